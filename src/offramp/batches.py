"""The one batch iterator: evaluation walks a dataset in order, training shuffles it and shards
it over ranks, and both refuse the same mistakes with the same errors.

Example:
    >>> import torch
    >>> x, y = torch.arange(10.0), torch.arange(10)
    >>> batches, n = iterate_batches((x, y), 4)
    >>> n, [len(b[1]) for b in batches]
    (3, [4, 4, 2])
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from offramp.errors import ConfigError, ShapeError

__all__ = ["check_batch_size", "iterate_batches"]


def check_batch_size(batch_size: object) -> int:
    """``batch_size`` as an int, or ``ConfigError`` unless it is a whole number ≥ 1 (a bool is
    not).

    Example:
        >>> check_batch_size(256)
        256
    """
    if isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool):
        if int(batch_size) >= 1:
            return int(batch_size)
    raise ConfigError(
        f"batch_size must be a whole number ≥ 1, got {batch_size!r}: it is the number of "
        "samples per forward pass, e.g. batch_size=256"
    )


def _tensors(data: Any) -> bool:
    return isinstance(data, tuple) and len(data) >= 2 and all(isinstance(t, Tensor) for t in data)


def iterate_batches(
    data: tuple[Tensor, ...] | Iterable[tuple[Tensor, ...]],
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world: int = 1,
) -> tuple[Iterable[tuple[Tensor, ...]], int | None]:
    """Batches of aligned tensors ``(X, y, extra…)``, or any iterable of batches as it is, and
    their count (``None`` when the iterable has no length).

    Args:
        data: tensors sharing their first dimension, or an iterable of batches.
        batch_size: samples per batch (checked by :func:`check_batch_size` in either case).
        generator: shuffle the samples with a permutation drawn from it (training); ``None``
            keeps their order (evaluation).
        rank, world: under distributed training, each rank gets its contiguous share of every
            global batch (all ranks draw the same permutation from the same seed); a short tail
            batch loses its last ``len % world`` samples so the shards stay equal.

    Raises:
        ConfigError: a bad ``batch_size``, or an iterable of batches under ``world > 1``.
        ShapeError: tensors that disagree on the number of samples.
    """
    batch_size = check_batch_size(batch_size)
    if not _tensors(data):
        if world > 1:
            raise ConfigError(
                "distributed training shards (X, y) tensors itself; pass tensors rather than an "
                "iterable of batches"
            )
        return data, (len(data) if hasattr(data, "__len__") else None)  # type: ignore[arg-type]
    assert isinstance(data, tuple)
    n = data[0].shape[0]
    if any(t.shape[0] != n for t in data):
        raise ShapeError(
            "inputs and labels differ in length: "
            + ", ".join(f"tensor {k} has {t.shape[0]} rows" for k, t in enumerate(data))
            + "; pass tensors with one row per sample"
        )
    order = torch.randperm(n, generator=generator) if generator is not None else None
    starts = range(0, n, batch_size)

    def batches() -> Iterator[tuple[Tensor, ...]]:
        for s in starts:
            if order is None and world == 1:
                yield tuple(t[s : s + batch_size] for t in data)
                continue
            idx = (
                order[s : s + batch_size]
                if order is not None
                else torch.arange(s, min(s + batch_size, n))
            )
            if world > 1:
                idx = idx[: len(idx) - len(idx) % world]
                if len(idx) == 0:
                    continue
                idx = idx.tensor_split(world)[rank]
            yield tuple(t[idx] for t in data)

    return batches(), len(starts)
