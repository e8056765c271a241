"""Export: a network's stages and tier segments as ONNX or TorchScript, checked against eager.

- :mod:`offramp.export.segment`: consecutive stages with their exit tests as one module
  (compaction inside), the unit a tier runs.
- :mod:`offramp.export.onnx`: ``torch.onnx`` export to bytes and an ONNX Runtime session
  called like a module (the ``onnx`` extra).
- :mod:`offramp.export.bundle`: segment files plus a manifest with checksums, written and
  loaded (``offramp export``).
"""

from offramp.export.bundle import (
    FORMATS,
    MANIFEST,
    Bundle,
    LoadedSegment,
    export_segments,
    load_bundle,
    segment_examples,
)
from offramp.export.onnx import OrtModule, max_difference, require_onnx, to_onnx
from offramp.export.segment import (
    Segment,
    SegmentOutput,
    StagedSegment,
    check_splits,
    segment_output,
    segments,
)

__all__ = [
    "FORMATS",
    "MANIFEST",
    "Bundle",
    "LoadedSegment",
    "OrtModule",
    "Segment",
    "SegmentOutput",
    "StagedSegment",
    "check_splits",
    "export_segments",
    "load_bundle",
    "max_difference",
    "require_onnx",
    "segment_examples",
    "segment_output",
    "segments",
    "to_onnx",
]
