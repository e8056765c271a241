"""A small residual CNN for grey images (CIFAR-style ResNet, He et al. 2016, narrowed).

Blocks: 0 = stem (3×3 conv, BatchNorm, ReLU); then ``sum(blocks_per_stage)`` basic residual
blocks (two 3×3 convs with BatchNorm, identity or 1×1-conv shortcut), the first block of every
stage after the first halving the resolution; the final exit is global average pooling and a
linear layer. Every block boundary is an exit candidate, and compute is spread evenly over the
blocks, so FLOPs track wall-clock better than in tiny nets such as B-LeNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from offramp.errors import ConfigError
from offramp.heads import HeadFactory, make_head
from offramp.network import MultiExitNetwork, block_output_shapes

__all__ = ["BasicBlock", "resnet"]


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _PoolLinear(nn.Module):
    def __init__(self, c: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(h.mean(dim=(2, 3)))  # (B, C, H, W) -> (B, C)


def resnet(
    in_size: int = 28,
    num_classes: int = 10,
    *,
    widths: Sequence[int] = (16, 32, 64),
    blocks_per_stage: Sequence[int] = (2, 2, 2),
    exits_after: Sequence[int] | None = None,
    head: str | HeadFactory = "pool",
    in_channels: int = 1,
    seed: int | None = None,
) -> MultiExitNetwork:
    """Build the residual CNN with early exits after the given blocks.

    Args:
        in_size: height = width of the input images.
        num_classes: number of classes.
        widths: channels of each stage.
        blocks_per_stage: residual blocks in each stage.
        exits_after: block indices with an early exit (0 = stem); default: the last block of
            every stage but the last.
        head: head name/factory for the early exits.
        in_channels: image channels.
        seed: seeds parameter initialisation when given.

    Example:
        >>> import torch
        >>> net = resnet(28, 10, widths=(8, 16), blocks_per_stage=(1, 1))
        >>> [tuple(y.shape) for y in net(torch.zeros(2, 1, 28, 28))]
        [(2, 10), (2, 10)]
    """
    if len(widths) != len(blocks_per_stage) or not widths:
        raise ConfigError("widths and blocks_per_stage need one entry per stage")
    if seed is not None:
        torch.manual_seed(seed)
    blocks: list[nn.Module] = [
        nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
    ]
    stage_ends = []
    cin = widths[0]
    for s, (w, n) in enumerate(zip(widths, blocks_per_stage, strict=True)):
        for b in range(n):
            blocks.append(BasicBlock(cin, w, 2 if (s > 0 and b == 0) else 1))
            cin = w
        stage_ends.append(len(blocks) - 1)
    last = len(blocks) - 1
    exits = list(exits_after) if exits_after is not None else stage_ends[:-1]
    if any(not 0 <= k < last for k in exits):
        raise ConfigError(f"exits_after must lie in 0 … {last - 1}, got {list(exits)}")
    shapes = block_output_shapes(blocks, (in_channels, in_size, in_size))
    heads: dict[int, nn.Module] = {k: make_head(head, shapes[k], num_classes) for k in exits}
    heads[last] = _PoolLinear(cin, num_classes)
    return MultiExitNetwork(
        blocks, heads, input_shape=(in_channels, in_size, in_size), num_classes=num_classes
    )
