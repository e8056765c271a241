"""BranchyNet's B-LeNet for grey images (28×28 MNIST, 8×8 digits, any size ≥ 4).

Main path (BranchyNet, Teerapittayanon et al. 2016): three 5×5 convolutions (1→5→10→20
channels, padding 3), each followed by a 2×2 max-pool (ceil mode, as chainer's default) and
ReLU, then a fully connected layer to 84 units and one to the classes. The early exit sits
after the first conv block; BranchyNet's own branch is the ``conv`` head (3×3 conv 5→10, pool,
ReLU, linear); any head of the zoo can be put there instead.

Blocks: 0 = conv1 block, 1 = conv2 block, 2 = conv3 block, 3 = flatten + FC to 84. The final
head is the FC to the classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from offramp.heads import HeadFactory, make_head
from offramp.network import MultiExitNetwork, block_output_shapes

__all__ = ["BRANCHYNET_HEAD", "blenet"]

BRANCHYNET_HEAD = "conv"


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 5, padding=3), nn.MaxPool2d(2, ceil_mode=True), nn.ReLU()
    )


def blenet(
    in_size: int = 28,
    num_classes: int = 10,
    *,
    exits_after: Sequence[int] = (0,),
    head: str | HeadFactory | Sequence[str | HeadFactory] = BRANCHYNET_HEAD,
    in_channels: int = 1,
    seed: int | None = None,
) -> MultiExitNetwork:
    """Build B-LeNet with early exits after the given blocks.

    Args:
        in_size: height = width of the input images.
        num_classes: number of classes.
        exits_after: block indices (0 … 2) that get an early exit; BranchyNet uses ``(0,)``.
        head: head name/factory for the early exits, or one per exit.
        in_channels: image channels.
        seed: seeds parameter initialisation when given.

    Example:
        >>> import torch
        >>> net = blenet(28)
        >>> [tuple(y.shape) for y in net(torch.zeros(2, 1, 28, 28))]
        [(2, 10), (2, 10)]
    """
    if seed is not None:
        torch.manual_seed(seed)
    blocks: list[nn.Module] = [
        _conv_block(in_channels, 5),
        _conv_block(5, 10),
        _conv_block(10, 20),
    ]
    shapes = block_output_shapes(blocks, (in_channels, in_size, in_size))
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shapes[-1]), 84)))
    heads_spec = list(head) if isinstance(head, (list, tuple)) else [head] * len(exits_after)
    heads: dict[int, nn.Module] = {
        k: make_head(spec, shapes[k], num_classes)
        for k, spec in zip(exits_after, heads_spec, strict=True)
    }
    heads[3] = nn.Linear(84, num_classes)
    return MultiExitNetwork(
        blocks, heads, input_shape=(in_channels, in_size, in_size), num_classes=num_classes
    )
