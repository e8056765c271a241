"""Honest wall-clock measurement: side by side, interleaved, median of repeats after warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

__all__ = ["compare_wallclock"]


def compare_wallclock(
    fns: Mapping[str, Callable[[], object]], *, repeats: int = 7, warmup: int = 2
) -> dict[str, float]:
    """Median seconds of each callable, timed in one run with their order rotated each repeat.

    Rotating the order spreads machine noise (other processes, frequency changes) evenly over
    the candidates, so ratios of the medians are fair even on a shared machine.

    Example:
        >>> t = compare_wallclock({"a": lambda: sum(range(100)), "b": lambda: None}, repeats=3)
        >>> sorted(t)
        ['a', 'b']
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in samples.items()}
