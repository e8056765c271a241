"""Recursive confidence gating (eq. 9) and cost-regularised training (eq. 13–14).

Each early exit ``i`` gets a small trainable gate ``g_i = σ(w_iᵀ pool(h_i) + b_i) ∈ [0, 1]``, and
the exits' class probabilities are mixed from the back (eq. 9)::

    ŷ_L = y_L,    ŷ_i = g_i · y_i + (1 − g_i) · ŷ_{i+1},    output ŷ_1

so the whole cascade — including the decision where to stop — is differentiable. The same
recursion over the cumulative costs ``C_i`` gives the soft expected cost (eq. 13–14)::

    C̃_L = C_L,    C̃_i = g_i · C_i + (1 − g_i) · C̃_{i+1}

With hard gates (``g ∈ {0, 1}``) ``C̃_1`` is exactly the cost of the first exit whose gate is 1,
so its batch mean is eq. 12. Adding ``β · C̃_1 / C_L`` to the loss (``beta > 0``,
strategy ``"cost"``) trades accuracy for expected cost; ``β`` is in units of the loss per
full-backbone cost. After training, the gates are learned exit criteria: exit at ``i`` when
``g_i > ½`` (:meth:`GatedTraining.gate_values`).

Use gating when you want the network to learn where to stop instead of calibrating thresholds
afterwards, and the cost term when the budget matters during training already.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offramp.errors import ConfigError
from offramp.network import MultiExitNetwork
from offramp.policies import GateScorer
from offramp.training.joint import (
    Schedule,
    ScheduledLambdas,
    constant,
    correct_per_exit,
    joint_loss,
)

__all__ = ["GatedTraining", "gate_scorers_from_state", "gated_output", "make_gate", "soft_cost"]


def gated_output(probs: Sequence[Tensor], gates: Sequence[Tensor]) -> Tensor:
    """Eq. 9: ``ŷ_1`` from the exits' probabilities and the early exits' gates.

    Args:
        probs: class probabilities of every exit, ``E × (B, C)``.
        gates: gate values of the ``E − 1`` early exits, ``(E − 1) × (B,)``.

    Returns:
        ``ŷ_1``, ``(B, C)``.

    Example:
        >>> import torch
        >>> p = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
        >>> gated_output(p, [torch.tensor([0.25])]).tolist()
        [[0.25, 0.75]]
    """
    if len(gates) != len(probs) - 1:
        raise ConfigError(f"got {len(gates)} gates for {len(probs) - 1} early exits")
    out = probs[-1]
    for p, g in zip(reversed(probs[:-1]), reversed(gates), strict=True):
        out = g[:, None] * p + (1 - g[:, None]) * out  # (B, 1) * (B, C)
    return out


def soft_cost(gates: Sequence[Tensor], cumulative: Sequence[float] | Tensor) -> Tensor:
    """Eq. 13–14: the soft expected cost ``C̃_1`` per sample.

    Args:
        gates: gate values of the ``E − 1`` early exits, ``(E − 1) × (B,)``.
        cumulative: ``C_i`` of every exit, ``(E,)``.

    Returns:
        ``C̃_1``, ``(B,)``.

    Example:
        >>> import torch
        >>> soft_cost([torch.tensor([1.0, 0.0, 0.5])], [2.0, 10.0]).tolist()
        [2.0, 10.0, 6.0]
    """
    c = torch.as_tensor(cumulative, dtype=torch.float32)
    if c.numel() != len(gates) + 1:
        raise ConfigError(f"got {c.numel()} costs for {len(gates) + 1} exits")
    out = torch.full_like(gates[0], float(c[-1])) if gates else c[-1:].clone()
    for i in range(len(gates) - 1, -1, -1):
        out = gates[i] * c[i] + (1 - gates[i]) * out
    return out


def make_gate(in_shape: Sequence[int]) -> nn.Module:
    """A gate for features of per-sample shape ``in_shape``: global average pooling over
    spatial dimensions, a linear map to one logit, a sigmoid. Initialised to ``g = ½``."""
    if len(in_shape) == 1:
        pool: nn.Module = nn.Identity()
        width = int(in_shape[0])
    else:
        pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1) if len(in_shape) == 3 else nn.Identity(), nn.Flatten()
        )
        width = int(in_shape[0]) if len(in_shape) == 3 else int(torch.tensor(in_shape).prod())
    lin = nn.Linear(width, 1)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return nn.Sequential(pool, lin, nn.Flatten(0), nn.Sigmoid())


def gate_scorers_from_state(state: dict[str, Any]) -> tuple[GateScorer, ...]:
    """Gate scorers rebuilt from :meth:`GatedTraining.gates_state` (in eval mode).

    Example:
        >>> import torch
        >>> from offramp.models import mlp
        >>> s = GatedTraining.for_network(mlp(4, 3, hidden=(8, 8)), torch.randn(2, 4))
        >>> len(gate_scorers_from_state(s.gates_state()))
        1
    """
    try:
        gates = nn.ModuleList([make_gate(tuple(sh)) for sh in state["feature_shapes"]])
        gates.load_state_dict(state["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ConfigError(
            f"not the saved gates of a gated run ({type(exc).__name__}: {exc}); save them with "
            "GatedTraining.gates_state()"
        ) from exc
    return tuple(GateScorer(g).eval() for g in gates)


class GatedTraining(ScheduledLambdas, nn.Module):
    """Strategy for eq. 9 (``beta = 0``) and eq. 13–14 (``beta > 0``).

    Loss: ``−log ŷ_1[y] + exit_weight · joint loss (eq. 6–7) + beta · mean(C̃_1) / C_L``.

    Args:
        feature_shapes: per-sample shape of ``h_i`` at every early exit (see :meth:`for_network`).
        beta: weight of the soft-cost term; needs ``cumulative``.
        cumulative: ``C_i`` of every exit (``CostProfile.cumulative``).
        exit_weight: weight of the joint per-exit loss; keeps each exit a classifier of its own.
        schedule: λ schedule of that joint loss.
        loss_fn: per-exit loss on logits.

    Example:
        >>> import torch
        >>> from offramp.models import mlp
        >>> net = mlp(4, 3, hidden=(8, 8))
        >>> s = GatedTraining.for_network(net, torch.randn(2, 4))
        >>> float(s.step(net, (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])))["gate_mean"])
        0.5
    """

    def __init__(
        self,
        feature_shapes: Sequence[Sequence[int]],
        *,
        beta: float = 0.0,
        cumulative: Sequence[float] | None = None,
        exit_weight: float = 1.0,
        schedule: Schedule | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    ) -> None:
        super().__init__()
        if beta < 0:
            raise ConfigError(f"beta must be ≥ 0, got {beta}")
        if beta > 0 and cumulative is None:
            raise ConfigError(
                "cost-regularised training (beta > 0) needs the exits' cumulative costs: pass "
                "cumulative=offramp.profile(net, x).cumulative"
            )
        self.feature_shapes = [tuple(int(d) for d in s) for s in feature_shapes]
        self.gates = nn.ModuleList([make_gate(s) for s in self.feature_shapes])
        self.beta = float(beta)
        c = torch.as_tensor(cumulative if cumulative is not None else [], dtype=torch.float32)
        if cumulative is not None and c.numel() != len(feature_shapes) + 1:
            raise ConfigError(
                f"got {c.numel()} cumulative costs for {len(feature_shapes) + 1} exits"
            )
        self.register_buffer("relative_costs", c / c[-1] if c.numel() else c)
        self.exit_weight = float(exit_weight)
        self.schedule = schedule or constant(1.0)
        self.loss_fn = loss_fn

    @classmethod
    def for_network(
        cls, net: MultiExitNetwork, example_input: Tensor, **kwargs: object
    ) -> GatedTraining:
        """Gates shaped for ``net``'s early exits (shapes read off one forward pass in eval mode,
        so BatchNorm statistics are left alone)."""
        was_training = net.training
        net.eval()
        with torch.no_grad():
            feats, _ = net(example_input[:2], return_features=True)
        net.train(was_training)
        return cls([tuple(f.shape[1:]) for f in feats[:-1]], **kwargs)  # type: ignore[arg-type]

    def gate_values(self, features: Sequence[Tensor]) -> list[Tensor]:
        """``g_i`` of every early exit, ``(E − 1) × (B,)``, from the features at the exits."""
        if len(features) < len(self.gates):
            raise ConfigError(
                f"need features of {len(self.gates)} early exits, got {len(features)}"
            )
        return [g(h) for g, h in zip(self.gates, features, strict=False)]

    def gate_scorers(self) -> tuple[GateScorer, ...]:
        """The trained gates as exit scorers for policies, calibration and the runtime (in eval
        mode; they share parameters with this strategy):
        ``ThresholdPolicy("learned", τ, scorers=strategy.gate_scorers())``, thresholds from
        ``ThresholdCalibrator("learned", δ, scorers=...)`` on a record collected with
        ``ExitRecord.collect(net, data, feature_scorers=...)``; ``τ = ½`` is the gates' own rule.

        Example:
            >>> import torch
            >>> from offramp.models import mlp
            >>> net = mlp(4, 3, hidden=(8, 8))
            >>> s = GatedTraining.for_network(net, torch.randn(2, 4))
            >>> [type(g).__name__ for g in s.gate_scorers()]
            ['GateScorer']
        """
        return tuple(GateScorer(g).eval() for g in self.gates)

    def gates_state(self) -> dict[str, object]:
        """The gates as plain data (``feature_shapes`` + ``state_dict``), saved with the model
        by ``offramp train``; :func:`gate_scorers_from_state` rebuilds them."""
        return {
            "feature_shapes": [list(s) for s in self.feature_shapes],
            "state_dict": self.gates.state_dict(),
        }

    def step(self, net: MultiExitNetwork, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Gated loss (+ joint loss, + soft cost) on one batch."""
        x, y = batch
        feats, outs = net(x, return_features=True)
        gates = self.gate_values(feats)
        mixed = gated_output([o.softmax(dim=1) for o in outs], gates)
        gated_loss = F.nll_loss(mixed.clamp_min(1e-12).log(), y)
        joint, per = joint_loss(outs, y, self.lambdas(net), self.loss_fn)
        loss = gated_loss + self.exit_weight * joint
        extra: dict[str, Tensor] = {}
        if self.relative_costs.numel():
            cost = soft_cost(gates, self.relative_costs).mean()
            loss = loss + self.beta * cost
            extra["soft_cost"] = cost.detach()
        with torch.no_grad():
            extra["gated_accuracy"] = (mixed.argmax(dim=1) == y).double().mean()
            extra["gate_mean"] = torch.stack(gates).mean() if gates else torch.tensor(0.0)
        return {
            "loss": loss,
            "exit_losses": per.detach(),
            "correct": correct_per_exit(outs, y),
            "gated_loss": gated_loss.detach(),
            **extra,
        }
