"""Cached features of a frozen prefix, in memory or spilled to disk.

Layer-wise and heads-only training run a frozen prefix of the network over the whole training
set once and train the next part on the stored outputs, instead of recomputing the prefix every
epoch. :func:`cache_outputs` stores them in RAM when they fit in ``memory_budget_mb`` and in a
``numpy`` memory-mapped file otherwise (``mode="auto"``), and says so in the log; the returned
tensors index like any other, so the fit loop does not care where they live. While a stage's
outputs are computed from its cached inputs both are alive, so the peak is up to twice the
budget; an earlier stage's spilled files are deleted as soon as the next stage's replace them.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from offramp._progress import progress
from offramp.errors import ConfigError

__all__ = ["CACHE_MODES", "FeatureStore", "cache_outputs"]

log = logging.getLogger("offramp.training")

CACHE_MODES = ("auto", "memory", "disk", "recompute")


@dataclass
class FeatureStore:
    """Where cached features live; :meth:`close` deletes any files it spilled.

    Attributes:
        directory: spill directory (``None`` until something is written to disk).
        files: files written so far.
        owns_directory: the directory was created here (a temporary one) and is removed on close.
    """

    directory: Path | None = None
    files: list[Path] = field(default_factory=list)
    owns_directory: bool = False

    def new_file(self, name: str, cache_dir: str | None) -> Path:
        """A fresh file path for one cached tensor."""
        if self.directory is None:
            if cache_dir is None:
                self.directory = Path(tempfile.mkdtemp(prefix="offramp-cache-"))
                self.owns_directory = True
            else:
                self.directory = Path(cache_dir)
                self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / name
        self.files.append(path)
        return path

    def remove(self, paths: list[Path]) -> None:
        """Delete spilled files that are no longer needed (an earlier stage's features)."""
        for f in paths:
            f.unlink(missing_ok=True)
            if f in self.files:
                self.files.remove(f)

    def close(self) -> None:
        """Delete the spilled files (and the temporary directory, if it made one)."""
        for f in self.files:
            f.unlink(missing_ok=True)
        self.files.clear()
        if self.owns_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def cache_outputs(
    fn: Callable[[Tensor], tuple[Tensor, ...]],
    x: Tensor,
    *,
    store: FeatureStore,
    tag: str,
    batch_size: int = 512,
    mode: str = "auto",
    memory_budget_mb: float = 1024.0,
    cache_dir: str | None = None,
    show_progress: bool = False,
) -> tuple[Tensor, ...]:
    """Run ``fn`` over ``x`` in batches, without gradients, and keep every output.

    Args:
        fn: maps a batch to a tuple of per-sample outputs, each ``(B, ...)``.
        x: the inputs, ``(N, ...)``.
        store: records spilled files for cleanup.
        tag: a name for log messages and spill files.
        batch_size: samples per call of ``fn``.
        mode: ``"memory"``, ``"disk"`` or ``"auto"`` (memory when the outputs fit the budget).
        memory_budget_mb: RAM allowed for these outputs in ``"auto"`` mode.
        cache_dir: where to spill (default: a temporary directory).
        show_progress: show a progress bar.

    Returns:
        One ``(N, ...)`` tensor per output of ``fn`` (memory-mapped when spilled).

    Example:
        >>> import torch
        >>> store = FeatureStore()
        >>> (h,) = cache_outputs(lambda b: (2 * b,), torch.ones(5, 3), store=store, tag="t",
        ...                      batch_size=2, mode="disk")
        >>> h.sum().item(), store.files[0].exists()
        (30.0, True)
        >>> store.close()
    """
    if mode not in ("auto", "memory", "disk"):
        raise ConfigError(f"unknown cache mode {mode!r}; choose one of {CACHE_MODES}")
    n = x.shape[0]
    if n == 0:
        raise ConfigError(f"nothing to cache for {tag}: the data is empty")
    starts = range(0, n, batch_size)
    outs: list[Tensor] = []
    try:
        with torch.no_grad():
            bar = progress(starts, total=len(starts), desc=f"caching {tag}", enabled=show_progress)
            for s in bar:
                got = fn(x[s : s + batch_size])
                if not outs:  # allocate from the first batch's shapes (no extra probe call)
                    outs = _allocate(got, n, tag, store, mode, memory_budget_mb, cache_dir)
                for buf, t in zip(outs, got, strict=True):
                    buf[s : s + t.shape[0]] = t
    except OSError as exc:
        raise ConfigError(
            f"could not store the cached features for {tag} ({exc}); free disk space, point "
            "cache_dir at a larger disk, or use cache='recompute'"
        ) from exc
    return tuple(outs)


def _allocate(
    first: tuple[Tensor, ...],
    n: int,
    tag: str,
    store: FeatureStore,
    mode: str,
    memory_budget_mb: float,
    cache_dir: str | None,
) -> list[Tensor]:
    nbytes = sum(n * math.prod(t.shape[1:]) * t.element_size() for t in first)
    mb = nbytes / 2**20
    if mode == "auto":
        mode = "memory" if mb <= memory_budget_mb else "disk"
        if mode == "disk":
            log.warning(
                "cached features for %s need %.1f MB, over the %.1f MB memory budget: spilling "
                "to disk (%s); raise memory_budget_mb to keep them in RAM, or use "
                "cache='recompute' to recompute the frozen prefix instead",
                tag,
                mb,
                memory_budget_mb,
                cache_dir or "a temporary directory",
            )
    outs: list[Tensor] = []
    for k, t in enumerate(first):
        shape = (n, *t.shape[1:])
        if mode == "memory":
            outs.append(torch.empty(shape, dtype=t.dtype))
        else:
            path = store.new_file(f"{tag}-{k}.npy", cache_dir)
            if t.dtype == torch.bfloat16:
                raise ConfigError(
                    f"cannot spill bfloat16 features for {tag} to disk (NumPy has no bfloat16); "
                    "raise memory_budget_mb or use cache='recompute'"
                )
            dtype = torch.empty(0, dtype=t.dtype).numpy().dtype
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            outs.append(torch.from_numpy(mm))
    return outs
