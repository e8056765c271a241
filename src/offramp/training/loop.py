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

import gc
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from offramp._progress import progress
from offramp.batches import check_batch_size, iterate_batches
from offramp.errors import CheckpointError, ConfigError, DataError
from offramp.evaluation import ExitRecord
from offramp.files import read_torch, save_torch
from offramp.network import MultiExitNetwork
from offramp.training.distributed import (
    all_reduce_sum,
    average_gradients,
    barrier,
    ddp_wrap,
    world_info,
)
from offramp.training.joint import JointTraining

__all__ = [
    "CHECKPOINT_KEYS",
    "EpochLog",
    "FitConfig",
    "Strategy",
    "check_fit",
    "epochs_change_problem",
    "fit",
    "load_checkpoint",
    "load_fit_checkpoint",
    "make_optimizer",
    "refuse_epochs_change",
    "save_checkpoint",
    "tagged_checkpoint",
    "total_epochs_use",
]

log = logging.getLogger("offramp.training")


class Strategy(Protocol):
    """A training strategy: ``step(net, batch) -> {"loss", "exit_losses", "correct", …}``.

    Optional hooks, looked up by name (no base class to inherit):

    - ``on_epoch_start(net, epoch, num_epochs)`` — per-epoch settings (λ schedules);
    - ``on_batch_start(net, optimizer, iteration, total_iterations)`` — per-step settings
      (freezeout's per-block learning rates); set ``manages_lr = True`` to keep the loop from
      overwriting the learning rates it sets;
    - ``configure_optimizer(net, config) -> Optimizer`` — own parameter groups;
    - ``total_epochs_use() -> str | None`` — what in the strategy depends on the total number
      of epochs (``None``: nothing), so whether a finished run may be continued to more epochs
      (:func:`total_epochs_use`). A strategy with ``on_epoch_start`` or ``on_batch_start`` but
      without this hook is taken to depend on the total.

    Attributes read if present: ``used_exits`` (exit indices the loss uses; under DDP the
    others are treated as unused) and ``ddp_compatible = False`` (refuse to run under DDP).

    A strategy that is itself an ``nn.Module`` (gates, mixing weights) has its parameters
    trained with the network's and its state saved in the checkpoint. Any further 0-d tensors
    in the returned dict are averaged over the epoch into :attr:`EpochLog.extra`.
    """

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
        """The fields a resumed run must share with the run that wrote the checkpoint
        (``epochs`` may differ as far as :func:`epochs_change_problem` allows)."""
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
    """Write ``state`` atomically (:func:`offramp.files.save_torch`): on any failure the
    previous checkpoint is intact and no temporary file is left.

    Raises:
        WriteError: the checkpoint could not be written (disk full, read-only directory).
    """
    save_torch(path, state)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True``: a
    checkpoint holds tensors, numbers, strings, lists and dicts only, so a crafted file cannot
    run code when a run resumes from it."""
    try:
        return read_torch(path)
    except DataError as exc:
        raise CheckpointError(f"checkpoint {exc}; delete it to start over") from exc


#: What a checkpoint written by :func:`fit` holds.
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "rng", "history", "config")


def load_fit_checkpoint(path: str | Path) -> dict[str, Any]:
    """:func:`load_checkpoint` for a checkpoint :func:`fit` wrote: ``CheckpointError`` naming
    the keys of :data:`CHECKPOINT_KEYS` it lacks (another program's file, or damaged)."""
    state = load_checkpoint(path)
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {missing}: it was not written by offramp's fit loop (or "
            "by another version); delete it to start over, or do not resume from it "
            "(resume: false in a config, resume=False in FitConfig)"
        )
    return state


def _trainable(net: nn.Module, strategy: object) -> list[nn.Parameter]:
    params = [p for p in net.parameters() if p.requires_grad]
    if isinstance(strategy, nn.Module):
        params += [p for p in strategy.parameters() if p.requires_grad]
    return params


def make_optimizer(
    params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], cfg: FitConfig
) -> torch.optim.Optimizer:
    """The optimiser ``cfg`` names, over ``params`` (tensors or parameter-group dicts)."""
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
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / cfg.epochs))
    raise ConfigError(f"unknown lr_schedule {cfg.lr_schedule!r}; choose 'constant' or 'cosine'")


def tagged_checkpoint(checkpoint: str | Path | None, tag: str) -> str | None:
    """``checkpoint`` with ``.tag`` before its suffix: one file per fit of a multi-fit run.

    Example:
        >>> tagged_checkpoint("runs/ckpt.pt", "stage1")
        'runs/ckpt.stage1.pt'
    """
    if checkpoint is None:
        return None
    p = Path(checkpoint)
    return str(p.with_name(f"{p.stem}.{tag}{p.suffix or '.pt'}"))


def _hook(strategy: object, name: str) -> Callable[..., Any] | None:
    return getattr(strategy, name, None)


def total_epochs_use(cfg: FitConfig, strategy: object) -> str | None:
    """What in this training depends on the total number of epochs, ``None`` when nothing does.

    A run whose training does not depend on the total may be continued to more epochs: the
    extended run equals one started with the larger number (same shuffles, optimiser and RNG
    state). One that does — ``lr_schedule="cosine"`` anneals over the total, a strategy's
    ``total_epochs_use()`` names its own (freezeout's freezing points, the ``sdn`` λ schedule)
    — would change the epochs already trained, so :func:`fit` refuses to change its total.

    Example:
        >>> total_epochs_use(FitConfig(lr_schedule="cosine"), JointTraining())
        'lr_schedule cosine anneals the learning rate over the total epochs'
        >>> total_epochs_use(FitConfig(), JointTraining()) is None
        True
    """
    hook = getattr(strategy, "total_epochs_use", None)
    if callable(hook):
        use = hook()
        if use is not None:
            return str(use)
    else:
        hooks = [h for h in ("on_epoch_start", "on_batch_start") if _hook(strategy, h)]
        if hooks:  # they receive the total and may depend on it
            return (
                f"{type(strategy).__name__}'s {' and '.join(hooks)} receive the total number of "
                "epochs (if they do not depend on it, give the strategy a total_epochs_use() "
                "that returns None)"
            )
    if cfg.lr_schedule == "cosine" and not getattr(strategy, "manages_lr", False):
        return "lr_schedule cosine anneals the learning rate over the total epochs"
    return None


def epochs_change_problem(
    trained: int, old_epochs: int | None, cfg: FitConfig, strategy: object
) -> str | None:
    """Why a checkpoint holding ``trained`` epochs of a run of ``old_epochs`` cannot continue
    with ``cfg.epochs``, or ``None`` when it can: fewer epochs than trained, or a total that
    the training depends on (:func:`total_epochs_use`). The reason is a predicate (``"holds 3
    epochs trained, …"``) for the caller to give a subject and a fix."""
    if cfg.epochs < trained:
        return (
            f"holds {_epochs(trained)} trained, more than the {cfg.epochs} asked for: give "
            f"epochs ≥ {trained} to continue it"
        )
    if old_epochs is None or cfg.epochs == old_epochs:
        return None
    use = total_epochs_use(cfg, strategy)
    if use is None:
        return None
    return (
        f"was started for {_epochs(old_epochs)} and this run asks for {cfg.epochs}, but {use}: "
        "changing the total would change the epochs already trained"
    )


def _epochs(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def refuse_epochs_change(
    checkpoint: str | Path | None, epochs: int, resume: bool, why: str
) -> None:
    """For a fit whose total cannot change (``why``: one of several fits that build on each
    other): ``CheckpointError`` when ``checkpoint`` would be resumed and was written for
    another number of epochs."""
    if checkpoint is None or not resume or not Path(checkpoint).exists():
        return
    config = load_fit_checkpoint(checkpoint)["config"]
    old = config.get("epochs") if isinstance(config, dict) else None
    if old is not None and old != epochs:
        raise CheckpointError(
            f"checkpoint {checkpoint} was written for {old} epochs and this run asks for "
            f"{epochs}, but {why}: changing the total would change what was trained on top of "
            f"it; keep epochs={old}, use another checkpoint path, or resume=False"
        )


def check_fit(cfg: FitConfig, strategy: object, world: int = 1) -> None:
    """``ConfigError`` for settings :func:`fit` cannot train with on ``world`` ranks, before
    any training (``offramp train`` calls it before it writes anything)."""
    check_batch_size(cfg.batch_size)
    if cfg.epochs < 1:
        raise ConfigError(f"epochs must be ≥ 1, got {cfg.epochs}")
    if world > 1 and cfg.batch_size % world:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is split over {world} ranks and must be a multiple of "
            f"{world}; use e.g. {cfg.batch_size - cfg.batch_size % world or world}"
        )
    if world > 1 and getattr(strategy, "ddp_compatible", True) is False:
        raise ConfigError(
            f"{type(strategy).__name__} cannot run under DDP (it changes which parameters "
            "train while training); run it in one process (--nproc 1)"
        )


def fit(
    net: MultiExitNetwork,
    train: tuple[Tensor, ...] | Iterable[tuple[Tensor, ...]],
    config: FitConfig | None = None,
    *,
    strategy: Strategy | None = None,
    val: tuple[Tensor, Tensor] | None = None,
    callbacks: Sequence[Callable[[EpochLog], None]] = (),
) -> list[EpochLog]:
    """Train ``net`` with ``strategy`` (default: joint training with λ = 1).

    Under ``torch.distributed`` (initialised, world size > 1) the network is wrapped in
    ``DistributedDataParallel`` and every rank trains on its share of each global batch of
    ``config.batch_size`` samples, so a run on N ranks follows the single-process run.

    Args:
        net: the network; trained in place.
        train: ``(X, y)`` tensors (shuffled by the loop; more aligned tensors may follow ``y``)
            or a re-iterable of batches.
        config: loop settings (:class:`FitConfig`).
        strategy: object with ``step(net, batch) -> {"loss", "exit_losses", "correct"}`` and
            optional hooks (see :class:`Strategy`).
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
    strategy = strategy or JointTraining()
    rank, world = world_info()
    check_fit(cfg, strategy, world)
    torch.manual_seed(cfg.seed)
    configure = _hook(strategy, "configure_optimizer")
    opt = (
        configure(net, cfg)
        if configure is not None
        else make_optimizer(_trainable(net, strategy), cfg)
    )
    history: list[EpochLog] = []
    start = 0
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else None
    if ckpt is not None and cfg.resume and ckpt.exists():
        state = load_fit_checkpoint(ckpt)
        old = dict(state["config"]) if isinstance(state["config"], dict) else {}
        if {**old, "epochs": cfg.epochs} != cfg.fingerprint():
            raise CheckpointError(
                f"checkpoint {ckpt} was written with settings {state.get('config')}, but this "
                f"run uses {cfg.fingerprint()}; use the same settings, another checkpoint path, "
                "or resume=False"
            )
        problem = epochs_change_problem(int(state["epoch"]), old.get("epochs"), cfg, strategy)
        if problem is not None:
            raise CheckpointError(
                f"checkpoint {ckpt} {problem}; use another checkpoint path, or resume=False to "
                "start over"
            )
        name = type(strategy).__name__
        if state.get("strategy_name", name) != name:
            raise CheckpointError(
                f"checkpoint {ckpt} was written by strategy {state['strategy_name']}, not "
                f"{name}; use another checkpoint path, or resume=False"
            )
        try:
            net.load_state_dict(state["model"])
            if isinstance(strategy, nn.Module) and "strategy" in state:
                strategy.load_state_dict(state["strategy"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"checkpoint {ckpt} does not fit this network or optimiser ({exc}); it was "
                "written for another model: use another checkpoint path, or resume=False"
            ) from exc
        try:
            torch.set_rng_state(state["rng"])
            history = [EpochLog(**h) for h in state["history"]]
            start = int(state["epoch"])
        except (RuntimeError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint {ckpt} holds an unusable rng, history or epoch ({exc}); delete it "
                "to start over, or resume=False"
            ) from exc
        log.info("resumed from %s after epoch %d", ckpt, start)

    model: Any = ddp_wrap(net, strategy) if world > 1 else net
    on_batch = _hook(strategy, "on_batch_start")
    iteration: int | None = None
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        net.train()
        if isinstance(strategy, nn.Module):
            strategy.train()
        if not getattr(strategy, "manages_lr", False):
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, epoch)
        hook = _hook(strategy, "on_epoch_start")
        if hook is not None:
            hook(net, epoch, cfg.epochs)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        batches, per_epoch = iterate_batches(
            train, cfg.batch_size, generator=gen, rank=rank, world=world
        )
        if on_batch is not None and per_epoch is None:
            raise ConfigError(
                f"{type(strategy).__name__} schedules every step and needs the number of "
                "batches per epoch: pass (X, y) tensors or a sized iterable of batches"
            )
        iteration = epoch * per_epoch if per_epoch is not None else None
        sums = _EpochSums()
        bar = progress(
            batches,
            total=per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="batches",
            enabled=cfg.show_progress and rank == 0,
        )
        for batch in bar:
            if on_batch is not None:
                assert iteration is not None and per_epoch is not None
                on_batch(net, opt, iteration, cfg.epochs * per_epoch)
            out = _step(strategy, model, batch, world)
            loss = out["loss"]
            if not _all_finite(loss, world):
                raise ConfigError(
                    f"training diverged at epoch {epoch}: loss is {float(loss.detach())}; "
                    f"lower the learning rate (now {cfg.lr})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1 and isinstance(strategy, nn.Module):
                average_gradients(strategy.parameters())
            opt.step()
            sums.add(out, batch[1].shape[0])
            if iteration is not None:
                iteration += 1
        entry = sums.epoch_log(epoch, world)
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
        if ckpt is not None and rank == 0:
            state = {
                "format": 1,
                "epoch": epoch + 1,
                "model": net.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state(),
                "history": [asdict(h) for h in history],
                "config": cfg.fingerprint(),
                "strategy_name": type(strategy).__name__,
            }
            if isinstance(strategy, nn.Module):
                state["strategy"] = strategy.state_dict()
            save_checkpoint(ckpt, state)
        barrier()
        for cb in callbacks:
            cb(entry)
    if world > 1:  # release DDP's reducer now, while the process group is certainly alive
        del model
        gc.collect()
        barrier()
    net.eval()
    if isinstance(strategy, nn.Module):
        strategy.eval()
    return history


def _all_finite(loss: Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank (one tiny all-reduce under DDP, so that all
    ranks stop together instead of some waiting forever in the next collective)."""
    finite = bool(torch.isfinite(loss.detach()))
    if world == 1:
        return finite
    return float(all_reduce_sum(torch.tensor([0.0 if finite else 1.0]))) == 0.0


def _step(strategy: Strategy, model: Any, batch: tuple[Tensor, ...], world: int) -> Any:
    if world == 1:
        return strategy.step(model, batch)
    try:
        return strategy.step(model, batch)
    except RuntimeError as exc:
        if "finished reduction in the prior iteration" not in str(exc):
            raise
        raise ConfigError(
            f"DDP waited for gradients that never came: {type(strategy).__name__} leaves some "
            "exits out of its loss. Declare the exits it uses, e.g. used_exits = (-1,) on the "
            "strategy, so their heads are treated as unused"
        ) from exc


class _EpochSums:
    """Sample-weighted sums of a strategy's outputs over one epoch."""

    def __init__(self) -> None:
        self.n = 0
        self.loss = 0.0
        self.exit_losses: Tensor | None = None
        self.correct: Tensor | None = None
        self.extra: dict[str, float] = {}

    def add(self, out: dict[str, Tensor], b: int) -> None:
        self.n += b
        self.loss += float(out["loss"].detach()) * b
        el = out["exit_losses"].detach().double() * b
        self.exit_losses = el if self.exit_losses is None else self.exit_losses + el
        c = out["correct"].detach().double()
        self.correct = c if self.correct is None else self.correct + c
        for k, v in out.items():
            if k not in ("loss", "exit_losses", "correct") and v.dim() == 0:
                self.extra[k] = self.extra.get(k, 0.0) + float(v.detach()) * b

    def epoch_log(self, epoch: int, world: int) -> EpochLog:
        if self.exit_losses is None or self.correct is None:
            raise ConfigError(f"epoch {epoch} saw no training batch: the training data is empty")
        keys = sorted(self.extra)
        flat = torch.cat(
            [
                torch.tensor([float(self.n), self.loss], dtype=torch.float64),
                self.exit_losses,
                self.correct,
                torch.tensor([self.extra[k] for k in keys], dtype=torch.float64),
            ]
        )
        if world > 1:
            flat = all_reduce_sum(flat)
        e = self.exit_losses.numel()
        n = float(flat[0])
        return EpochLog(
            epoch=epoch,
            loss=float(flat[1]) / n,
            exit_losses=(flat[2 : 2 + e] / n).tolist(),
            exit_accuracy=(flat[2 + e : 2 + 2 * e] / n).tolist(),
            extra={k: float(v) / n for k, v in zip(keys, flat[2 + 2 * e :], strict=True)},
        )
