"""Layer-wise training (forward thinking, deep cascade learning; survey §5.3 and §7.3).

Stage ``i`` (the blocks since the previous exit, and exit head ``c_i``) is trained on its own,
then frozen; its outputs ``h_i`` over the training set are computed **once** and become the
inputs of stage ``i + 1``. The frozen prefix is never run again during training, so each stage
costs only its own blocks. Where the cached ``h_i`` live is chosen by ``cache``:

- ``"auto"`` (default): in RAM when they fit ``memory_budget_mb``, else spilled to a
  memory-mapped file (a warning says so, with the size and the budget);
- ``"memory"`` / ``"disk"``: always RAM / always a file in ``cache_dir`` (default a temporary
  directory, deleted at the end);
- ``"recompute"``: no cache; the frozen prefix is run (without gradients) on every batch —
  for when neither RAM nor disk can hold the features.

The per-stage loss is the exit's cross-entropy (``local_loss="ce"``) or the HSIC
information-bottleneck loss of eq. 15 (``local_loss="ib"``, see :mod:`offramp.training.ib`),
which trains the body while the head learns from the detached features.

Each stage runs :func:`~offramp.training.loop.fit` with its own checkpoint
(``<checkpoint>.stage<i>.pt``), so an interrupted run resumes at the stage and epoch it reached.
Under DDP each rank builds the same cache and trains on its share of every batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from offramp.errors import ConfigError
from offramp.network import MultiExitNetwork
from offramp.training.cache import CACHE_MODES, FeatureStore, cache_outputs
from offramp.training.distributed import world_info
from offramp.training.ib import IBLocalLoss
from offramp.training.joint import JointTraining
from offramp.training.loop import (
    EpochLog,
    FitConfig,
    fit,
    refuse_epochs_change,
    tagged_checkpoint,
)

__all__ = ["fit_layerwise", "freeze", "widen_log"]

log = logging.getLogger("offramp.training")


def freeze(*modules: nn.Module) -> None:
    """``requires_grad = False`` on every parameter, and eval mode (fixed BatchNorm statistics)."""
    for m in modules:
        m.requires_grad_(False)
        m.eval()


class _Frozen(nn.Module):
    """A frozen prefix that stays in eval mode and runs without gradients."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> _Frozen:
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.module(x)


def widen_log(entry: EpochLog, index: int, num_exits: int, phase: int) -> EpochLog:
    """A one-exit log of a partial fit, placed at exit ``index`` of ``num_exits`` (NaN
    elsewhere), with ``extra["phase"] = phase``."""

    def wide(values: Sequence[float] | None) -> list[float] | None:
        if values is None:
            return None
        out = [math.nan] * num_exits
        out[index] = float(values[-1])
        return out

    return EpochLog(
        epoch=entry.epoch,
        loss=entry.loss,
        exit_losses=wide(entry.exit_losses) or [],
        exit_accuracy=wide(entry.exit_accuracy) or [],
        val_exit_accuracy=wide(entry.val_exit_accuracy),
        seconds=entry.seconds,
        extra={**entry.extra, "phase": float(phase)},
    )


def fit_layerwise(
    net: MultiExitNetwork,
    data: tuple[Tensor, Tensor],
    config: FitConfig | None = None,
    *,
    local_loss: str = "ce",
    val: tuple[Tensor, Tensor] | None = None,
    callbacks: Sequence[Callable[[EpochLog], None]] = (),
    cache: str = "auto",
    cache_dir: str | None = None,
    memory_budget_mb: float = 1024.0,
    epochs_per_stage: int | None = None,
    beta: float = 5.0,
    sigma: float | None = None,
) -> list[EpochLog]:
    """Train ``net`` stage by stage, freezing each stage and caching its outputs.

    Args:
        net: the network; trained in place, every parameter frozen at the end.
        data: training ``(X, y)``.
        config: loop settings for every stage (``epochs`` per stage unless
            ``epochs_per_stage``); ``checkpoint`` gets a ``.stage<i>`` tag per stage.
        local_loss: ``"ce"`` (the exit's cross-entropy) or ``"ib"`` (eq. 15, HSIC).
        val: optional ``(X, y)``; each stage reports its exit's validation accuracy.
        callbacks: called with every epoch's log (widened to all exits, NaN elsewhere).
        cache: ``"auto"``, ``"memory"``, ``"disk"`` or ``"recompute"`` (module docstring).
        cache_dir: where spilled features go (default: a temporary directory).
        memory_budget_mb: RAM allowed for one stage's cached features in ``"auto"`` mode.
        epochs_per_stage: epochs of each stage (default ``config.epochs``).
        beta: ``β`` of the IB loss.
        sigma: kernel width of the IB loss (``None``: median heuristic).

    Returns:
        Every stage's epoch logs, widened to all exits, ``extra["phase"]`` = stage index.

    Example:
        >>> import torch
        >>> from offramp.models import mlp
        >>> net = mlp(4, 3, hidden=(8, 8))
        >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> hist = fit_layerwise(net, data, FitConfig(epochs=2, show_progress=False))
        >>> [int(h.extra["phase"]) for h in hist]
        [0, 0, 1, 1]
    """
    cfg = config or FitConfig()
    if local_loss not in ("ce", "ib"):
        raise ConfigError(f"unknown local_loss {local_loss!r}; choose 'ce' or 'ib'")
    if cache not in CACHE_MODES:
        raise ConfigError(f"unknown cache mode {cache!r}; choose one of {CACHE_MODES}")
    if local_loss == "ib" and world_info()[1] > 1:
        raise ConfigError("layer-wise training with the IB loss runs in one process (no DDP)")
    x, y = data[0], data[1]
    stages = net.stages()
    e = len(stages)
    num_classes = net.num_classes or int(y.max()) + 1
    store = FeatureStore()
    rank = world_info()[0]
    h_train, h_val = x, (val[0] if val is not None else None)
    history: list[EpochLog] = []
    for st in stages:
        refuse_epochs_change(
            tagged_checkpoint(cfg.checkpoint, f"stage{st.index}"),
            epochs_per_stage or cfg.epochs,
            cfg.resume,
            "layer-wise training trains every stage on the frozen outputs of the ones before",
        )
    try:
        for st in stages:
            i = st.index
            if cache == "recompute" and i > 0:
                prefix = _Frozen(nn.Sequential(*[s.body for s in stages[:i]]))
                sub = MultiExitNetwork([prefix, st.body], {1: st.head}, num_classes=num_classes)
            else:
                sub = MultiExitNetwork([st.body], {0: st.head}, num_classes=num_classes)
            strategy = (
                JointTraining() if local_loss == "ce" else IBLocalLoss(num_classes, beta, sigma)
            )
            train_t = (h_train, y) if local_loss == "ce" else (h_train, y, x)
            tag = f"stage{i}"
            stage_cfg = replace(
                cfg,
                epochs=epochs_per_stage or cfg.epochs,
                checkpoint=tagged_checkpoint(cfg.checkpoint, tag),
            )
            cbs = [lambda ent, i=i, cb=cb: cb(widen_log(ent, i, e, i)) for cb in callbacks]
            logs = fit(
                sub,
                train_t,
                stage_cfg,
                strategy=strategy,  # type: ignore[arg-type]
                val=(h_val, val[1]) if val is not None and h_val is not None else None,
                callbacks=cbs,
            )
            history += [widen_log(ent, i, e, i) for ent in logs]
            freeze(st.body, st.head)
            if i < e - 1 and cache != "recompute":
                previous = list(store.files)
                kw = {
                    "store": store,
                    "batch_size": max(512, cfg.batch_size),
                    "mode": cache,
                    "memory_budget_mb": memory_budget_mb,
                    "cache_dir": cache_dir,
                }
                (h_train,) = cache_outputs(
                    lambda b, body=st.body: (body(b),),
                    h_train,
                    tag=f"h{i}-train-rank{rank}",
                    show_progress=cfg.show_progress and rank == 0,
                    **kw,  # type: ignore[arg-type]
                )
                if h_val is not None:
                    (h_val,) = cache_outputs(
                        lambda b, body=st.body: (body(b),), h_val, tag=f"h{i}-val-rank{rank}", **kw
                    )
                store.remove(previous)  # the previous stage's spilled inputs are done with
    finally:
        store.close()
    net.eval()
    return history
