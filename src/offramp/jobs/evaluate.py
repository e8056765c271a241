"""``offramp evaluate RUN_DIR`` and ``offramp calibrate RUN_DIR``: analyse a trained run.

A run directory is what ``offramp train`` writes (``model.pt``, ``config.json``). Both commands
rebuild the network and its data splits, collect one :class:`~offramp.evaluation.ExitRecord` on
the validation split (for fitting) and one on the test split (for reporting), and write their
results under ``RUN_DIR/analysis/``:

- ``evaluate``: per-exit accuracy, the oracle, overthinking, per-exit ECE before/after
  temperature scaling, and the accuracy–cost Pareto front (JSON + plot);
- ``calibrate``: every policy family calibrated on validation for a target accuracy drop or a
  cost budget, measured on test (JSON + plot), with the oracle's saving captured by each.

Runs trained with strategy ``gated`` or ``cost`` saved their gates in ``model.pt``: both records
then carry the gates' scores, and the gates are one more policy family (``gates``).

Costs are FLOPs (``torch.utils.flop_counter``) or measured latency per exit (``--cost latency``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from torch import nn

from offramp.analysis import calibration_table, oracle_summary, overthinking
from offramp.calibration import calibrate_policies, pareto_front, report_on_test
from offramp.calibration.checks import check_budget, check_confidence, check_delta
from offramp.confidence import fit_learned_confidence, fit_temperatures, temperature_scorers
from offramp.costs import COSTS, cumulative_costs
from offramp.errors import ConfigError, DataError
from offramp.evaluation import ExitRecord, record_splits
from offramp.files import write_json
from offramp.report import format_table, plot_policies

__all__ = [
    "LoadedRun",
    "calibrate_run",
    "check_goal",
    "describe_goal",
    "evaluate_run",
    "format_calibration",
    "format_evaluation",
    "load_run",
]


#: Where the tables' columns are explained at length.
DOCS = "docs/policies.md"

#: Confidence bins of the expected calibration error ``offramp evaluate`` reports.
ECE_BINS = 15


class LoadedRun(NamedTuple):
    """A trained run, ready to analyse.

    Attributes:
        val: the exit record of the validation split (for fitting).
        test: the exit record of the test split (for reporting).
        cumulative: cost ``C_i`` of reaching every exit (FLOPs or seconds per sample).
        info: what was loaded, for the JSON output.
        gates: the gates of a ``gated`` / ``cost`` run as exit scorers (both records then
            carry their ``feature_scores``), else ``None``.
    """

    val: ExitRecord
    test: ExitRecord
    cumulative: np.ndarray
    info: dict[str, Any]
    gates: tuple[nn.Module, ...] | None


def load_run(run_dir: str | Path, *, cost: str = "flops") -> LoadedRun:
    """The records, costs and (for gated runs) gates of a run written by ``offramp train``."""
    from offramp.jobs.train import load_config, load_datasets, load_model_and_gates

    run = Path(run_dir)
    for f in ("model.pt", "config.json"):
        if not (run / f).is_file():
            raise DataError(f"{run} has no {f}: is it a directory written by `offramp train`?")
    cfg = load_config(run / "config.json")
    net, gates = load_model_and_gates(run / "model.pt")
    data = load_datasets(cfg)
    if len(data.val[1]) == 0:
        raise ConfigError(
            f"{run} was trained with val_fraction 0: there is no held-out split to fit on; "
            "retrain with val_fraction > 0"
        )
    if cost not in COSTS:
        raise ConfigError(f"unknown cost {cost!r}; choose one of {list(COSTS)}")
    val, test = record_splits(net, data.val, data.test, feature_scorers=gates)
    cum = cumulative_costs(net, data.test[0][:256], cost)
    info = {
        "run_dir": str(run),
        "cost": cost,
        "cumulative": np.asarray(cum).tolist(),
        "gates": gates is not None,
    }
    return LoadedRun(val, test, np.asarray(cum, dtype=np.float64), info, gates)


def evaluate_run(run_dir: str | Path, *, cost: str = "flops", plot: bool = True) -> dict[str, Any]:
    """Everything :mod:`offramp.analysis` says about the run, written to ``analysis/``."""
    val, test, cum, info, gates = load_run(run_dir, cost=cost)
    temps = fit_temperatures(val)
    scorers = {
        "entropy+T": ("entropy", temperature_scorers("entropy", temps)),
        "learned": ("learned", fit_learned_confidence(val)),
    }
    if gates is not None:
        scorers["gates"] = ("learned", gates)
    front = pareto_front(test, cum, scorers=scorers)
    result = {
        **info,
        "exit_accuracy": test.exit_accuracy().tolist(),
        "oracle": oracle_summary(test, cum),
        "overthinking": overthinking(test),
        "calibration": calibration_table(val, test, bins=ECE_BINS, temperatures=temps),
        "pareto": front.to_dict(),
    }
    out = Path(run_dir) / "analysis"
    result["json"] = str(write_json(out / "evaluate.json", result))
    if plot:
        result["plot"] = str(front.plot(out / "pareto.png", title="test split"))
    return result


def calibrate_run(
    run_dir: str | Path,
    *,
    target_drop_pp: float | None = None,
    budget: float | None = None,
    confidence: float | None = None,
    cost: str = "flops",
    plot: bool = True,
) -> dict[str, Any]:
    """Every policy family calibrated on validation for the goal, reported on test
    (``confidence``: require a target accuracy at that one-sided confidence)."""
    delta = check_goal(target_drop_pp, budget, confidence)
    val, test, cum, info, gates = load_run(run_dir, cost=cost)
    policies = calibrate_policies(
        val, cum, delta=delta, budget=budget, confidence=confidence, feature_scorers=gates
    )
    result = {**info, **report_on_test(policies, test, cum, delta=delta, budget=budget)}
    if confidence is not None:  # what `offramp export` needs to fit the same thresholds again
        result["goal"]["confidence"] = confidence
    out = Path(run_dir) / "analysis"
    result["json"] = str(write_json(out / "calibrate.json", result))
    if plot:
        result["plot"] = str(plot_policies(result, out / "calibrate.png"))
    return result


def check_goal(
    target_drop_pp: float | None, budget: float | None, confidence: float | None
) -> float | None:
    """The goal of ``offramp calibrate`` checked in the units of its flags, before any work:
    ``--target-drop`` in ``[0, 100)`` percentage points, ``--budget`` in ``(0, 1]``,
    ``--confidence`` in ``[0.5, 1)`` (NaN never). Returns the target drop as a fraction
    (``delta``), ``None`` for a budget.

    Example:
        >>> check_goal(0.5, None, 0.95)
        0.005
    """
    if (target_drop_pp is None) == (budget is None):
        raise ConfigError("give exactly one of --target-drop (percentage points) or --budget")
    delta = None
    if target_drop_pp is not None:
        drop = target_drop_pp if isinstance(target_drop_pp, (int, float)) else math.nan
        if not 0 <= drop < 100:  # NaN fails the comparison too
            raise ConfigError(
                f"--target-drop is the accuracy drop you accept against the final exit, in "
                f"percentage points in [0, 100), got {target_drop_pp}; e.g. 0.5 for half a "
                "point, 0 to keep the final exit's accuracy"
            )
        delta = check_delta(drop / 100)
    else:
        try:
            check_budget(budget)
        except ConfigError:
            raise ConfigError(
                f"--budget is the expected cost you allow as a fraction of the full network's, "
                f"in (0, 1], got {budget}; e.g. 0.5 for half the cost"
            ) from None
    try:
        check_confidence(confidence)
    except ConfigError:
        raise ConfigError(
            f"--confidence is the one-sided confidence level of the accuracy goal, in [0.5, 1), "
            f"got {confidence}; e.g. 0.95, or leave it out for the plain accuracy"
        ) from None
    return delta


def format_evaluation(r: dict[str, Any]) -> str:
    """The evaluation as a text table with a legend of its columns."""
    cal = {row["exit"]: row for row in r["calibration"]["exits"]}
    ot = r["overthinking"]
    rows = [
        [
            i,
            f"{acc:.4f}",
            f"{r['cumulative'][i] / r['cumulative'][-1]:.3f}",
            f"{ot['to_final'][i]:.4f}" if i < len(r["exit_accuracy"]) - 1 else "-",
            f"{cal[i]['temperature']:.3f}",
            f"{cal[i]['ece_before']:.4f}",
            f"{cal[i]['ece_after']:.4f}",
        ]
        for i, acc in enumerate(r["exit_accuracy"])
    ]
    head = ["exit", "accuracy", "C_i / C_L", "overthink→final", "T", "ECE", "ECE after T"]
    o = r["oracle"]
    lines = [
        format_table(head, rows),
        "",
        "  accuracy: on the test split; C_i / C_L: cost of reaching the exit, relative to the "
        "full network",
        "  overthink→final: share of test samples this exit gets right and the final exit wrong",
        "  T: temperature fitted on validation (the exit's logits are divided by T)",
        f"  ECE: expected calibration error on test ({ECE_BINS} bins); ECE after T: the same with "
        "the logits divided by T",
        f"  see {DOCS} (Analysis)",
        "",
        f"oracle (earliest right exit): accuracy {o['accuracy']:.4f} at relative cost "
        f"{o['relative_cost']:.3f}; final exit {ot['final_accuracy']:.4f}",
        f"Pareto front: {len(r['pareto']['front'])} points of {len(r['pareto']['points'])}",
        f"written to {r['json']}" + (f" and {r['plot']}" if "plot" in r else ""),
    ]
    return "\n".join(lines)


def describe_goal(goal: dict[str, float]) -> str:
    """The goal of a calibration in the units of ``offramp calibrate``'s flags.

    Example:
        >>> describe_goal({"delta": 0.005})
        'accuracy drop ≤ 0.5 pp against the final exit'
        >>> describe_goal({"budget": 0.25})
        "expected cost ≤ 0.25 of the full network's"
    """
    if "delta" in goal:
        return f"accuracy drop ≤ {100 * goal['delta']:.6g} pp against the final exit"
    return f"expected cost ≤ {goal['budget']:.6g} of the full network's"


def _change(drop_pp: float) -> str:
    """A policy's accuracy against the final exit's, signed and named: ``+0.12 gain``,
    ``-0.30 drop`` (``accuracy_drop_pp`` is positive for a drop)."""
    change = round(-drop_pp, 2)
    if change > 0:
        return f"+{change:.2f} gain"
    if change < 0:
        return f"{change:.2f} drop"
    return "±0.00"


def format_calibration(r: dict[str, Any]) -> str:
    """The calibration report as a text table with a legend of its columns."""
    head = [
        "policy",
        "val acc",
        "test acc",
        "change pp",
        "cost",
        "share of oracle saving",
        "goal held",
    ]
    rows = [
        [
            p["policy"],
            f"{p['val_accuracy']:.4f}",
            f"{p['test_accuracy']:.4f}",
            _change(p["accuracy_drop_pp"]),
            f"{p['relative_cost']:.3f}",
            f"{p['oracle_saving_captured']:.3f}",
            "yes" if p["goal_held_on_test"] else "no",
        ]
        for p in r["policies"]
    ]
    o = r["oracle"]
    return "\n".join(
        [
            f"goal: {describe_goal(r['goal'])}, calibrated on validation; final exit accuracy "
            f"on test {r['final_exit_accuracy']:.4f}; oracle {o['accuracy']:.4f} at cost "
            f"{o['relative_cost']:.3f} ({r['cost']})",
            format_table(head, rows),
            "",
            "  change pp: test accuracy minus the final exit's, percentage points (gain: above "
            "it, drop: below)",
            "  cost: expected cost on test relative to the full network (1: every sample runs "
            "to the final exit)",
            "  share of oracle saving: (1 − cost) / (1 − oracle cost), the part of the oracle's "
            "cost saving this policy achieves;",
            "    > 1: it saves more than the oracle, which is possible only at lower accuracy",
            "  goal held: whether the goal met on validation also holds on test",
            f"  see {DOCS} (Calibration, Analysis)",
            "",
            f"written to {r['json']}" + (f" and {r['plot']}" if "plot" in r else ""),
        ]
    )
