"""How a runtime's stages execute: one interface, one class per execution mode.

A :class:`StageBackend` turns the runtime's stage modules — each ``(h, state) -> (h_next,
logits, leave, state)``, the final one ``h -> logits`` — and exit paths into callables, and says
how batches reach them (a private snapshot of the network, channels-last layout, batch-size
buckets). The runtime core (:mod:`offramp.runtime.core`) never looks inside: a new backend (an
ONNX Runtime session per stage, say) is one more class here and one more name in
:data:`MODES`.

- ``eager``: the modules themselves.
- ``script``: each stage traced and frozen with TorchScript, then ``optimize_for_inference``.
- ``compile``: a frozen snapshot of the network in channels-last layout, each stage exported
  and compiled ahead of time by Inductor where it exports (calls skip TorchDynamo), else
  ``torch.compile``; stages specialised to a few batch sizes ("buckets", :func:`bucket_size`),
  a batch padded up to its bucket by repeating a row.
- ``onnx``: each stage exported to ONNX (:mod:`offramp.export.onnx`) and run by ONNX Runtime,
  its batch dimension (and, for networks that trim padding, its sequence dimension) dynamic;
  needs the ``onnx`` extra.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from offramp.errors import ConfigError
from offramp.network import MultiExitNetwork

__all__ = [
    "MODES",
    "CompileBackend",
    "EagerBackend",
    "OnnxBackend",
    "ScriptBackend",
    "StageBackend",
    "bucket_size",
    "dynamo_limits",
    "make_backend",
    "padded",
]

_log = logging.getLogger("offramp.runtime")

MODES = ("eager", "script", "compile", "onnx")


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


class StageBackend:
    """Eager execution, and the interface every backend implements.

    Attributes:
        name: the mode's name in :data:`MODES`.
        per_octave: batch-size buckets per power of two (0: every batch size runs as it is).
        channels_last: 4-D activations are laid out channels-last between stages.
        compiles_ahead: the runtime runs its example batch once at construction, so that a
            backend's compile errors surface there and not on the first real batch.
    """

    name = "eager"
    per_octave = 0
    channels_last = False
    compiles_ahead = False

    def prepare(
        self, net: MultiExitNetwork, tests: Sequence[nn.Module], example: Tensor | None
    ) -> tuple[MultiExitNetwork, list[nn.Module]]:
        """The network and exit tests the stages will be built from (the user's own here)."""
        return net, list(tests)

    def stage(self, module: nn.Module, example: tuple[Tensor, ...] | None) -> Callable[..., Any]:
        """``module`` (a stage) ready to run; ``example`` is what it receives on the
        runtime's example batch (``None`` without one)."""
        return module

    def path(self, module: nn.Module, example: Tensor | None) -> nn.Module:
        """An exit path (blocks then one head, input to logits) ready to run."""
        return module


EagerBackend = StageBackend


class ScriptBackend(StageBackend):
    """Each stage traced on the example batch and frozen (TorchScript)."""

    name = "script"

    def stage(self, module: nn.Module, example: tuple[Tensor, ...] | None) -> Callable[..., Any]:
        assert example is not None  # the runtime insists on an example for this mode
        with torch.no_grad():
            return _script(module, *example)

    def path(self, module: nn.Module, example: Tensor | None) -> nn.Module:
        assert example is not None
        with torch.no_grad():
            return _script(module, example)


class CompileBackend(StageBackend):
    """Inductor on a frozen, channels-last snapshot, with batch-size buckets.

    Args:
        per_octave: buckets per power of two (a power of two itself).
        cpp_wrapper: Inductor drives each stage from C++ (less per-call overhead).
    """

    name = "compile"
    compiles_ahead = True

    def __init__(self, per_octave: int = 4, *, cpp_wrapper: bool = False) -> None:
        bucket_size(1, per_octave)  # validates it
        self.per_octave = per_octave
        self.cpp_wrapper = cpp_wrapper

    def prepare(
        self, net: MultiExitNetwork, tests: Sequence[nn.Module], example: Tensor | None
    ) -> tuple[MultiExitNetwork, list[nn.Module]]:
        net = copy.deepcopy(net).eval().requires_grad_(False)  # inference only
        if example is not None and example.dim() == 4:
            net = net.to(memory_format=torch.channels_last)
            self.channels_last = True
        tests = [copy.deepcopy(t).eval().requires_grad_(False) for t in tests]
        return net, tests

    def stage(self, module: nn.Module, example: tuple[Tensor, ...] | None) -> Callable[..., Any]:
        return _Compiled(module, cpp_wrapper=self.cpp_wrapper)

    def path(self, module: nn.Module, example: Tensor | None) -> nn.Module:
        compiled = _Compiled(module, cpp_wrapper=self.cpp_wrapper)
        return _Bucketed(compiled, self.channels_last, self.per_octave)


class OnnxBackend(StageBackend):
    """Each stage and exit path exported to ONNX and run by an ONNX Runtime session.

    Args:
        threads: ONNX Runtime's intra-op threads per session (default: torch's thread count).

    A stage that does not export, or whose export disagrees with eager on the example batch
    (beyond 1e-4 absolute + 1e-4 relative on any floating-point output), is refused with a
    :class:`~offramp.errors.ConversionError` saying why: ``mode="onnx"`` runs what was
    exported or nothing.
    """

    name = "onnx"
    compiles_ahead = True

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self._seq = False

    def prepare(
        self, net: MultiExitNetwork, tests: Sequence[nn.Module], example: Tensor | None
    ) -> tuple[MultiExitNetwork, list[nn.Module]]:
        self._seq = net.trim_padding  # token features' sequence length varies per batch
        net = copy.deepcopy(net).eval().requires_grad_(False)
        return net, [copy.deepcopy(t).eval().requires_grad_(False) for t in tests]

    def stage(self, module: nn.Module, example: tuple[Tensor, ...] | None) -> Callable[..., Any]:
        assert example is not None
        return self._export(module, example)

    def path(self, module: nn.Module, example: Tensor | None) -> nn.Module:
        assert example is not None
        return self._export(module, (example,))

    def _export(self, module: nn.Module, example: tuple[Any, ...]) -> nn.Module:
        from offramp.activations import select_rows
        from offramp.errors import ConversionError
        from offramp.export.onnx import OrtModule, max_difference, to_onnx

        h = example[0]
        rows = torch.zeros(2, dtype=torch.long)  # the exporter needs a batch of two or more
        if _as_tuple(h)[0].shape[0] < 2:
            example = tuple(select_rows(a, rows) for a in example)
        flat = _as_tuple(example)
        n_act = len(_as_tuple(example[0]))
        dims = [
            {0: "batch", 1: "seq"} if self._seq and i < n_act and t.dim() >= 2 else {0: "batch"}
            for i, t in enumerate(flat)
        ]
        data, spec = to_onnx(module, example, dynamic=dims)
        ort_module = OrtModule(data, spec, threads=self.threads)
        with torch.no_grad():
            want, got = module(*example), ort_module(*example)
        diff = max_difference(_floats(got), _floats(want))
        scale = max((float(t.abs().max()) for t in _floats(want) if t.numel()), default=0.0)
        if not diff <= 1e-4 + 1e-4 * scale:
            raise ConversionError(
                f"{type(module).__name__} exported to ONNX differs from eager by {diff:.3g} "
                "on the example batch; run it with mode='script' and report the model"
            )
        return ort_module


def _floats(x: Any) -> tuple[Tensor, ...]:
    return tuple(t for t in _as_tuple(x) if t.is_floating_point())


def make_backend(
    mode: str, *, buckets_per_octave: int = 4, cpp_wrapper: bool = False
) -> StageBackend:
    """The backend of execution mode ``mode`` (a name in :data:`MODES`).

    Example:
        >>> make_backend("compile", buckets_per_octave=8).per_octave
        8
    """
    if mode not in MODES:
        raise ConfigError(f"unknown runtime mode {mode!r}; choose one of {MODES}")
    if cpp_wrapper and mode != "compile":
        raise ConfigError(f"cpp_wrapper=True applies to mode='compile' only, not {mode!r}")
    if mode == "script":
        return ScriptBackend()
    if mode == "compile":
        return CompileBackend(buckets_per_octave, cpp_wrapper=cpp_wrapper)
    if mode == "onnx":
        from offramp.export.onnx import require_onnx

        require_onnx()  # a missing extra is said before any work
        return OnnxBackend()
    return StageBackend()


@contextlib.contextmanager
def dynamo_limits(limit: int = 1024) -> Iterator[None]:
    """Dynamo's recompile limits raised to ``limit`` inside the block, restored after it.

    Each compiled stage variant has its own code object, but a graph break inside a stage
    resumes in code shared by every variant: with Dynamo's default (8 per function) a run with
    many batch-size buckets would fall back to eager mid-run. The runtime raises the limits
    only around its own Dynamo calls, leaving the rest of the process's setting alone.
    """
    import torch._dynamo.config as dc

    names = [
        n
        for n in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit")
        if hasattr(dc, n) and getattr(dc, n) < limit
    ]
    with dc.patch({n: limit for n in names}):
        yield


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
    batch-size buckets the stages have seen. A graph break inside a stage (a head leaving
    torch) resumes in code shared by every variant, so Dynamo's recompile limits are raised
    around these calls (:func:`dynamo_limits`) — only around them: the process's own setting is
    restored after each call.

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
        key = (  # every tensor's signature: an activation may be (h, *side inputs)
            grad,
            autocast,
            *((a.shape, a.stride(), a.dtype, a.device) for a in _as_tuple(args)),
        )
        fn = self._variants.get(key)
        if fn is not None:
            if self.kinds[key] == "dynamo":
                with dynamo_limits():
                    return fn(*args)
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
            with inductor_config.patch(config), dynamo_limits():
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


def padded(index: Tensor, size: int) -> Tensor:
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
            x = x[padded(torch.arange(n, device=x.device), size)]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.module(x)[:n]


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


def _as_tuple(x: Any) -> tuple[Tensor, ...]:
    """Every tensor of ``x`` (a tensor, or tuples of them nested, as a stage returns an
    activation with side inputs), in order."""
    if isinstance(x, tuple):
        return tuple(t for part in x for t in _as_tuple(part))
    return (x,)
