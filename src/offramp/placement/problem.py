"""What placement decides on: candidate exits, their costs, and a record of how they behave.

A **candidate set** is a network carrying a head at every block boundary where an exit could
go (plus the final exit). A **placement** is a subset of the candidates; the final exit is
always in it. Candidate ``j`` sits after block ``blocks[j]``; in subset ``s`` (a bit mask over
candidates, bit ``K − 1`` = the final exit, always set) the cost of exit ``j`` is

    C_j(s) = C(f_1) + … + C(f_{blocks[j]}) + Σ_{i ∈ s, i ≤ j} C(c_i)

(blocks up to the exit plus every head of the subset on the way; DESIGN.md, "Cost"), and the
reference is the plain backbone, ``Σ_k C(f_k) + C(c_final)``.

Each subset is evaluated under one threshold ``τ`` shared by its exits on one criterion (the
single-threshold policy of Baccarelli et al. 2020): a sample leaves at the first exit of the
subset whose score is confident at ``τ``. :func:`evaluate_subsets` does this for many subsets
and thresholds at once: samples are grouped by the set of candidates that would fire for them
(a bit mask), so the work is ``thresholds × subsets × distinct masks``, not ``× samples``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from offramp.calibration.grid import candidate_thresholds
from offramp.costs import CostProfile
from offramp.errors import ConfigError
from offramp.evaluation import ExitRecord
from offramp.policies import exit_scores, get_criterion

__all__ = [
    "Candidates",
    "OperatingPoint",
    "PlacementRecord",
    "evaluate_subsets",
    "operating_points",
    "subset_mask",
]

_CHUNK = 256  # subsets evaluated together (bounds memory at chunk × distinct masks)


@dataclass(frozen=True)
class Candidates:
    """Costs of the blocks and of every candidate head.

    Attributes:
        blocks: block index of each candidate exit, increasing; the last is the final exit on
            the last block.
        block_costs: cost of every block ``C(f_k)``, ``(L,)``.
        head_costs: cost of every candidate head ``C(c_j)``, ``(K,)``.
        unit: what the costs measure (``"flops"`` or ``"seconds"``), for reports.

    Example:
        >>> c = Candidates((0, 1, 2), np.array([1.0, 1.0, 2.0]), np.array([0.1, 0.1, 0.5]))
        >>> c.cumulative(subset_mask([0], 3)).tolist()  # exit 0 and the final exit
        [1.1, 2.1, 4.6]
    """

    blocks: tuple[int, ...]
    block_costs: np.ndarray
    head_costs: np.ndarray
    unit: str = "flops"

    def __post_init__(self) -> None:
        b = np.asarray(self.blocks)
        bc = np.asarray(self.block_costs, dtype=np.float64)
        hc = np.asarray(self.head_costs, dtype=np.float64)
        if len(b) < 1 or len(hc) != len(b):
            raise ConfigError(
                f"need one head cost per candidate: {len(b)} candidates, {len(hc)} head costs"
            )
        if np.any(np.diff(b) <= 0) or b[-1] != len(bc) - 1:
            raise ConfigError(
                f"candidate blocks must increase and end at the last block ({len(bc) - 1}), "
                f"got {list(self.blocks)}"
            )
        if (
            np.any(bc < 0)
            or np.any(hc < 0)
            or not (np.isfinite(bc).all() and np.isfinite(hc).all())
        ):
            raise ConfigError("block and head costs must be finite and non-negative")
        if len(b) > 63:
            raise ConfigError(f"at most 63 candidates fit a bit mask, got {len(b)}")
        object.__setattr__(self, "block_costs", bc)
        object.__setattr__(self, "head_costs", hc)

    @classmethod
    def from_profile(cls, prof: CostProfile) -> Candidates:
        """FLOPs of a network whose exits are the candidates (:func:`offramp.costs.profile`)."""
        return cls(
            tuple(prof.exit_blocks), np.asarray(prof.block_flops), np.asarray(prof.head_flops)
        )

    @property
    def num(self) -> int:
        """Number of candidates ``K`` (the final exit included)."""
        return len(self.blocks)

    @property
    def full_cost(self) -> float:
        """The plain backbone: every block and the final head."""
        return float(self.block_costs.sum() + self.head_costs[-1])

    @property
    def depth_fraction(self) -> np.ndarray:
        """Share of the backbone's block cost done when each candidate is reached, ``(K,)``."""
        prefix = np.cumsum(self.block_costs)
        return prefix[list(self.blocks)] / prefix[-1]

    def cumulative(self, subset: int) -> np.ndarray:
        """``C_j(s)`` for every candidate ``j`` under subset mask ``s`` (meaningful for the
        members of ``s``), ``(K,)``."""
        return self.cumulative_many(np.array([subset], dtype=np.int64))[0]

    def cumulative_many(self, subsets: np.ndarray) -> np.ndarray:
        """``C_j(s)`` for many subset masks, ``(S,) -> (S, K)``."""
        k = self.num
        member = (subsets[:, None] >> np.arange(k)[None, :]) & 1  # (S, K)
        heads = np.cumsum(member * self.head_costs[None, :], axis=1)
        prefix = np.cumsum(self.block_costs)[list(self.blocks)]
        return prefix[None, :] + heads


def subset_mask(early: Sequence[int], num: int) -> int:
    """Bit mask of the early candidates ``early`` (indices into the candidates) plus the final
    exit, for ``num`` candidates.

    Example:
        >>> bin(subset_mask([0, 2], 4))
        '0b1101'
    """
    mask = 1 << (num - 1)
    for j in early:
        if not 0 <= int(j) < num - 1:
            raise ConfigError(f"early candidate index {j} out of range 0 … {num - 2}")
        mask |= 1 << int(j)
    return mask


@dataclass(frozen=True)
class PlacementRecord:
    """Scores and correctness of every candidate on one split, with the shared thresholds.

    Attributes:
        scores: ``(K, N)`` criterion score of every candidate exit.
        correct: ``(K, N)`` whether each candidate exit is right.
        thresholds: shared thresholds ``τ`` to try, from "never leave" to "always leave".
        lower_is_confident: the criterion's direction.
    """

    scores: torch.Tensor
    correct: torch.Tensor
    thresholds: np.ndarray
    lower_is_confident: bool

    @classmethod
    def from_exit_record(
        cls,
        record: ExitRecord,
        criterion: str = "max_prob",
        *,
        num_thresholds: int = 64,
        thresholds: np.ndarray | None = None,
    ) -> PlacementRecord:
        """Score ``record`` (an :class:`~offramp.evaluation.ExitRecord` of the candidate
        network) with ``criterion``; thresholds at ``num_thresholds`` quantiles of the pooled
        early-exit scores unless given (pass the calibration split's to a test split)."""
        lower = get_criterion(criterion).lower_is_confident
        scores = exit_scores(record.logits, criterion)
        if thresholds is None:
            early = scores[:-1].reshape(-1).double().numpy()  # (K-1, N) -> (K-1 · N,)
            thresholds = candidate_thresholds(early, num_thresholds, lower)
        return cls(scores, record.correct(), np.asarray(thresholds, dtype=np.float64), lower)

    @property
    def num_samples(self) -> int:
        return int(self.scores.shape[1])

    @cached_property
    def _early_scores(self) -> np.ndarray:
        return self.scores[:-1].double().numpy()  # (K-1, N), converted once for every τ

    def fires(self, tau: float) -> np.ndarray:
        """``(K − 1, N)``: which early candidates are confident at ``tau``."""
        s = self._early_scores
        return s < tau if self.lower_is_confident else s > tau

    def exits(self, subset: int, tau: float) -> np.ndarray:
        """Candidate index each sample leaves at under ``subset`` and ``tau``, ``(N,)``."""
        k = self.scores.shape[0]
        if k == 1:  # only the final exit
            return np.zeros(self.num_samples, dtype=np.int64)
        member = np.array([(subset >> j) & 1 for j in range(k - 1)], dtype=bool)
        f = self.fires(tau) & member[:, None]
        first = np.argmax(f, axis=0)
        return np.where(f.any(axis=0), first, k - 1)


def evaluate_subsets(
    cands: Candidates, record: PlacementRecord, subsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Expected cost and accuracy of every subset at every threshold of ``record``.

    Args:
        cands: candidate costs.
        record: scores and correctness of the candidates on one split.
        subsets: subset masks ``(S,)`` (the final bit is added when missing).

    Returns:
        ``(cost, accuracy)``, each ``(S, T)``: cost relative to the plain backbone, accuracy as
        a fraction, for the ``T`` thresholds of ``record``.
    """
    k = cands.num
    if record.scores.shape[0] != k:
        raise ConfigError(
            f"the record has {record.scores.shape[0]} exits but there are {k} candidates"
        )
    subsets = np.asarray(subsets, dtype=np.int64) | (1 << (k - 1))
    n = record.num_samples
    cum = cands.cumulative_many(subsets) / cands.full_cost  # (S, K)
    correct = record.correct.numpy().astype(np.float64)  # (K, N)
    weights = (1 << np.arange(k - 1, dtype=np.int64))[:, None]  # (K-1, 1)
    cost = np.empty((len(subsets), len(record.thresholds)))
    acc = np.empty_like(cost)
    for t, tau in enumerate(record.thresholds):
        masks = (record.fires(tau) * weights).sum(axis=0) | (1 << (k - 1))  # (N,)
        uniq, inv = np.unique(masks, return_inverse=True)
        counts = np.bincount(inv, minlength=len(uniq)).astype(np.float64)  # (U,)
        right = np.stack([np.bincount(inv, correct[j], len(uniq)) for j in range(k)], 1)
        cols = np.arange(len(uniq))[None, :]
        for lo in range(0, len(subsets), _CHUNK):
            s = subsets[lo : lo + _CHUNK]
            both = s[:, None] & uniq[None, :]  # (S, U): candidates in the subset that fire
            first = np.log2(both & -both).astype(np.int64)  # lowest set bit = exit taken
            cost[lo : lo + _CHUNK, t] = np.take_along_axis(cum[lo : lo + _CHUNK], first, 1) @ counts
            acc[lo : lo + _CHUNK, t] = right[cols, first].sum(axis=1)
    return cost / n, acc / n


@dataclass(frozen=True)
class OperatingPoint:
    """The cheapest threshold of one subset that meets the accuracy target on its split.

    Attributes:
        subset: the subset mask.
        threshold: the shared ``τ``.
        cost: expected cost relative to the plain backbone.
        accuracy: accuracy at ``τ``.
    """

    subset: int
    threshold: float
    cost: float
    accuracy: float


def operating_points(
    cands: Candidates, record: PlacementRecord, subsets: np.ndarray, delta: float
) -> list[OperatingPoint]:
    """For each subset, the threshold with the lowest expected cost whose accuracy is at least
    the final exit's minus ``delta`` (a fraction) on ``record``; "never leave early" always
    qualifies, so every subset has one."""
    if not 0 <= delta < 1:
        raise ConfigError(f"delta is an accuracy drop in [0, 1), got {delta}")
    cost, acc = evaluate_subsets(cands, record, subsets)
    final = float(record.correct[-1].double().mean())
    ok = acc >= final - delta - 1e-12
    masked = np.where(ok, cost, np.inf)
    best = masked.argmin(axis=1)
    rows = np.arange(len(subsets))
    full = np.asarray(subsets, dtype=np.int64) | (1 << (cands.num - 1))
    return [
        OperatingPoint(int(s), float(record.thresholds[b]), float(cost[r, b]), float(acc[r, b]))
        for r, s, b in zip(rows, full, best, strict=True)
    ]
