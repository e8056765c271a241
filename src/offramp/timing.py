"""Honest wall-clock measurement: side by side, interleaved, median of repeats after warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

__all__ = ["compare_wallclock", "exit_latencies"]


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


def exit_latencies(net: object, x: object, *, repeats: int = 5, warmup: int = 2) -> list[float]:
    """Measured cost ``C_i`` of every exit: seconds per sample to run ``net.truncate(i)`` (all
    blocks up to exit ``i`` and every head on the way) on the batch ``x``, in eval mode without
    gradients, timed side by side (median of ``repeats``). Usable wherever a cost vector is.

    Example:
        >>> import torch
        >>> from offramp.models import mlp
        >>> lat = exit_latencies(mlp(4, 3, hidden=(8, 8)), torch.randn(16, 4), repeats=2)
        >>> len(lat)
        2
    """
    import torch

    n = x.shape[0]  # type: ignore[attr-defined]
    net.eval()  # type: ignore[attr-defined]
    paths = {i: net.truncate(i) for i in range(net.num_exits)}  # type: ignore[attr-defined]

    def runner(m: object) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return m(x)  # type: ignore[operator]

        return run

    t = compare_wallclock(
        {str(i): runner(m) for i, m in paths.items()}, repeats=repeats, warmup=warmup
    )
    return [t[str(i)] / n for i in range(len(paths))]
