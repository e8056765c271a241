"""Joint (deeply supervised) training, eq. 6–7: ``J = J_L + Σ_{i<L} λ_i J_i``.

``J_i`` is the mean loss of exit ``i`` on the batch. The weights ``λ`` of the early exits come
from a schedule, a callable ``schedule(epoch, num_epochs, num_early_exits) -> list[float]``:

- :func:`constant` — the same λ for every exit and epoch (Inception used 0.3: :func:`inception`);
- :func:`linear_in_depth` — λ grows linearly with the exit's depth;
- :func:`sdn_growing` — SDN's schedule: each exit's λ grows linearly over the epochs from 1% to
  a depth-dependent maximum.

Use joint training when all exits should be good at once and the backbone is trained from
scratch together with its heads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from offramp.errors import ConfigError
from offramp.network import ExitOutputs, MultiExitNetwork

__all__ = [
    "CUSTOM_SCHEDULE_USE",
    "JointTraining",
    "Schedule",
    "ScheduledLambdas",
    "constant",
    "correct_per_exit",
    "inception",
    "joint_loss",
    "linear_in_depth",
    "sdn_growing",
]

Schedule = Callable[[int, int, int], list[float]]

#: What a λ schedule without a ``total_epochs_use`` attribute is taken to do: it receives the
#: total number of epochs, so it may depend on it.
CUSTOM_SCHEDULE_USE = (
    "a custom λ schedule receives the total number of epochs and may depend on it (if yours "
    "does not, set its attribute total_epochs_use = None)"
)


def _described(schedule: Schedule, total_epochs_use: str | None) -> Schedule:
    """``schedule`` with its ``total_epochs_use``: what in it depends on the total number of
    epochs (``None``: nothing, so a run may be extended to more epochs)."""
    schedule.total_epochs_use = total_epochs_use  # type: ignore[attr-defined]
    return schedule


def constant(value: float = 1.0) -> Schedule:
    """λ_i = ``value`` for every early exit and epoch."""
    if value < 0:
        raise ConfigError(f"λ must be ≥ 0, got {value}")
    return _described(lambda epoch, num_epochs, k: [float(value)] * k, None)


def inception(value: float = 0.3) -> Schedule:
    """Inception's auxiliary-classifier weight: constant 0.3."""
    return constant(value)


def linear_in_depth(top: float = 1.0) -> Schedule:
    """λ_i = ``top``·(i+1)/(k+1) for early exit ``i`` of ``k``: deeper exits weigh more."""
    return _described(
        lambda epoch, num_epochs, k: [top * (i + 1) / (k + 1) for i in range(k)], None
    )


def sdn_growing(top: Sequence[float] | float | None = None, start: float = 0.01) -> Schedule:
    """SDN's schedule: λ_i(t) = τ_i·(start + (1 − start)·t/(T − 1)) over epochs t = 0 … T−1.

    Args:
        top: maximum weight τ_i per early exit; a single number caps the default instead.
            Default: linear in depth, 0.15, 0.3, … capped at 0.9, as in SDN's six internal
            classifiers.
        start: fraction of τ_i at epoch 0.

    Example:
        >>> sdn_growing(0.2)(1, 2, 3)  # last epoch: τ = min(0.2, 0.15·(i + 1))
        [0.15, 0.2, 0.2]
    """

    def schedule(epoch: int, num_epochs: int, k: int) -> list[float]:
        if top is None or isinstance(top, (int, float)):
            cap = 0.9 if top is None else float(top)
            taus = [min(cap, 0.15 * (i + 1)) for i in range(k)]
        else:
            taus = list(top)
        if len(taus) != k:
            raise ConfigError(f"sdn_growing got {len(taus)} maxima for {k} early exits")
        frac = epoch / (num_epochs - 1) if num_epochs > 1 else 1.0
        return [t * (start + (1 - start) * frac) for t in taus]

    return _described(
        schedule, "λ schedule sdn grows each early exit's weight over the total epochs"
    )


def joint_loss(
    outputs: ExitOutputs | Sequence[Tensor],
    target: Tensor,
    weights: Sequence[float],
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> tuple[Tensor, Tensor]:
    """Eq. 6–7: ``J_L + Σ_i λ_i J_i``.

    Args:
        outputs: logits of every exit, ``E × (B, C)``.
        target: labels ``(B,)``.
        weights: λ for the ``E − 1`` early exits.
        loss_fn: per-exit mean loss.

    Returns:
        ``(total loss, per-exit losses (E,))``.

    Example:
        >>> import torch
        >>> outs = [torch.zeros(2, 2), torch.zeros(2, 2)]
        >>> total, per = joint_loss(outs, torch.tensor([0, 1]), [0.5])
        >>> round(float(total), 4)  # 1.5 · log 2
        1.0397
    """
    if len(weights) != len(outputs) - 1:
        raise ConfigError(
            f"got {len(weights)} λ weights for {len(outputs) - 1} early exits; give one per "
            "early exit (the final exit always has weight 1)"
        )
    per = torch.stack([loss_fn(y, target) for y in outputs])  # (E,)
    w = torch.tensor([*weights, 1.0], dtype=per.dtype, device=per.device)
    return (w * per).sum(), per


def correct_per_exit(outputs: Sequence[Tensor], target: Tensor) -> Tensor:
    """Correct predictions of every exit on the batch, ``E × (B, C) -> (E,)`` (no gradient).

    Example:
        >>> import torch
        >>> correct_per_exit([torch.eye(2), torch.eye(2).flip(0)], torch.tensor([0, 1])).tolist()
        [2, 0]
    """
    with torch.no_grad():
        preds = torch.stack(tuple(outputs)).argmax(dim=-1)  # E × (B, C) -> (E, B)
        return (preds == target[None, :]).sum(dim=1)


class ScheduledLambdas:
    """Mixin for strategies with a joint term: this epoch's λ of the early exits, taken from
    ``self.schedule`` at every epoch start (or at the first step, outside the fit loop)."""

    schedule: Schedule
    _lambdas: list[float] | None = None

    def on_epoch_start(self, net: MultiExitNetwork, epoch: int, num_epochs: int) -> None:
        """Set this epoch's λ from the schedule."""
        self._lambdas = list(self.schedule(epoch, num_epochs, net.num_exits - 1))

    def total_epochs_use(self) -> str | None:
        """What in this strategy depends on the total number of epochs (its λ schedule's
        ``total_epochs_use``), ``None`` when nothing does: see
        :func:`offramp.training.loop.total_epochs_use`."""
        return getattr(self.schedule, "total_epochs_use", CUSTOM_SCHEDULE_USE)

    def lambdas(self, net: MultiExitNetwork) -> list[float]:
        """The current λ (epoch 0 of 1 when no epoch has started)."""
        if self._lambdas is None:
            self.on_epoch_start(net, 0, 1)
        assert self._lambdas is not None
        return self._lambdas


class JointTraining(ScheduledLambdas):
    """Strategy object for eq. 6–7: ``step(net, batch) -> dict(loss=…, …)``.

    Args:
        schedule: λ schedule for the early exits (default :func:`constant` 1.0).
        loss_fn: per-exit loss (default cross-entropy).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from offramp import MultiExitNetwork
        >>> net = MultiExitNetwork([nn.Linear(4, 4), nn.Linear(4, 4)],
        ...                        {0: nn.Linear(4, 2), 1: nn.Linear(4, 2)})
        >>> out = JointTraining().step(net, (torch.randn(3, 4), torch.tensor([0, 1, 1])))
        >>> sorted(out)
        ['correct', 'exit_losses', 'loss']
    """

    def __init__(
        self,
        schedule: Schedule | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    ) -> None:
        self.schedule = schedule or constant(1.0)
        self.loss_fn = loss_fn

    @property
    def weights(self) -> list[float] | None:
        """This epoch's λ (``None`` before the first epoch)."""
        return self._lambdas

    def step(self, net: MultiExitNetwork, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Forward all exits and return the joint loss plus per-exit statistics."""
        x, y = batch
        lambdas = self.lambdas(net)
        outs = net(x)
        loss, per = joint_loss(outs, y, lambdas, self.loss_fn)
        return {"loss": loss, "exit_losses": per.detach(), "correct": correct_per_exit(outs, y)}
