"""The threshold grid every calibrator searches, vectorised over samples and combinations.

Candidates per early exit sit at midpoints between neighbouring distinct scores ("never" first,
"always" last), so a chosen threshold never equals a calibration sample's score and tiny
numerical differences do not flip a decision. :func:`evaluate_grid` counts, for every
combination of candidates, how many samples leave at each exit and how many are right;
:func:`search` picks the combination a selection rule prefers — over the whole grid when it is
small enough, else by coordinate descent (one exit at a time, the others pinned).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from offramp.calibration.checks import check_cumulative, check_record
from offramp.errors import ConfigError
from offramp.evaluation import ExitRecord
from offramp.policies import exit_scores, get_criterion

__all__ = [
    "GridResult",
    "Problem",
    "SearchResult",
    "candidate_thresholds",
    "evaluate_grid",
    "prepare",
    "record_scores",
    "search",
]


def record_scores(
    record: ExitRecord, criterion: str, scorers: Sequence[nn.Module] | None = None
) -> torch.Tensor:
    """Scores of every exit on ``record``, ``(E, N)`` (:func:`offramp.policies.exit_scores`);
    scorers of exit features (gates) read the record's ``feature_scores``."""
    if scorers is not None and any(getattr(s, "on_features", False) for s in scorers):
        if record.feature_scores is None:
            raise ConfigError(
                "the scorers score exit features (gates): collect the record with "
                "ExitRecord.collect(net, data, feature_scorers=scorers)"
            )
        fs = record.feature_scores
        return torch.cat([fs, fs.new_zeros(1, fs.shape[1])]).float()  # final row unused
    return exit_scores(record.logits, criterion, scorers)


@dataclass(frozen=True)
class Problem:
    """What every calibrator starts from: costs, scores and correctness of every exit.

    Attributes:
        cumulative: ``C_i`` of every exit, ``(E,)`` float64.
        scores: ``(E, N)`` scores (criterion or per-exit scorers).
        correct: ``(E, N)`` whether each exit is right.
        lower_is_confident: the criterion's direction.
    """

    cumulative: np.ndarray
    scores: torch.Tensor
    correct: torch.Tensor
    lower_is_confident: bool

    def candidates(self, num: int) -> list[np.ndarray]:
        """Candidate thresholds of every early exit (:func:`candidate_thresholds`)."""
        return [
            candidate_thresholds(s.numpy(), num, self.lower_is_confident) for s in self.scores[:-1]
        ]


def prepare(
    record: ExitRecord,
    criterion: str,
    scorers: Sequence[nn.Module] | None,
    cumulative: np.ndarray,
) -> Problem:
    """Check ``cumulative`` against ``record`` and the record's size (no samples refused, one
    warned about; :mod:`offramp.calibration.checks`), then score every exit once."""
    cum = check_cumulative(cumulative, record.num_exits)
    check_record(record)
    return Problem(
        cum,
        record_scores(record, criterion, scorers),
        record.correct(),
        get_criterion(criterion).lower_is_confident,
    )


def candidate_thresholds(scores: np.ndarray, num: int, lower_is_confident: bool) -> np.ndarray:
    """Candidate thresholds for one exit: "never", up to ``num`` quantile cuts, "always".

    Cuts are midpoints between neighbouring distinct score values, taken at evenly spaced
    quantiles, sorted from the least to the most permissive.

    Example:
        >>> candidate_thresholds(np.array([0.1, 0.2, 0.4]), 10, True).tolist()
        [-inf, 0.15000000000000002, 0.30000000000000004, inf]
    """
    u = np.unique(np.asarray(scores, dtype=np.float64))
    u = u[np.isfinite(u)]
    mids = (u[:-1] + u[1:]) / 2
    if len(mids) > num:
        pick = np.unique(np.round(np.linspace(0, len(mids) - 1, num)).astype(np.int64))
        mids = mids[pick]
    if not lower_is_confident:
        mids = mids[::-1]
    never, always = (-np.inf, np.inf) if lower_is_confident else (np.inf, -np.inf)
    return np.concatenate([[never], mids, [always]])


@dataclass(frozen=True)
class GridResult:
    """Exit counts and correct counts of every threshold combination of a grid.

    Attributes:
        counts: ``(M, E)`` samples leaving at each exit, per combination.
        correct: ``(M,)`` correct predictions per combination.
        changed: ``(M,)`` samples whose correctness differs from the final exit's (right where
            it is wrong, or wrong where it is right) — the spread of the paired accuracy
            difference, for confidence bounds.
    """

    counts: np.ndarray
    correct: np.ndarray
    changed: np.ndarray


def _fire_matrix(scores: torch.Tensor, cands: np.ndarray, lower: bool) -> torch.Tensor:
    s = scores.double()[None, :]  # (1, N)
    t = torch.as_tensor(cands, dtype=torch.float64)[:, None]  # (K, 1)
    return s < t if lower else s > t  # (K, N)


def evaluate_grid(
    scores: torch.Tensor,
    correct: torch.Tensor,
    candidates: list[np.ndarray],
    lower_is_confident: bool,
) -> GridResult:
    """Evaluate every combination of candidate thresholds (product order, last exit fastest).

    Args:
        scores: ``(E, N)`` scores of every exit.
        correct: ``(E, N)`` whether each exit is right.
        candidates: ``E − 1`` arrays of thresholds.
        lower_is_confident: criterion direction.
    """
    e, n = scores.shape
    alive = torch.ones(1, n, dtype=torch.bool)  # (M, N): still running, per combination
    counts = np.zeros((1, 0), dtype=np.int64)
    right = np.zeros(1, dtype=np.int64)
    changed = np.zeros(1, dtype=np.int64)
    for i in range(e - 1):
        fire = _fire_matrix(scores[i], candidates[i], lower_is_confident)  # (K, N)
        leave = alive[:, None, :] & fire[None, :, :]  # (M, K, N)
        m, k = leave.shape[:2]
        cnt = leave.sum(dim=2).numpy().reshape(m * k, 1)
        ok = (leave & correct[i][None, None, :]).sum(dim=2).numpy().reshape(m * k)
        counts = np.concatenate([np.repeat(counts, k, axis=0), cnt], axis=1)
        right = np.repeat(right, k) + ok
        diff = (leave & (correct[i] != correct[-1])[None, None, :]).sum(dim=2).numpy()
        changed = np.repeat(changed, k) + diff.reshape(m * k)
        alive = (alive[:, None, :] & ~fire[None, :, :]).reshape(m * k, n)
    counts = np.concatenate([counts, alive.sum(dim=1).numpy()[:, None]], axis=1)
    right = right + (alive & correct[-1][None, :]).sum(dim=1).numpy()
    return GridResult(counts=counts, correct=right, changed=changed)


def _fixed(cands: list[np.ndarray], choice: list[int], free: int | None) -> list[np.ndarray]:
    """Candidate lists with every exit but ``free`` pinned to its chosen threshold."""
    return [c if i == free else c[[j]] for i, (c, j) in enumerate(zip(cands, choice, strict=True))]


#: ``select(grid, current) -> index`` of the preferred combination of ``grid`` (raises
#: ``ConfigError`` when none is acceptable); ``current`` is the index of the incumbent, if any.
Select = Callable[[GridResult, int | None], int]


@dataclass(frozen=True)
class SearchResult:
    """The chosen combination: candidate index per early exit, exit counts, correct count."""

    choice: list[int]
    counts: np.ndarray
    correct: int
    method: str


def search(
    scores: torch.Tensor,
    correct: torch.Tensor,
    candidates: list[np.ndarray],
    lower_is_confident: bool,
    select: Select,
    *,
    start: list[int] | None = None,
    max_combinations: int = 20_000,
    max_sweeps: int = 20,
) -> SearchResult:
    """The combination of candidate thresholds that ``select`` prefers.

    Exhaustive when the grid has at most ``max_combinations`` points; otherwise coordinate
    descent from ``start`` (default: "never" at every exit), re-optimising one exit at a time
    with the others pinned until a full sweep changes nothing (at most ``max_sweeps``). Each
    step's grid includes the incumbent, so the objective never gets worse.
    """
    sizes = [len(c) for c in candidates]
    if int(np.prod(sizes)) <= max_combinations:
        grid = evaluate_grid(scores, correct, candidates, lower_is_confident)
        best = select(grid, None)
        choice = [int(j) for j in np.unravel_index(best, sizes)] if candidates else []
        return SearchResult(choice, grid.counts[best], int(grid.correct[best]), "exhaustive")
    choice = list(start) if start is not None else [0] * len(candidates)
    for _sweep in range(max_sweeps):
        changed = False
        for i in range(len(candidates)):
            grid = evaluate_grid(scores, correct, _fixed(candidates, choice, i), lower_is_confident)
            b = select(grid, choice[i])
            changed |= b != choice[i]
            choice[i] = b
        if not changed:
            break
    grid = evaluate_grid(scores, correct, _fixed(candidates, choice, None), lower_is_confident)
    return SearchResult(choice, grid.counts[0], int(grid.correct[0]), "coordinate")
