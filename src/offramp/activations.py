"""What travels between blocks: ``h_i`` alone, or ``h_i`` with the per-sample side inputs the
later blocks need.

A CNN passes one tensor from block to block. A transformer on padded text also needs, at every
layer, which tokens are padding; a recurrent network may need the sequence lengths. Such a
network's blocks pass a tuple ``(h, *side)``: the features ``h`` first (what a head reads,
``(B, …)``), then the side inputs (each ``(B, …)`` too). The runtime treats every member alike —
compaction keeps the same rows of each — so a mask always stays with its hidden states.

The one convention offramp reads into a side input: a **padding mask** is a ``bool`` tensor
``(B, T)``, ``True`` at padding — PyTorch's ``src_key_padding_mask`` — beside token features
``(B, T, D)``. Token heads pool over the real tokens only (:mod:`offramp.heads`), and
:func:`trim_padding` drops the padding columns no live row needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from offramp.errors import ConversionError, ShapeError

__all__ = [
    "Activation",
    "batch_size",
    "check_activation",
    "concat",
    "features",
    "map_tensors",
    "nbytes_per_sample",
    "padding_mask",
    "select_rows",
    "slice_rows",
    "trim_padding",
]

#: ``h`` alone, or ``(h, *side inputs)``; every tensor is batch-first.
Activation = Tensor | tuple[Tensor, ...]


def features(h: Activation) -> Tensor:
    """The features a head reads: ``h`` itself, or the first member of ``(h, *side)``.

    Example:
        >>> import torch
        >>> tuple(features((torch.zeros(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool))).shape)
        (2, 5, 8)
    """
    return h[0] if isinstance(h, tuple) else h


def map_tensors(fn: Callable[[Tensor], Tensor], h: Activation) -> Activation:
    """``fn`` applied to every tensor of ``h``, keeping its form (a tensor or a tuple)."""
    return tuple(fn(t) for t in h) if isinstance(h, tuple) else fn(h)


def select_rows(h: Activation, rows: Tensor) -> Activation:
    """The rows ``rows`` (an index tensor) of every tensor of ``h`` — compaction, keeping each
    side input with its hidden states.

    Example:
        >>> import torch
        >>> h = (torch.arange(6.0).view(3, 2), torch.tensor([[True], [False], [True]]))
        >>> select_rows(h, torch.tensor([2, 0]))[1].tolist()
        [[True], [True]]
    """
    return tuple(t[rows] for t in h) if isinstance(h, tuple) else h[rows]


def slice_rows(h: Activation, start: int, stop: int | None = None) -> Activation:
    """Rows ``start:stop`` of every tensor of ``h`` (views, no copy)."""
    return map_tensors(lambda t: t[start:stop], h)


def concat(parts: list[Activation], *, pad_tokens: bool = True) -> Activation:
    """The rows of ``parts`` one after the other (bulk inference pools rows of several
    batches). With ``pad_tokens`` (a network that masks padding), token features of different
    lengths are padded to the longest, the padding mask with ``True`` and everything else of
    shape ``(B, T, …)`` with zeros; without it, parts of different shapes are refused.

    Raises:
        ShapeError: parts whose per-sample shapes differ and cannot be padded.

    Example:
        >>> import torch
        >>> a = (torch.ones(1, 2, 3), torch.tensor([[False, False]]))
        >>> b = (torch.ones(1, 1, 3), torch.tensor([[False]]))
        >>> h, pad = concat([a, b])
        >>> tuple(h.shape), pad.tolist()
        ((2, 2, 3), [[False, False], [False, True]])
    """
    if len(parts) == 1:
        return parts[0]
    masks = [padding_mask(p) for p in parts]
    shapes = {
        tuple(tuple(t.shape[1:]) for t in (p if isinstance(p, tuple) else (p,))) for p in parts
    }
    if len(shapes) > 1 and not (pad_tokens and all(m is not None for m in masks)):
        raise ShapeError(
            f"cannot pool rows of per-sample shapes {sorted(shapes)}: bulk inference needs "
            "batches of one shape (pad token ids to one length), unless the network masks "
            "padding (attach_exits(..., trim_padding=True))"
        )
    if not isinstance(parts[0], tuple):
        return torch.cat(parts)  # type: ignore[arg-type]
    if any(m is None for m in masks) or len({m.shape[1] for m in masks}) == 1:  # type: ignore[union-attr]
        return tuple(torch.cat(ms) for ms in zip(*parts, strict=True))
    t = max(m.shape[1] for m in masks)  # type: ignore[union-attr]
    out = []
    for members in zip(*parts, strict=True):
        grown = []
        for m, mask in zip(members, masks, strict=True):
            assert mask is not None
            short = t - mask.shape[1]
            if short and m.dim() >= 2 and m.shape[:2] == mask.shape:
                fill = m.new_ones if m is mask else m.new_zeros
                m = torch.cat([m, fill((m.shape[0], short, *m.shape[2:]))], dim=1)
            grown.append(m)
        out.append(torch.cat(grown))
    return tuple(out)


def batch_size(h: Activation) -> int:
    """Rows of ``h`` (its first dimension)."""
    return features(h).shape[0]


def nbytes_per_sample(h: Activation) -> int:
    """Bytes of one sample of ``h``, side inputs included (what a tier would send)."""
    ts = h if isinstance(h, tuple) else (h,)
    n = batch_size(h)
    return int(sum(t.numel() * t.element_size() for t in ts) // max(n, 1))


def check_activation(h: object, where: str) -> Activation:
    """``h`` if it is a tensor or a tuple of batch-first tensors of one batch size; otherwise a
    ConversionError that names ``where`` (the block or module that produced it) and the fix.
    """
    if isinstance(h, Tensor):
        return h
    if isinstance(h, tuple) and h and all(isinstance(t, Tensor) for t in h):
        sizes = {t.shape[0] if t.dim() else None for t in h}
        if len(sizes) == 1 and None not in sizes:
            return h
        raise ConversionError(
            f"{where} produced a tuple of tensors with different batch sizes "
            f"{[tuple(t.shape) for t in h]}; every tensor passed between blocks must be "
            "batch-first, (B, ...)"
        )
    kind = type(h).__name__
    if isinstance(h, tuple):
        kind = "tuple of " + ", ".join(type(t).__name__ for t in h)
    raise ConversionError(
        f"{where} produced {kind}, not a tensor or a tuple of tensors: exits need h_i as a "
        "tensor (B, ...), optionally with batch-first side inputs. For a module that returns "
        "(output, state), such as nn.GRU or nn.LSTM, cut after the line that takes its output "
        "(`out, _ = self.rnn(x)`), or wrap it in a module returning `out`"
    )


def padding_mask(h: Activation) -> Tensor | None:
    """The padding mask carried in ``h``: the first side input that is a ``bool`` ``(B, T)``
    tensor matching the features' first two dimensions (``True`` at padding), or ``None``.

    Example:
        >>> import torch
        >>> pad = torch.tensor([[False, True]])
        >>> padding_mask((torch.zeros(1, 2, 4), pad)) is pad
        True
    """
    if not isinstance(h, tuple):
        return None
    x = h[0]
    for t in h[1:]:
        if t.dtype == torch.bool and t.dim() == 2 and x.dim() >= 2 and t.shape == x.shape[:2]:
            return t
    return None


def trim_padding(h: Activation) -> Activation:
    """``h`` without the trailing token positions that are padding in every row: after
    compaction the rows still running may all be shorter than the batch's longest sequence.

    Every member whose first two dimensions are ``(B, T)`` is cut to the longest live length;
    others are kept. Without a padding mask, or with nothing to cut, ``h`` is returned as it
    is. Only the *trailing* columns are cut, so the real tokens keep their positions; this
    changes no result of a network whose later layers mask padding (attention with a key
    padding mask, pooling over real tokens) — :func:`offramp.check_network` verifies it.

    Example:
        >>> import torch
        >>> pad = torch.tensor([[False, False, True, True], [False, True, True, True]])
        >>> hidden, mask = trim_padding((torch.zeros(2, 4, 3), pad))
        >>> tuple(hidden.shape), mask.tolist()
        ((2, 2, 3), [[False, False], [False, True]])
    """
    pad = padding_mask(h)
    if pad is None or pad.shape[1] == 0:
        return h
    b, t = pad.shape
    real = ~pad
    # last real position + 1, over every row: (B, T) -> (T,) -> scalar (one host sync)
    any_real = real.any(dim=0)
    length = int(any_real.nonzero().max()) + 1 if bool(any_real.any()) else 1
    if length == t:
        return h
    assert isinstance(h, tuple)
    return tuple(m[:, :length] if m.dim() >= 2 and m.shape[:2] == (b, t) else m for m in h)
