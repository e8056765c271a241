"""A short, explicit fit loop: seeded, with a progress bar, per-exit logs and atomic,
resumable checkpoints.

The loop is deliberately plain — for each epoch: ask the strategy for its per-epoch settings,
shuffle with a generator seeded by ``(seed, epoch)``, call ``strategy.step`` on each batch,
step the optimiser, log per-exit loss and accuracy, write the checkpoint. Because shuffling
depends only on the seed and the epoch, and the checkpoint holds the model, the optimiser and
the global RNG state, a run resumed after an interruption ends with exactly the weights of an
uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from offramp._progress import progress
from offramp.errors import CheckpointError, ConfigError
from offramp.evaluation import ExitRecord
from offramp.network import MultiExitNetwork
from offramp.training.joint import JointTraining

__all__ = ["EpochLog", "FitConfig", "Strategy", "fit", "load_checkpoint", "save_checkpoint"]

log = logging.getLogger("offramp.training")


class Strategy(Protocol):
    """A training strategy: one step signature, optional ``on_epoch_start`` hook."""

    def step(self, net: MultiExitNetwork, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]: ...


@dataclass
class FitConfig:
    """Settings of :func:`fit`.

    Attributes:
        epochs: passes over the training data.
        batch_size: samples per optimiser step.
        lr: learning rate.
        weight_decay: L2 penalty (decoupled for Adam: AdamW).
        optimizer: ``"adam"`` (AdamW) or ``"sgd"`` (with momentum).
        momentum: SGD momentum.
        lr_schedule: ``"constant"`` or ``"cosine"`` (annealed to 0 over ``epochs``).
        seed: seeds the global RNG at the start and every epoch's shuffle.
        checkpoint: file written atomically after every epoch; ``None`` for none.
        resume: continue from ``checkpoint`` when it exists.
        show_progress: show a progress bar per epoch.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    momentum: float = 0.9
    lr_schedule: str = "constant"
    seed: int = 0
    checkpoint: str | None = None
    resume: bool = True
    show_progress: bool = True

    def fingerprint(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run that wrote the checkpoint."""
        d = asdict(self)
        for k in ("checkpoint", "resume", "show_progress"):
            d.pop(k)
        return d


@dataclass
class EpochLog:
    """What one epoch did.

    Attributes:
        epoch: 0-based epoch index.
        loss: mean training loss.
        exit_losses: mean loss of each exit.
        exit_accuracy: training accuracy of each exit (running, during the epoch).
        val_exit_accuracy: accuracy of each exit on the validation data, if given.
        seconds: wall-clock time of the epoch.
    """

    epoch: int
    loss: float
    exit_losses: list[float]
    exit_accuracy: list[float]
    val_exit_accuracy: list[float] | None = None
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` atomically: a temporary file, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointError(f"could not write checkpoint {path}: {exc}") from exc


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    try:
        return torch.load(Path(path), weights_only=False)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); delete it to "
            "start over"
        ) from exc


def _optimizer(net: MultiExitNetwork, cfg: FitConfig) -> torch.optim.Optimizer:
    params = [p for p in net.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; choose 'adam' or 'sgd'")


def _lr_at(cfg: FitConfig, epoch: int) -> float:
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        import math

        return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / cfg.epochs))
    raise ConfigError(f"unknown lr_schedule {cfg.lr_schedule!r}; choose 'constant' or 'cosine'")


def _batches(
    data: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]], bs: int, gen: torch.Generator
) -> tuple[Iterable[tuple[Tensor, Tensor]], int | None]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
        perm = torch.randperm(x.shape[0], generator=gen)
        starts = range(0, x.shape[0], bs)
        return ((x[perm[s : s + bs]], y[perm[s : s + bs]]) for s in starts), len(starts)
    return data, (len(data) if hasattr(data, "__len__") else None)  # type: ignore[arg-type]


def fit(
    net: MultiExitNetwork,
    train: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
    config: FitConfig | None = None,
    *,
    strategy: Strategy | None = None,
    val: tuple[Tensor, Tensor] | None = None,
    callbacks: Sequence[Callable[[EpochLog], None]] = (),
) -> list[EpochLog]:
    """Train ``net`` with ``strategy`` (default: joint training with λ = 1).

    Args:
        net: the network; trained in place.
        train: ``(X, y)`` tensors (shuffled by the loop) or a re-iterable of batches.
        config: loop settings (:class:`FitConfig`).
        strategy: object with ``step(net, batch) -> {"loss", "exit_losses", "correct"}`` and an
            optional ``on_epoch_start(net, epoch, num_epochs)``.
        val: optional ``(X, y)`` evaluated on every exit after each epoch.
        callbacks: called with each epoch's :class:`EpochLog` after its checkpoint is written.

    Returns:
        The history, one :class:`EpochLog` per epoch (resumed epochs included).

    Example:
        >>> import torch
        >>> from offramp.models import mlp
        >>> net = mlp(4, 3, hidden=(8, 8))
        >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> hist = fit(net, data, FitConfig(epochs=2, show_progress=False))
        >>> len(hist), len(hist[-1].exit_accuracy)
        (2, 2)
    """
    cfg = config or FitConfig()
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be ≥ 1, got {cfg.epochs}, {cfg.batch_size}")
    strategy = strategy or JointTraining()
    opt = _optimizer(net, cfg)
    history: list[EpochLog] = []
    start = 0
    torch.manual_seed(cfg.seed)
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else None
    if ckpt is not None and cfg.resume and ckpt.exists():
        state = load_checkpoint(ckpt)
        if state.get("config") != cfg.fingerprint():
            raise CheckpointError(
                f"checkpoint {ckpt} was written with settings {state.get('config')}, but this "
                f"run uses {cfg.fingerprint()}; use the same settings, another checkpoint path, "
                "or resume=False"
            )
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        history = [EpochLog(**h) for h in state["history"]]
        start = state["epoch"]
        log.info("resumed from %s after epoch %d", ckpt, start)

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        net.train()
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, epoch)
        hook = getattr(strategy, "on_epoch_start", None)
        if hook is not None:
            hook(net, epoch, cfg.epochs)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        batches, total = _batches(train, cfg.batch_size, gen)
        loss_sum, n_seen = 0.0, 0
        exit_loss_sum: Tensor | None = None
        correct_sum: Tensor | None = None
        bar = progress(
            batches, total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}", enabled=cfg.show_progress
        )
        for batch in bar:
            out = strategy.step(net, batch)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"training diverged at epoch {epoch}: loss is {float(loss.detach())}; "
                    f"lower the learning rate (now {cfg.lr})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            b = batch[1].shape[0]
            n_seen += b
            loss_sum += float(loss.detach()) * b
            el = out["exit_losses"].detach() * b
            exit_loss_sum = el if exit_loss_sum is None else exit_loss_sum + el
            c = out["correct"].detach()
            correct_sum = c if correct_sum is None else correct_sum + c
        assert exit_loss_sum is not None and correct_sum is not None
        entry = EpochLog(
            epoch=epoch,
            loss=loss_sum / n_seen,
            exit_losses=(exit_loss_sum / n_seen).tolist(),
            exit_accuracy=(correct_sum.double() / n_seen).tolist(),
        )
        if val is not None:
            entry.val_exit_accuracy = ExitRecord.collect(net, val).exit_accuracy().tolist()
        entry.seconds = time.perf_counter() - t0
        history.append(entry)
        log.info(
            "epoch %d/%d loss %.4f exit acc %s%s",
            epoch + 1,
            cfg.epochs,
            entry.loss,
            " ".join(f"{a:.3f}" for a in entry.exit_accuracy),
            ""
            if entry.val_exit_accuracy is None
            else " val " + " ".join(f"{a:.3f}" for a in entry.val_exit_accuracy),
        )
        if ckpt is not None:
            save_checkpoint(
                ckpt,
                {
                    "format": 1,
                    "epoch": epoch + 1,
                    "model": net.state_dict(),
                    "optimizer": opt.state_dict(),
                    "rng": torch.get_rng_state(),
                    "history": [asdict(h) for h in history],
                    "config": cfg.fingerprint(),
                },
            )
        for cb in callbacks:
            cb(entry)
    net.eval()
    return history
