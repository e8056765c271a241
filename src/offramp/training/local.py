"""Local error learning (Mostafa, Ramesh & Cauwenberghs 2018; survey §7.1).

Every block ``f_k`` except the last — whether or not an exit follows it — is trained only by its
own **fixed random classifier** ``B_k`` (a ``C × D`` matrix, never trained) applied to its
pooled output::

    J_k^local = CE(B_k · pool(h_k), y)

and no gradient crosses a block boundary: block ``k + 1`` reads ``h_k`` detached. The last
block is trained by the final exit's loss, as usual. The exit heads ``c_i`` of the early exits
are trained on their detached ``h``, so they become usable exits without sending any gradient
into the backbone.

With ``feedback_alignment=True`` the backward pass through ``B_i`` uses a second fixed random
matrix ``F_i`` (same shape) instead of ``B_i``: the error reaching the block is
``∂J/∂z · F_i`` rather than ``∂J/∂z · B_i``, so no weight transport is needed — the
biologically plausible variant.

Use it when blocks must train independently (pipelined or on separate devices, no backward
traffic between them), or to study local learning. It calls the stages directly, so it runs in
one process (not under DDP).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offramp.errors import ConfigError
from offramp.heads import pool_features
from offramp.network import MultiExitNetwork
from offramp.training.joint import correct_per_exit

__all__ = ["LocalErrorLearning", "feedback_alignment_linear"]


class _FAFunction(torch.autograd.Function):
    """``z = x Bᵀ`` forward; backward sends ``∂z · F`` to ``x`` (not ``∂z · B``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, forward_w: Tensor, feedback_w: Tensor) -> Tensor:
        ctx.save_for_backward(feedback_w)
        return x @ forward_w.t()  # (B, D) @ (D, C) -> (B, C)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        (feedback_w,) = ctx.saved_tensors
        return grad_out @ feedback_w, None, None  # (B, C) @ (C, D) -> (B, D)


def feedback_alignment_linear(x: Tensor, forward_w: Tensor, feedback_w: Tensor) -> Tensor:
    """``x @ forward_wᵀ`` whose backward uses ``feedback_w`` in place of ``forward_w``.

    Example:
        >>> import torch
        >>> x = torch.ones(1, 2, requires_grad=True)
        >>> B, Fb = torch.tensor([[1.0, 2.0]]), torch.tensor([[5.0, 7.0]])
        >>> feedback_alignment_linear(x, B, Fb).sum().backward()
        >>> x.grad.tolist()
        [[5.0, 7.0]]
    """
    return _FAFunction.apply(x, forward_w, feedback_w)


class LocalErrorLearning(nn.Module):
    """Strategy: each block but the last trained by its own fixed random classifier; heads on
    detached features; the last block by the final exit.

    Args:
        feature_dims: ``D_k`` of the pooled output of every block but the last.
        num_classes: classes ``C``.
        feedback_alignment: use fixed random feedback matrices in the backward pass.
        pool_size: spatial size of the average pooling before ``B_i``.
        seed: seeds the random matrices (they are buffers, saved in checkpoints).

    Example:
        >>> import torch
        >>> from offramp.models import mlp
        >>> net = mlp(4, 3, hidden=(8, 8))
        >>> s = LocalErrorLearning.for_network(net, torch.randn(2, 4))
        >>> out = s.step(net, (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])))
        >>> len(out["local_losses"]), out["loss"].requires_grad  # one per block but the last
        (1, True)
    """

    ddp_compatible = False

    def __init__(
        self,
        feature_dims: Sequence[int],
        num_classes: int,
        *,
        feedback_alignment: bool = False,
        pool_size: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if pool_size < 1:
            raise ConfigError(f"pool_size must be ≥ 1, got {pool_size}")
        self.feedback_alignment = bool(feedback_alignment)
        self.pool_size = int(pool_size)
        self.num_local = len(feature_dims)
        gen = torch.Generator().manual_seed(seed)
        for i, d in enumerate(feature_dims):
            scale = 1.0 / math.sqrt(d)
            self.register_buffer(f"B{i}", torch.randn(num_classes, d, generator=gen) * scale)
            if self.feedback_alignment:
                self.register_buffer(f"F{i}", torch.randn(num_classes, d, generator=gen) * scale)

    @classmethod
    def for_network(
        cls, net: MultiExitNetwork, example_input: Tensor, **kwargs: Any
    ) -> LocalErrorLearning:
        """Random classifiers shaped for every block of ``net`` but the last (shapes read off
        one forward pass in eval mode, so BatchNorm statistics are left alone)."""
        pool = int(kwargs.get("pool_size", 2))
        was_training = net.training
        net.eval()
        dims = []
        with torch.no_grad():
            h = example_input[:2]
            for block in net.blocks[:-1]:
                h = block(h)
                dims.append(pool_features(h, pool).shape[1])
            classes = net(example_input[:2]).final.shape[1]
        net.train(was_training)
        return cls(dims, classes, **kwargs)

    def random_classifier(self, k: int) -> tuple[Tensor, Tensor | None]:
        """``(B_k, F_k)`` of block ``k`` (``F_k`` is ``None`` without feedback alignment)."""
        b = getattr(self, f"B{k}")
        return b, getattr(self, f"F{k}") if self.feedback_alignment else None

    def local_logits(self, k: int, h: Tensor) -> Tensor:
        """``B_k · pool(h_k)``, with the feedback-alignment backward when enabled."""
        z = pool_features(h, self.pool_size)
        b, fb = self.random_classifier(k)
        if fb is not None:
            return feedback_alignment_linear(z, b, fb)
        return z @ b.t()  # (B, D) @ (D, C) -> (B, C)

    def local_losses(
        self, net: MultiExitNetwork, x: Tensor, y: Tensor
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Run the blocks with a detached hand-over between them.

        Returns:
            ``(block losses, head losses, head logits)``: the loss that trains each block (its
            random classifier's for all but the last, the final exit's for the last; one per
            block), and each exit head's own loss and logits (one per exit).
        """
        blocks = list(net.blocks)
        if len(blocks) - 1 != self.num_local:
            raise ConfigError(
                f"{self.num_local} random classifiers for a network with {len(blocks)} blocks "
                "(one per block but the last); build the strategy with "
                "LocalErrorLearning.for_network(net, x)"
            )
        exit_at = {b: i for i, b in enumerate(net.exit_blocks)}
        block_losses, head_losses, logits = [], [], []
        h = x
        for k, block in enumerate(blocks):
            h = block(h.detach())
            last = k == len(blocks) - 1
            if not last:
                block_losses.append(F.cross_entropy(self.local_logits(k, h), y))
            if k in exit_at:
                out = net.heads[exit_at[k]](h if last else h.detach())
                head_losses.append(F.cross_entropy(out, y))
                logits.append(out)
        block_losses.append(head_losses[-1])
        return block_losses, head_losses, logits

    def step(self, net: MultiExitNetwork, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Sum of the local losses and the heads' losses (they touch disjoint parameters)."""
        x, y = batch
        block_losses, head_losses, logits = self.local_losses(net, x, y)
        loss = torch.stack(block_losses[:-1]).sum() if self.num_local else x.new_zeros(())
        loss = loss + torch.stack(head_losses).sum()
        local = torch.stack([b.detach() for b in block_losses[:-1]]) if self.num_local else None
        return {
            "loss": loss,
            "exit_losses": torch.stack(head_losses).detach(),
            "correct": correct_per_exit(logits, y),
            "local_losses": local if local is not None else x.new_zeros(0),
            "local_loss": local.mean() if local is not None else x.new_zeros(()),
        }
