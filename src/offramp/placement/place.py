"""Run every placement rule on one candidate set and report each recommendation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from offramp.errors import ConfigError
from offramp.evaluation import ExitRecord
from offramp.placement.problem import Candidates, OperatingPoint, PlacementRecord, operating_points
from offramp.placement.rules import (
    MAX_EXHAUSTIVE,
    SDN_FRACTIONS,
    exhaustive,
    flops_spacing,
    greedy,
    members,
    prune,
)

__all__ = ["RULES", "Placement", "place", "placement_table"]

log = logging.getLogger(__name__)

RULES = ("all", "flops_spacing", "eq4", "eq5_greedy", "exhaustive")


@dataclass(frozen=True)
class Placement:
    """One rule's recommendation and what it is predicted to cost.

    Attributes:
        rule: the rule's name (one of :data:`RULES`).
        exits: block indices of the early exits kept (the final exit is always there).
        candidates: the same exits as candidate indices.
        threshold: the shared threshold calibrated for the accuracy target.
        val_cost: expected cost relative to the plain backbone, calibration split.
        val_accuracy: accuracy on the calibration split.
        cost: expected cost on the evaluation split (the calibration split when none given).
        accuracy: accuracy on the evaluation split.
        exit_fractions: share of the evaluation samples leaving at each kept exit (final last).
        details: rule-specific facts (eq. 4's removals, the greedy rule's bounds).
    """

    rule: str
    exits: list[int]
    candidates: list[int]
    threshold: float
    val_cost: float
    val_accuracy: float
    cost: float
    accuracy: float
    exit_fractions: list[float]
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["expected_cost"] = d["cost"]  # the name the benchmark contract reads
        return d


def place(
    cands: Candidates,
    val: ExitRecord,
    test: ExitRecord | None = None,
    *,
    criterion: str = "max_prob",
    delta: float = 0.005,
    rules: Sequence[str] = RULES,
    fractions: Sequence[float] = SDN_FRACTIONS,
    max_ratio: float = 0.05,
    min_accuracy_ratio: float = 0.9,
    min_gain: float = 0.005,
    num_thresholds: int = 64,
) -> list[Placement]:
    """Recommend exits under every rule, each calibrated on ``val`` for the same target.

    Args:
        cands: costs of the blocks and candidate heads (FLOPs or seconds).
        val: record of the candidate network on the calibration split.
        test: record on an evaluation split; each recommendation is reported there at its
            calibrated threshold.
        criterion: confidence criterion of the shared-threshold policy.
        delta: allowed accuracy drop against the final exit, a fraction (0.005 = 0.5 pp).
        rules: which rules to run, from :data:`RULES`.
        fractions: cost fractions of the ``flops_spacing`` rule (SDN's by default).
        max_ratio, min_accuracy_ratio, min_gain: the greedy rule's bounds
            (:func:`~offramp.placement.rules.greedy`).
        num_thresholds: thresholds tried per subset.

    Returns:
        One :class:`Placement` per rule, in the order asked.

    Example:
        >>> import torch
        >>> from offramp.evaluation import ExitRecord
        >>> g = torch.Generator().manual_seed(0)
        >>> rec = ExitRecord(torch.randn(3, 50, 4, generator=g), torch.randint(0, 4, (50,)))
        >>> cands = Candidates((0, 1, 2), np.ones(3), np.full(3, 0.1))
        >>> [p.rule for p in place(cands, rec, rules=("all", "exhaustive"))]
        ['all', 'exhaustive']
    """
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ConfigError(f"unknown placement rules {unknown}; choose from {list(RULES)}")
    for name, rec in (("val", val), ("test", test)):
        if rec is not None and rec.num_exits != cands.num:
            raise ConfigError(
                f"the {name} record has {rec.num_exits} exits but there are {cands.num} "
                "candidates: record the network that carries a head at every candidate"
            )
    rec = PlacementRecord.from_exit_record(val, criterion, num_thresholds=num_thresholds)
    # the split each recommendation is reported on, scored once for every rule
    ev = (
        rec
        if test is None
        else PlacementRecord.from_exit_record(test, criterion, thresholds=rec.thresholds)
    )
    k = cands.num
    out = []
    for rule in rules:
        details: dict[str, object] = {}
        if rule == "all":
            point = _point(cands, rec, (1 << k) - 1, delta)
        elif rule == "flops_spacing":
            details["fractions"] = list(fractions)
            point = _point(cands, rec, flops_spacing(cands, fractions), delta)
        elif rule == "eq4":
            point, trace = prune(cands, rec, delta)
            details["removed"] = [
                {"block": cands.blocks[int(t["removed"])], "margin": t["margin"]} for t in trace
            ]
        elif rule == "eq5_greedy":
            details.update(
                max_ratio=max_ratio, min_accuracy_ratio=min_accuracy_ratio, min_gain=min_gain
            )
            acc = val.exit_accuracy().tolist()
            mask = greedy(
                cands,
                acc,
                max_ratio=max_ratio,
                min_accuracy_ratio=min_accuracy_ratio,
                min_gain=min_gain,
            )
            point = _point(cands, rec, mask, delta)
        else:
            if k - 1 > MAX_EXHAUSTIVE:
                log.warning(
                    "exhaustive placement skipped: %d early candidates, at most %d are searched "
                    "(2^%d subsets); pass fewer candidates or rely on the other rules",
                    k - 1,
                    MAX_EXHAUSTIVE,
                    MAX_EXHAUSTIVE,
                )
                continue
            point = exhaustive(cands, rec, delta)
        out.append(_report(rule, cands, ev, point, details))
    return out


def _point(cands: Candidates, rec: PlacementRecord, subset: int, delta: float) -> OperatingPoint:
    return operating_points(cands, rec, np.array([subset]), delta)[0]


def _report(
    rule: str,
    cands: Candidates,
    ev: PlacementRecord,
    point: OperatingPoint,
    details: dict[str, object],
) -> Placement:
    """``point`` (calibrated on validation) measured on the evaluation record ``ev``."""
    early = members(point.subset, cands.num)
    exits = ev.exits(point.subset, point.threshold)
    cum = cands.cumulative(point.subset) / cands.full_cost
    correct = ev.correct.numpy()[exits, np.arange(len(exits))]
    kept = [*early, cands.num - 1]
    return Placement(
        rule=rule,
        exits=[cands.blocks[j] for j in early],
        candidates=early,
        threshold=point.threshold,
        val_cost=point.cost,
        val_accuracy=point.accuracy,
        cost=float(cum[exits].mean()),
        accuracy=float(correct.mean()),
        exit_fractions=[float((exits == j).mean()) for j in kept],
        details=details,
    )


def placement_table(placements: Sequence[Placement], final_accuracy: float) -> str:
    """A text table of the recommendations: exits, predicted cost and accuracy."""
    from offramp.report import format_table

    rows = [
        [
            p.rule,
            ",".join(str(b) for b in p.exits) or "—",
            f"{p.val_cost:.3f}",
            f"{p.cost:.3f}",
            f"{100 * p.accuracy:.2f}",
            f"{100 * (final_accuracy - p.accuracy):+.2f}",
        ]
        for p in placements
    ]
    head = ["rule", "exits (blocks)", "cost (val)", "cost", "accuracy %", "drop pp"]
    return format_table(head, rows)
