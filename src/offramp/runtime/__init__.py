"""Real early-exit inference.

- :mod:`~offramp.runtime.core`: :class:`EarlyExitRuntime` — batched early exit with
  compaction, the batch-1 path, bulk inference (``rt.map``);
- :mod:`~offramp.runtime.backends`: how stages execute (``eager``, ``script``, ``compile``),
  one interface (:class:`~offramp.runtime.backends.StageBackend`) for every mode;
- :mod:`~offramp.runtime.bulk`: many batches with the samples that go on pooled across them;
- :mod:`~offramp.runtime.result`: :class:`RuntimeResult`.

Imports point one way: ``core`` → ``bulk``, ``backends``, ``result``; ``bulk`` → ``result``.
"""

from offramp.runtime.backends import MODES, StageBackend, bucket_size, make_backend
from offramp.runtime.core import EarlyExitRuntime
from offramp.runtime.result import RuntimeResult

__all__ = [
    "MODES",
    "EarlyExitRuntime",
    "RuntimeResult",
    "StageBackend",
    "bucket_size",
    "make_backend",
]
