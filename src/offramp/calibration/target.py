"""Target-accuracy calibration: per-exit thresholds minimising expected cost (eq. 12) subject to
``accuracy ≥ final-exit accuracy − δ`` on the calibration split.

With few early exits the whole candidate grid is searched exactly (vectorised); beyond
``max_combinations`` coordinate descent from "never exit" takes over. Ties go to the higher
accuracy, then to the first combination in ``itertools.product`` order over the candidate lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
from torch import nn

from offramp.calibration.checks import check_confidence, check_delta
from offramp.calibration.grid import GridResult, prepare, search
from offramp.errors import ConfigError
from offramp.evaluation import ExitRecord
from offramp.policies import ThresholdPolicy, get_criterion

__all__ = ["ThresholdCalibrator", "lower_bound"]


def lower_bound(
    correct: np.ndarray, changed: np.ndarray, final_correct: int, n: int, z: float
) -> np.ndarray:
    """One-sided lower confidence bound of ``accuracy − final-exit accuracy`` per combination.

    The paired difference ``d_n ∈ {−1, 0, 1}`` has mean ``(correct − final_correct) / n`` and
    second moment ``changed / n``; the bound is ``mean − z · sqrt(var / n)`` (normal
    approximation). ``z = 0`` gives the plain difference.
    """
    mean = (correct - final_correct) / n
    var = np.maximum(changed / n - mean**2, 0.0)
    return mean - z * np.sqrt(var / n)


def _cheapest_reaching(
    grid: GridResult, cumulative: np.ndarray, n: int, final_correct: int, delta: float, z: float
) -> int:
    """Index of the cheapest combination whose accuracy difference to the final exit (or its
    lower confidence bound, ``z > 0``) is ≥ −δ; ties: more correct, then first in product
    order."""
    cost = grid.counts @ cumulative / n
    bound = lower_bound(grid.correct, grid.changed, final_correct, n, z)
    feasible = np.flatnonzero(bound >= -delta - 1e-12)
    if feasible.size == 0:
        best = float(bound.max())
        raise ConfigError(
            f"no thresholds keep the accuracy within {delta:.4f} of the final exit on this split "
            f"(the best {'bound ' if z else ''}is {best:+.4f}); a negative delta asks for more "
            "than the final exit: lower it" + (", or lower the confidence" if z else "")
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
        confidence: when set (e.g. 0.95), require the constraint with that one-sided
            confidence instead of only on average: the lower confidence bound of the paired
            accuracy difference to the final exit must be ≥ −δ (normal approximation). The
            cheapest thresholds that *just* meet a target on the calibration split tend to miss
            it on new data (they are selected for being lucky there); the bound buys that
            margin back.

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
        confidence: float | None = None,
    ) -> None:
        self.criterion = criterion
        self.confidence = confidence
        self.delta = delta
        self.num_candidates = num_candidates
        self.max_combinations = max_combinations
        self.scorers = scorers

    def _validate(self) -> None:
        get_criterion(self.criterion)
        check_delta(self.delta)
        check_confidence(self.confidence)
        if self.num_candidates < 1:
            raise ConfigError(f"num_candidates must be ≥ 1, got {self.num_candidates}")

    def fit(self, record: ExitRecord, cumulative: np.ndarray) -> ThresholdCalibrator:
        """Choose thresholds on ``record`` for exits costing ``cumulative`` (``C_i``, ``(E,)``)."""
        self._validate()
        p = prepare(record, self.criterion, self.scorers, cumulative)
        cumulative, scores, correct = p.cumulative, p.scores, p.correct
        n = record.num_samples
        cands = p.candidates(self.num_candidates)
        final_correct = int(correct[-1].sum())
        self.final_accuracy_ = final_correct / n
        z = 0.0 if self.confidence is None else float(NormalDist().inv_cdf(self.confidence))
        res = search(
            scores,
            correct,
            cands,
            p.lower_is_confident,
            lambda grid, _cur: _cheapest_reaching(
                grid, cumulative, n, final_correct, self.delta, z
            ),
            max_combinations=self.max_combinations,
        )
        choice, counts, right, self.method_ = res.choice, res.counts, res.correct, res.method
        self.thresholds_ = tuple(float(cands[i][j]) for i, j in enumerate(choice))
        self.policy_ = ThresholdPolicy(
            self.criterion, self.thresholds_, tuple(self.scorers) if self.scorers else None
        )
        self.accuracy_ = right / n
        self.expected_cost_ = float(counts @ cumulative / n)
        self.exit_fractions_ = counts / n
        return self
