"""The head zoo: exit classifiers ``c_i`` built from the per-sample shape of ``h_i`` alone.

Every head factory has the signature ``factory(in_shape, num_classes, **options) -> nn.Module``
where ``in_shape`` is the shape of one sample of ``h_i`` (no batch dimension). Register your own
with :func:`register_head`.

| name | input | what it is |
|---|---|---|
| ``linear`` | any | flatten, one linear layer |
| ``mlp`` | any | flatten, linear–ReLU–linear |
| ``pool`` | ``(C, *spatial)`` | global average pooling over the spatial dims, linear |
| ``mixpool`` | ``(C, H, W)`` | SDN-style learned max/avg pooling mix to a small grid, linear |
| ``conv`` | ``(C, H, W)`` | BranchyNet-style branch: 3×3 conv, 2×2 max-pool, ReLU, linear |
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from offramp.errors import ConfigError

__all__ = [
    "HEADS",
    "HeadFactory",
    "MixedPool2d",
    "conv_head",
    "linear_head",
    "make_head",
    "mixpool_head",
    "mlp_head",
    "pool_head",
    "register_head",
]

HeadFactory = Callable[..., nn.Module]
HEADS: dict[str, HeadFactory] = {}


def register_head(name: str) -> Callable[[HeadFactory], HeadFactory]:
    """Decorator that adds a head factory to :data:`HEADS` under ``name``."""

    def deco(fn: HeadFactory) -> HeadFactory:
        HEADS[name] = fn
        return fn

    return deco


def make_head(
    head: str | HeadFactory, in_shape: Sequence[int], num_classes: int, **options: object
) -> nn.Module:
    """Build a head for per-sample input shape ``in_shape``.

    Args:
        head: a registered name (see :data:`HEADS`) or a factory callable.
        in_shape: shape of one sample of ``h_i``, e.g. ``(5, 15, 15)``.
        num_classes: number of outputs.
        **options: passed to the factory.

    Example:
        >>> import torch
        >>> head = make_head("pool", (8, 6, 6), 10)
        >>> tuple(head(torch.randn(4, 8, 6, 6)).shape)
        (4, 10)
    """
    if isinstance(head, str):
        if head not in HEADS:
            raise ConfigError(f"unknown head {head!r}; registered heads are {sorted(HEADS)}")
        factory = HEADS[head]
    else:
        factory = head
    if num_classes < 1:
        raise ConfigError(f"num_classes must be ≥ 1, got {num_classes}")
    return factory(tuple(int(s) for s in in_shape), int(num_classes), **options)


def _need_spatial(name: str, in_shape: tuple[int, ...], dims: int | None = None) -> None:
    ok = len(in_shape) >= 2 if dims is None else len(in_shape) == dims
    if not ok:
        want = "(C, H, W)" if dims == 3 else "(C, *spatial)"
        raise ConfigError(
            f"head {name!r} needs a feature map shaped {want} per sample, but h_i has shape "
            f"{in_shape}; use the 'linear' or 'mlp' head for flat features"
        )


@register_head("linear")
def linear_head(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Flatten ``h_i`` and apply one linear layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes))


@register_head("mlp")
def mlp_head(in_shape: tuple[int, ...], num_classes: int, hidden: int | None = None) -> nn.Module:
    """Flatten, linear to ``hidden`` (default: half the input, between 16 and 256), ReLU, linear."""
    d = math.prod(in_shape)
    hidden = hidden or max(16, min(256, d // 2))
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


class _GlobalAvgPool(nn.Module):
    def forward(self, h: Tensor) -> Tensor:
        return h.flatten(2).mean(dim=2)  # (B, C, *spatial) -> (B, C)


@register_head("pool")
def pool_head(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Global average pooling over all spatial dims, then a linear layer on the channels."""
    _need_spatial("pool", in_shape)
    return nn.Sequential(_GlobalAvgPool(), nn.Linear(in_shape[0], num_classes))


class MixedPool2d(nn.Module):
    """``σ(a)·maxpool(h) + (1 − σ(a))·avgpool(h)`` with a learned scalar ``a`` (SDN's mix).

    Pools a ``(B, C, H, W)`` map to ``(B, C, size, size)`` with adaptive pooling.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.mix = nn.Parameter(torch.zeros(()))

    def forward(self, h: Tensor) -> Tensor:
        a = torch.sigmoid(self.mix)
        mx = nn.functional.adaptive_max_pool2d(h, self.size)
        av = nn.functional.adaptive_avg_pool2d(h, self.size)
        return a * mx + (1 - a) * av


@register_head("mixpool")
def mixpool_head(in_shape: tuple[int, ...], num_classes: int, size: int = 4) -> nn.Module:
    """SDN-style head: learned max/avg pooling mix to a grid of at most ``size × size`` (and at
    most half the map), flatten, linear."""
    _need_spatial("mixpool", in_shape, dims=3)
    c, h, w = in_shape
    s = max(
        1, min(size, h // 2, w // 2)
    )  # at least halve the map, or max = avg and the mix is moot
    return nn.Sequential(MixedPool2d(s), nn.Flatten(), nn.Linear(c * s * s, num_classes))


@register_head("conv")
def conv_head(
    in_shape: tuple[int, ...], num_classes: int, channels: int | None = None
) -> nn.Module:
    """BranchyNet's branch shape: 3×3 conv (``channels``, default 2·C), ceil 2×2 max-pool, ReLU,
    linear."""
    _need_spatial("conv", in_shape, dims=3)
    c, h, w = in_shape
    k = channels or 2 * c
    oh, ow = math.ceil(h / 2), math.ceil(w / 2)
    return nn.Sequential(
        nn.Conv2d(c, k, 3, padding=1),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(k * oh * ow, num_classes),
    )
