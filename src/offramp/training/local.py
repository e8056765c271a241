"""Local error learning (Mostafa, Ramesh & Cauwenberghs 2018; survey §7.1).

Every block except the last is trained only by its own **fixed random classifier** ``B_i``
(a ``C × D`` matrix, never trained) applied to its pooled output::

    J_i^local = CE(B_i · pool(h_i), y)

and no gradient crosses a block boundary: block ``i + 1`` reads ``h_i`` detached. The last
block is trained by the final exit's loss, as usual. The exit heads ``c_i`` of the early exits
are trained on the detached ``h_i``, so they become usable exits without sending any gradient
into their block.

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

__all__ = ["LocalErrorLearning", "feedback_alignment_linear", "local_pool"]


def local_pool(h: Tensor, size: int = 2) -> Tensor:
    """Features for the random classifier (:func:`offramp.heads.pool_features`)."""
    return pool_features(h, size)


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
    """Strategy: each early block trained by its own fixed random classifier; heads on detached
    features; the last block by the final exit.

    Args:
        feature_dims: ``D_i`` of the pooled features of every early exit.
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
        >>> len(out["local_losses"]), out["loss"].requires_grad
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
        """Random classifiers shaped for ``net``'s early exits (read off one forward pass)."""
        pool = int(kwargs.get("pool_size", 2))
        with torch.no_grad():
            feats, outs = net(example_input[:2], return_features=True)
        dims = [local_pool(h, pool).shape[1] for h in feats[:-1]]
        return cls(dims, outs.final.shape[1], **kwargs)

    def random_classifier(self, i: int) -> tuple[Tensor, Tensor | None]:
        """``(B_i, F_i)`` of early exit ``i`` (``F_i`` is ``None`` without feedback alignment)."""
        b = getattr(self, f"B{i}")
        return b, getattr(self, f"F{i}") if self.feedback_alignment else None

    def local_logits(self, i: int, h: Tensor) -> Tensor:
        """``B_i · pool(h_i)``, with the feedback-alignment backward when enabled."""
        z = local_pool(h, self.pool_size)
        b, fb = self.random_classifier(i)
        if fb is not None:
            return feedback_alignment_linear(z, b, fb)
        return z @ b.t()  # (B, D) @ (D, C) -> (B, C)

    def local_losses(
        self, net: MultiExitNetwork, x: Tensor, y: Tensor
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Run the stages with a detached hand-over between them.

        Returns:
            ``(block losses, head losses, head logits)``: the loss that trains each block (the
            random classifier's for early blocks, the final exit's for the last), and each
            exit head's own loss and logits.
        """
        stages = net.stages()
        if len(stages) - 1 != self.num_local:
            raise ConfigError(
                f"{self.num_local} random classifiers for a network with {len(stages) - 1} "
                "early exits; build the strategy with LocalErrorLearning.for_network(net, x)"
            )
        block_losses, head_losses, logits = [], [], []
        h = x
        for st in stages:
            h = st.body(h.detach())
            if st.index < self.num_local:
                block_losses.append(F.cross_entropy(self.local_logits(st.index, h), y))
                out = st.head(h.detach())
            else:
                out = st.head(h)
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
        with torch.no_grad():
            correct = (torch.stack(logits).argmax(dim=-1) == y[None, :]).sum(dim=1)  # (E,)
        local = torch.stack([b.detach() for b in block_losses[:-1]]) if self.num_local else None
        return {
            "loss": loss,
            "exit_losses": torch.stack(head_losses).detach(),
            "correct": correct,
            "local_losses": local if local is not None else x.new_zeros(0),
            "local_loss": local.mean() if local is not None else x.new_zeros(()),
        }
