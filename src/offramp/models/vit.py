"""A small vision transformer with exits after its encoder layers.

Blocks: 0 = patch embedding (a ``patch × patch`` convolution with that stride), the class token
and learned position embeddings, then encoder layer 0; block ``k`` = encoder layer ``k``
(``nn.TransformerEncoderLayer``, pre-norm, batch first, GELU). Every exit reads the class token
(or the mean of all tokens) through a LayerNorm and a linear layer, as the final one does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from offramp.errors import ConfigError
from offramp.heads import TokenPool
from offramp.models.exits import early_exits
from offramp.network import MultiExitNetwork

__all__ = ["vit"]


class _PatchEmbed(nn.Module):
    """Images ``(B, C, H, W)`` → tokens ``(B, 1 + (H/p)·(W/p), D)``: class token first."""

    def __init__(self, in_channels: int, in_size: int, patch: int, d: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, d, patch, stride=patch)
        n = (in_size // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        t = self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h·w, D)
        cls = self.cls.expand(t.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, t], dim=1) + self.pos


def _token_head(how: str, d: int, num_classes: int) -> nn.Module:
    return nn.Sequential(TokenPool(how), nn.LayerNorm(d), nn.Linear(d, num_classes))


def vit(
    in_size: int = 28,
    num_classes: int = 10,
    *,
    patch: int = 7,
    dim: int = 64,
    depth: int = 6,
    heads: int = 4,
    mlp_dim: int = 128,
    dropout: float = 0.0,
    exits_after: Sequence[int] | None = None,
    head: str = "cls",
    in_channels: int = 1,
    seed: int | None = None,
) -> MultiExitNetwork:
    """Build the vision transformer with early exits after the given encoder layers.

    Args:
        in_size: height = width of the images (a multiple of ``patch``).
        num_classes: number of classes.
        patch: side of the square patches.
        dim: token width.
        depth: encoder layers.
        heads: attention heads per layer.
        mlp_dim: hidden width of each layer's feed-forward part.
        dropout: dropout inside the layers (training only).
        exits_after: layers with an early exit (default: every layer but the last).
        head: what every exit reads: ``cls`` (the class token) or ``mean`` (all tokens).
        in_channels: image channels.
        seed: seeds parameter initialisation when given.

    Example:
        >>> import torch
        >>> net = vit(28, 10, depth=3)
        >>> net.exit_blocks, [tuple(o.shape) for o in net(torch.zeros(2, 1, 28, 28))]
        ((0, 1, 2), [(2, 10), (2, 10), (2, 10)])
    """
    if in_size % patch or depth < 1 or dim % heads:
        raise ConfigError(
            f"vit needs in_size a multiple of patch, depth ≥ 1 and dim a multiple of heads; got "
            f"in_size={in_size}, patch={patch}, depth={depth}, dim={dim}, heads={heads}"
        )
    if head not in ("cls", "mean"):
        raise ConfigError(f"vit heads read 'cls' or 'mean' tokens, got head {head!r}")
    early = early_exits(exits_after, depth)
    if seed is not None:
        torch.manual_seed(seed)

    def layer() -> nn.Module:
        return nn.TransformerEncoderLayer(
            dim,
            heads,
            mlp_dim,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )

    blocks: list[nn.Module] = [
        nn.Sequential(_PatchEmbed(in_channels, in_size, patch, dim), layer())
    ]
    blocks += [layer() for _ in range(depth - 1)]
    heads_at = {k: _token_head(head, dim, num_classes) for k in (*sorted(early), depth - 1)}
    return MultiExitNetwork(
        blocks, heads_at, input_shape=(in_channels, in_size, in_size), num_classes=num_classes
    )
