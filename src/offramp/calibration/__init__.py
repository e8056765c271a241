"""Choose how the exits decide, on held-out data (scikit-learn estimator conventions).

- :class:`ThresholdCalibrator` — target accuracy: cheapest per-exit thresholds with accuracy ≥
  final exit − δ;
- :class:`BudgetCalibrator` — most accurate per-exit thresholds at expected cost ≤ B;
- :class:`SingleThresholdCalibrator` — one τ for every exit, by error feedback (Baccarelli);
- :func:`pareto_front` — the accuracy–cost front over policies and thresholds;
- :func:`calibrate_policies` / :func:`report_on_test` — every family fitted on one split,
  measured on another.

All of them work on an :class:`~offramp.evaluation.ExitRecord` and a cost vector ``C_i`` (FLOPs
or measured latency), and accept per-exit scorers (temperature scaling, learned confidence).
"""

from offramp.calibration.budget import BudgetCalibrator
from offramp.calibration.grid import (
    GridResult,
    candidate_thresholds,
    evaluate_grid,
    record_scores,
    search,
)
from offramp.calibration.pareto import ParetoFront, ParetoPoint, non_dominated, pareto_front
from offramp.calibration.single import SingleThresholdCalibrator
from offramp.calibration.suite import CalibratedPolicy, calibrate_policies, report_on_test
from offramp.calibration.target import ThresholdCalibrator

__all__ = [
    "BudgetCalibrator",
    "CalibratedPolicy",
    "GridResult",
    "ParetoFront",
    "ParetoPoint",
    "SingleThresholdCalibrator",
    "ThresholdCalibrator",
    "calibrate_policies",
    "candidate_thresholds",
    "evaluate_grid",
    "non_dominated",
    "pareto_front",
    "record_scores",
    "report_on_test",
    "search",
]
