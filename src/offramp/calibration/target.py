"""Target-accuracy calibration: per-exit thresholds minimising expected cost (eq. 12) subject to
``accuracy ≥ final-exit accuracy − δ`` on the calibration split.

With few early exits the whole candidate grid is searched exactly (vectorised); beyond
``max_combinations`` coordinate descent from "never exit" takes over. Ties go to the higher
accuracy, then to the first combination in ``itertools.product`` order over the candidate lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from offramp.calibration.grid import GridResult, candidate_thresholds, record_scores, search
from offramp.errors import ConfigError
from offramp.evaluation import ExitRecord
from offramp.policies import ThresholdPolicy, get_criterion

__all__ = ["ThresholdCalibrator"]


def _cheapest_reaching(grid: GridResult, cumulative: np.ndarray, n: int, min_acc: float) -> int:
    """Index of the cheapest combination with accuracy ≥ ``min_acc`` (ties: more correct, then
    first in product order)."""
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
        res = search(
            scores,
            correct,
            cands,
            crit.lower_is_confident,
            lambda grid, _cur: _cheapest_reaching(grid, cumulative, n, min_acc),
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
