"""Real early-exit inference: the runtime core.

The batched path runs a batch stage by stage; after each exit the samples that leave are
written to the output (in input order) and dropped from the batch (compaction), so later stages
only compute for the samples still running. The only host synchronisation is one ``nonzero`` per
stage — none per sample. The batch-1 path stops at the first exit that fires.

Each stage is one module computing ``(h_i, logits_i, leave_i)`` — body, head and the exit test
fused. How stages execute (eager, TorchScript, Inductor with batch-size buckets) is the
backend's business (:mod:`offramp.runtime.backends`); bulk inference over many batches is in
:mod:`offramp.runtime.bulk`. Use :meth:`EarlyExitRuntime.plain_backbone` to time the plain
backbone in the same execution mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from offramp.activations import (
    Activation,
    batch_size,
    features,
    select_rows,
    slice_rows,
    trim_padding,
)
from offramp.costs import CostProfile
from offramp.errors import ConfigError
from offramp.network import MultiExitNetwork, check_input, input_dtype
from offramp.policies import ExitPolicy
from offramp.runtime.backends import MODES, bucket_size, make_backend, padded
from offramp.runtime.bulk import run_pooled
from offramp.runtime.result import RuntimeResult

__all__ = ["MODES", "EarlyExitRuntime", "RuntimeResult", "bucket_size", "stage_modules"]


class _Step(nn.Module):
    """body → head → exit test, as one module: ``(h, state) -> (h_next, logits, leave, state)``.
    The test sees the logits, or ``h`` when it scores features (a gate)."""

    def __init__(self, body: nn.Module, head: nn.Module, test: nn.Module):
        super().__init__()
        self.body, self.head, self.test = body, head, test
        self.on_features = bool(getattr(test, "on_features", False))

    def forward(self, h: Activation, state: Tensor) -> tuple[Activation, Tensor, Tensor, Tensor]:
        h = self.body(h)
        logits = self.head(h)
        leave, state = self.test(features(h) if self.on_features else logits, state)
        return h, logits, leave, state


class _Final(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, h: Activation) -> Tensor:
        return self.head(self.body(h))


def stage_modules(
    net: MultiExitNetwork, tests: list[nn.Module]
) -> tuple[list[nn.Module], nn.Module]:
    """The network's stages as modules: one ``(h, state) -> (h_next, logits, leave, state)``
    per early exit (body, head and ``tests[i]`` fused), then the final ``h -> logits``. What
    every backend, and the exporter (:mod:`offramp.export`), receives."""
    stages = net.stages()
    steps: list[nn.Module] = [
        _Step(s.body, s.head, t) for s, t in zip(stages[:-1], tests, strict=True)
    ]
    return steps, _Final(stages[-1].body, stages[-1].head)


class EarlyExitRuntime:
    """Run a ``MultiExitNetwork`` with an exit policy, really skipping computation.

    Args:
        net: the network (used in eval mode; its parameters are not copied in eager mode).
        policy: any :class:`~offramp.policies.ExitPolicy` (thresholds on a criterion, with
            temperature or learned scorers; patience).
        costs: optional cost profile, to report each sample's FLOPs.
        mode: ``"eager"`` (plain PyTorch), ``"script"`` (each stage traced and frozen with
            TorchScript) or ``"compile"`` (each stage compiled by Inductor, ahead of time
            where it exports and with ``torch.compile`` otherwise, on a snapshot of the
            network: later changes to ``net`` are not seen; needs a C++ compiler). The last
            two need ``example_input``. ``"onnx"``: each stage exported to ONNX and run by
            ONNX Runtime (needs ``example_input`` and the ``onnx`` extra).
        example_input: an example batch for ``mode="script"`` and ``mode="compile"``.
        validate: check shape and finiteness of every input batch (one sync per batch).
        buckets_per_octave: ``mode="compile"`` only: batch-size buckets per power of two (a
            power of two itself). More buckets, less padding, more compilations (each new
            bucket compiles once, on first use, about a second per stage; see
            :func:`bucket_size`).
        cpp_wrapper: ``mode="compile"`` only: have Inductor drive each compiled stage from C++
            instead of Python. Smaller batches gain most (batch 1 on the runtime benchmark's
            network: about 11 % lower latency, plain and early exit alike; batch 256: within
            the run-to-run spread), and each stage takes about 1.6× as long to compile.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from offramp import MultiExitNetwork, ThresholdPolicy
        >>> net = MultiExitNetwork([nn.Linear(4, 8), nn.Linear(8, 8)],
        ...                        {0: nn.Linear(8, 3), 1: nn.Linear(8, 3)}, input_shape=(4,))
        >>> rt = EarlyExitRuntime(net, ThresholdPolicy("entropy", (0.5,)))
        >>> tuple(rt(torch.randn(5, 4)).exits.shape)
        (5,)
    """

    def __init__(
        self,
        net: MultiExitNetwork,
        policy: ExitPolicy,
        *,
        costs: CostProfile | None = None,
        mode: str = "eager",
        example_input: Tensor | None = None,
        validate: bool = True,
        buckets_per_octave: int = 4,
        cpp_wrapper: bool = False,
    ) -> None:
        policy.check(net.num_exits)
        backend = make_backend(mode, buckets_per_octave=buckets_per_octave, cpp_wrapper=cpp_wrapper)
        if mode != "eager" and example_input is None:
            raise ConfigError(f"mode={mode!r} compiles each stage: pass example_input=x[:2]")
        if mode != "eager":
            untraceable = [
                f"{name} ({type(m).__name__})"
                for name, m in net.named_modules()
                if getattr(m, "traceable", True) is False
            ]
            if untraceable:
                raise ConfigError(
                    f"mode={mode!r} cannot trace {', '.join(untraceable)}: they compute outside "
                    "torch (e.g. scikit-learn heads); use mode='eager'"
                )
        self.net = net.eval()
        self.policy = policy
        self.mode = mode
        self.validate = validate
        self.backend = backend
        self.cumulative = (
            torch.as_tensor(costs.cumulative, dtype=torch.float64) if costs is not None else None
        )
        self._dtype = input_dtype(net)
        self._work, tests = backend.prepare(net, policy.exit_tests(), example_input)
        steps, final = stage_modules(self._work, tests)
        examples: list[tuple[Activation, Tensor] | None] = [None] * len(steps)
        h_final: Activation | None = None
        if example_input is not None:  # what each stage sees on the example batch
            h, state = (
                example_input,
                policy.initial_state(example_input.shape[0], example_input.device),
            )
            with torch.no_grad(), _eval(self._work):
                for k, st in enumerate(steps):
                    examples[k] = (h, state)
                    h, _, _, state = st(h, state)
            h_final = h
        self._steps: list[Callable[..., Any]] = [
            backend.stage(st, ex) for st, ex in zip(steps, examples, strict=True)
        ]
        self._final: Callable[..., Any] = backend.stage(
            final, None if h_final is None else (h_final,)
        )
        self._paths: dict[int, nn.Module] = {}
        self._example = example_input
        # run_one's initial state, made once (13 µs a call otherwise; exit tests never write
        # their state in place)
        self._state1 = policy.initial_state(1)
        if backend.compiles_ahead:
            assert example_input is not None
            try:  # compile now (for this batch shape), so a missing compiler shows here
                self(example_input)
            except Exception as exc:  # torch._dynamo / inductor / onnxruntime errors
                needs = (
                    "it needs torch.compile with a working C++ compiler"
                    if mode == "compile"
                    else "the exported stages failed on the example batch"
                )
                raise ConfigError(
                    f"mode={mode!r} failed ({type(exc).__name__}: {str(exc)[:200]}); {needs}: "
                    "use mode='script' instead"
                ) from exc

    def _layout(self, x: Activation) -> Activation:
        if self.backend.channels_last and isinstance(x, Tensor) and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _rows(self, h: Activation, rows: Tensor) -> Activation:
        """Compaction: the rows ``rows`` of every tensor of ``h``, then the padding columns no
        remaining row needs dropped (networks built with ``trim_padding``)."""
        h = select_rows(h, rows)
        if self.net.trim_padding:
            h = trim_padding(h)
        return self._layout(h)

    def _bucket(self, n: int) -> int:
        per_octave = self.backend.per_octave
        return bucket_size(n, per_octave) if per_octave else n

    def check_input(self, x: Tensor) -> None:
        """Refuse a batch the network cannot run (shape, dtype, non-finite values) with one
        clear error; nothing is checked when the runtime was built with ``validate=False``."""
        if self.validate:
            check_input(x, self.net.input_shape, dtype=self._dtype)

    def path(self, i: int = -1) -> nn.Module:
        """Exit ``i``'s plain path (its blocks, then its head; no other heads) in this runtime's
        execution mode — the fair reference for timing that exit."""
        i = self.net.exit_index(i)
        if i not in self._paths:
            with _eval(self._work):
                self._paths[i] = self.backend.path(self._work.exit_path(i).eval(), self._example)
        return self._paths[i]

    @property
    def trim_padding(self) -> bool:
        """The network masks padding and its padding columns may be dropped
        (:attr:`MultiExitNetwork.trim_padding`)."""
        return self.net.trim_padding

    @property
    def num_stages(self) -> int:
        """Stages of the network, one per exit."""
        return len(self._steps) + 1

    @torch.no_grad()
    def stage(
        self, i: int, h: Activation, state: Tensor
    ) -> tuple[Activation, Tensor, Tensor | None, Tensor]:
        """Stage ``i`` alone on the rows ``h`` / ``state`` (padded to their bucket here and
        trimmed back): ``(h_next, logits, leave, state)``, with ``leave`` ``None`` at the final
        exit. The building block of :mod:`offramp.runtime.bulk`.

        Example:
            >>> import torch
            >>> from offramp import ThresholdPolicy
            >>> from offramp.models import mlp
            >>> rt = EarlyExitRuntime(mlp(4, 3, hidden=(8, 8)), ThresholdPolicy("max_prob", (0.5,)))
            >>> h, logits, leave, state = rt.stage(0, torch.randn(5, 4), torch.zeros(5))
            >>> tuple(logits.shape), tuple(leave.shape)
            ((5, 3), (5,))
        """
        if self.net.trim_padding and i > 0:  # rows pooled from batches padded alike
            h = trim_padding(h)
        m = batch_size(h)
        if (size := self._bucket(m)) != m:
            rows = padded(torch.arange(m, device=state.device), size)
            h, state = select_rows(h, rows), state[rows]
        h = self._layout(h)
        with _eval(self._work):
            if i == len(self._steps):
                return h, self._final(h)[:m], None, state[:m]
            h, logits, leave, state = self._steps[i](h, state)
        return slice_rows(h, 0, m), logits[:m], leave[:m], state[:m]

    def map(self, batches: Iterable[Tensor], *, pool: int | None = None) -> Iterator[RuntimeResult]:
        """Bulk inference: run ``batches`` with the samples that go on past an exit pooled
        across batches, each later stage running on ``pool`` rows at a time (default: the
        first batch's size) instead of a few rows per batch. Yields one result per batch, in
        order, each equal to ``self(batch)``; see :mod:`offramp.runtime.bulk` for the trade-off
        (throughput for latency).

        Example:
            >>> import torch
            >>> from offramp import ThresholdPolicy
            >>> from offramp.models import mlp
            >>> rt = EarlyExitRuntime(mlp(4, 3, hidden=(8, 8)), ThresholdPolicy("max_prob", (0.5,)))
            >>> xs = [torch.randn(6, 4) for _ in range(3)]
            >>> all(torch.equal(r.exits, rt(x).exits) for r, x in zip(rt.map(xs), xs))
            True
        """
        return run_pooled(self, batches, pool)

    def plain_backbone(self) -> nn.Module:
        """The plain backbone (no intermediate heads) in the same execution mode as the stages."""
        return self.path(-1)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> RuntimeResult:
        """Batched early exit with compaction; results in input order."""
        self.check_input(x)
        with _eval(self._work):
            return self._run(x)

    def _run(self, x: Tensor) -> RuntimeResult:
        n = x.shape[0]
        exits = torch.full((n,), len(self._steps), dtype=torch.long)
        idx = torch.arange(n)  # input position of each live row; rows past len(idx) are padding
        out: Tensor | None = None
        h: Activation = x
        state = self.policy.initial_state(n, x.device)
        if (size := self._bucket(n)) != n:
            rows = padded(idx, size)
            h, state = x[rows], state[rows]
        h = self._layout(h)
        for i, step in enumerate(self._steps):
            h, logits, leave, state = step(h, state)
            if out is None:
                out = logits.new_empty((n, logits.shape[1]))
            live = idx.numel()
            leave = leave[:live]
            gone = leave.nonzero().squeeze(1)  # the one host sync of this stage
            if gone.numel():
                out[idx[gone]] = logits[gone]
                exits[idx[gone]] = i
                stay = (~leave).nonzero().squeeze(1)
                if stay.numel() == 0:
                    break
                idx, rows = idx[stay], padded(stay, self._bucket(stay.numel()))
                h, state = self._rows(h, rows), state[rows]
            elif i == 0 and self.net.trim_padding:  # the batch's own padding, once
                h = trim_padding(h)
        else:
            logits = self._final(h)
            if out is None:
                out = logits.new_empty((n, logits.shape[1]))
            out[idx] = logits[: idx.numel()]
        assert out is not None
        costs = self.cumulative[exits] if self.cumulative is not None else None
        return RuntimeResult(out.argmax(dim=1), exits, out, costs)

    @torch.no_grad()
    def run_one(self, x: Tensor) -> tuple[int, int, Tensor]:
        """Batch-size-1 path: stop at the first exit that fires.

        Args:
            x: one sample as a batch, ``(1, *input_shape)``.

        Returns:
            ``(prediction, exit index, logits (C,))``.
        """
        if self.validate:
            self.check_input(x)
            if x.shape[0] != 1:
                raise ConfigError(f"run_one takes a batch of one sample, got {x.shape[0]}")
        with _eval(self._work):
            return self._run_one(x)

    def _run_one(self, x: Tensor) -> tuple[int, int, Tensor]:
        h: Activation = self._layout(x)
        state = (
            self._state1
            if x.device == self._state1.device
            else self.policy.initial_state(1, x.device)
        )
        for i, step in enumerate(self._steps):
            h, logits, leave, state = step(h, state)
            if leave[0].item():
                row = logits[0]
                return int(row.argmax()), i, row
            if i == 0 and self.net.trim_padding:  # the sample's padding
                h = trim_padding(h)
        logits = self._final(h)
        return int(logits[0].argmax()), len(self._steps), logits[0]


@contextlib.contextmanager
def _eval(net: nn.Module) -> Iterator[None]:
    """Inference semantics whatever mode the user left ``net`` in: when ``net.train()`` was
    called after the runtime was built, every module runs in eval mode inside the block
    (BatchNorm uses, and never updates, its running statistics) and gets its own mode back
    after it. A network in eval mode costs one attribute read."""
    if not net.training:
        yield
        return
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
