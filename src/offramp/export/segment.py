"""Tier segments: consecutive stages of a network with their exit tests, as one module.

A segment ``[first, last)`` takes the rows that reach stage ``first`` — ``(h, state)`` — and
runs its stages with compaction inside: after each exit the rows that leave are written out
and dropped, so later stages of the segment compute only for the rows still running. It returns

- ``logits (n, C)`` and ``exits (n,)``: each row's logits and exit index where it left inside
  the segment; for the rows that go on, ``exits = −1`` and the logits of the segment's last
  exit — the best answer this tier has, should the next one not answer;
- for a segment that does not end with the final exit, also ``rows (m,)`` — which input rows
  go on, in order — and their ``h`` and ``state`` at stage ``last``: what travels to the next
  tier.

Everything is tensor operations (``nonzero`` included), so a segment exports to ONNX and
TorchScript as one graph with data-dependent row counts. Token networks keep their padding
columns inside a segment (trimming them is a speed-up of the eager runtime, not a change of
result).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from offramp.activations import Activation, select_rows
from offramp.errors import ConfigError
from offramp.network import MultiExitNetwork
from offramp.policies import ExitPolicy
from offramp.runtime.core import stage_modules

__all__ = [
    "Segment",
    "SegmentOutput",
    "StagedSegment",
    "check_splits",
    "segment_output",
    "segments",
]


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


def segment_output(out: Sequence[Tensor]) -> SegmentOutput:
    """What a segment returned — the flat ``(logits, exits)`` of a final segment, the flat
    ``(logits, exits, rows, *h, state)`` of another (ONNX and TorchScript return flat tuples),
    or a :class:`SegmentOutput` already — as a :class:`SegmentOutput`: the one place that
    reads a segment's outputs.

    Example:
        >>> o = segment_output((torch.zeros(2, 3), torch.tensor([0, -1]), torch.tensor([1]),
        ...                     torch.ones(1, 4), torch.zeros(1, 0)))
        >>> o.exits.tolist(), tuple(o.h.shape)
        ([0, -1], (1, 4))
    """
    if isinstance(out, SegmentOutput):
        return out
    flat = tuple(out)
    if len(flat) == 2:
        return SegmentOutput(flat[0], flat[1])
    members = flat[3:-1]
    h = members[0] if len(members) == 1 else members
    return SegmentOutput(flat[0], flat[1], flat[2], h, flat[-1])


class Segment(nn.Module):
    """Stages ``first`` … ``first + len(steps) − 1`` (and the final stage when ``final`` is
    given) with compaction inside; see the module docstring for what it returns.

    Args:
        steps: stage modules ``(h, state) -> (h_next, logits, leave, state)``.
        final: the final stage ``h -> logits``, or ``None`` when the segment stops before it.
        first: the global index of the segment's first stage (its exits' numbering).
    """

    def __init__(self, steps: Sequence[nn.Module], final: nn.Module | None, first: int) -> None:
        super().__init__()
        if not steps and final is None:
            raise ConfigError("a segment needs at least one stage")
        self.steps = nn.ModuleList(steps)
        self.final = final
        self.first = int(first)

    @property
    def last(self) -> int:
        """One past the segment's last stage."""
        return self.first + len(self.steps) + (self.final is not None)

    @property
    def is_final(self) -> bool:
        """The segment ends with the final exit (every row leaves in it)."""
        return self.final is not None

    def forward(self, h: Activation, state: Tensor) -> tuple[Tensor, ...]:
        n = state.shape[0]
        rows = torch.arange(n, device=state.device)  # input position of each live row
        exits = torch.full_like(rows, -1)
        out: Tensor | None = None
        for i, step in enumerate(self.steps):
            h, logits, leave, state = step(h, state)
            if out is None:
                out = logits.new_zeros((n, logits.shape[1]))
            out = out.index_copy(0, rows, logits)  # every live row: its latest exit's logits
            gone = leave.nonzero().squeeze(1)
            exits = exits.index_copy(0, rows[gone], torch.full_like(gone, self.first + i))
            stay = (~leave).nonzero().squeeze(1)
            rows, h, state = rows[stay], select_rows(h, stay), state[stay]
        if self.final is None:
            assert out is not None
            return out, exits, rows, *_members(h), state
        logits = self.final(h)
        if out is None:
            out = logits.new_zeros((n, logits.shape[1]))
        out = out.index_copy(0, rows, logits)
        exits = exits.index_copy(0, rows, torch.full_like(rows, self.last - 1))
        return out, exits


class StagedSegment(Segment):
    """A segment whose stages are separate callables (each stage's own ONNX graph), compacted
    between them on the host: the same outputs as :class:`Segment`, for networks whose stages
    export one by one but not as one graph with data-dependent row counts. Stages are not
    called once no row is left (some kernels refuse empty batches); the activation returned
    with zero rows then has the shape of the stage the rows stopped at.

    ``wanted``, when given, is asked before every stage which input rows are still awaited
    (a bool ``(n,)``); rows nobody awaits any more — a cancelled request — are dropped there
    (their outputs: exit −1, the logits they had), so a server stops computing for a caller
    that has gone."""

    #: A server may pass ``wanted=`` (see the class docstring).
    stops_early = True

    def forward(
        self, h: Activation, state: Tensor, wanted: Callable[[], Tensor] | None = None
    ) -> tuple[Tensor, ...]:
        n = state.shape[0]
        rows = torch.arange(n, device=state.device)
        exits = torch.full_like(rows, -1)
        out: Tensor | None = None
        for i, step in enumerate(self.steps):
            if wanted is not None:
                rows, h, state = _still_wanted(wanted, rows, h, state)
            if rows.numel() == 0:
                break
            h, logits, leave, state = step(h, state)
            if out is None:
                out = logits.new_zeros((n, logits.shape[1]))
            out[rows] = logits
            gone = leave.nonzero().squeeze(1)
            exits[rows[gone]] = self.first + i
            stay = (~leave).nonzero().squeeze(1)
            rows, h, state = rows[stay], select_rows(h, stay), state[stay]
        if out is None and wanted is not None and self.final is None:
            out = torch.zeros((n, 0))  # every caller gone before the first stage ran
        if self.final is None:
            assert out is not None
            return out, exits, rows, *_members(h), state
        if wanted is not None and rows.numel():
            rows, h, state = _still_wanted(wanted, rows, h, state)
        if rows.numel():
            logits = self.final(h)
            if out is None:
                out = logits.new_zeros((n, logits.shape[1]))
            out[rows] = logits
            exits[rows] = self.last - 1
        if out is None and wanted is not None:
            out = torch.zeros((n, 0))  # every caller gone before any stage ran
        assert out is not None
        return out, exits


def _still_wanted(
    wanted: Callable[[], Tensor], rows: Tensor, h: Activation, state: Tensor
) -> tuple[Tensor, Activation, Tensor]:
    keep = wanted()[rows].nonzero().squeeze(1)
    if keep.numel() == rows.numel():
        return rows, h, state
    return rows[keep], select_rows(h, keep), state[keep]


def _members(h: Activation) -> tuple[Tensor, ...]:
    return h if isinstance(h, tuple) else (h,)


def check_splits(splits: Sequence[int], num_stages: int) -> tuple[int, ...]:
    """``splits`` checked: the stages where a new segment starts, increasing, each in
    ``1 … num_stages − 1``.

    Example:
        >>> check_splits([2, 1], 3)
        Traceback (most recent call last):
        ...
        offramp.errors.ConfigError: splits must increase strictly, got [2, 1]; ...
    """
    s = [int(v) for v in splits]
    if any(b <= a for a, b in itertools.pairwise(s)):
        raise ConfigError(f"splits must increase strictly, got {s}; e.g. --split 1,2")
    bad = [v for v in s if not 1 <= v < num_stages]
    if bad:
        raise ConfigError(
            f"split {bad[0]} is outside 1 … {num_stages - 1}: a split is the stage a tier "
            f"starts at, and this network has {num_stages} stages (one per exit)"
        )
    return tuple(s)


def segments(
    net: MultiExitNetwork, policy: ExitPolicy, splits: Sequence[int] = ()
) -> list[Segment]:
    """The network cut before each stage in ``splits``: ``len(splits) + 1`` segments, the last
    ending with the final exit. The segments share the network's modules (``net.eval()``
    first for inference).

    Example:
        >>> from offramp import ThresholdPolicy
        >>> from offramp.models import mlp
        >>> net = mlp(4, 3, hidden=(8, 8, 8)).eval()
        >>> policy = ThresholdPolicy("max_prob", (0.9, 0.9))
        >>> device, cloud = segments(net, policy, [1])
        >>> logits, exits, rows, h, state = device(torch.randn(5, 4), policy.initial_state(5))
        >>> bool(((exits == 0) | (exits == -1)).all()), h.shape[0] == rows.numel()
        (True, True)
    """
    policy.check(net.num_exits)
    steps, final = stage_modules(net, policy.exit_tests())
    bounds = [0, *check_splits(splits, len(steps) + 1), len(steps) + 1]
    return [
        Segment(steps[a : min(b, len(steps))], final if b == bounds[-1] else None, a)
        for a, b in itertools.pairwise(bounds)
    ]
