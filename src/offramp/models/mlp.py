"""A multilayer perceptron with an exit after every hidden layer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from offramp.heads import HeadFactory, make_head
from offramp.network import MultiExitNetwork

__all__ = ["mlp"]


def mlp(
    in_features: int | Sequence[int],
    num_classes: int,
    *,
    hidden: Sequence[int] = (128, 128, 128),
    head: str | HeadFactory = "linear",
    seed: int | None = None,
) -> MultiExitNetwork:
    """An MLP: block ``k`` is (flatten,) linear, ReLU; every hidden block has an exit, the last
    one the final exit.

    Args:
        in_features: input width, or a per-sample input shape that is flattened first.
        num_classes: number of classes.
        hidden: width of each hidden block.
        head: head for the early exits; the final exit is a linear layer.
        seed: seeds parameter initialisation when given.

    Example:
        >>> import torch
        >>> net = mlp((1, 8, 8), 10, hidden=(32, 32, 32))
        >>> net.num_exits
        3
    """
    if seed is not None:
        torch.manual_seed(seed)
    shape = (in_features,) if isinstance(in_features, int) else tuple(in_features)
    d = math.prod(shape)
    blocks: list[nn.Module] = []
    for k, w in enumerate(hidden):
        layers: list[nn.Module] = [nn.Flatten()] if k == 0 else []
        blocks.append(nn.Sequential(*layers, nn.Linear(d, w), nn.ReLU()))
        d = w
    heads: dict[int, nn.Module] = {
        k: make_head(head, (w,), num_classes) for k, w in enumerate(hidden[:-1])
    }
    heads[len(hidden) - 1] = nn.Linear(d, num_classes)
    return MultiExitNetwork(blocks, heads, input_shape=shape, num_classes=num_classes)
