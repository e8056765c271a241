"""Placement rules (survey §4): which candidate exits to keep.

Every rule returns a subset mask over the candidates (:mod:`offramp.placement.problem`); the
final exit is always kept. The rules:

- ``all``: every candidate.
- ``flops_spacing``: one exit at each of a list of fractions of the backbone's cost (SDN: 15,
  30, 45, 60, 75 and 90 %), the candidate nearest each fraction.
- ``eq4``: start from every candidate and prune exits that do not pay (eq. 4, :func:`pays`),
  one at a time — the worst first, re-evaluating the others after each removal, since an exit
  that paid alone may stop paying once others take its samples.
- ``eq5_greedy``: the greedy walk of Baccarelli et al. (2020) with a compression ratio and an
  accuracy bound (:func:`greedy`).
- ``exhaustive``: every subset (≤ 12 candidates), the one with the lowest expected cost at the
  accuracy target, on the calibration record.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np

from offramp.errors import ConfigError
from offramp.placement.problem import (
    Candidates,
    OperatingPoint,
    PlacementRecord,
    operating_points,
    subset_mask,
)

__all__ = [
    "MAX_EXHAUSTIVE",
    "SDN_FRACTIONS",
    "exhaustive",
    "flops_spacing",
    "greedy",
    "members",
    "pays",
    "prune",
]

#: Where SDN (Kaya et al. 2019) puts its six exits, as fractions of the backbone's FLOPs.
SDN_FRACTIONS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)
#: Largest number of early candidates searched exhaustively (2^12 subsets).
MAX_EXHAUSTIVE = 12


def members(subset: int, num: int) -> list[int]:
    """Early candidates in a subset mask (the final exit left out).

    Example:
        >>> members(0b1101, 4)
        [0, 2]
    """
    return [j for j in range(num - 1) if (subset >> j) & 1]


def pays(reach: float, leave: float, head_cost: float, final_cost: float, exit_cost: float) -> bool:
    """Eq. 4: exit ``i`` pays when ``r_i · C(c_i) < γ_i · (C_L − C_i)`` — its head, paid by
    every sample that reaches it (fraction ``r_i``), costs less than what the samples leaving
    there (fraction ``γ_i``) save against running to the final exit.

    Example:
        >>> pays(1.0, 0.5, head_cost=1.0, final_cost=10.0, exit_cost=4.0)  # 1 < 0.5 · 6
        True
        >>> pays(1.0, 0.1, head_cost=1.0, final_cost=10.0, exit_cost=4.0)  # 1 > 0.1 · 6
        False
    """
    return reach * head_cost < leave * (final_cost - exit_cost)


def _margins(cands: Candidates, record: PlacementRecord, point: OperatingPoint) -> dict[int, float]:
    """``γ_i (C_L − C_i) − r_i C(c_i)`` of every early exit of the subset at its threshold."""
    exits = record.exits(point.subset, point.threshold)
    cum = cands.cumulative(point.subset)
    n = len(exits)
    out = {}
    for j in members(point.subset, cands.num):
        reach = float((exits >= j).sum()) / n
        leave = float((exits == j).sum()) / n
        out[j] = leave * (cum[-1] - cum[j]) - reach * cands.head_costs[j]
    return out


def prune(
    cands: Candidates, record: PlacementRecord, delta: float, start: int | None = None
) -> tuple[OperatingPoint, list[dict[str, object]]]:
    """Eq. 4 pruning: from ``start`` (default: every candidate), calibrate the shared
    threshold for the accuracy target, drop the early exit that pays least if any does not
    pay, and repeat until every exit left pays.

    Returns:
        The final operating point and the trace of removals (``removed``, ``margin``).
    """
    k = cands.num
    subset = (1 << k) - 1 if start is None else start | (1 << (k - 1))
    trace: list[dict[str, object]] = []
    while True:
        point = operating_points(cands, record, np.array([subset]), delta)[0]
        margins = _margins(cands, record, point)
        losing = {j: m for j, m in margins.items() if not m > 0}
        if not losing:
            return point, trace
        worst = min(losing, key=lambda j: losing[j])
        trace.append({"removed": worst, "margin": losing[worst]})
        subset &= ~(1 << worst)


def greedy(
    cands: Candidates,
    accuracy: Sequence[float],
    *,
    max_ratio: float = 0.05,
    min_accuracy_ratio: float = 0.9,
    min_gain: float = 0.005,
) -> int:
    """Eq. 5, the greedy walk (Baccarelli et al. 2020), from the input to the output.

    Candidate ``i`` is kept when all three hold:

    1. its compression ratio ``ρ_i = C(c_i) / C(f_{b_i+1} … f_L)`` — head cost over the block
       cost still ahead — is at most ``max_ratio`` (the head is cheap next to what leaving
       there saves);
    2. its accuracy on the calibration split is at least ``min_accuracy_ratio`` times the final
       exit's (it is good enough to leave at);
    3. it beats the last exit kept before it by at least ``min_gain`` (the walk adds an exit
       only where accuracy has grown since the previous one).

    Args:
        cands: candidate costs.
        accuracy: accuracy of every candidate (final last) on the calibration split.
        max_ratio: bound on ``ρ_i``.
        min_accuracy_ratio: bound on accuracy relative to the final exit's.
        min_gain: accuracy (fraction) a new exit must add over the previous kept one.

    Returns:
        The subset mask.
    """
    k = cands.num
    if len(accuracy) != k:
        raise ConfigError(f"need the accuracy of all {k} candidates, got {len(accuracy)}")
    if max_ratio < 0 or not 0 <= min_accuracy_ratio <= 1 or min_gain < 0:
        raise ConfigError(
            "greedy placement needs max_ratio ≥ 0, 0 ≤ min_accuracy_ratio ≤ 1 and min_gain ≥ 0; "
            f"got {max_ratio}, {min_accuracy_ratio}, {min_gain}"
        )
    ahead = cands.block_costs[::-1].cumsum()[::-1]  # ahead[k] = C(f_k) + … + C(f_L)
    keep: list[int] = []
    last = 0.0
    for j in range(k - 1):
        b = cands.blocks[j]
        rest = float(ahead[b + 1])
        ratio = cands.head_costs[j] / rest if rest > 0 else np.inf
        acc = float(accuracy[j])
        if (
            ratio <= max_ratio
            and acc >= min_accuracy_ratio * accuracy[-1]
            and acc >= last + min_gain
        ):
            keep.append(j)
            last = acc
    return subset_mask(keep, k)


def flops_spacing(cands: Candidates, fractions: Sequence[float] = SDN_FRACTIONS) -> int:
    """The candidate nearest each fraction of the backbone's block cost (SDN spacing);
    duplicates collapse, so fewer exits than fractions may come back.

    Example:
        >>> c = Candidates((0, 1, 2, 3), np.ones(4), np.zeros(4))
        >>> members(flops_spacing(c, (0.25, 0.5)), 4)
        [0, 1]
    """
    depth = cands.depth_fraction[:-1]
    if len(depth) == 0:
        return subset_mask([], cands.num)
    chosen = {int(np.argmin(np.abs(depth - f))) for f in fractions}
    return subset_mask(sorted(chosen), cands.num)


def exhaustive(
    cands: Candidates, record: PlacementRecord, delta: float, size: int | None = None
) -> OperatingPoint:
    """The subset with the lowest expected cost at the accuracy target, over every subset of
    the early candidates (or every subset of ``size`` of them).

    Raises:
        ConfigError: with more than :data:`MAX_EXHAUSTIVE` early candidates.
    """
    e = cands.num - 1
    if e > MAX_EXHAUSTIVE:
        raise ConfigError(
            f"exhaustive search covers at most {MAX_EXHAUSTIVE} early candidates (2^"
            f"{MAX_EXHAUSTIVE} subsets), got {e}; use the greedy or eq. 4 rule, or fewer "
            "candidates"
        )
    if size is None:
        subsets = np.arange(1 << e, dtype=np.int64)
    else:
        subsets = np.array(
            [subset_mask(c, cands.num) for c in combinations(range(e), size)], dtype=np.int64
        )
    points = operating_points(cands, record, subsets, delta)
    return min(points, key=lambda p: (p.cost, -p.accuracy, bin(p.subset).count("1")))
