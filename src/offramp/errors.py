"""The one error family of offramp.

Every message says what was wrong (with the offending shape, name or value) and how to fix it.
Subclasses also derive from the matching built-in exception so that generic ``except
ValueError`` handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConformanceError",
    "ConversionError",
    "DataError",
    "NonFiniteError",
    "OfframpError",
    "ShapeError",
    "TierError",
    "WriteError",
]


class OfframpError(Exception):
    """Base class of every error raised by offramp."""


class ShapeError(OfframpError, ValueError):
    """A tensor has the wrong shape or dtype."""


class ConfigError(OfframpError, ValueError):
    """A parameter or combination of parameters is invalid."""


class ConversionError(OfframpError, ValueError):
    """A model could not be turned into a multi-exit network (bad layer name, tracing failed)."""


class DataError(OfframpError, ValueError):
    """Data is missing, corrupt or invalid: a data file of the wrong format, labels that are not
    class indices, an empty dataset."""


class NonFiniteError(DataError):
    """Data holds NaN or infinite values where finite numbers are needed (an input batch, the
    logits of an ``ExitRecord``)."""


class CheckpointError(OfframpError, RuntimeError):
    """A checkpoint could not be written or does not match the run being resumed."""


class WriteError(OfframpError, OSError):
    """A result file could not be written (disk full, read-only directory, a value JSON cannot
    hold); the previous file is intact."""


class ConformanceError(OfframpError, AssertionError):
    """A network breaks a guarantee :func:`offramp.check_network` verifies; ``report`` holds
    the checks up to the broken one."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class TierError(OfframpError, RuntimeError):
    """The next tier did not answer: down, past the deadline, or refusing. ``code`` is the gRPC
    status name (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``RESOURCE_EXHAUSTED``, ...)."""

    def __init__(self, message: str, code: str = "UNAVAILABLE") -> None:
        super().__init__(message)
        self.code = code
