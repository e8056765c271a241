"""Honest wall-clock measurement: side by side, interleaved, median of repeats after warm-up."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

from offramp.errors import ConfigError

__all__ = [
    "block_latencies",
    "compare_over_batches",
    "compare_wallclock",
    "exit_latencies",
    "paired_ratio",
    "time_over_batches",
]


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


def time_over_batches(
    fns: Mapping[str, Callable[[object], object]],
    batches: Sequence[object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    group: int = 8,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Seconds each callable takes for each pass over all ``batches``, interleaved group by
    group (pass ``r`` of every callable ran in the same stretch of time, so ratios are best
    taken pass by pass: :func:`paired_ratio`).

    The batches are taken ``group`` at a time; each group is handed to every callable in turn,
    in an order shuffled afresh for every group (seeded by ``seed``; a fixed cyclic order would
    always put the same callable before each one), and each callable's time is summed over the
    groups of one pass. A callable's turn starts with the group's first
    batch run once untimed, so it is timed in its steady state (allocator, caches, code), as a
    server running only it would be, and not in the state the previous callable left behind.
    Candidates are never more than a group apart, so noise from a shared machine that drifts
    over seconds (other processes, frequency changes) hits them alike: tighter ratios than
    :func:`compare_wallclock` over whole passes. Gradients are the caller's business (wrap
    the call in ``torch.no_grad()`` to time inference).

    Args:
        fns: name → callable taking one batch.
        batches: the batches, each passed as the callable's only argument.
        repeats: timed passes over all batches; the median pass is reported.
        warmup: untimed passes first (compilation, caches, allocator).
        group: consecutive batches per turn.
        seed: seeds the order of the turns.

    Returns:
        name → seconds of each timed pass over ``batches`` (``repeats`` values).

    Example:
        >>> t = time_over_batches({"sum": sum, "max": max}, [[1, 2], [3, 4]], repeats=3)
        >>> sorted(t), len(t["sum"])
        (['max', 'sum'], 3)
    """
    names = list(fns)
    if not names or not batches or group < 1:
        raise ConfigError(
            "timing over batches needs at least one callable and one batch, and group ≥ 1; "
            f"got {len(names)} callables, {len(batches)} batches, group={group}"
        )
    for _ in range(warmup):
        for b in batches:
            for name in names:
                fns[name](b)
    groups = [batches[i : i + group] for i in range(0, len(batches), group)]
    rng = random.Random(seed)
    passes: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        total = dict.fromkeys(names, 0.0)
        for bs in groups:
            for name in rng.sample(names, len(names)):
                fn = fns[name]
                fn(bs[0])  # untimed: the turn starts in this callable's steady state
                t0 = time.perf_counter()
                for b in bs:
                    fn(b)
                total[name] += time.perf_counter() - t0
        for name in names:
            passes[name].append(total[name])
    return passes


def compare_over_batches(
    fns: Mapping[str, Callable[[object], object]],
    batches: Sequence[object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    group: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """Median seconds of one pass over all ``batches`` for each callable, timed by
    :func:`time_over_batches` (interleaved group by group, each turn in its steady state).

    Example:
        >>> t = compare_over_batches({"sum": sum, "max": max}, [[1, 2], [3, 4]], repeats=3)
        >>> sorted(t)
        ['max', 'sum']
    """
    passes = time_over_batches(fns, batches, repeats=repeats, warmup=warmup, group=group, seed=seed)
    return {n: statistics.median(v) for n, v in passes.items()}


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over passes of ``numerator[r] / denominator[r]``: a ratio of two callables timed
    in the same passes (:func:`time_over_batches`), each pass compared with itself.

    Example:
        >>> paired_ratio([2.0, 3.0, 10.0], [1.0, 2.0, 4.0])
        2.0
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ConfigError(
            f"paired_ratio needs the same number (≥ 1) of passes on both sides, got "
            f"{len(numerator)} and {len(denominator)}"
        )
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


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
