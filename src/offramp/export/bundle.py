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
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from offramp.activations import Activation, select_rows
from offramp.errors import ConfigError, ConversionError, DataError
from offramp.export.onnx import OrtModule, max_difference, to_onnx
from offramp.export.segment import (
    Segment,
    SegmentOutput,
    StagedSegment,
    segment_output,
    segments,
)
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

_log = logging.getLogger("offramp.export")

#: Export formats and their file suffixes.
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
#: The manifest's file name inside a bundle.
MANIFEST = "manifest.json"
_VERSION = 2  # 2: TorchScript segments may be staged too (version 1 still loads)
_READS = (1, 2)


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


def _torchscript(seg: nn.Module, example: tuple[Any, ...]) -> bytes:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer warns about data-dependent row counts
        traced = torch.jit.trace(seg.eval(), example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(torch.jit.freeze(traced), buf)
    return buf.getvalue()


def _check(seg: Segment, runner: Any, args: tuple[Any, ...], where: str, fmt: str) -> float:
    """The largest difference of ``runner`` to the eager segment on ``args``; refused past
    1e-4 (integer outputs — exits, rows — must be equal)."""
    with torch.no_grad():
        want, got = seg(*args), runner(*args)
    diff = max_difference(tuple(got), tuple(want))
    if not diff <= 1e-4:
        raise ConversionError(
            f"{where} exported to {fmt} differs from eager by {diff:.3g} on the example batch; "
            "try the other format"
        )
    return diff


def _takes_empty(seg: Segment, args: tuple[Any, ...]) -> bool:
    """Whether every stage of ``seg`` runs on a batch of zero rows, as a one-graph segment
    must: all its rows can leave before its last stage. Hugging Face attention, for one,
    reshapes with ``view(n, t, -1, d)``, which refuses zero rows."""
    h, state = args
    none = torch.zeros(0, dtype=torch.long, device=state.device)
    try:
        with torch.no_grad():
            h, state = select_rows(h, none), state[none]
            for step in seg.steps:
                h, _, _, state = step(h, state)
            if seg.final is not None:
                seg.final(h)
    except Exception:  # a kernel or a reshape refusing an empty batch; any type
        return False
    return True


def _staged(
    seg: Segment, args: tuple[Any, ...], index: int, fmt: str
) -> tuple[list[tuple[str, bytes, str | None]], StagedSegment]:
    """Each stage of ``seg`` as its own ONNX graph or TorchScript module (batch dynamic), and
    the segment that runs them with compaction on the host (stages skipped once no row is
    left)."""
    from torch.utils import _pytree as pytree

    def one(module: nn.Module, example: tuple[Any, ...], name: str) -> Any:
        if fmt == "onnx":
            data, spec = to_onnx(module, example)
            files.append((f"{name}.onnx", data, pytree.treespec_dumps(spec)))
            return OrtModule(data, spec)
        data = _torchscript(module, example)
        files.append((f"{name}.pt", data, None))
        return torch.jit.load(io.BytesIO(data))

    h, state = args
    files: list[tuple[str, bytes, str | None]] = []
    steps: list[Any] = []
    with torch.no_grad():
        for j, step in enumerate(seg.steps):
            steps.append(one(step, (h, state), f"segment-{index}-stage-{j}"))
            h, _, _, state = step(h, state)
        final = one(seg.final, (h,), f"segment-{index}-final") if seg.final is not None else None
    return files, StagedSegment(steps, final, seg.first)


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
        where = f"segment {i} (stages {seg.first}…{seg.last - 1})"
        files: list[tuple[str, bytes, str | None]] = []  # (name, data, output structure)
        form = "graph"
        runner: Any = None
        if not _takes_empty(seg, args):
            _log.info("%s: a stage refuses an empty batch; exporting it stage by stage", where)
            form = "staged"
        elif fmt == "onnx":
            try:
                data, _ = to_onnx(seg, args)
                runner = OrtModule(data)
                diff = _check(seg, runner, args, where, fmt)
                files = [(f"segment-{i}.onnx", data, None)]
            except ConversionError as exc:  # one graph with data-dependent rows: not for all
                _log.info("%s as one ONNX graph: %s; exporting it stage by stage", where, exc)
                form = "staged"
        else:
            data = _torchscript(seg, args)
            diff = _check(seg, torch.jit.load(io.BytesIO(data)), args, where, fmt)
            files = [(f"segment-{i}.pt", data, None)]
        if form == "staged":
            files, runner = _staged(seg, args, i, fmt)
            eager = StagedSegment(list(seg.steps), seg.final, seg.first)  # the same skips
            diff = _check(eager, runner, args, where, fmt)
        for name, data, _ in files:
            write_bytes(out / name, data)
        entries.append(
            {
                "file": files[0][0],
                "sha256": _sha256(files[0][1]),
                "bytes": sum(len(d) for _, d, _ in files),
                "form": form,
                "files": [
                    {"file": name, "sha256": _sha256(data), "out_spec": spec}
                    for name, data, spec in files
                ],
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

    @property
    def is_final(self) -> bool:
        """It ends with the final exit (as :attr:`Segment.is_final`)."""
        return self.final

    @property
    def stops_early(self) -> bool:
        """Stage by stage on the host: it can drop rows nobody awaits (``wanted=``)."""
        return bool(getattr(self.module, "stops_early", False))

    @torch.no_grad()
    def __call__(
        self, h: Activation, state: Tensor, wanted: Callable[[], Tensor] | None = None
    ) -> SegmentOutput:
        if wanted is not None and self.stops_early:
            return segment_output(self.module(h, state, wanted=wanted))
        return segment_output(self.module(h, state))


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


def _verified(root: Path, name: str, digest: str) -> bytes:
    """The bytes of ``root/name``, checked against ``digest``."""
    file = root / name
    if Path(name).name != name or not file.is_file():
        raise DataError(f"{root}: segment file {name!r} is missing; re-export the bundle")
    data = file.read_bytes()
    if _sha256(data) != digest:
        raise DataError(
            f"{file}: checksum differs from the manifest's (changed or truncated since "
            "export); re-export the bundle"
        )
    return data


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
    if not isinstance(m, dict) or m.get("offramp_bundle") not in _READS:
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
                [(str(f["file"]), str(f["sha256"]), f.get("out_spec")) for f in e["files"]]
                if "files" in e
                else [(str(e["file"]), str(e["sha256"]), None)],
                str(e.get("form", "graph")),
                int(e["stages"][0]),
                int(e["stages"][1]),
                bool(e["final"]),
            )
            for e in entries
        ]
        int(m["state_size"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(f"{root / MANIFEST} is malformed ({exc!r}); re-export the bundle") from exc
    from torch.utils import _pytree as pytree

    def load(data: bytes, spec: str | None) -> Any:
        if fmt != "onnx":
            return torch.jit.load(io.BytesIO(data), map_location="cpu")
        try:
            out_spec = pytree.treespec_loads(spec) if spec else None
        except (TypeError, ValueError, KeyError) as exc:
            raise DataError(f"{root / MANIFEST}: a stage's output structure is malformed") from exc
        return OrtModule(data, out_spec, threads=threads)

    loaded = []
    for parts, form, first, last, final in specs:
        mods = [load(_verified(root, name, digest), spec) for name, digest, spec in parts]
        module: Any = mods[0]
        if form == "staged":
            steps = mods[: last - first - (1 if final else 0)]
            module = StagedSegment(steps, mods[-1] if final else None, first)
        loaded.append(LoadedSegment(module, first, last, final))
    return Bundle(m, loaded)
