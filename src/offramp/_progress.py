"""A progress bar that uses tqdm when it is installed and prints plain lines otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True
) -> Iterator[T]:
    """Wrap ``items`` in a progress bar on stderr (tqdm if available)."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # plain fallback: one line at the end
        n = 0
        for n, item in enumerate(items, 1):  # noqa: B007
            yield item
        print(f"{desc}: {n}/{total if total is not None else n} done", file=sys.stderr)
        return
    yield from tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)
