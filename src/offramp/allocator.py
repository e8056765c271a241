"""Keep freed memory in the process, so large CPU tensors are not page-faulted in on every batch.

PyTorch's CPU tensors come from the C library's ``malloc``. With glibc's defaults, a block above
a moving threshold (128 KiB at start, at most 32 MiB) is mapped fresh from the kernel and
handed back when freed, and free memory at the top of the heap above a second threshold is
returned too. Every new mapping is page-faulted in and zeroed by the kernel, 4 KiB at a time:
a CNN whose activations are tens of MiB per batch pays that on every batch. On the runtime
benchmark's network (batch 256 on 2 cores) it cost 15 % of the plain backbone's time, and
its variance shifted every timing ratio by a few per cent depending on what ran before.

:func:`keep_freed_memory` fixes both glibc thresholds, so blocks up to 32 MiB are served from
the heap and freed memory is kept for reuse: the process holds on to its peak memory instead
of returning it. It is a process-wide setting, never applied behind the user's back: call it
once before inference (``benchmarks/runtime.py`` does, unless run with ``--malloc default``).
A process running on jemalloc or tcmalloc (``LD_PRELOAD``) does not need it, and it reports
that it did nothing.
"""

from __future__ import annotations

import ctypes
import logging
import sys

__all__ = ["keep_freed_memory"]

_log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc refuses mmap thresholds above half its largest heap: 32 MiB on 64-bit systems.
_MAX_MMAP_THRESHOLD = 32 << 20


def keep_freed_memory(
    mmap_threshold: int = _MAX_MMAP_THRESHOLD, trim_threshold: int = 1 << 30
) -> bool:
    """Serve blocks up to ``mmap_threshold`` bytes from the heap and keep up to
    ``trim_threshold`` bytes of freed heap, with glibc's ``mallopt``.

    Args:
        mmap_threshold: blocks of at least this many bytes are mapped from the kernel
            (between 1 and 32 MiB).
        trim_threshold: free memory at the top of the heap above this many bytes is returned
            to the kernel (at most 2³¹ − 1).

    Returns:
        ``True`` when both settings were applied; ``False`` (with a log message) when the
        process's ``malloc`` is not glibc's (macOS, Windows, musl, or jemalloc / tcmalloc
        preloaded), where there is nothing to set.

    Raises:
        ConfigError: a threshold out of range.

    Example:
        >>> from offramp.allocator import keep_freed_memory
        >>> keep_freed_memory() in (True, False)
        True
    """
    from offramp.errors import ConfigError

    if not 0 < mmap_threshold <= _MAX_MMAP_THRESHOLD:
        raise ConfigError(
            f"mmap_threshold must be in (0, {_MAX_MMAP_THRESHOLD}] bytes (glibc's limit), "
            f"got {mmap_threshold}"
        )
    if not 0 <= trim_threshold < 2**31:
        raise ConfigError(f"trim_threshold must be in [0, 2**31), got {trim_threshold}")
    if not sys.platform.startswith("linux"):
        _log.info("keep_freed_memory: not Linux, nothing to set")
        return False
    proc = ctypes.CDLL(None)  # the symbols the process resolves: a preloaded malloc wins
    if not hasattr(proc, "gnu_get_libc_version") or not hasattr(proc, "mallopt"):
        _log.info("keep_freed_memory: the C library is not glibc, nothing to set")
        return False
    libc = ctypes.CDLL("libc.so.6")
    if (
        ctypes.cast(proc.malloc, ctypes.c_void_p).value
        != ctypes.cast(libc.malloc, ctypes.c_void_p).value
    ):
        _log.info("keep_freed_memory: malloc is not glibc's (preloaded allocator), nothing to set")
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    return libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
