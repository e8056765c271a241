"""Calibrate every policy family on one split and report them on another.

Families: thresholds on entropy, max-prob and margin — plain, and on temperature-scaled logits
(temperatures fitted on the calibration split) — learned confidence, one shared threshold by
error feedback, and patience (the cheapest ``k`` meeting the goal on the calibration split).
The goal is either a target accuracy (``delta``: loss allowed relative to the final exit) or a
cost budget (``budget``: fraction of the full network's cost). Every family is fitted on the
calibration record only; :func:`report_on_test` then measures each on the test record:
accuracy, drop relative to the final exit, relative expected cost, share of the oracle's saving
captured, and whether the goal still holds there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from torch import nn

from offramp.analysis import oracle_saving_captured, oracle_summary
from offramp.calibration.budget import BudgetCalibrator
from offramp.calibration.checks import (
    check_budget,
    check_confidence,
    check_cumulative,
    check_delta,
    check_record,
)
from offramp.calibration.single import SingleThresholdCalibrator
from offramp.calibration.target import ThresholdCalibrator, lower_bound
from offramp.confidence import fit_learned_confidence, fit_temperatures, temperature_scorers
from offramp.errors import ConfigError
from offramp.evaluation import ExitRecord
from offramp.policies import ExitPolicy, PatiencePolicy, decide_from_logits

__all__ = ["CalibratedPolicy", "calibrate_policies", "report_on_test"]

CRITERIA = ("entropy", "max_prob", "margin")


@dataclass
class CalibratedPolicy:
    """A policy chosen on the calibration split, with what it reached there.

    Attributes:
        name: family name (``entropy``, ``max_prob+T``, ``learned``, ``patience`` …).
        policy: the policy.
        val_accuracy: accuracy on the calibration split.
        val_cost: relative expected cost on the calibration split.
        seconds: time its calibration took.
        val_bound: lower confidence bound of its accuracy minus the final exit's on the
            calibration split (the plain difference without a confidence level).
    """

    name: str
    policy: ExitPolicy
    val_accuracy: float
    val_cost: float
    seconds: float
    val_bound: float = 0.0


def _check_goal(delta: float | None, budget: float | None) -> None:
    """``ConfigError`` unless exactly one goal is given and it is valid (NaN never is)."""
    if (delta is None) == (budget is None):
        raise ConfigError(
            f"give exactly one goal: delta (target accuracy) or budget (cost), got delta={delta}, "
            f"budget={budget}"
        )
    if delta is not None:
        check_delta(delta)
    else:
        check_budget(budget)


def _evaluate(policy: ExitPolicy, record: ExitRecord, rel: np.ndarray) -> tuple[float, float]:
    exits = decide_from_logits(policy, record.logits, record.feature_scores).numpy()
    return record.accuracy(exits), float(rel[exits].mean())


def calibrate_policies(
    val: ExitRecord,
    cumulative: np.ndarray,
    *,
    delta: float | None = None,
    budget: float | None = None,
    confidence: float | None = None,
    feature_scorers: Sequence[nn.Module] | None = None,
) -> list[CalibratedPolicy]:
    """Fit every family on ``val`` for one goal: ``delta`` (target accuracy) or ``budget``.

    With ``feature_scorers`` (the gates of a gated run, one per early exit; ``val`` collected
    with them) the family ``gates`` thresholds their scores too.

    With ``confidence`` (target accuracy only) the per-exit threshold families require the
    goal at that one-sided confidence (:class:`ThresholdCalibrator`), and every family's
    ``val_bound`` is the lower confidence bound, so choosing among them stays consistent.
    """
    _check_goal(delta, budget)
    check_confidence(confidence)
    rel = check_cumulative(cumulative, val.num_exits)
    rel = rel / rel[-1]
    check_record(val, stacklevel=3)
    correct = val.correct()  # (E, N), once for every family
    n, final_n = val.num_samples, int(correct[-1].sum())
    final = final_n / n
    z = 0.0 if confidence is None else float(NormalDist().inv_cdf(confidence))
    out: list[CalibratedPolicy] = []

    def add(name: str, make: Any) -> None:
        t0 = time.perf_counter()
        try:
            policy = make()
        except ConfigError:  # the goal is out of this family's reach on val
            return
        secs = time.perf_counter() - t0
        exits = decide_from_logits(policy, val.logits, val.feature_scores)
        acc, cost = val.accuracy(exits.numpy()), float(rel[exits.numpy()].mean())
        right = correct.gather(0, exits[None])[0]
        changed = int((right != correct[-1]).sum())
        bound = float(
            lower_bound(np.array([int(right.sum())]), np.array([changed]), final_n, n, z)[0]
        )
        out.append(CalibratedPolicy(name, policy, acc, cost, secs, bound))

    t0 = time.perf_counter()
    temps = fit_temperatures(val)
    learned = fit_learned_confidence(val)
    fit_secs = time.perf_counter() - t0
    families: list[tuple[str, str, Any]] = [(c, c, None) for c in CRITERIA]
    families += [(f"{c}+T", c, temperature_scorers(c, temps)) for c in CRITERIA]
    families.append(("learned", "learned", learned))
    if feature_scorers is not None:
        families.append(("gates", "learned", tuple(feature_scorers)))
    for name, crit, sc in families:
        if delta is not None:
            add(
                name,
                lambda c=crit, s=sc: (
                    ThresholdCalibrator(c, delta, scorers=s, confidence=confidence)
                    .fit(val, rel)
                    .policy_
                ),
            )
        else:
            add(
                name,
                lambda c=crit, s=sc: BudgetCalibrator(c, budget, scorers=s).fit(val, rel).policy_,
            )
    if delta is not None:
        add(
            "single-τ entropy",
            lambda: SingleThresholdCalibrator("entropy", delta).fit(val, rel).policy_,
        )

    def patience() -> ExitPolicy:
        e = val.num_exits
        best = None
        for k in range(1, e):
            pol = PatiencePolicy(e, k)
            acc, cost = _evaluate(pol, val, rel)
            ok = acc >= final - delta - 1e-12 if delta is not None else cost <= budget + 1e-12  # type: ignore[operator]
            if ok and (best is None or cost < best[1]):
                best = (pol, cost)
        if best is None:
            raise ConfigError("no patience meets the goal")
        return best[0]

    add("patience", patience)
    for p in out:  # fitting temperatures / learned confidence is part of those families' cost
        if p.name.endswith("+T") or p.name == "learned":
            p.seconds += fit_secs
    return out


def report_on_test(
    policies: list[CalibratedPolicy],
    test: ExitRecord,
    cumulative: np.ndarray,
    *,
    delta: float | None = None,
    budget: float | None = None,
) -> dict[str, Any]:
    """Every calibrated policy measured on ``test``, with the oracle for reference."""
    _check_goal(delta, budget)
    rel = check_cumulative(cumulative, test.num_exits)
    rel = rel / rel[-1]
    final = float(test.correct()[-1].double().mean())
    oracle = oracle_summary(test, rel)
    rows = []
    for p in policies:
        acc, cost = _evaluate(p.policy, test, rel)
        held = acc >= final - delta - 1e-12 if delta is not None else cost <= budget + 1e-12  # type: ignore[operator]
        rows.append(
            {
                "policy": p.name,
                "description": p.policy.to_dict(),  # type: ignore[attr-defined]
                "val_accuracy": p.val_accuracy,
                "val_relative_cost": p.val_cost,
                "val_bound": p.val_bound,
                "test_accuracy": acc,
                "accuracy_drop_pp": 100 * (final - acc),
                "relative_cost": cost,
                "oracle_saving_captured": oracle_saving_captured(cost, oracle["relative_cost"]),
                "goal_held_on_test": bool(held),
                "calibration_seconds": p.seconds,
            }
        )
    return {
        "goal": {"delta": delta} if delta is not None else {"budget": budget},
        "final_exit_accuracy": final,
        "oracle": oracle,
        "policies": rows,
    }
