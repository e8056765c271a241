"""The stage model: a backbone cut into blocks, with exit heads after some of them.

Exit ``i`` (0-based here; the survey counts from 1) sits after block ``exit_blocks[i]``; the last
block always carries the final exit. Everything else in offramp (training, the cached
``ExitRecord``, the runtime, tiers) is a view of this ordered list.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, overload

import torch
from torch import Tensor, nn

from offramp.activations import Activation, check_activation, features, map_tensors, trim_padding
from offramp.errors import ConfigError, NonFiniteError, ShapeError

__all__ = [
    "ExitOutputs",
    "MultiExitNetwork",
    "Stage",
    "block_output_shapes",
    "block_outputs",
    "check_input",
    "evaluating",
    "input_dtype",
]


@dataclass(frozen=True)
class ExitOutputs(Sequence[Tensor]):
    """Logits of every exit for one batch, in exit order.

    Behaves like a tuple of ``(B, C)`` tensors; ``final`` is the last exit and ``stack()`` gives
    one ``(E, B, C)`` tensor.
    """

    logits: tuple[Tensor, ...]

    def __len__(self) -> int:
        return len(self.logits)

    def __getitem__(self, i):  # type: ignore[override]
        return self.logits[i]

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.logits)

    @property
    def final(self) -> Tensor:
        """Logits of the last exit, ``(B, C)``: the plain backbone's output."""
        return self.logits[-1]

    def stack(self) -> Tensor:
        """All exits as one tensor, ``(E, B, C)``."""
        return torch.stack(self.logits)


@dataclass(frozen=True)
class Stage:
    """One unit of the runtime: the blocks since the previous exit, then this exit's head.

    Attributes:
        index: exit index ``i`` (0-based).
        body: the blocks ``f_{b_{i-1}+1} … f_{b_i}`` as one ``nn.Sequential``.
        head: the exit head ``c_i``.
    """

    index: int
    body: nn.Module
    head: nn.Module


_CASTS = {
    torch.float32: "x.float()",
    torch.float64: "x.double()",
    torch.float16: "x.half()",
    torch.bfloat16: "x.bfloat16()",
}


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Every module of ``modules`` in eval mode inside the block; each gets its own mode back
    after it (a module left half in train mode stays so).

    Example:
        >>> m = nn.Sequential(nn.Dropout(), nn.Linear(2, 2)).train()
        >>> with evaluating(m):
        ...     m.training
        False
        >>> m.training
        True
    """
    modes = [(m, m.training) for top in modules for m in top.modules()]
    try:
        for top in modules:
            top.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def block_outputs(blocks: Sequence[nn.Module], example: Tensor | Sequence[int]) -> list[Activation]:
    """What each block of a chain outputs on ``example`` (a batch) or, given an input shape,
    on one zero sample — the one probe of offramp, for sizing heads. Runs in eval mode without
    gradients (BatchNorm statistics are left alone); every module gets its own mode back.

    Raises:
        ConversionError: a block returned something other than a tensor or a tuple of
            batch-first tensors (the message names the block and the fix).

    Example:
        >>> [tuple(h.shape) for h in block_outputs([nn.Linear(4, 8), nn.Linear(8, 2)], (4,))]
        [(1, 8), (1, 2)]
    """
    h: Activation = example if isinstance(example, Tensor) else torch.zeros(1, *example)
    outs: list[Activation] = []
    with torch.no_grad(), evaluating(*blocks):
        for k, block in enumerate(blocks):
            h = check_activation(block(h), f"block {k} ({type(block).__name__})")
            outs.append(h)
    return outs


def block_output_shapes(
    blocks: Sequence[nn.Module], example: Tensor | Sequence[int]
) -> list[tuple[int, ...]]:
    """Per-sample shape of the features each block outputs (``h_i`` without the side inputs
    that may travel with it, :mod:`offramp.activations`), from :func:`block_outputs`.

    Example:
        >>> block_output_shapes([nn.Linear(4, 8), nn.Linear(8, 2)], (4,))
        [(8,), (2,)]
    """
    return [tuple(features(h).shape[1:]) for h in block_outputs(blocks, example)]


def input_dtype(net: nn.Module) -> torch.dtype | None:
    """The dtype ``net`` computes in, which its input batches must have: that of its first
    floating-point parameter (or buffer).

    ``torch.long`` when its first block holds an ``nn.Embedding`` / ``nn.EmbeddingBag``: such a
    network takes integer indices (token ids; :func:`check_input` accepts any integer dtype).
    ``None`` (nothing to check) when it has no floating-point parameter.

    Example:
        >>> from torch import nn
        >>> input_dtype(nn.Linear(2, 2).double())
        torch.float64
    """
    first = net.blocks[0] if isinstance(net, MultiExitNetwork) else net
    if any(isinstance(m, nn.Embedding | nn.EmbeddingBag) for m in first.modules()):
        return torch.long
    for t in (*net.parameters(), *net.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def _fits(shape: tuple[int, ...], want: tuple[int | None, ...]) -> bool:
    return len(shape) == len(want) and all(
        w is None or s == w for s, w in zip(shape, want, strict=False)
    )


def check_input(
    x: Tensor,
    input_shape: tuple[int | None, ...] | None,
    *,
    finite: bool = True,
    dtype: torch.dtype | None = None,
) -> None:
    """Check that ``x`` is a batch the network can run: the one input check of offramp.

    Raises:
        ShapeError: ``x`` is not a tensor, not a batch of ``input_shape``, or not of ``dtype``
            (the message names the conversion, e.g. ``x.float()``).
        NonFiniteError: ``x`` holds NaN or infinite values (with ``finite``).

    Args:
        x: a batch, ``(B, *input_shape)``.
        input_shape: the per-sample shape the network expects (``None`` in a dimension of any
            size, such as a sequence length), or ``None`` to skip the check.
        finite: also reject NaN and infinite values (one host sync per batch).
        dtype: the dtype the network expects (:func:`input_dtype`; an integer dtype accepts
            any integer batch), or ``None`` to skip the check.
    """
    if not isinstance(x, Tensor):
        raise ShapeError(f"expected a torch.Tensor input, got {type(x).__name__}")
    if input_shape is not None and not _fits(tuple(x.shape[1:]), tuple(input_shape)):
        want = "(B, " + ", ".join("any" if s is None else str(s) for s in input_shape) + ")"
        hint = ""
        if tuple(x.shape) == tuple(input_shape):
            hint = "; it looks like a single sample: add a batch dimension with x.unsqueeze(0)"
        elif x.dim() == len(input_shape):
            hint = "; the batch dimension may be missing (x.unsqueeze(0) or x.unsqueeze(1))"
        raise ShapeError(f"expected input of shape {want}, got {tuple(x.shape)}{hint}")
    if dtype is not None and not (dtype.is_floating_point or dtype == torch.bool):  # indices
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ShapeError(
                f"expected integer indices (token ids: the network embeds its input), got "
                f"{x.dtype} (batch of shape {tuple(x.shape)}): convert the batch with x.long()"
            )
    elif dtype is not None and x.dtype != dtype:
        fix = _CASTS.get(dtype, f"x.to({dtype})")
        if x.dtype == torch.uint8 and dtype.is_floating_point:
            fix += " / 255 (8-bit pixel values: scale them as the training data was)"
        raise ShapeError(
            f"expected input of dtype {dtype} (the dtype of the network's parameters), got "
            f"{x.dtype} (batch of shape {tuple(x.shape)}): convert the batch with {fix}"
        )
    # NaN and ±inf survive a sum, so a finite sum (in float64: no float32 batch overflows it)
    # clears the batch in one cheap reduction, 4x faster than isfinite().all() at batch 1;
    # only a non-finite sum needs the exact test
    if (
        finite
        and x.is_floating_point()
        and not math.isfinite(float(x.sum(dtype=torch.float64)))
        and not bool(torch.isfinite(x).all())
    ):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(
            f"input of shape {tuple(x.shape)} contains {bad} NaN or infinite values; "
            "clean or impute the data before running the network"
        )


class MultiExitNetwork(nn.Module):
    """An ordered list of blocks with exit heads after chosen blocks.

    Args:
        blocks: the backbone's blocks ``f_1 … f_L`` in order.
        heads: either a mapping ``{block index: head}`` (negative indices allowed) or a sequence
            aligned with ``blocks`` holding a head or ``None``. The last block must have one.
        input_shape: per-sample input shape, e.g. ``(1, 28, 28)``, with ``None`` for a
            dimension of any size (``(None,)`` for token ids of any length); when given,
            ``forward`` and the runtime reject inputs of another shape with a clear
            ``ShapeError``.
        num_classes: number of classes each head predicts (informational).
        trim_padding: the blocks carry a padding mask with token features (see
            :mod:`offramp.activations`) and mask it wherever it matters, so the runtime may
            drop padding columns that no live row needs after compaction
            (:func:`~offramp.activations.trim_padding`). Verify it with
            :func:`offramp.check_network`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from offramp import MultiExitNetwork
        >>> net = MultiExitNetwork(
        ...     [nn.Linear(4, 8), nn.Linear(8, 8)],
        ...     {0: nn.Linear(8, 3), 1: nn.Linear(8, 3)},
        ... )
        >>> outs = net(torch.randn(2, 4))
        >>> len(outs), tuple(outs.final.shape)
        (2, (2, 3))
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        heads: Mapping[int, nn.Module] | Sequence[nn.Module | None],
        *,
        input_shape: Sequence[int | None] | None = None,
        num_classes: int | None = None,
        trim_padding: bool = False,
    ) -> None:
        super().__init__()
        blocks = list(blocks)
        if not blocks:
            raise ConfigError("a MultiExitNetwork needs at least one block; got an empty list")
        n = len(blocks)
        if isinstance(heads, Mapping):
            head_map: dict[int, nn.Module] = {}
            for k, head in heads.items():
                if not -n <= int(k) < n:
                    raise ConfigError(
                        f"head at block index {k} is out of range for {n} blocks "
                        f"(valid: 0 … {n - 1}, or negative from the end)"
                    )
                head_map[int(k) % n] = head
        else:
            if len(heads) != n:
                raise ConfigError(
                    f"heads given as a sequence must align with the blocks: got {len(heads)} "
                    f"heads for {n} blocks (use None where a block has no exit)"
                )
            head_map = {k: h for k, h in enumerate(heads) if h is not None}
        if n - 1 not in head_map:
            raise ConfigError(
                f"the last block (index {n - 1}) must carry the final exit head; "
                f"heads were given at {sorted(head_map)}"
            )
        self.blocks = nn.ModuleList(blocks)
        self.exit_blocks: tuple[int, ...] = tuple(sorted(head_map))
        self.heads = nn.ModuleList([head_map[k] for k in self.exit_blocks])
        self.input_shape: tuple[int | None, ...] | None = (
            tuple(None if s is None else int(s) for s in input_shape)
            if input_shape is not None
            else None
        )
        self.num_classes = num_classes
        self.trim_padding = bool(trim_padding)

    @property
    def num_exits(self) -> int:
        """Number of exits ``E`` (the final one included)."""
        return len(self.exit_blocks)

    def exit_index(self, i: int) -> int:
        """Exit ``i`` as a non-negative index (``-1`` is the final exit), or a ConfigError
        naming the valid range.

        Example:
            >>> from torch import nn
            >>> net = MultiExitNetwork([nn.Linear(2, 2), nn.Linear(2, 2)],
            ...                        {0: nn.Linear(2, 2), 1: nn.Linear(2, 2)}, input_shape=(2,))
            >>> net.exit_index(-1)
            1
        """
        e = self.num_exits
        if not -e <= i < e:
            raise ConfigError(f"exit index {i} is out of range for {e} exits (valid: 0 … {e - 1})")
        return i % e

    @overload
    def forward(
        self, x: Tensor, *, return_features: Literal[False] = ..., detach: bool = ...
    ) -> ExitOutputs: ...

    @overload
    def forward(
        self, x: Tensor, *, return_features: Literal[True], detach: bool = ...
    ) -> tuple[tuple[Activation, ...], ExitOutputs]: ...

    def forward(
        self, x: Tensor, *, return_features: bool = False, detach: bool = False
    ) -> ExitOutputs | tuple[tuple[Activation, ...], ExitOutputs]:
        """Run every block and every head.

        Args:
            x: a batch ``(B, *input_shape)``.
            return_features: also return ``h`` at every exit (the head's input; with the side
                inputs that travel with it, if any).
            detach: cut the autograd graph after every stage, so no gradient crosses from one
                stage into the previous one (local learning); each stage is then trained only
                by the losses computed on its own outputs.

        Returns:
            ``ExitOutputs`` with one ``(B, C)`` logits tensor per exit, or
            ``(features, outputs)`` with ``return_features=True``.
        """
        check_input(x, self.input_shape, finite=False)
        outs: list[Tensor] = []
        feats: list[Activation] = []
        h: Activation = x
        e = 0
        for k, block in enumerate(self.blocks):
            h = block(h)
            if k == 0 and self.trim_padding:  # the batch's own padding, as the runtime drops it
                h = trim_padding(h)
            if e < len(self.exit_blocks) and self.exit_blocks[e] == k:
                feats.append(h)
                outs.append(self.heads[e](h))
                e += 1
                if detach:
                    h = map_tensors(Tensor.detach, h)
        if return_features:
            return tuple(feats), ExitOutputs(tuple(outs))
        return ExitOutputs(tuple(outs))

    def stages(self) -> list[Stage]:
        """The network as runtime stages: one per exit, blocks since the previous exit + head."""
        out: list[Stage] = []
        start = 0
        for i, b in enumerate(self.exit_blocks):
            body = nn.Sequential(*self.blocks[start : b + 1])
            out.append(Stage(index=i, body=body, head=self.heads[i]))
            start = b + 1
        return out

    def truncate(self, i: int) -> MultiExitNetwork:
        """The network up to and including exit ``i`` (modules are shared, not copied).

        Its final exit is this network's exit ``i``, so ``net.truncate(i)(x).final`` equals
        ``net(x)[i]``.
        """
        i = self.exit_index(i)
        b = self.exit_blocks[i]
        heads = {self.exit_blocks[j]: self.heads[j] for j in range(i + 1)}
        return MultiExitNetwork(
            list(self.blocks[: b + 1]),
            heads,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            trim_padding=self.trim_padding,
        )

    def exit_path(self, i: int = -1) -> nn.Sequential:
        """A plain single-output model computing exit ``i`` only: ``f_1 … f_{b_i}`` then ``c_i``.

        ``exit_path(-1)`` is the plain backbone, with no intermediate heads on the way.
        """
        i = self.exit_index(i)
        b = self.exit_blocks[i]
        return nn.Sequential(*self.blocks[: b + 1], self.heads[i])

    def backbone(self) -> nn.Sequential:
        """The plain backbone (the final exit's path), sharing modules with this network."""
        return self.exit_path(-1)

    def extra_repr(self) -> str:
        trim = ", trim_padding=True" if self.trim_padding else ""
        return f"exit_blocks={self.exit_blocks}, input_shape={self.input_shape}{trim}"
