"""A small VGG-style CNN whose compute sits after its early exit (the demo's backbone).

Blocks: 0 = a cheap stem (3×3 conv to ``stem[0]`` channels, BatchNorm, ReLU, 2×2 max-pool, 3×3
conv to ``stem[1]`` channels, BatchNorm, ReLU); then one block per entry of ``widths``, each
``convs_per_block`` 3×3 conv–BatchNorm–ReLU layers at that width followed by a 2×2 max-pool.
The final exit is global average pooling and a linear layer.

The stem is narrow and the widths double from block to block, so almost all the work lies
behind the stem: with the defaults on 16×16 inputs the stem and a ``linear`` head on it cost
about 4 % of the plain backbone's FLOPs. An exit after the stem is where early exit pays off in
wall-clock time, not only in FLOPs — unlike B-LeNet on 8×8 digits, whose layers are so small
that each stage's fixed cost outweighs the work skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from offramp.errors import ConfigError
from offramp.heads import HeadFactory, make_head
from offramp.network import MultiExitNetwork, block_output_shapes

__all__ = ["vgg"]


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class _PoolLinear(nn.Module):
    def __init__(self, c: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(h.mean(dim=(2, 3)))  # (B, C, H, W) -> (B, C)


def vgg(
    in_size: int = 16,
    num_classes: int = 10,
    *,
    stem: Sequence[int] = (16, 32),
    widths: Sequence[int] = (64, 128),
    convs_per_block: int = 2,
    exits_after: Sequence[int] = (0,),
    head: str | HeadFactory = "linear",
    in_channels: int = 1,
    seed: int | None = None,
) -> MultiExitNetwork:
    """Build the VGG-style CNN with early exits after the given blocks.

    Args:
        in_size: height = width of the input images (at least ``2 ** (len(widths) + 1)``:
            every block halves the resolution).
        num_classes: number of classes.
        stem: channels of the stem's two convolutions (before and after its max-pool).
        widths: channels of each later block.
        convs_per_block: 3×3 convolutions in each later block.
        exits_after: block indices with an early exit (0 = stem, up to ``len(widths) - 1``).
        head: head name/factory for the early exits.
        in_channels: image channels.
        seed: seeds parameter initialisation when given.

    Example:
        >>> import torch
        >>> net = vgg(16, 10)
        >>> [tuple(y.shape) for y in net(torch.zeros(2, 1, 16, 16))]
        [(2, 10), (2, 10)]
        >>> net.exit_blocks
        (0, 2)
    """
    if len(stem) != 2 or not widths or convs_per_block < 1:
        raise ConfigError(
            "vgg needs two stem widths, at least one block width and convs_per_block ≥ 1, got "
            f"stem={list(stem)}, widths={list(widths)}, convs_per_block={convs_per_block}"
        )
    if in_size < 2 ** (len(widths) + 1):
        raise ConfigError(
            f"vgg halves the resolution {len(widths) + 1} times: in_size must be ≥ "
            f"{2 ** (len(widths) + 1)}, got {in_size}"
        )
    last = len(widths)
    if any(not 0 <= k < last for k in exits_after):
        raise ConfigError(f"exits_after must lie in 0 … {last - 1}, got {list(exits_after)}")
    if seed is not None:
        torch.manual_seed(seed)
    blocks: list[nn.Module] = [
        nn.Sequential(
            *_conv_bn_relu(in_channels, stem[0]),
            nn.MaxPool2d(2),
            *_conv_bn_relu(stem[0], stem[1]),
        )
    ]
    cin = stem[1]
    for w in widths:
        layers: list[nn.Module] = []
        for _ in range(convs_per_block):
            layers += _conv_bn_relu(cin, w)
            cin = w
        layers.append(nn.MaxPool2d(2))
        blocks.append(nn.Sequential(*layers))
    shapes = block_output_shapes(blocks, (in_channels, in_size, in_size))
    heads: dict[int, nn.Module] = {k: make_head(head, shapes[k], num_classes) for k in exits_after}
    heads[last] = _PoolLinear(cin, num_classes)
    return MultiExitNetwork(
        blocks, heads, input_shape=(in_channels, in_size, in_size), num_classes=num_classes
    )
