"""Choose exit thresholds on held-out data.

:class:`ThresholdCalibrator` minimises the expected cost (eq. 12) subject to
``accuracy ≥ final-exit accuracy − δ`` over a grid of candidate thresholds per exit. With few
early exits the whole grid is searched exactly (vectorised); beyond ``max_combinations`` it
falls back to coordinate descent from "never exit". Ties go to the higher accuracy, then to the
first combination in ``itertools.product`` order over the candidate lists.

Candidates sit at midpoints between neighbouring distinct scores, so a chosen threshold is never
equal to any calibration sample's score and tiny numerical differences do not flip a decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from offramp.errors import ConfigError
from offramp.evaluation import ExitRecord
from offramp.policies import ThresholdPolicy, get_criterion

__all__ = [
    "GridResult",
    "ThresholdCalibrator",
    "candidate_thresholds",
    "evaluate_grid",
    "record_scores",
]


def record_scores(
    record: ExitRecord, criterion: str, scorers: Sequence[nn.Module] | None = None
) -> torch.Tensor:
    """Scores of every exit on ``record``, ``(E, N)``: the plain criterion, or per-exit
    ``scorers`` for the early exits (the final exit's row is never used to decide)."""
    if scorers is None:
        return record.scores(criterion)
    if len(scorers) != record.num_exits - 1:
        raise ConfigError(
            f"got {len(scorers)} scorers for {record.num_exits - 1} early exits; give one each"
        )
    with torch.no_grad():
        rows = [scorers[i](record.logits[i]) for i in range(record.num_exits - 1)]
    rows.append(torch.zeros_like(rows[0]) if rows else torch.zeros(record.num_samples))
    return torch.stack(rows).float()


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
    """

    counts: np.ndarray
    correct: np.ndarray


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
    for i in range(e - 1):
        fire = _fire_matrix(scores[i], candidates[i], lower_is_confident)  # (K, N)
        leave = alive[:, None, :] & fire[None, :, :]  # (M, K, N)
        m, k = leave.shape[:2]
        cnt = leave.sum(dim=2).numpy().reshape(m * k, 1)
        ok = (leave & correct[i][None, None, :]).sum(dim=2).numpy().reshape(m * k)
        counts = np.concatenate([np.repeat(counts, k, axis=0), cnt], axis=1)
        right = np.repeat(right, k) + ok
        alive = (alive[:, None, :] & ~fire[None, :, :]).reshape(m * k, n)
    counts = np.concatenate([counts, alive.sum(dim=1).numpy()[:, None]], axis=1)
    right = right + (alive & correct[-1][None, :]).sum(dim=1).numpy()
    return GridResult(counts=counts, correct=right)


def _best(grid: GridResult, cumulative: np.ndarray, n: int, min_acc: float) -> int:
    cost = grid.counts @ cumulative / n
    acc = grid.correct / n
    feasible = np.flatnonzero(acc >= min_acc - 1e-12)
    if feasible.size == 0:
        raise ConfigError(
            f"no thresholds reach accuracy {min_acc:.4f} on this split (the best reachable is "
            f"{acc.max():.4f}); a negative delta asks for more than the final exit: lower it"
        )
    # lexsort: last key is primary -> cost, then more correct, then first index
    order = np.lexsort((feasible, -grid.correct[feasible], cost[feasible]))
    return int(feasible[order[0]])


class ThresholdCalibrator:
    """Per-exit thresholds that minimise expected cost at bounded accuracy loss.

    Follows scikit-learn's estimator rules: the constructor only stores arguments, ``fit``
    returns ``self``, and learned values end with ``_``.

    Args:
        criterion: ``"entropy"`` or ``"max_prob"``.
        delta: allowed accuracy loss δ relative to the final exit on the fitting split; a small
            negative δ demands that much *more* than the final exit's accuracy there — a safety
            margin for the split the policy is applied to (raises ``ConfigError`` when no
            thresholds reach it; the coordinate-descent search starts from "never exit" and
            may miss such points, so keep exits × candidates within ``max_combinations``).
        num_candidates: quantile cut points per exit (plus "never" and "always").
        max_combinations: largest grid searched exhaustively; larger grids use coordinate
            descent.
        scorers: per-early-exit score modules used instead of the plain criterion (temperature
            scaling, learned confidence; :mod:`offramp.confidence`); ``criterion`` then only
            gives their direction.

    Attributes:
        policy_: the chosen :class:`ThresholdPolicy`.
        thresholds_: its thresholds.
        accuracy_: accuracy on the fitting split with those thresholds.
        final_accuracy_: final exit's accuracy on the fitting split.
        expected_cost_: expected cost (eq. 12, in the units of ``cumulative``).
        exit_fractions_: share of samples leaving at each exit.
        method_: ``"exhaustive"`` or ``"coordinate"``.

    Example:
        >>> import torch, numpy as np
        >>> logits = torch.tensor([[[4.0, 0.0], [0.1, 0.0]], [[4.0, 0.0], [0.0, 4.0]]])
        >>> rec = ExitRecord(logits, torch.tensor([0, 1]))
        >>> cal = ThresholdCalibrator(delta=0.0).fit(rec, np.array([1.0, 3.0]))
        >>> cal.exit_fractions_.tolist()
        [0.5, 0.5]
    """

    def __init__(
        self,
        criterion: str = "entropy",
        delta: float = 0.0,
        num_candidates: int = 50,
        max_combinations: int = 20_000,
        scorers: Sequence[nn.Module] | None = None,
    ) -> None:
        self.criterion = criterion
        self.delta = delta
        self.num_candidates = num_candidates
        self.max_combinations = max_combinations
        self.scorers = scorers

    def _validate(self) -> None:
        get_criterion(self.criterion)
        if not np.isfinite(self.delta) or not -1.0 < self.delta < 1.0:
            raise ConfigError(
                f"delta is the accuracy loss you accept, a finite number in (-1, 1), got "
                f"{self.delta}; use 0.0 to keep the final exit's accuracy, a small negative "
                "value for a safety margin above it"
            )
        if self.num_candidates < 1:
            raise ConfigError(f"num_candidates must be ≥ 1, got {self.num_candidates}")

    def fit(self, record: ExitRecord, cumulative: np.ndarray) -> ThresholdCalibrator:
        """Choose thresholds on ``record`` for exits costing ``cumulative`` (``C_i``, ``(E,)``)."""
        self._validate()
        cumulative = np.asarray(cumulative, dtype=np.float64)
        e, n = record.num_exits, record.num_samples
        if cumulative.shape != (e,):
            raise ConfigError(
                f"cumulative costs must have one value per exit ({e}), got shape "
                f"{cumulative.shape}; pass profile(net, x).cumulative"
            )
        crit = get_criterion(self.criterion)
        scores = record_scores(record, self.criterion, self.scorers)  # (E, N)
        correct = record.correct()  # (E, N)
        cands = [
            candidate_thresholds(scores[i].numpy(), self.num_candidates, crit.lower_is_confident)
            for i in range(e - 1)
        ]
        self.final_accuracy_ = float(correct[-1].double().mean())
        min_acc = self.final_accuracy_ - self.delta
        size = int(np.prod([len(c) for c in cands])) if cands else 1
        if size <= self.max_combinations:
            self.method_ = "exhaustive"
            grid = evaluate_grid(scores, correct, cands, crit.lower_is_confident)
            best = _best(grid, cumulative, n, min_acc)
            combo = np.unravel_index(best, [len(c) for c in cands]) if cands else ()
            choice = [int(j) for j in combo]
            counts, right = grid.counts[best], int(grid.correct[best])
        else:
            self.method_ = "coordinate"
            choice, counts, right = self._coordinate(
                scores, correct, cands, cumulative, min_acc, crit.lower_is_confident
            )
        self.thresholds_ = tuple(float(cands[i][j]) for i, j in enumerate(choice))
        self.policy_ = ThresholdPolicy(
            self.criterion, self.thresholds_, tuple(self.scorers) if self.scorers else None
        )
        self.accuracy_ = right / n
        self.expected_cost_ = float(counts @ cumulative / n)
        self.exit_fractions_ = counts / n
        return self

    @staticmethod
    def _coordinate(scores, correct, cands, cumulative, min_acc, lower):
        n = scores.shape[1]
        choice = [0] * len(cands)  # index 0 is "never" for every exit: always feasible
        for _sweep in range(20):
            changed = False
            for i in range(len(cands)):
                grid = evaluate_grid(scores, correct, _fixed(cands, choice, i), lower)
                b = _best(grid, cumulative, n, min_acc)  # the current choice is a candidate
                changed |= b != choice[i]
                choice[i] = b
            if not changed:
                break
        grid = evaluate_grid(scores, correct, _fixed(cands, choice, None), lower)
        return choice, grid.counts[0], int(grid.correct[0])


def _fixed(cands: list[np.ndarray], choice: list[int], free: int | None) -> list[np.ndarray]:
    """Candidate lists with every exit but ``free`` pinned to its chosen threshold."""
    return [c if i == free else c[[j]] for i, (c, j) in enumerate(zip(cands, choice, strict=True))]
