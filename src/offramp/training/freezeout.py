"""Freezeout (Brock et al. 2017; survey eq. 10): blocks stop training one after another.

Block group ``i`` (a block with the exit head after it, if any) has its own learning rate,
cosine-annealed from ``α_i`` to zero at its freezing point ``t_i`` (a fraction of the training
budget), after which it is frozen::

    α_i(t) = ½ · α_i · (1 + cos(π · t / t_i))   for t < t_i,   0 (and frozen) afterwards

The freezing points start at ``t_0`` for the first block and reach 1 for the last:

- linear spacing: ``t_i = t_0 + (1 − t_0) · i / (n − 1)``;
- cubic spacing:  ``t_i = (t_0^{1/3} + (1 − t_0^{1/3}) · i / (n − 1))³`` (more time for the
  later blocks, Freezeout's recommended choice).

With ``scale_lr`` each group starts at ``α_i = α_0 / t_i`` so that every block travels about the
same distance (the paper's learning-rate scaling); otherwise ``α_i = α_0``.

A frozen block has ``requires_grad = False`` on all its parameters. Because blocks freeze from
the input side, the frozen part is always a prefix of the network, and autograd does not
backpropagate into it at all: every step after a freezing point is cheaper than the one before.
The loss is the joint loss (eq. 6–7), so the exits are trained with their blocks.

Use it to cut training time (the paper reports ~20% less wall-clock for a small accuracy cost).
It changes which parameters train while training, so it runs in one process (not under DDP).
After training the frozen blocks keep ``requires_grad = False``; call
``net.requires_grad_(True)`` before training the network again by other means.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from offramp.errors import ConfigError
from offramp.network import MultiExitNetwork
from offramp.training.joint import JointTraining, Schedule
from offramp.training.loop import FitConfig, make_optimizer

__all__ = ["Freezeout", "block_groups", "freezeout_lr", "freezing_points"]

log = logging.getLogger("offramp.training")

SPACINGS = ("linear", "cubic")


def freezing_points(n: int, t0: float = 0.5, spacing: str = "cubic") -> list[float]:
    """Freezing points ``t_i`` of ``n`` block groups, as fractions of the training budget.

    Example:
        >>> freezing_points(3, 0.5, "linear")
        [0.5, 0.75, 1.0]
        >>> [round(t, 4) for t in freezing_points(3, 0.125, "cubic")]
        [0.125, 0.4219, 1.0]
    """
    if not 0.0 < t0 <= 1.0:
        raise ConfigError(f"t0 must lie in (0, 1], got {t0}")
    if spacing not in SPACINGS:
        raise ConfigError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    if n < 1:
        raise ConfigError(f"need at least one block group, got {n}")
    if n == 1:
        return [1.0]
    if spacing == "linear":
        return [t0 + (1 - t0) * i / (n - 1) for i in range(n)]
    c = t0 ** (1 / 3)
    return [(c + (1 - c) * i / (n - 1)) ** 3 for i in range(n)]


def freezeout_lr(base_lr: float, t: float, t_i: float) -> float:
    """Eq. 10: ``½ · base_lr · (1 + cos(π t / t_i))`` before ``t_i``, 0 from ``t_i`` on.

    Example:
        >>> freezeout_lr(0.1, 0.0, 0.5), freezeout_lr(0.1, 0.25, 0.5), freezeout_lr(0.1, 0.5, 0.5)
        (0.1, 0.05, 0.0)
    """
    if t >= t_i:
        return 0.0
    return 0.5 * base_lr * (1 + math.cos(math.pi * t / t_i))


def block_groups(net: MultiExitNetwork) -> list[tuple[list[nn.Module], list[nn.Parameter]]]:
    """Every block with the head after it (if any), in depth order: ``(modules, trainable
    parameters)``. Parameters already frozen by the user are left out (and stay frozen)."""
    heads = dict(zip(net.exit_blocks, net.heads, strict=True))
    groups = []
    for k, block in enumerate(net.blocks):
        modules = [block] + ([heads[k]] if k in heads else [])
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        groups.append((modules, params))
    return groups


class Freezeout(JointTraining):
    """Strategy for eq. 10: joint loss, per-block cosine learning rates, progressive freezing.

    Args:
        t0: freezing point of the first block, a fraction of the training budget in (0, 1].
        spacing: ``"linear"`` or ``"cubic"`` spacing of the freezing points.
        scale_lr: start group ``i`` at ``α_0 / t_i`` instead of ``α_0``.
        schedule: λ schedule of the joint loss.

    Example:
        >>> import torch
        >>> from offramp.models import mlp
        >>> from offramp.training import FitConfig, fit
        >>> net = mlp(4, 3, hidden=(8, 8))
        >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> _ = fit(net, data, FitConfig(epochs=2, batch_size=8, show_progress=False),
        ...         strategy=Freezeout(t0=0.5, spacing="linear"))
        >>> [p.requires_grad for p in net.blocks[0].parameters()]  # frozen at half the budget
        [False, False]
    """

    manages_lr = True
    ddp_compatible = False

    def __init__(
        self,
        t0: float = 0.5,
        spacing: str = "cubic",
        scale_lr: bool = False,
        schedule: Schedule | None = None,
    ) -> None:
        super().__init__(schedule)
        freezing_points(2, t0, spacing)  # validates
        self.t0 = float(t0)
        self.spacing = spacing
        self.scale_lr = bool(scale_lr)
        self.points: list[float] = []
        self._group_modules: list[list[nn.Module]] = []
        self._num_frozen = 0

    def configure_optimizer(self, net: MultiExitNetwork, cfg: FitConfig) -> torch.optim.Optimizer:
        """One parameter group per block (with its head), each remembering its ``t_i``."""
        if cfg.lr_schedule != "constant":
            log.warning(
                "freezeout sets every block's learning rate itself (eq. 10); lr_schedule=%r is "
                "ignored",
                cfg.lr_schedule,
            )
        groups = block_groups(net)
        self.points = freezing_points(len(groups), self.t0, self.spacing)
        self._group_modules = []
        param_groups = []
        for (modules, params), t_i in zip(groups, self.points, strict=True):
            if params:
                base = cfg.lr / t_i if self.scale_lr else cfg.lr
                param_groups.append({"params": params, "base_lr": base, "t_i": t_i})
                self._group_modules.append(modules)
        return make_optimizer(param_groups, cfg)

    def total_epochs_use(self) -> str | None:
        """Freezing points are fractions of the whole training: extending it would thaw
        blocks frozen already."""
        return (
            "freezeout freezes each block at a fraction of the total training steps and "
            "anneals its learning rate to 0 there"
        )

    def on_batch_start(
        self, net: MultiExitNetwork, optimizer: torch.optim.Optimizer, iteration: int, total: int
    ) -> None:
        """Set every group's learning rate for step ``iteration`` of ``total``; freeze the groups
        whose freezing point has passed (``requires_grad = False`` and eval mode, so BatchNorm
        statistics and dropout are frozen too) and keep the others trainable (after a resume)."""
        t = iteration / total
        self._num_frozen = sum(t >= g["t_i"] for g in optimizer.param_groups)
        for g, modules in zip(optimizer.param_groups, self._group_modules, strict=True):
            g["lr"] = freezeout_lr(g["base_lr"], t, g["t_i"])
            frozen = t >= g["t_i"]
            for p in g["params"]:
                p.requires_grad_(not frozen)
                if frozen:
                    p.grad = None
            if frozen:
                for m in modules:
                    m.eval()

    def step(self, net: MultiExitNetwork, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Joint loss; also reports how many block groups are frozen."""
        out = super().step(net, batch)
        out["frozen_blocks"] = torch.tensor(float(self._num_frozen))
        return out
