"""Real early-exit inference.

The batched path runs a batch stage by stage; after each exit the samples that leave are
written to the output (in input order) and dropped from the batch (compaction), so later stages
only compute for the samples still running. The only host synchronisation is one ``nonzero`` per
stage — none per sample. The batch-1 path stops at the first exit that fires.

Each stage is one module computing ``(h_i, logits_i, leave_i)`` — body, head and the exit test
fused — and can be traced and frozen with TorchScript (``mode="script"``), or compiled by
Inductor (``mode="compile"``: a frozen snapshot of the network in channels-last layout, so stage
boundaries cost no layout conversion; each stage exported and compiled ahead of time where it
exports, so calls skip TorchDynamo, else ``torch.compile``). Compiled stages are specialised to
a few batch sizes — "buckets", four per octave — and a batch is padded up to its bucket by
repeating a row of the gather that compaction does anyway: at most 25 % (about 10 % on average)
of a stage's rows are padding, in exchange for static-shape kernels with frozen, prepacked
weights. Use :meth:`EarlyExitRuntime.plain_backbone` to time the plain backbone in the same
execution mode.
"""

from __future__ import annotations

import copy
import itertools
import logging
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from offramp.costs import CostProfile
from offramp.errors import ConfigError
from offramp.network import MultiExitNetwork, check_input
from offramp.policies import ExitPolicy

__all__ = ["MODES", "EarlyExitRuntime", "RuntimeResult", "bucket_size"]

_log = logging.getLogger(__name__)

MODES = ("eager", "script", "compile")


def bucket_size(n: int, per_octave: int = 4) -> int:
    """Smallest bucket ≥ ``n``: sizes up to ``2 * per_octave`` are their own bucket; above,
    ``per_octave`` evenly spaced sizes per power of two (so padding is < 1 / per_octave).

    Example:
        >>> [bucket_size(n) for n in (1, 8, 9, 17, 100, 129, 256)]
        [1, 8, 10, 20, 112, 160, 256]
    """
    if per_octave < 1 or per_octave & (per_octave - 1):
        raise ConfigError(f"per_octave must be a power of two (1, 2, 4, 8, ...), got {per_octave}")
    if n <= 2 * per_octave:
        return n
    step = 1 << ((n - 1).bit_length() - per_octave.bit_length())
    return -(-n // step) * step


@dataclass(frozen=True)
class RuntimeResult:
    """Outputs of the runtime, in input order.

    Attributes:
        predictions: predicted class per sample, ``(N,)``.
        exits: exit each sample left at, ``(N,)``.
        logits: logits of that exit, ``(N, C)``.
        costs: FLOPs spent on each sample, ``C_{exit}``, ``(N,)``, when a cost profile was given.
    """

    predictions: Tensor
    exits: Tensor
    logits: Tensor
    costs: Tensor | None = None


class _Step(nn.Module):
    """body → head → exit test, as one module: ``(h, state) -> (h_next, logits, leave, state)``.
    The test sees the logits, or ``h`` when it scores features (a gate)."""

    def __init__(self, body: nn.Module, head: nn.Module, test: nn.Module):
        super().__init__()
        self.body, self.head, self.test = body, head, test
        self.on_features = bool(getattr(test, "on_features", False))

    def forward(self, h: Tensor, state: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        h = self.body(h)
        logits = self.head(h)
        leave, state = self.test(h if self.on_features else logits, state)
        return h, logits, leave, state


def _allow_recompiles(limit: int = 1024) -> None:
    """Each stage variant has its own code object, but a graph break inside a stage (a head
    leaving torch) resumes in code shared by every variant: raise Dynamo's recompile limits
    (default 8 per function) so it never falls back to eager mid-run. A process-wide setting,
    only ever raised."""
    import torch._dynamo.config as dc

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dc, name) and getattr(dc, name) < limit:
            setattr(dc, name, limit)


class _Compiled:
    """``module`` compiled by Inductor once per input signature (shapes, strides, dtypes, grad
    mode, autocast), each signature as its own compiled function.

    For inference (no grad, no autocast) a signature is first exported (``torch.export``,
    non-strict) and compiled ahead of time with ``torch._inductor.standalone_compile``: the
    call then skips TorchDynamo's frame hook and guard checks, which this class's exact
    signature key makes redundant (on the runtime benchmark's network at batch 1, 0.1 ms per
    stage call: 16 % of a three-stage ``run_one``; compiling is faster too). A module that
    does not export (data-dependent Python, code outside torch), or whose compiled output
    disagrees with eager on the first batch, falls back to ``torch.compile``, as do calls
    with grad or autocast enabled.

    Under ``torch.compile`` each signature has its own code object: Dynamo keeps compiled
    variants per code object and walks them, checking guards, on every call; with the variant
    picked here by its exact signature, each call checks one variant's guards, however many
    batch-size buckets the stages have seen, and no recompile limit is ever reached.

    Freezing (conv-bn folded, weights prepacked), and Inductor's C++ wrapper when asked for, are
    on while a variant compiles. Inductor reads them from its global config
    (``torch.compile(options=...)`` does not reach them), so they are switched on only around
    compilation, leaving the user's other compilations alone.
    """

    def __init__(self, module: nn.Module, *, cpp_wrapper: bool = False) -> None:
        self.module = module
        self.cpp_wrapper = cpp_wrapper  # Inductor's C++ wrapper: less overhead per call
        self._variants: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self.kinds: dict[tuple[Any, ...], str] = {}  # "standalone" or "dynamo", per signature

    def __call__(self, *args: Tensor) -> Any:
        grad = torch.is_grad_enabled()  # freezing applies without grad only
        autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")
        key = (
            grad,
            autocast,
            *((a.shape, a.stride(), a.dtype, a.device) for a in args),
        )
        fn = self._variants.get(key)
        if fn is not None:
            return fn(*args)
        import torch._inductor.config as inductor_config

        config = {"freezing": True, "cpp_wrapper": self.cpp_wrapper}
        compiled = None if grad or autocast else _standalone(self.module, args, config)
        if compiled is not None:
            self.kinds[key] = "standalone"
            fn, out = compiled
        else:
            self.kinds[key] = "dynamo"
            fn = torch.compile(_own_code(self.module), dynamic=False)
            with inductor_config.patch(config):
                out = fn(*args)
        self._variants[key] = fn
        return out


def _standalone(
    module: nn.Module, args: tuple[Tensor, ...], config: dict[str, Any]
) -> tuple[Callable[..., Any], Any] | None:
    """``module`` exported and compiled ahead of time for inputs shaped like ``args``, with
    Inductor ``config``, and its output on ``args``; ``None`` when it does not export or
    compile, or disagrees with eager on ``args``."""
    import torch._inductor.config as inductor_config
    from torch._inductor import standalone_compile

    name = type(module).__name__
    # standalone_compile warns that a frozen graph cannot be saved: nothing is saved here
    quiet = logging.getLogger("torch._inductor.standalone_compile")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = torch.export.export(module, args, strict=False).module()
            with inductor_config.patch(config):
                fn = standalone_compile(
                    gm, list(args), dynamic_shapes="from_example_inputs", donate_graph_module=True
                )
            got, want = fn(*args), module(*args)
    except Exception as exc:  # export / Inductor errors have many types; torch.compile may work
        _log.debug("%s not compiled ahead of time (%s: %s)", name, type(exc).__name__, exc)
        return None
    finally:
        quiet.setLevel(level)
    if not _agree(got, want):
        _log.debug("%s compiled ahead of time disagrees with eager", name)
        return None
    return fn, got


def _agree(got: Any, want: Any) -> bool:
    """Same structure; equal integer and boolean tensors, close floating-point ones."""
    got, want = _as_tuple(got), _as_tuple(want)
    return len(got) == len(want) and all(
        torch.equal(a, b)
        if not b.is_floating_point()
        else a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)
        for a, b in zip(got, want, strict=True)
    )


_variant_count = itertools.count()


def _own_code(module: nn.Module) -> Callable[..., Any]:
    """A function calling ``module``, with a code object of its own (Dynamo caches per code
    object: a shared one would pile every stage's and bucket's variants into one cache)."""

    def call(*args: Tensor) -> Any:
        return module(*args)

    code = call.__code__.replace(co_name=f"offramp_variant_{next(_variant_count)}")
    return types.FunctionType(code, call.__globals__, code.co_name, None, call.__closure__)


def _padded(index: Tensor, size: int) -> Tensor:
    """``index`` extended to ``size`` entries by repeating its first entry."""
    extra = size - index.numel()
    return torch.cat([index, index[:1].expand(extra)]) if extra else index


class _Bucketed(nn.Module):
    """Hands its compiled module channels-last inputs padded to their batch-size bucket, and
    returns the rows of the real samples."""

    def __init__(self, module: _Compiled, channels_last: bool, per_octave: int) -> None:
        super().__init__()
        self.module, self.channels_last, self.per_octave = module, channels_last, per_octave

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        size = bucket_size(n, self.per_octave)
        if size != n:
            x = x[_padded(torch.arange(n, device=x.device), size)]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.module(x)[:n]


class _Final(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, h: Tensor) -> Tensor:
        return self.head(self.body(h))


def _script(module: nn.Module, *example: Tensor) -> nn.Module:
    """Trace and freeze ``module`` for inference, then let ``optimize_for_inference`` fuse
    conv/bn/relu and move convolutions to oneDNN layouts. Graphs whose optimised form fails or
    disagrees with eager on ``example`` (some oneDNN kernels have shape limits) keep the plain
    frozen graph."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")

        def frozen() -> torch.jit.ScriptModule:
            return torch.jit.freeze(torch.jit.trace(module.eval(), example, check_trace=False))

        want = module(*example)
        try:  # optimize_for_inference rewrites its argument in place: give it its own copy
            fast = torch.jit.optimize_for_inference(frozen())
            same = _agree(fast(*example), want)
        except RuntimeError:
            same = False
        return fast if same else frozen()


def _as_tuple(x: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


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
            two need ``example_input``.
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
        if mode not in MODES:
            raise ConfigError(f"unknown runtime mode {mode!r}; choose one of {MODES}")
        if cpp_wrapper and mode != "compile":
            raise ConfigError(f"cpp_wrapper=True applies to mode='compile' only, not {mode!r}")
        if mode in ("script", "compile") and example_input is None:
            raise ConfigError(f"mode={mode!r} compiles each stage: pass example_input=x[:2]")
        if mode in ("script", "compile"):
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
        self._cpp_wrapper = cpp_wrapper
        bucket_size(1, buckets_per_octave)  # validates it
        self._per_octave = buckets_per_octave if mode == "compile" else 0
        self.cumulative = (
            torch.as_tensor(costs.cumulative, dtype=torch.float64) if costs is not None else None
        )
        self._channels_last = False
        if mode == "compile":  # a snapshot, laid out channels-last for convolutions
            net = copy.deepcopy(net).eval().requires_grad_(False)  # inference only
            assert example_input is not None
            if example_input.dim() == 4:
                net = net.to(memory_format=torch.channels_last)
                self._channels_last = True
        self._work = net
        stages = net.stages()
        tests = policy.exit_tests()
        if mode == "compile":  # the tests' scorers join the snapshot
            tests = [copy.deepcopy(t).eval().requires_grad_(False) for t in tests]
        steps: list[Callable[..., Any]] = [
            _Step(s.body, s.head, t) for s, t in zip(stages[:-1], tests, strict=True)
        ]
        final: Callable[..., Any] = _Final(stages[-1].body, stages[-1].head)
        if mode == "script":
            assert example_input is not None
            h = example_input
            state = policy.initial_state(h.shape[0], h.device)
            scripted = []
            with torch.no_grad():
                for st in steps:
                    scripted.append(_script(st, h, state))
                    h, _, _, state = st(h, state)
                final = _script(final, h)
            steps = scripted
        if mode == "compile":
            _allow_recompiles()
            steps = [_Compiled(st, cpp_wrapper=cpp_wrapper) for st in steps]
            final = _Compiled(final, cpp_wrapper=cpp_wrapper)
        self._steps = steps
        self._final = final
        self._paths: dict[int, nn.Module] = {}
        self._example = example_input
        if mode == "compile":
            assert example_input is not None
            try:  # compile now (for this batch shape), so a missing compiler shows here
                self(example_input)
            except Exception as exc:  # torch._dynamo / inductor errors have many types
                raise ConfigError(
                    f"mode='compile' failed ({type(exc).__name__}: {str(exc)[:200]}); it needs "
                    "torch.compile with a working C++ compiler: use mode='script' instead"
                ) from exc

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last else x

    def _bucket(self, n: int) -> int:
        return bucket_size(n, self._per_octave) if self._per_octave else n

    def path(self, i: int = -1) -> nn.Module:
        """Exit ``i``'s plain path (its blocks, then its head; no other heads) in this runtime's
        execution mode — the fair reference for timing that exit."""
        i = self.net._exit(i)
        if i not in self._paths:
            m = self._work.exit_path(i).eval()
            if self.mode == "script":
                assert self._example is not None
                with torch.no_grad():
                    m = _script(m, self._example)
            if self.mode == "compile":
                m = _Compiled(m, cpp_wrapper=self._cpp_wrapper)
                m = _Bucketed(m, self._channels_last, self._per_octave)
            self._paths[i] = m
        return self._paths[i]

    @property
    def num_stages(self) -> int:
        """Stages of the network, one per exit."""
        return len(self._steps) + 1

    def _stage(
        self, i: int, h: Tensor, state: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Stage ``i`` on the rows ``h`` / ``state`` (padded to their bucket here and trimmed
        back): ``(h_next, logits, leave, state)``, with ``leave`` ``None`` at the final exit."""
        m = h.shape[0]
        if (size := self._bucket(m)) != m:
            rows = _padded(torch.arange(m, device=h.device), size)
            h, state = h[rows], state[rows]
        h = self._layout(h)
        if i == len(self._steps):
            return h, self._final(h)[:m], None, state[:m]
        h, logits, leave, state = self._steps[i](h, state)
        return h[:m], logits[:m], leave[:m], state[:m]

    def map(self, batches: Iterable[Tensor], *, pool: int | None = None) -> Iterator[RuntimeResult]:
        """Bulk inference: run ``batches`` with the samples that go on past an exit pooled
        across batches, each later stage running on ``pool`` rows at a time (default: the
        first batch's size) instead of a few rows per batch. Yields one result per batch, in
        order, each equal to ``self(batch)``; see :mod:`offramp.pooled` for the trade-off
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
        from offramp.pooled import run_pooled

        return run_pooled(self, batches, pool)

    def plain_backbone(self) -> nn.Module:
        """The plain backbone (no intermediate heads) in the same execution mode as the stages."""
        return self.path(-1)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> RuntimeResult:
        """Batched early exit with compaction; results in input order."""
        if self.validate:
            check_input(x, self.net.input_shape)
        n = x.shape[0]
        exits = torch.full((n,), len(self._steps), dtype=torch.long)
        idx = torch.arange(n)  # input position of each live row; rows past len(idx) are padding
        out: Tensor | None = None
        h, state = x, self.policy.initial_state(n, x.device)
        if (size := self._bucket(n)) != n:
            rows = _padded(idx, size)
            h, state = h[rows], state[rows]
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
                idx, rows = idx[stay], _padded(stay, self._bucket(stay.numel()))
                h, state = self._layout(h[rows]), state[rows]
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
            check_input(x, self.net.input_shape)
            if x.shape[0] != 1:
                raise ConfigError(f"run_one takes a batch of one sample, got {x.shape[0]}")
        h = self._layout(x)
        state = self.policy.initial_state(1, x.device)
        for i, step in enumerate(self._steps):
            h, logits, leave, state = step(h, state)
            if bool(leave[0]):
                return int(logits[0].argmax()), i, logits[0]
        logits = self._final(h)
        return int(logits[0].argmax()), len(self._steps), logits[0]
