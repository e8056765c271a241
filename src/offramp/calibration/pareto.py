"""The accuracy–cost Pareto front over policies and thresholds.

Points come from every criterion given (plain or with per-exit scorers): a sweep of one shared
threshold over quantiles of the scores, and per-exit thresholds calibrated for a range of
accuracy targets (δ from 0 to 10 pp below the final exit); plus patience (PABEE) for every
``k``, and the two trivial policies (everyone at the first exit, everyone at the final one). The
front is the non-dominated subset: sorted by cost, each point strictly more accurate than every
cheaper one. Export it with :meth:`ParetoFront.to_dict` and plot it with :meth:`ParetoFront.plot`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from offramp.analysis import oracle_summary
from offramp.calibration.checks import check_cumulative, check_delta
from offramp.calibration.grid import record_scores
from offramp.calibration.target import ThresholdCalibrator
from offramp.evaluation import ExitRecord
from offramp.policies import ExitPolicy, PatiencePolicy, ThresholdPolicy, decide_from_logits

__all__ = ["ParetoFront", "ParetoPoint", "non_dominated", "pareto_front"]

DELTAS = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1)


@dataclass(frozen=True)
class ParetoPoint:
    """One policy's accuracy and relative expected cost on the record."""

    label: str
    accuracy: float
    relative_cost: float
    policy: ExitPolicy = field(compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "accuracy": self.accuracy,
            "relative_cost": self.relative_cost,
            "policy": self.policy.to_dict(),  # type: ignore[attr-defined]
        }


def non_dominated(points: Sequence[ParetoPoint]) -> list[ParetoPoint]:
    """The points no other point beats on both accuracy and cost, by increasing cost.

    Example:
        >>> p = ThresholdPolicy.never(2)
        >>> pts = [ParetoPoint("a", 0.9, 0.5, p), ParetoPoint("b", 0.8, 0.6, p),
        ...        ParetoPoint("c", 0.95, 1.0, p)]
        >>> [q.label for q in non_dominated(pts)]
        ['a', 'c']
    """
    front: list[ParetoPoint] = []
    for p in sorted(points, key=lambda q: (q.relative_cost, -q.accuracy)):
        if not front or p.accuracy > front[-1].accuracy:
            front.append(p)
    return front


@dataclass
class ParetoFront:
    """Every evaluated point and the non-dominated front."""

    points: list[ParetoPoint]
    front: list[ParetoPoint]
    oracle: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "front": [p.to_dict() for p in self.front],
            "points": [p.to_dict() for p in self.points],
            "oracle": {"accuracy": self.oracle[0], "relative_cost": self.oracle[1]},
        }

    def plot(self, path: str | Path, title: str = "accuracy–cost") -> Path:
        """Write the points, the front and the oracle as a PNG (needs matplotlib; see
        :func:`offramp.report.plot_pareto`)."""
        from offramp.report import plot_pareto

        return plot_pareto(
            [(p.relative_cost, p.accuracy) for p in self.points],
            [(p.relative_cost, p.accuracy) for p in self.front],
            (self.oracle[1], self.oracle[0]),
            path,
            title,
        )


def _point(
    record: ExitRecord,
    rel: np.ndarray,
    label: str,
    policy: ExitPolicy,
    exits: np.ndarray | None = None,
) -> ParetoPoint:
    """``policy`` measured on ``record`` (``exits`` when already decided)."""
    if exits is None:
        exits = decide_from_logits(policy, record.logits, record.feature_scores).numpy()
    return ParetoPoint(label, record.accuracy(exits), float(rel[exits].mean()), policy)


def pareto_front(
    record: ExitRecord,
    cumulative: np.ndarray,
    *,
    criteria: Sequence[str] = ("entropy", "max_prob", "margin"),
    scorers: dict[str, tuple[str, Sequence[nn.Module]]] | None = None,
    num_sweep: int = 40,
    deltas: Sequence[float] = DELTAS,
) -> ParetoFront:
    """Accuracy and relative expected cost of many policies on ``record``, and their front.

    Args:
        record: the split to evaluate on.
        cumulative: ``C_i`` of every exit (FLOPs or latency).
        criteria: plain criteria to include.
        scorers: named scorer sets, ``{label: (criterion, per-exit scorers)}`` (e.g.
            temperature-scaled entropy, learned confidence).
        num_sweep: shared-threshold values per criterion.
        deltas: accuracy targets of the per-exit calibrations.
    """
    rel = check_cumulative(cumulative, record.num_exits)
    rel = rel / rel[-1]
    for d in deltas:
        check_delta(d)
    e = record.num_exits
    sets: list[tuple[str, str, Sequence[nn.Module] | None]] = [(c, c, None) for c in criteria]
    sets += [(label, c, sc) for label, (c, sc) in (scorers or {}).items()]
    points: list[ParetoPoint] = []
    for label, crit_name, sc in sets:
        scores = record_scores(record, crit_name, sc)  # scored once for the whole sweep
        qs = np.quantile(scores[:-1].double().numpy(), np.linspace(0, 1, num_sweep))
        for t in np.unique(qs):
            pol = ThresholdPolicy(crit_name, (float(t),) * (e - 1), tuple(sc) if sc else None)
            exits = pol.decide(scores).numpy()
            points.append(_point(record, rel, f"{label} τ={t:.4g}", pol, exits))
        for d in deltas:
            cal = ThresholdCalibrator(crit_name, d, scorers=sc).fit(record, rel)
            points.append(_point(record, rel, f"{label} δ={100 * d:g}pp", cal.policy_))
    for k in range(1, e):
        points.append(_point(record, rel, f"patience {k}", PatiencePolicy(e, k)))
    never = ThresholdPolicy.never(e)
    first = ThresholdPolicy("entropy", (float("inf"),) * (e - 1))
    points += [_point(record, rel, "final exit", never), _point(record, rel, "first exit", first)]
    o = oracle_summary(record, rel)
    return ParetoFront(points, non_dominated(points), (o["accuracy"], o["relative_cost"]))
