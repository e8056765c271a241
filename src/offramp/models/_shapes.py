"""Per-sample output shapes of a chain of blocks, for sizing heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def block_output_shapes(
    blocks: Sequence[nn.Module], input_shape: Sequence[int]
) -> list[tuple[int, ...]]:
    """Shape of one sample after each block, read off one zero sample in eval mode (so
    BatchNorm statistics are left alone); every block's training mode is restored.

    Example:
        >>> block_output_shapes([nn.Linear(4, 8), nn.Linear(8, 2)], (4,))
        [(8,), (2,)]
    """
    shapes = []
    h = torch.zeros(1, *input_shape)
    with torch.no_grad():
        for blk in blocks:
            was_training = blk.training
            h = blk.eval()(h)
            blk.train(was_training)
            shapes.append(tuple(h.shape[1:]))
    return shapes
