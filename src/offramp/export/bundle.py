"""Export bundles: a network's tier segments as ONNX or TorchScript files, with a manifest.

:func:`export_segments` writes one file per segment (``segment-0.onnx``, ...) and
``manifest.json``: the segments' stages, the policy (its thresholds), the codec their
activations travel in, the input's shape and dtype, each segment's inputs and outputs, and a
SHA-256 checksum of every file. :func:`load_bundle` checks every checksum before it loads a
file, and runs the segments with ONNX Runtime or TorchScript.

Every file is written atomically (:mod:`offramp.files`); the manifest last, so a bundle whose
export failed half-way has no manifest and is never loaded.

A TorchScript file holds TorchScript code that ``torch.jit.load`` compiles: load bundles you
made or trust (the checksums catch a changed file, not a malicious exporter). ONNX files are
data for ONNX Runtime's interpreter.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from offramp.activations import Activation
from offramp.errors import ConfigError, ConversionError, DataError
from offramp.export.onnx import OrtModule, max_difference, to_onnx
from offramp.export.segment import Segment, segments
from offramp.files import read_json, write_bytes, write_json
from offramp.network import MultiExitNetwork, input_dtype
from offramp.policies import ExitPolicy
from offramp.runtime.core import stage_modules
from offramp.tiers.codecs import CODECS

__all__ = [
    "FORMATS",
    "MANIFEST",
    "Bundle",
    "LoadedSegment",
    "SegmentOutput",
    "export_segments",
    "load_bundle",
    "segment_examples",
]

#: Export formats and their file suffixes.
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
#: The manifest's file name inside a bundle.
MANIFEST = "manifest.json"
_VERSION = 1


class SegmentOutput(NamedTuple):
    """What a segment returns (:class:`~offramp.export.segment.Segment`).

    Attributes:
        logits: ``(n, C)`` logits of each row's exit; for the rows that go on, of the
            segment's last exit (the answer a device falls back on).
        exits: ``(n,)`` exit index of each row, ``−1`` for the rows that go on.
        rows: ``(m,)`` positions of the rows that go on (``None`` for a final segment).
        h: their activation at the next segment's first stage (``None`` for a final one).
        state: their exit-test state (``None`` for a final one).
    """

    logits: Tensor
    exits: Tensor
    rows: Tensor | None = None
    h: Activation | None = None
    state: Tensor | None = None


def _output(flat: Sequence[Tensor], final: bool) -> SegmentOutput:
    if final:
        return SegmentOutput(flat[0], flat[1])
    members = tuple(flat[3:-1])
    h = members[0] if len(members) == 1 else members
    return SegmentOutput(flat[0], flat[1], flat[2], h, flat[-1])


def segment_examples(
    net: MultiExitNetwork, policy: ExitPolicy, example: Tensor, splits: Sequence[int]
) -> list[tuple[Activation, Tensor]]:
    """What each segment receives when ``example`` runs with no exit firing: its ``(h,
    state)``, every row of ``example`` included (the exporter's example inputs)."""
    steps, _ = stage_modules(net, policy.exit_tests())
    starts = {0, *splits}
    h: Activation = example
    state = policy.initial_state(example.shape[0], example.device)
    out = []
    with torch.no_grad():
        for k in range(len(steps) + 1):
            if k in starts:
                out.append((h, state))
            if k < len(steps):
                h, _, _, state = steps[k](h, state)
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _describe(x: Activation | Tensor) -> list[dict[str, Any]]:
    parts = x if isinstance(x, tuple) else (x,)
    return [
        {"shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")} for t in parts
    ]


def _torchscript(seg: Segment, example: tuple[Any, ...]) -> bytes:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer warns about data-dependent row counts
        traced = torch.jit.trace(seg.eval(), example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(torch.jit.freeze(traced), buf)
    return buf.getvalue()


def export_segments(
    net: MultiExitNetwork,
    policy: ExitPolicy,
    out_dir: str | Path,
    example: Tensor,
    *,
    splits: Sequence[int] = (),
    fmt: str = "onnx",
    codec: str = "fp32",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Export the network cut at ``splits`` (one segment per tier), each segment checked
    against eager on ``example``; returns the manifest's path.

    Args:
        net: the network (exported in eval mode; unchanged).
        policy: the exit policy; its tests are part of the segments.
        out_dir: the bundle's directory (created; files of an earlier export replaced).
        example: a batch of real inputs, two rows or more (more rows check more).
        splits: the stage each later segment starts at (``[]``: one segment, the whole
            network; ``[1]``: stage 0 on the device, the rest on a server).
        fmt: ``"onnx"`` or ``"torchscript"``.
        codec: the activation codec the manifest names for the wire
            (:data:`offramp.tiers.CODECS`).
        extra: more fields for the manifest (e.g. where the network came from).

    Raises:
        ConversionError: a segment does not export, or its export disagrees with eager.

    Example:
        >>> import tempfile
        >>> from offramp import ThresholdPolicy
        >>> from offramp.models import mlp
        >>> net = mlp(4, 3, hidden=(8, 8))
        >>> d = tempfile.mkdtemp()
        >>> path = export_segments(net, ThresholdPolicy("max_prob", (0.6,)), d,
        ...                        torch.randn(8, 4), splits=[1], fmt="torchscript")
        >>> [s["stages"] for s in load_bundle(d).manifest["segments"]]
        [[0, 1], [1, 2]]
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {sorted(FORMATS)}")
    if codec not in CODECS:
        raise ConfigError(f"unknown codec {codec!r}; choose one of {sorted(CODECS)}")
    if not isinstance(example, Tensor) or example.dim() == 0 or example.shape[0] < 2:
        raise ConfigError("export needs an example batch of two or more real inputs, x[:8]")
    net = net.eval()
    segs = segments(net, policy, splits)
    examples = segment_examples(net, policy, example, splits)
    out = Path(out_dir)
    entries = []
    for i, (seg, (h, state)) in enumerate(zip(segs, examples, strict=True)):
        args = (h, state)
        if fmt == "onnx":
            data, _ = to_onnx(seg, args)
            runner: nn.Module = OrtModule(data)
        else:
            data = _torchscript(seg, args)
            runner = torch.jit.load(io.BytesIO(data))
        with torch.no_grad():
            want, got = seg(*args), runner(*args)
        diff = max_difference(tuple(got), tuple(want))
        if not diff <= 1e-4:
            raise ConversionError(
                f"segment {i} (stages {seg.first}…{seg.last - 1}) exported to {fmt} differs "
                f"from eager by {diff:.3g} on the example batch; try the other format"
            )
        name = f"segment-{i}{FORMATS[fmt]}"
        write_bytes(out / name, data)
        entries.append(
            {
                "file": name,
                "sha256": _sha256(data),
                "bytes": len(data),
                "stages": [seg.first, seg.last],
                "final": seg.is_final,
                "inputs": {"h": _describe(h), "state": _describe(state)},
                "max_difference": diff,
            }
        )
    dtype = input_dtype(net) or example.dtype
    manifest = {
        "offramp_bundle": _VERSION,
        "format": fmt,
        "torch": torch.__version__,
        "num_exits": net.num_exits,
        "splits": list(splits),
        "input": {
            "shape": list(net.input_shape) if net.input_shape else list(example.shape[1:]),
            "dtype": str(dtype).removeprefix("torch."),
        },
        "policy": {"type": type(policy).__name__, **policy.to_dict()},
        "state_size": policy.state_size,
        "codec": codec,
        "segments": entries,
        **(extra or {}),
    }
    return write_json(out / MANIFEST, manifest)


class LoadedSegment:
    """One segment of a bundle, ready to run: ``seg(h, state) -> SegmentOutput``.

    Attributes:
        first, last: its stages ``first … last − 1``.
        final: it ends with the final exit.
        module: the loaded ONNX Runtime session or TorchScript module.
    """

    def __init__(self, module: Any, first: int, last: int, final: bool) -> None:
        self.module, self.first, self.last, self.final = module, first, last, final

    @torch.no_grad()
    def __call__(self, h: Activation, state: Tensor) -> SegmentOutput:
        return _output(tuple(self.module(h, state)), self.final)


@dataclass
class Bundle:
    """A loaded export bundle.

    Attributes:
        manifest: ``manifest.json`` as written.
        segments: the segments in order, each :class:`LoadedSegment`.
    """

    manifest: dict[str, Any]
    segments: list[LoadedSegment]

    @property
    def state_size(self) -> int:
        """Columns of the exit tests' per-sample state."""
        return int(self.manifest["state_size"])

    def initial_state(self, n: int) -> Tensor:
        """The state before the first exit, ``(n, state_size)`` int64."""
        return torch.zeros((n, self.state_size), dtype=torch.long)

    def run(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Every segment in turn on ``x``, in one process: ``(logits (n, C), exits (n,))`` —
        what the tiers compute together."""
        n = x.shape[0]
        h: Activation = x
        state = self.initial_state(n)
        rows = torch.arange(n)
        logits: Tensor | None = None
        exits = torch.full((n,), -1, dtype=torch.long)
        for seg in self.segments:
            out = seg(h, state)
            if logits is None:
                logits = out.logits.new_zeros((n, out.logits.shape[1]))
            left = out.exits >= 0
            logits[rows[left]] = out.logits[left]
            exits[rows[left]] = out.exits[left]
            if seg.final or out.rows is None or out.rows.numel() == 0:
                break
            assert out.h is not None and out.state is not None
            rows, h, state = rows[out.rows], out.h, out.state
        assert logits is not None
        return logits, exits


def load_bundle(path: str | Path, *, threads: int | None = None) -> Bundle:
    """The bundle in directory ``path`` (or at its ``manifest.json``), every file's checksum
    checked before it is loaded.

    Raises:
        DataError: no manifest, a manifest offramp cannot read, a missing file, or a file whose
            checksum differs from the manifest's (changed or truncated since export).
    """
    root = Path(path)
    if root.name == MANIFEST:
        root = root.parent
    if not (root / MANIFEST).is_file():
        raise DataError(f"{root} has no {MANIFEST}: is it a directory `offramp export` wrote?")
    m = read_json(root / MANIFEST)
    if not isinstance(m, dict) or m.get("offramp_bundle") != _VERSION:
        raise DataError(
            f"{root / MANIFEST} is not an offramp bundle manifest of version {_VERSION}; "
            "re-export it with this version of offramp"
        )
    try:
        fmt, entries = m["format"], m["segments"]
        if fmt not in FORMATS or not isinstance(entries, list) or not entries:
            raise TypeError
        specs = [
            (
                str(e["file"]),
                str(e["sha256"]),
                int(e["stages"][0]),
                int(e["stages"][1]),
                bool(e["final"]),
            )
            for e in entries
        ]
        int(m["state_size"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(f"{root / MANIFEST} is malformed ({exc!r}); re-export the bundle") from exc
    loaded = []
    for name, digest, first, last, final in specs:
        file = root / name
        if Path(name).name != name or not file.is_file():
            raise DataError(f"{root}: segment file {name!r} is missing; re-export the bundle")
        data = file.read_bytes()
        if _sha256(data) != digest:
            raise DataError(
                f"{file}: checksum differs from the manifest's (changed or truncated since "
                "export); re-export the bundle"
            )
        module: Any = (
            OrtModule(data, threads=threads)
            if fmt == "onnx"
            else torch.jit.load(io.BytesIO(data), map_location="cpu")
        )
        loaded.append(LoadedSegment(module, first, last, final))
    return Bundle(m, loaded)
