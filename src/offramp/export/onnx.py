"""ONNX export of stages and segments, and ONNX Runtime sessions that run like modules.

:func:`to_onnx` exports a module with ``torch.onnx`` (the Dynamo exporter) to ONNX bytes, its
batch dimension — and any other dimension asked for — left dynamic. :class:`OrtModule` runs
those bytes with ``onnxruntime`` behind a module's call: tensors (nested in tuples, as a stage
takes ``(h, *side)``) in and out, the output's structure recorded at export. Both need the
``onnx`` extra (``pip install 'offramp[onnx]'``), imported only when used.

Exported graphs are not bit-identical to eager: ONNX Runtime fuses operators, so logits differ
by about 1e-6 (relative); :func:`max_difference` measures it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from offramp.errors import ConfigError, ConversionError

__all__ = ["OrtModule", "max_difference", "require_onnx", "session_options", "to_onnx"]

_log = logging.getLogger("offramp.export")

#: ONNX opset of exported graphs (the exporter's own is written at 18).
OPSET = 18


def require_onnx(runtime_only: bool = False) -> Any:
    """The ``onnxruntime`` module, after checking that export's packages are installed too
    (unless ``runtime_only``).

    Raises:
        ConfigError: a package is missing; the message says what to install.
    """
    names = ["onnxruntime"] if runtime_only else ["onnxruntime", "onnx", "onnxscript"]
    missing = []
    for name in names:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(
            f"ONNX needs {', '.join(missing)}, not installed: pip install 'offramp[onnx]'"
        )
    import onnxruntime

    return onnxruntime


def session_options(threads: int | None = None) -> Any:
    """ONNX Runtime session options for a CPU shared with torch: ``threads`` intra-op threads
    (default: torch's), sequential execution, no spinning while idle (a spinning pool would
    burn a core between calls), errors-only logging."""
    ort = require_onnx(runtime_only=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


@contextlib.contextmanager
def _exporting() -> Iterator[None]:
    """Quiet export: the exporter's warnings and progress logs off, and the fused transformer
    fast path (``aten._transformer_encoder_layer_fwd``, which ONNX cannot express) disabled,
    restored afterwards."""
    fast = torch.backends.mha.get_fastpath_enabled()
    loggers = [
        logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")
    ]
    levels = [lg.level for lg in loggers]
    torch.backends.mha.set_fastpath_enabled(False)
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class _Flat(nn.Module):
    """``module`` taking and returning flat tuples of tensors (ONNX graphs have flat inputs
    and outputs); the nesting of the arguments is ``spec``."""

    def __init__(self, module: nn.Module, spec: pytree.TreeSpec) -> None:
        super().__init__()
        self.module, self.spec = module, spec

    def forward(self, *flat: Tensor) -> tuple[Tensor, ...]:
        args = pytree.tree_unflatten(list(flat), self.spec)
        return tuple(pytree.tree_leaves(self.module(*args)))


def to_onnx(
    module: nn.Module,
    example: Sequence[Any],
    *,
    dynamic: Sequence[dict[int, str]] | None = None,
) -> tuple[bytes, pytree.TreeSpec]:
    """``module`` exported to ONNX for arguments shaped like ``example``.

    Args:
        module: a module of tensors (a stage, a segment, an exit path), run in eval mode.
        example: its positional arguments, tensors or tuples of tensors, with a batch of at
            least two rows (the exporter fixes a dimension of size 1 in the graph).
        dynamic: per flat input tensor, its dynamic dimensions by name (default: dimension 0,
            ``"batch"``, of every input).

    Returns:
        ``(ONNX model bytes, the structure of the module's output)``.

    Raises:
        ConversionError: the module does not export (Python control flow on values, code
            outside torch), with the exporter's reason.

    Example:
        >>> from torch import nn
        >>> onnx_bytes, out = to_onnx(nn.Linear(4, 3), (torch.zeros(2, 4),))  # doctest: +SKIP
        >>> tuple(OrtModule(onnx_bytes, out)(torch.zeros(5, 4)).shape)  # doctest: +SKIP
        (5, 3)
    """
    require_onnx()
    flat, spec = pytree.tree_flatten(tuple(example))
    if not flat or not all(isinstance(t, Tensor) for t in flat):
        raise ConversionError("to_onnx: the example must be tensors, or tuples of tensors")
    if flat[0].dim() == 0 or flat[0].shape[0] < 2:
        raise ConversionError(
            "to_onnx: export with a batch of at least 2 rows (a size-1 batch would be fixed "
            "in the graph); pass x[:2]"
        )
    dims = list(dynamic) if dynamic is not None else [{0: "batch"} for _ in flat]
    if len(dims) != len(flat):
        raise ConversionError(f"to_onnx: {len(dims)} dynamic specs for {len(flat)} inputs")
    wrapped = _Flat(module.eval(), spec)
    with _exporting():
        out_spec = pytree.tree_flatten(module(*example))[1]
        try:
            prog = torch.onnx.export(
                wrapped,
                tuple(flat),
                dynamo=True,
                dynamic_shapes=(tuple(dims),),  # one entry: forward's *flat
                input_names=[f"in{i}" for i in range(len(flat))],
                opset_version=OPSET,
                external_data=False,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many types
            raise ConversionError(
                f"{type(module).__name__} does not export to ONNX ({_reason(exc)}); keep its "
                "forward to torch operations without Python branches on tensor values"
            ) from exc
        data = prog.model_proto.SerializeToString()
    return data, out_spec


def _reason(exc: Exception) -> str:
    """The exporter's one-line reason: the line after its "Exception summary" heading."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, ln in enumerate(lines[:-1]):
        if ln.startswith("## Exception summary"):
            return lines[i + 1][:300]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


class OrtModule(nn.Module):
    """An ONNX graph run by ONNX Runtime, called like the module it was exported from.

    Args:
        onnx_bytes: the model (:func:`to_onnx`, or a file's bytes).
        out_spec: the structure of the outputs (``None``: a flat tuple, or the single tensor).
        threads: intra-op threads (default: torch's).

    Tensors go in and come out on the CPU, sharing memory with numpy where they can; inputs
    must have the dtypes of the export (float32 features, int64 state, bool masks).
    """

    def __init__(
        self,
        onnx_bytes: bytes,
        out_spec: pytree.TreeSpec | None = None,
        *,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        ort = require_onnx(runtime_only=True)
        try:
            self.session = ort.InferenceSession(
                onnx_bytes, session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's own exception types
            raise ConversionError(
                f"ONNX Runtime cannot load this model ({type(exc).__name__}: "
                f"{str(exc)[:300]}); re-export it with this version of offramp"
            ) from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.out_spec = out_spec
        # a flat tuple of outputs (a CNN's stage) skips pytree: 10 µs a call at batch 1
        self._flat_out = (
            out_spec is not None
            and out_spec.type is tuple
            and all(c.num_leaves == 1 and c.is_leaf() for c in out_spec.children())
        )

    def forward(self, *args: Any) -> Any:
        flat = pytree.tree_leaves(args) if any(isinstance(a, tuple) for a in args) else args
        if len(flat) != len(self.input_names):
            raise ConversionError(
                f"this ONNX graph takes {len(self.input_names)} tensors, got {len(flat)}"
            )
        feed = {n: _numpy(t) for n, t in zip(self.input_names, flat, strict=True)}
        outs = [torch.from_numpy(a) for a in self.session.run(self.output_names, feed)]
        if self.out_spec is None:
            return outs[0] if len(outs) == 1 else tuple(outs)
        if self._flat_out:
            return tuple(outs)
        return pytree.tree_unflatten(outs, self.out_spec)


def _numpy(t: Tensor) -> np.ndarray:
    """``t`` as a C-contiguous numpy array, sharing memory where it can."""
    if not isinstance(t, Tensor):
        raise ConversionError(f"an ONNX graph takes tensors, got {type(t).__name__}")
    return t.detach().cpu().numpy() if t.is_contiguous() else t.detach().cpu().contiguous().numpy()


def max_difference(got: Any, want: Any) -> float:
    """Largest absolute difference between the floating-point tensors of two outputs of the
    same structure (integer and boolean tensors must be equal: ``inf`` when they are not).

    Example:
        >>> max_difference((torch.ones(2), torch.tensor([1])), (torch.ones(2), torch.tensor([1])))
        0.0
    """
    a, b = pytree.tree_leaves(got), pytree.tree_leaves(want)
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return float("inf")
        if y.is_floating_point():
            if x.numel():
                worst = max(worst, float((x.float() - y.float()).abs().max()))
        elif not torch.equal(x, y):
            return float("inf")
    return worst
