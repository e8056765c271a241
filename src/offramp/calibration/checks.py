"""The argument checks every calibrator shares: costs, goals and the record's size.

Each raises :class:`~offramp.errors.ConfigError` (a record without samples:
:class:`~offramp.errors.DataError`) with the offending value and the fix, before any search
runs, so a NaN goal or a bad cost vector never reaches a fitted policy or a results file.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np

from offramp.errors import ConfigError, DataError
from offramp.evaluation import ExitRecord

__all__ = [
    "MIN_SAMPLES",
    "check_budget",
    "check_confidence",
    "check_cumulative",
    "check_delta",
    "check_record",
]

#: Fewer calibration samples than this warn. With one sample there is no cut between two
#: scores: every early exit can only be "never" or "always", chosen by whether that one
#: sample is right. Two samples are the least that calibrate at all; for thresholds that
#: carry over to new data use hundreds (accuracy moves in steps of 1/N) and ``confidence``.
MIN_SAMPLES = 2


def _number(value: object) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else ``None``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def check_cumulative(cumulative: object, num_exits: int) -> np.ndarray:
    """``cumulative`` as ``(E,)`` float64, or ``ConfigError`` unless it holds the cost of
    reaching every exit: one finite value ≥ 0 per exit, non-decreasing (exit ``i`` pays for
    everything before it), with a positive total ``C_L`` (relative costs divide by it)."""
    cum = np.asarray(cumulative, dtype=np.float64)
    fix = "pass profile(net, x).cumulative (or per-exit latencies measured from the input)"
    if cum.shape != (num_exits,):
        raise ConfigError(
            f"cumulative costs must have one value per exit ({num_exits}), got shape "
            f"{cum.shape}; {fix}"
        )
    problem = None
    if not np.isfinite(cum).all():
        problem = "finite"
    elif (cum < 0).any():
        problem = "≥ 0"
    elif (np.diff(cum) < 0).any():
        problem = "non-decreasing (C_i includes every block and head before exit i)"
    elif cum[-1] <= 0:
        problem = "positive at the final exit (C_L > 0: relative costs divide by it)"
    if problem is not None:
        if problem.startswith("non-decreasing"):  # measured latencies can dip by timing noise
            fix += "; for measured latencies, time more repeats or take np.maximum.accumulate"
        raise ConfigError(f"cumulative costs must be {problem}, got {cum.tolist()}; {fix}")
    return cum


def check_delta(delta: object) -> float:
    """``delta`` (accuracy loss allowed relative to the final exit), or ``ConfigError`` unless
    it is a finite number in ``(-1, 1)``."""
    d = _number(delta)
    if d is None or not math.isfinite(d) or not -1.0 < d < 1.0:
        raise ConfigError(
            f"delta is the accuracy loss you accept, a finite number in (-1, 1), got "
            f"{delta}; use 0.0 to keep the final exit's accuracy, a small negative "
            "value for a safety margin above it"
        )
    return d


def check_budget(budget: object) -> float:
    """``budget`` (expected cost as a fraction of the full network's), or ``ConfigError``
    unless it lies in ``(0, 1]``."""
    b = _number(budget)
    if b is None or not 0 < b <= 1:  # NaN fails the comparison too
        raise ConfigError(
            f"budget is a fraction of the full network's cost, in (0, 1], got {budget}; "
            "e.g. 0.5 for half the cost"
        )
    return b


def check_confidence(confidence: object) -> float | None:
    """``confidence`` (one-sided level of the accuracy bound) or ``None``; ``ConfigError``
    unless it lies in ``[0.5, 1)``."""
    if confidence is None:
        return None
    c = _number(confidence)
    if c is None or not 0.5 <= c < 1:  # NaN fails the comparison too
        raise ConfigError(
            f"confidence must lie in [0.5, 1), got {confidence}; e.g. 0.95, or None for the "
            "plain accuracy"
        )
    return c


def check_record(record: ExitRecord, *, stacklevel: int = 4) -> None:
    """``DataError`` for a record without samples; a ``UserWarning`` for one with fewer than
    :data:`MIN_SAMPLES` (``stacklevel`` points the warning at the caller's ``fit``)."""
    n = record.num_samples
    if n == 0:
        raise DataError(
            "the calibration record has no samples: collect it on a non-empty split "
            "(ExitRecord.collect(net, (x_val, y_val)))"
        )
    if n < MIN_SAMPLES:
        warnings.warn(
            f"calibrating on a record of {n} sample{'s' if n != 1 else ''}: there is no cut "
            "between two scores, so every early exit is set to 'never' or 'always' by that "
            "one sample; calibrate on a held-out split of hundreds of samples",
            UserWarning,
            stacklevel=stacklevel,
        )
