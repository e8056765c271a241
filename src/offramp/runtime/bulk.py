"""Early exit over a stream of batches, pooling the samples that go on across batches.

Run one batch at a time and every stage after the first sees only the samples of that batch
that did not leave — on the runtime benchmark's MNIST network, 6 of 256 after exit 1. A stage
call on a handful of rows costs a fixed ~0.4 ms on a CPU (per-call and per-kernel overhead)
on top of its per-sample work, so those small calls cost as much as the samples' own compute.
:func:`run_pooled` keeps a queue in front of every stage after the first: the samples still
running wait there until ``pool`` of them are ready (or the input ends), and the stage runs
once on all of them. Results come out per input batch, in input order, as soon as all of a
batch's samples have left; each equals what the runtime returns for that batch alone.

The price is latency: a sample that goes on waits for its pool to fill, so this is for bulk
(offline) inference, and the per-batch call ``runtime(x)`` for requests that need an answer
now. Memory holds at most ``pool`` rows of activations per stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from offramp.activations import Activation, batch_size, concat, select_rows, slice_rows
from offramp.errors import ConfigError
from offramp.policies import ExitPolicy
from offramp.runtime.result import RuntimeResult

__all__ = ["StageRunner", "run_pooled"]


class StageRunner(Protocol):
    """What bulk inference needs of a runtime (:class:`~offramp.runtime.EarlyExitRuntime`)."""

    policy: ExitPolicy
    cumulative: Tensor | None

    @property
    def trim_padding(self) -> bool: ...

    @property
    def num_stages(self) -> int: ...

    def check_input(self, x: Tensor) -> None: ...

    def stage(
        self, i: int, h: Activation, state: Tensor
    ) -> tuple[Activation, Tensor, Tensor | None, Tensor]: ...


class _Rows(NamedTuple):
    """Samples waiting for a stage: activations, policy state, and where each came from."""

    h: Activation  # (R, ...) the stage's input (with its side inputs)
    state: Tensor  # (R, ...) the policy's state
    batch: Tensor  # (R,) input batch number, non-decreasing (queues keep arrival order)
    pos: Tensor  # (R,) row within that batch


@dataclass
class _Pending:
    """One input batch's outputs while some of its samples are still running."""

    exits: Tensor  # (n,) exit of each sample, filled as they leave
    left: int  # samples still running
    logits: Tensor | None = field(default=None)  # (n, C), allocated at the first leaver


@torch.no_grad()
def run_pooled(
    rt: StageRunner, batches: Iterable[Tensor], pool: int | None = None
) -> Iterator[RuntimeResult]:
    """The runtime over ``batches``, each stage after the first run on ``pool`` rows at a time.

    Args:
        rt: the runtime (any mode; its policy, stages and buckets are used as they are).
        batches: input batches, ``(B_k, *input_shape)`` each; any iterable (read lazily).
        pool: rows a later stage waits for before it runs (default: the first batch's size).

    Yields:
        One :class:`~offramp.runtime.RuntimeResult` per input batch, in input order.

    Raises:
        ConfigError: ``pool`` < 1.
        ShapeError: a batch of the wrong shape (when the runtime validates its inputs).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from offramp import EarlyExitRuntime, MultiExitNetwork, ThresholdPolicy
        >>> net = MultiExitNetwork([nn.Linear(4, 8), nn.Linear(8, 8)],
        ...                        {0: nn.Linear(8, 3), 1: nn.Linear(8, 3)}, input_shape=(4,))
        >>> rt = EarlyExitRuntime(net, ThresholdPolicy("entropy", (0.5,)))
        >>> [tuple(r.exits.shape) for r in run_pooled(rt, [torch.randn(5, 4), torch.randn(3, 4)])]
        [(5,), (3,)]
    """
    if pool is not None and pool < 1:
        raise ConfigError(f"pool must be ≥ 1 rows, got {pool}")
    last = rt.num_stages - 1
    queues: list[list[_Rows]] = [[] for _ in range(last + 1)]
    pending: dict[int, _Pending] = {}
    emitted = 0
    for b, x in enumerate(batches):
        rt.check_input(x)
        n = x.shape[0]
        pool = pool or n or None  # the first non-empty batch sets the default
        pending[b] = _Pending(exits=torch.full((n,), last, dtype=torch.long), left=n)
        if n:
            state = rt.policy.initial_state(n, x.device)
            queues[0].append(_Rows(x, state, torch.full((n,), b), torch.arange(n)))
        _advance(rt, queues, pending, pool or 1, flush=False)
        while emitted in pending and pending[emitted].left == 0:
            yield _result(rt, pending.pop(emitted))
            emitted += 1
    _advance(rt, queues, pending, pool or 1, flush=True)
    while emitted in pending:
        yield _result(rt, pending.pop(emitted))
        emitted += 1


def _advance(
    rt: StageRunner,
    queues: list[list[_Rows]],
    pending: dict[int, _Pending],
    pool: int,
    flush: bool,
) -> None:
    """Run every stage whose queue is ready, first to last: the first stage on whatever has
    arrived, later ones on ``pool`` rows at a time (on what is left too, when flushing)."""
    for i, queue in enumerate(queues):
        while queue:
            ready = sum(batch_size(r.h) for r in queue)
            if i > 0 and ready < pool and not flush:
                break
            rows = _take(queue, ready if i == 0 else min(pool, ready), rt.trim_padding)
            _run_stage(rt, i, rows, queues, pending)


def _take(queue: list[_Rows], k: int, pad_tokens: bool) -> _Rows:
    """The first ``k`` rows of ``queue``, removed from it (token rows of different lengths
    padded alike when ``pad_tokens``)."""
    parts = [queue.pop(0)]
    while sum(batch_size(p.h) for p in parts) < k:
        parts.append(queue.pop(0))
    if len(parts) == 1:
        rows = parts[0]
    else:
        rows = _Rows(
            concat([p.h for p in parts], pad_tokens=pad_tokens),
            *(torch.cat(c) for c in zip(*(p[1:] for p in parts), strict=True)),
        )
    extra = batch_size(rows.h) - k
    if extra:  # the last part was split: its tail waits at the front of the queue
        queue.insert(0, _Rows(slice_rows(rows.h, k), *(t[k:] for t in rows[1:])))
        rows = _Rows(slice_rows(rows.h, 0, k), *(t[:k] for t in rows[1:]))
    return rows


def _run_stage(
    rt: StageRunner,
    i: int,
    rows: _Rows,
    queues: list[list[_Rows]],
    pending: dict[int, _Pending],
) -> None:
    """Stage ``i`` on ``rows``: leavers are written to their batches, the rest queue for
    stage ``i + 1``."""
    h, logits, leave, state = rt.stage(i, rows.h, rows.state)
    if leave is None:  # the final exit: everyone leaves
        _write(pending, rows.batch, rows.pos, logits, i)
        return
    gone = leave.nonzero().squeeze(1)  # the one host sync of this stage call
    if gone.numel():
        _write(pending, rows.batch[gone], rows.pos[gone], logits[gone], i)
    if gone.numel() < leave.numel():
        stay = (~leave).nonzero().squeeze(1)
        queues[i + 1].append(
            _Rows(select_rows(h, stay), state[stay], rows.batch[stay], rows.pos[stay])
        )


def _write(
    pending: dict[int, _Pending], batch: Tensor, pos: Tensor, logits: Tensor, exit_: int
) -> None:
    """Scatter leavers (sorted by batch) into their batches' outputs."""
    ids, counts = torch.unique_consecutive(batch, return_counts=True)
    start = 0
    for b, c in zip(ids.tolist(), counts.tolist(), strict=True):
        out, p = pending[b], pos[start : start + c]
        if out.logits is None:
            out.logits = logits.new_empty((out.exits.shape[0], logits.shape[1]))
        out.logits[p] = logits[start : start + c]
        out.exits[p] = exit_
        out.left -= c
        start += c


def _result(rt: StageRunner, out: _Pending) -> RuntimeResult:
    costs = rt.cumulative[out.exits] if rt.cumulative is not None else None
    if out.logits is None:  # an empty batch
        return RuntimeResult(out.exits.clone(), out.exits, torch.empty(0, 0), costs)
    return RuntimeResult(out.logits.argmax(dim=1), out.exits, out.logits, costs)
