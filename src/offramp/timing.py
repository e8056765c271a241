"""Honest wall-clock measurement: side by side, interleaved, median of repeats after warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

__all__ = ["block_latencies", "compare_wallclock", "exit_latencies"]


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
    net.eval()  # type: ignore[attr-defined]
    calls = {str(i): _bound(net.truncate(i), x) for i in range(net.num_exits)}  # type: ignore[attr-defined]
    per = _seconds_per_sample(calls, x.shape[0], repeats, warmup, None)  # type: ignore[attr-defined]
    return [per[str(i)] for i in range(len(calls))]


def block_latencies(
    net: object, x: object, *, repeats: int = 5, warmup: int = 2, min_seconds: float = 2e-3
) -> tuple[list[float], list[float]]:
    """Measured seconds per sample of every block ``f_k`` and every head ``c_i`` of ``net`` on
    the batch ``x`` (eval mode, no gradients), each timed on its real input ``h_{k−1}`` / ``h_i``
    side by side with the others (median of ``repeats``; calls too short for the clock are
    repeated until one measurement lasts ``min_seconds``).

    Returns:
        ``(block_seconds, head_seconds)``, one per block and one per exit.

    Example:
        >>> import torch
        >>> from offramp.models import mlp
        >>> blocks, heads = block_latencies(mlp(4, 3, hidden=(8, 8)), torch.randn(16, 4))
        >>> len(blocks), len(heads)
        (2, 2)
    """
    import torch

    net.eval()  # type: ignore[attr-defined]
    n = x.shape[0]  # type: ignore[attr-defined]
    calls: dict[str, Callable[[], object]] = {}
    with torch.no_grad():
        h = x
        for k, block in enumerate(net.blocks):  # type: ignore[attr-defined]
            calls[f"b{k}"] = _bound(block, h)
            h = block(h)
            if k in net.exit_blocks:  # type: ignore[attr-defined]
                i = net.exit_blocks.index(k)  # type: ignore[attr-defined]
                calls[f"h{i}"] = _bound(net.heads[i], h)  # type: ignore[attr-defined]
    per = _seconds_per_sample(calls, n, repeats, warmup, min_seconds)
    blocks = [per[f"b{k}"] for k in range(len(net.blocks))]  # type: ignore[attr-defined]
    heads = [per[f"h{i}"] for i in range(len(net.heads))]  # type: ignore[attr-defined]
    return blocks, heads


def _seconds_per_sample(
    calls: dict[str, Callable[[], object]],
    n: int,
    repeats: int,
    warmup: int,
    min_seconds: float | None,
) -> dict[str, float]:
    """Median seconds per sample of every call (batch of ``n``), timed side by side without
    gradients; with ``min_seconds``, short calls are repeated within one measurement."""
    import torch

    loops = {k: 1 if min_seconds is None else _loops(fn, min_seconds) for k, fn in calls.items()}

    def runner(name: str) -> Callable[[], object]:
        fn, reps = calls[name], loops[name]

        def run() -> None:
            with torch.no_grad():
                for _ in range(reps):
                    fn()

        return run

    t = compare_wallclock({k: runner(k) for k in calls}, repeats=repeats, warmup=warmup)
    return {k: t[k] / loops[k] / n for k in calls}


def _bound(module: object, h: object) -> Callable[[], object]:
    return lambda: module(h)  # type: ignore[operator]


def _loops(fn: Callable[[], object], min_seconds: float) -> int:
    """Calls per measurement so that one measurement lasts about ``min_seconds``."""
    import torch

    with torch.no_grad():
        fn()
        t0 = time.perf_counter()
        fn()
        once = time.perf_counter() - t0
    return max(1, min(1000, int(min_seconds / max(once, 1e-7)) + 1))
