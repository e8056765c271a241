"""Budget calibration: per-exit thresholds maximising accuracy subject to expected cost ≤ B.

The cost is whatever ``cumulative`` holds — FLOPs from :func:`offramp.costs.profile`, or
measured per-exit latency — and the budget ``B`` is a fraction of the full network's cost
(``cumulative[-1]``). Same candidate grid and search as target-accuracy calibration; coordinate
descent starts from "everyone leaves at the first exit", the cheapest policy there is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from offramp.calibration.checks import check_budget
from offramp.calibration.grid import GridResult, prepare, search
from offramp.errors import ConfigError
from offramp.evaluation import ExitRecord
from offramp.policies import ThresholdPolicy

__all__ = ["BudgetCalibrator"]


def _most_accurate_within(grid: GridResult, cumulative: np.ndarray, n: int, limit: float) -> int:
    """Index of the most accurate combination with expected cost ≤ ``limit`` (ties: cheaper,
    then first in product order)."""
    cost = grid.counts @ cumulative / n
    feasible = np.flatnonzero(cost <= limit * (1 + 1e-12))
    if feasible.size == 0:
        raise ConfigError(
            f"no thresholds keep the expected cost within {limit:.4g} (the cheapest is "
            f"{cost.min():.4g}: everyone leaving at the first exit); raise the budget"
        )
    order = np.lexsort((feasible, cost[feasible], -grid.correct[feasible]))
    return int(feasible[order[0]])


class BudgetCalibrator:
    """Per-exit thresholds with the highest accuracy at expected cost ≤ ``budget · C_L``.

    Follows scikit-learn's estimator rules: the constructor only stores arguments, ``fit``
    returns ``self``, learned values end with ``_``.

    Args:
        criterion: criterion name (its direction, when ``scorers`` are given).
        budget: allowed expected cost as a fraction of the full network's, in ``(0, 1]``.
        num_candidates: quantile cut points per exit (plus "never" and "always").
        max_combinations: largest grid searched exhaustively.
        scorers: per-early-exit score modules (temperature scaling, learned confidence).

    Attributes:
        policy_, thresholds_, accuracy_, expected_cost_ (in ``cumulative``'s units),
        relative_cost_, exit_fractions_, method_.

    Example:
        >>> import torch, numpy as np
        >>> from offramp import ExitRecord
        >>> logits = torch.tensor([[[4.0, 0.0], [0.1, 0.0]], [[4.0, 0.0], [0.0, 4.0]]])
        >>> rec = ExitRecord(logits, torch.tensor([0, 1]))
        >>> cal = BudgetCalibrator("max_prob", budget=0.75).fit(rec, np.array([1.0, 2.0]))
        >>> cal.accuracy_, cal.relative_cost_
        (1.0, 0.75)
    """

    def __init__(
        self,
        criterion: str = "entropy",
        budget: float = 0.5,
        num_candidates: int = 50,
        max_combinations: int = 20_000,
        scorers: Sequence[nn.Module] | None = None,
    ) -> None:
        self.criterion = criterion
        self.budget = budget
        self.num_candidates = num_candidates
        self.max_combinations = max_combinations
        self.scorers = scorers

    def fit(self, record: ExitRecord, cumulative: np.ndarray) -> BudgetCalibrator:
        """Choose thresholds on ``record`` for exits costing ``cumulative`` (``(E,)``)."""
        check_budget(self.budget)
        p = prepare(record, self.criterion, self.scorers, cumulative)
        cumulative, n = p.cumulative, record.num_samples
        cands = p.candidates(self.num_candidates)
        limit = self.budget * cumulative[-1]
        res = search(
            p.scores,
            p.correct,
            cands,
            p.lower_is_confident,
            lambda grid, _cur: _most_accurate_within(grid, cumulative, n, limit),
            start=[len(c) - 1 for c in cands],  # "always" at exit 0: the cheapest start
            max_combinations=self.max_combinations,
        )
        self.method_ = res.method
        self.thresholds_ = tuple(float(cands[i][j]) for i, j in enumerate(res.choice))
        self.policy_ = ThresholdPolicy(
            self.criterion, self.thresholds_, tuple(self.scorers) if self.scorers else None
        )
        self.accuracy_ = res.correct / n
        self.expected_cost_ = float(res.counts @ cumulative / n)
        self.relative_cost_ = self.expected_cost_ / float(cumulative[-1])
        self.exit_fractions_ = res.counts / n
        return self
