"""Self-distillation (beyond the survey; as in FastBERT and Zero-Time-Waste).

Every early exit learns from the labels and from the final exit's softened prediction::

    J = J_L + Σ_{i<L} λ_i · [(1 − α)·CE(y_i, label) + α·T²·KL(softmax(y_L/T) ‖ softmax(y_i/T))]

The teacher ``softmax(y_L / T)`` is detached: the final exit is trained by the labels only and
is not pulled towards its students. ``T`` softens both distributions; the ``T²`` factor keeps
the gradient scale independent of ``T`` (Hinton et al. 2015).

Use it when the early exits lag far behind the final one: the teacher's soft targets carry
"dark knowledge" about class similarity that the hard labels do not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from offramp.errors import ConfigError
from offramp.network import MultiExitNetwork
from offramp.training.joint import Schedule, ScheduledLambdas, constant, correct_per_exit

__all__ = ["SelfDistillation", "distillation_loss"]


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, batch mean; the teacher is detached.

    Example:
        >>> import torch
        >>> x = torch.randn(3, 5)
        >>> float(distillation_loss(x, x, 2.0))
        0.0
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    target = F.log_softmax(teacher.detach() / t, dim=1)
    log_p = F.log_softmax(student / t, dim=1)
    return F.kl_div(log_p, target, reduction="batchmean", log_target=True) * t * t


class SelfDistillation(ScheduledLambdas):
    """Strategy: joint training whose early exits also distil the final exit.

    Args:
        temperature: softening temperature ``T``.
        alpha: share ``α`` of the distillation term in each early exit's loss, in ``[0, 1]``.
        schedule: λ schedule over the early exits (default constant 1).

    Example:
        >>> import torch
        >>> from offramp.models import mlp
        >>> net = mlp(4, 3, hidden=(8, 8))
        >>> out = SelfDistillation().step(net, (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])))
        >>> sorted(out)
        ['correct', 'distill_loss', 'exit_losses', 'loss']
    """

    def __init__(
        self, temperature: float = 3.0, alpha: float = 0.5, schedule: Schedule | None = None
    ) -> None:
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1], got {alpha}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.schedule = schedule or constant(1.0)

    def step(self, net: MultiExitNetwork, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Labels for every exit, the final exit's soft targets for the early ones."""
        x, y = batch
        outs = net(x)
        ce = torch.stack([F.cross_entropy(o, y) for o in outs])  # (E,)
        kd = [distillation_loss(o, outs.final, self.temperature) for o in outs[:-1]]
        kd_t = torch.stack(kd) if kd else ce.new_zeros(0)  # (E - 1,)
        early = (1 - self.alpha) * ce[:-1] + self.alpha * kd_t
        lam = torch.tensor(self.lambdas(net), dtype=ce.dtype, device=ce.device)
        loss = ce[-1] + (lam * early).sum()
        return {
            "loss": loss,
            "exit_losses": ce.detach(),
            "correct": correct_per_exit(outs, y),
            "distill_loss": kd_t.detach().mean() if kd else ce.new_zeros(()),
        }
