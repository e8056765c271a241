"""What a record says about a multi-exit network: the oracle bound, overthinking, calibration.

- **Oracle** (the physical limit of early exiting): each sample leaves at the earliest exit that
  is right (exit 0 when none is). :func:`oracle_saving_captured` is the share of the oracle's
  cost saving that a policy achieves: ``(C_L − C̄_policy) / (C_L − C̄_oracle)``.
- **Overthinking** (Kaya et al. 2019): samples an earlier exit gets right and a later exit gets
  wrong. :func:`overthinking` gives the share for every exit pair ``i < j``; the accuracy of the
  "earliest right" ensemble (right if any exit is) bounds what exiting can reach.
- **Calibration**: per-exit expected calibration error before and after temperature scaling,
  temperatures fitted on one split and ECE reported on another.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from offramp.confidence import expected_calibration_error, fit_temperatures
from offramp.errors import ConfigError
from offramp.evaluation import ExitRecord

__all__ = ["calibration_table", "oracle_saving_captured", "oracle_summary", "overthinking"]


def oracle_saving_captured(policy_cost: float, oracle_cost: float, full_cost: float = 1.0) -> float:
    """``(C_L − policy) / (C_L − oracle)``: 1 = all of the oracle's saving, 0 = none.

    Example:
        >>> oracle_saving_captured(0.625, 0.5)  # saves 0.375 of the oracle's 0.5
        0.75
    """
    room = full_cost - oracle_cost
    if room <= 0:
        return 1.0 if policy_cost <= full_cost else 0.0
    return (full_cost - policy_cost) / room


def oracle_summary(record: ExitRecord, cumulative: np.ndarray) -> dict[str, Any]:
    """The oracle's accuracy (= the earliest-right ensemble), relative cost and exit shares."""
    rel = np.asarray(cumulative, dtype=np.float64)
    rel = rel / rel[-1]
    exits = record.oracle_exits()
    return {
        "accuracy": float(record.correct().any(dim=0).double().mean()),
        "relative_cost": float(rel[exits].mean()),
        "exit_fractions": (np.bincount(exits, minlength=record.num_exits) / exits.size).tolist(),
    }


def overthinking(record: ExitRecord) -> dict[str, Any]:
    """Overthinking shares per exit pair, and the earliest-right ensemble's accuracy.

    Returns:
        ``pairs``: ``(E, E)`` list, entry ``[i][j]`` (``i < j``) = share of samples right at
        exit ``i`` and wrong at exit ``j`` (0 elsewhere); ``to_final``: ``[i][E−1]`` per exit;
        ``earliest_right_accuracy``; ``final_accuracy``.

    Example:
        >>> import torch
        >>> rec = ExitRecord(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]), torch.tensor([0]))
        >>> overthinking(rec)["pairs"]
        [[0.0, 1.0], [0.0, 0.0]]
    """
    c = record.correct().double()  # (E, N)
    pairs = (c[:, None, :] * (1 - c[None, :, :])).mean(dim=2)  # (E, E): right at i, wrong at j
    pairs = torch.triu(pairs, diagonal=1)
    return {
        "pairs": pairs.tolist(),
        "to_final": pairs[:, -1].tolist(),
        "earliest_right_accuracy": float(c.amax(dim=0).mean()),
        "final_accuracy": float(c[-1].mean()),
    }


def calibration_table(
    fit_on: ExitRecord,
    report_on: ExitRecord,
    bins: int = 15,
    temperatures: list[float] | None = None,
) -> dict[str, Any]:
    """Per-exit temperatures fitted on ``fit_on`` (or given, already fitted there) and ECE on
    ``report_on`` before and after."""
    if fit_on.num_exits != report_on.num_exits:
        raise ConfigError("the two records come from networks with different numbers of exits")
    temps = fit_temperatures(fit_on) if temperatures is None else list(temperatures)
    rows = []
    for i, t in enumerate(temps):
        z, y = report_on.logits[i], report_on.labels
        rows.append(
            {
                "exit": i,
                "temperature": t,
                "ece_before": expected_calibration_error(z, y, bins),
                "ece_after": expected_calibration_error(z / t, y, bins),
            }
        )
    return {"temperatures": temps, "exits": rows}
