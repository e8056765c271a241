"""Every file offramp writes goes through here: atomically, and safe to read back.

A write serialises the whole content in memory first (JSON with NaN refused, CSV, a
``torch.save`` archive, a PNG), then writes it to a temporary file beside the target, flushes it
to disk and renames it over the target. A failure at any point — disk full, read-only
directory, a NaN where a number belongs — leaves the previous file intact, removes the temporary
and raises one :class:`~offramp.errors.WriteError` saying which file and why.

Reading back: :func:`read_torch` loads with ``weights_only=True`` (tensors, numbers, strings,
lists, dicts; never pickle), :func:`read_json` refuses ``NaN`` tokens (offramp writes
infinity as the string ``"Infinity"``).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = write_json(Path(d) / "r.json", {"accuracy": 0.9})
    ...     read_json(p)
    {'accuracy': 0.9}
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from offramp.errors import DataError, WriteError

__all__ = [
    "read_json",
    "read_torch",
    "save_figure",
    "save_torch",
    "to_json",
    "write_bytes",
    "write_csv",
    "write_json",
    "write_text",
]


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename).

    Raises:
        WriteError: the file could not be written; the previous ``path`` is intact and no
            temporary file is left behind.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise WriteError(
            f"could not write {path}: {reason}; the previous file, if any, is unchanged "
            "(free some space or choose a writable directory)"
        ) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """:func:`write_bytes` of ``text`` in UTF-8."""
    return write_bytes(path, text.encode("utf-8"))


def to_json(obj: Any) -> str:
    """``obj`` as indented JSON. NaN is refused (it is not JSON, and always a bug upstream);
    ±infinity — a threshold that never fires — is written as the string ``"Infinity"`` /
    ``"-Infinity"``, which ``float()`` reads back.

    Raises:
        WriteError: a value is NaN (the message names its place).

    Example:
        >>> print(to_json({"tau": [0.5, float("inf")]}).replace(chr(10), ""))
        {  "tau": [    0.5,    "Infinity"  ]}
        >>> to_json({"a": [1, float("nan")]})
        Traceback (most recent call last):
        ...
        offramp.errors.WriteError: cannot write NaN as JSON (at a[1]): ...
    """
    bad = _nan_at(obj, "")
    if bad is not None:
        raise WriteError(
            f"cannot write NaN as JSON (at {bad or 'the top level'}): a result was not a "
            "number; check the arguments that produced it"
        )
    return json.dumps(_finite(obj), indent=2, allow_nan=False, default=_default) + "\n"


def _finite(obj: Any) -> Any:
    """``obj`` with ±inf floats replaced by ``"Infinity"`` / ``"-Infinity"``."""
    if isinstance(obj, float) or _is_scalar(obj):
        f = float(obj)
        if math.isinf(f):
            return "Infinity" if f > 0 else "-Infinity"
        return obj
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _is_scalar(v: Any) -> bool:
    """A NumPy or 0-d torch scalar of a real dtype."""
    dtype = getattr(v, "dtype", None)
    if dtype is None or getattr(v, "ndim", 1) != 0:
        return False
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return not isinstance(v, str)


def _default(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if hasattr(v, "tolist"):  # NumPy scalars and arrays
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def _nan_at(obj: Any, where: str) -> str | None:
    """The place of the first NaN in ``obj`` (``""`` for the top level), else None."""
    if isinstance(obj, float) or _is_scalar(obj):
        return where if math.isnan(float(obj)) else None
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _nan_at(v, f"{where}.{k}" if where else str(k))
            if found is not None:
                return found
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            found = _nan_at(v, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as JSON (:func:`to_json`), written atomically."""
    return write_text(path, to_json(obj))


def write_csv(path: str | Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """A CSV file with a header row, written atomically (``None`` -> empty cell)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if v is None else v for v in r])
    return write_text(path, buf.getvalue())


def save_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save(obj)`` written atomically; ``obj`` must hold only what
    :func:`read_torch` reads back (tensors, numbers, strings, lists, tuples, dicts)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())


def read_torch(path: str | Path) -> Any:
    """A file written by :func:`save_torch`, read with ``weights_only=True`` (no pickle: a
    crafted file cannot run code).

    Raises:
        DataError: the file is missing, corrupt or holds objects other than tensors and plain
            values.
    """
    try:
        return torch.load(Path(path), weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise DataError(
            f"{path} is unreadable or not a file offramp wrote ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); offramp reads tensors and plain "
            "values only, never pickled objects"
        ) from exc


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``; ``NaN`` / ``Infinity`` tokens are refused.

    Raises:
        DataError: the file is missing, not UTF-8 or not valid JSON.
    """

    def refuse(token: str) -> None:
        raise ValueError(f"{token} is not valid JSON")

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=refuse)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path} is not a readable JSON file ({exc})") from exc


def save_figure(fig: Any, path: str | Path, **savefig_kwargs: Any) -> Path:
    """A matplotlib figure as PNG, written atomically (rendered in memory first)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    return write_bytes(path, buf.getvalue())
