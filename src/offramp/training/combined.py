"""Joint training on a combined output, eq. 8: ``ŷ = Σ_i α_i y_i``.

The exits' logits are mixed into one output and the loss is taken on the mix (plus, by default,
the joint per-exit losses of eq. 6–7 so that every exit stays a classifier of its own). The
mixing weights ``α`` are

- ``"free"`` — trainable, unconstrained, initialised to ``1/E``;
- ``"softmax"`` — trainable logits ``w`` with ``α = softmax(w)``: a convex mix;
- ``"mean"`` — fixed ``α = 1/E``;
- ``"max"`` — no weights: the element-wise maximum over the exits' logits.

Use it when the deployed model may average several exits (ensembles of exits), or to let the
data decide how much each exit should contribute to the final decision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offramp.errors import ConfigError
from offramp.network import MultiExitNetwork
from offramp.training.joint import (
    Schedule,
    ScheduledLambdas,
    constant,
    correct_per_exit,
    joint_loss,
)

__all__ = ["COMBINE_MODES", "CombinedOutput", "combine"]

COMBINE_MODES = ("free", "softmax", "mean", "max")


def combine(outputs: Sequence[Tensor], mode: str = "mean", weights: Tensor | None = None) -> Tensor:
    """Eq. 8: mix the exits' logits into one output.

    Args:
        outputs: logits of every exit, ``E × (B, C)``.
        mode: one of :data:`COMBINE_MODES`.
        weights: ``(E,)`` — ``α`` for ``"free"``, the logits ``w`` of ``α`` for ``"softmax"``;
            ignored otherwise.

    Returns:
        The combined logits ``(B, C)``.

    Example:
        >>> import torch
        >>> outs = [torch.zeros(1, 2), torch.ones(1, 2)]
        >>> combine(outs, "free", torch.tensor([0.0, 1.0])).tolist()
        [[1.0, 1.0]]
    """
    stacked = torch.stack(tuple(outputs))  # E × (B, C) -> (E, B, C)
    e = stacked.shape[0]
    if mode == "max":
        return stacked.max(dim=0).values
    if mode == "mean":
        return stacked.mean(dim=0)
    if mode not in ("free", "softmax"):
        raise ConfigError(f"unknown combine mode {mode!r}; choose one of {COMBINE_MODES}")
    if weights is None or weights.shape != (e,):
        got = None if weights is None else tuple(weights.shape)
        raise ConfigError(f"combine mode {mode!r} needs weights of shape ({e},), got {got}")
    alpha = weights.softmax(0) if mode == "softmax" else weights
    return torch.einsum("e,ebc->bc", alpha.to(stacked.dtype), stacked)


class CombinedOutput(ScheduledLambdas, nn.Module):
    """Strategy: cross-entropy on the combined output (eq. 8) + ``exit_weight`` × joint loss.

    Args:
        num_exits: exits of the network to train.
        mode: one of :data:`COMBINE_MODES`.
        exit_weight: weight of the joint per-exit loss (eq. 6–7) added to the combined loss;
            ``0`` trains on the mix alone.
        schedule: λ schedule of that joint loss (default :func:`~offramp.training.constant` 1).
        loss_fn: loss on logits.

    Example:
        >>> import torch
        >>> from offramp.models import mlp
        >>> net = mlp(4, 3, hidden=(8, 8))
        >>> s = CombinedOutput(net.num_exits, "softmax")
        >>> out = s.step(net, (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])))
        >>> sorted(out)
        ['combined_accuracy', 'combined_loss', 'correct', 'exit_losses', 'loss']
    """

    def __init__(
        self,
        num_exits: int,
        mode: str = "softmax",
        *,
        exit_weight: float = 1.0,
        schedule: Schedule | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    ) -> None:
        super().__init__()
        if mode not in COMBINE_MODES:
            raise ConfigError(f"unknown combine mode {mode!r}; choose one of {COMBINE_MODES}")
        if exit_weight < 0:
            raise ConfigError(f"exit_weight must be ≥ 0, got {exit_weight}")
        self.mode = mode
        self.exit_weight = float(exit_weight)
        self.schedule = schedule or constant(1.0)
        self.loss_fn = loss_fn
        init = torch.full((num_exits,), 1.0 / num_exits) if mode == "free" else None
        if mode == "softmax":
            init = torch.zeros(num_exits)
        self.weights = nn.Parameter(init) if init is not None else None

    def alpha(self) -> Tensor | None:
        """The current mixing weights ``α`` (``None`` for the fixed ``"mean"`` and ``"max"``)."""
        if self.weights is None:
            return None
        return self.weights.softmax(0) if self.mode == "softmax" else self.weights

    def step(self, net: MultiExitNetwork, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Combined loss (+ joint loss) on one batch."""
        x, y = batch
        outs = net(x)
        mixed = combine(outs, self.mode, self.weights)
        combined_loss = self.loss_fn(mixed, y)
        joint, per = joint_loss(outs, y, self.lambdas(net), self.loss_fn)
        with torch.no_grad():
            acc = (mixed.argmax(dim=1) == y).double().mean()
        return {
            "loss": combined_loss + self.exit_weight * joint,
            "exit_losses": per.detach(),
            "correct": correct_per_exit(outs, y),
            "combined_loss": combined_loss.detach(),
            "combined_accuracy": acc,
        }
