"""Values from config files, with one set of rules for the training config and the strategy
options: YAML reads ``1e-3`` as a string, so numbers written as strings are accepted; a boolean
is ``true`` / ``false`` (YAML's own booleans, or those two words as strings), nothing else."""

from __future__ import annotations

import numbers
from typing import Any


def to_int(value: Any) -> int:
    """``value`` as an int: integers, integral floats and their string forms; never a bool.

    Raises:
        TypeError, ValueError: anything else.

    Example:
        >>> to_int("3"), to_int(4.0), to_int("5.0")
        (3, 4, 5)
    """
    if isinstance(value, bool):
        raise TypeError("a bool is not an integer")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real | str):
        f = float(value)
        if not f.is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        return int(f)
    raise TypeError(f"{type(value).__name__} is not a number")


def to_bool(value: Any) -> bool:
    """``value`` as a bool: ``True`` / ``False``, or the strings ``"true"`` / ``"false"`` (any
    case); not numbers, not ``"yes"`` / ``"on"`` (ambiguous in a config someone else reads).

    Raises:
        TypeError, ValueError: anything else.

    Example:
        >>> to_bool(True), to_bool("False")
        (True, False)
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{value!r} is not true or false")


def to_float(value: Any) -> float:
    """``value`` as a float: real numbers and their string forms; never a bool.

    Example:
        >>> to_float("1e-3"), to_float(2)
        (0.001, 2.0)
    """
    if isinstance(value, bool):
        raise TypeError("a bool is not a number")
    if isinstance(value, numbers.Real | str):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not a number")
