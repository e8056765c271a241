"""A progress bar on stderr: tqdm's in-place bar on a terminal, one plain line elsewhere.

When stderr is not a terminal (a log file, a pipe, CI) an in-place bar only fills the log with
carriage-return refreshes, so each bar becomes one line printed when it ends instead:
``epoch 3/60: 17/17 batches, 0.4 s``. The same line is printed when tqdm is not installed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def _on_terminal() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def progress(
    items: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "items",
    enabled: bool = True,
) -> Iterator[T]:
    """Wrap ``items`` in a progress bar on stderr: tqdm's (if installed) on a terminal, else
    one line ``"{desc}: {done}/{total} {unit}, {seconds} s"`` once all items are through."""
    if not enabled:
        yield from items
        return
    if _on_terminal():
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            yield from tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)
            return
    t0 = time.perf_counter()
    n = 0
    for n, item in enumerate(items, 1):  # noqa: B007
        yield item
    secs = time.perf_counter() - t0
    print(
        f"{desc}: {n}/{total if total is not None else n} {unit}, {secs:.1f} s",
        file=sys.stderr,
        flush=True,
    )
