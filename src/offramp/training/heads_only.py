"""Backbone first, then heads (classifier-wise training; survey §5.4).

Phase 0 trains the plain backbone (its final exit only) — or skips that when the backbone is
already trained (``train_backbone=False``). Phase 1 freezes the backbone, runs it **once** over
the training (and validation) data to cache ``h_i`` at every early exit (in RAM or spilled to
disk, see :mod:`offramp.training.cache`), and trains each early head on its cached features:

- neural heads (whatever the network carries) with the fit loop, ``head_epochs`` epochs each;
- or, with ``sklearn="logistic" | "tree" | "svm" | "forest"`` (or a scikit-learn estimator),
  **non-neural heads**: each early head is replaced by a :class:`~offramp.heads.SklearnHead`
  fitted on pooled features. They output log-probabilities, so every policy, the calibration
  and the eager runtime use them like neural heads.

The backbone's accuracy is untouched by construction: the exits cannot hurt the final exit.
Use it when you start from a trained model (the usual case in practice), or when exits are
added to a model you cannot retrain.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from offramp.activations import Activation, features
from offramp.errors import ConfigError
from offramp.heads import SklearnHead
from offramp.network import MultiExitNetwork, block_outputs
from offramp.training.cache import FeatureStore, cache_outputs
from offramp.training.distributed import world_info
from offramp.training.joint import JointTraining
from offramp.training.layerwise import freeze, widen_log
from offramp.training.loop import (
    EpochLog,
    FitConfig,
    fit,
    refuse_epochs_change,
    tagged_checkpoint,
)

__all__ = ["fit_backbone_then_heads", "fit_sklearn_heads"]


def _features(net: MultiExitNetwork) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """``h`` at every early exit: the blocks up to the last early exit, no heads; an
    activation with side inputs (token features and their padding mask) packed into one
    tensor (:func:`_pack`)."""
    early = net.exit_blocks[:-1]

    def run(b: Tensor) -> tuple[Tensor, ...]:
        feats, h = [], b
        for block in net.blocks[: early[-1] + 1]:
            h = block(h)
            feats.append(h)
        return tuple(_pack(feats[k]) for k in early)

    return run


def _pack(h: Activation) -> Tensor:
    """``h``, or every tensor of ``(h, *side)`` flattened per sample, cast to one float dtype
    and put side by side: ``(B, Σ size)``, so the fit loop can batch it like features. The
    dtype is ``h``'s, or float32 when ``h`` is narrower and a side input holds integers (which
    float16 holds exactly only up to 2,048 and bfloat16 up to 256; masks are exact in any)."""
    if not isinstance(h, tuple):
        return h
    dtype = features(h).dtype
    counts = any(not (t.dtype.is_floating_point or t.dtype == torch.bool) for t in h[1:])
    if counts and torch.finfo(dtype).bits < 32:
        dtype = torch.float32
    return torch.cat([t.reshape(t.shape[0], -1).to(dtype) for t in h], dim=1)


class _Unpack(nn.Module):
    """The inverse of :func:`_pack` for one activation's ``layout`` (per-sample shape and
    dtype of every tensor): the block in front of a head trained on packed features."""

    def __init__(self, layout: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> None:
        super().__init__()
        self.layout = list(layout)

    def forward(self, packed: Tensor) -> tuple[Tensor, ...]:
        out, start = [], 0
        for shape, dtype in self.layout:
            size = math.prod(shape)
            t = packed[:, start : start + size].reshape(-1, *shape)  # (B, *shape)
            out.append(t.to(dtype) if dtype.is_floating_point else t.round().to(dtype))
            start += size
        return tuple(out)


def _layouts(
    net: MultiExitNetwork, x: Tensor
) -> list[list[tuple[tuple[int, ...], torch.dtype]] | None]:
    """Per early exit: the layout of its activation when it carries side inputs, else None."""
    outs = block_outputs(list(net.blocks[: net.exit_blocks[-2] + 1]), x[:2])
    return [
        [(tuple(t.shape[1:]), t.dtype) for t in outs[k]] if isinstance(outs[k], tuple) else None
        for k in net.exit_blocks[:-1]
    ]


def fit_sklearn_heads(
    net: MultiExitNetwork,
    features: Sequence[Tensor],
    y: Tensor,
    estimator: object | str,
    *,
    pool_size: int = 2,
) -> list[float]:
    """Replace every early head of ``net`` by a :class:`~offramp.heads.SklearnHead` fitted on
    the cached ``features`` (one ``(N, ...)`` tensor per early exit).

    Returns:
        The training accuracy of each new head.
    """
    num_classes = net.num_classes or int(y.max()) + 1
    accs = []
    for i, h in enumerate(features):
        est = copy.deepcopy(estimator) if not isinstance(estimator, str) else estimator
        head = SklearnHead(est, num_classes, pool_size).fit(h, y)
        net.heads[i] = head
        pred = torch.cat([head(h[s : s + 4096]).argmax(1) for s in range(0, h.shape[0], 4096)])
        accs.append(float((pred == y).double().mean()))
    return accs


def fit_backbone_then_heads(
    net: MultiExitNetwork,
    data: tuple[Tensor, Tensor],
    config: FitConfig | None = None,
    *,
    val: tuple[Tensor, Tensor] | None = None,
    callbacks: Sequence[Callable[[EpochLog], None]] = (),
    train_backbone: bool = True,
    head_epochs: int | None = None,
    sklearn: object | str | None = None,
    cache: str = "auto",
    cache_dir: str | None = None,
    memory_budget_mb: float = 1024.0,
) -> list[EpochLog]:
    """Train the backbone (phase 0), then the early heads on its frozen, cached features.

    Args:
        net: the network; trained in place.
        data: training ``(X, y)``.
        config: loop settings (the backbone's ``epochs``; ``checkpoint`` gets a tag per fit).
        val: optional ``(X, y)`` for per-epoch validation accuracy.
        callbacks: called with every epoch's log (widened to all exits).
        train_backbone: train the backbone first; ``False`` when it is already trained.
        head_epochs: epochs of each neural head (default ``config.epochs``).
        sklearn: fit scikit-learn heads instead (a name or an unfitted estimator).
        cache: ``"auto"``, ``"memory"`` or ``"disk"`` for the cached features.
        cache_dir: where spilled features go.
        memory_budget_mb: RAM allowed for the cached features in ``"auto"`` mode.

    Returns:
        Epoch logs: ``extra["phase"]`` 0 for the backbone, ``i + 1`` for early head ``i``.

    Example:
        >>> import torch
        >>> from offramp.models import mlp
        >>> net = mlp(4, 3, hidden=(8, 8))
        >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> hist = fit_backbone_then_heads(net, data, FitConfig(epochs=1, show_progress=False))
        >>> [int(h.extra["phase"]) for h in hist]
        [0, 1]
    """
    cfg = config or FitConfig()
    if cache not in ("auto", "memory", "disk"):
        raise ConfigError(
            f"unknown cache mode {cache!r} for heads-only training; choose 'auto', 'memory' or "
            "'disk' (the backbone runs once either way, so there is nothing to recompute)"
        )
    if sklearn is not None and world_info()[1] > 1:
        raise ConfigError("scikit-learn heads are fitted in one process; run without DDP")
    e = net.num_exits
    history: list[EpochLog] = []
    last = net.exit_blocks[-1]
    if train_backbone:
        backbone = MultiExitNetwork(
            list(net.blocks), {last: net.heads[-1]}, input_shape=net.input_shape
        )
        bb_cfg = replace(cfg, checkpoint=tagged_checkpoint(cfg.checkpoint, "backbone"))
        refuse_epochs_change(
            bb_cfg.checkpoint,
            bb_cfg.epochs,
            cfg.resume,
            "the early heads are trained on the backbone's frozen features",
        )
        cbs = [lambda ent, cb=cb: cb(widen_log(ent, e - 1, e, 0)) for cb in callbacks]
        logs = fit(backbone, data, bb_cfg, strategy=JointTraining(), val=val, callbacks=cbs)
        history += [widen_log(ent, e - 1, e, 0) for ent in logs]
    freeze(*net.blocks, net.heads[-1])
    if e == 1:
        return history
    x, y = data
    rank = world_info()[0]
    if x.shape[0] == 0:
        raise ConfigError("nothing to train the heads on: the training data is empty")
    layouts = _layouts(net, x)
    if any(lay is not None for lay in layouts):
        if sklearn is not None:
            raise ConfigError(
                "scikit-learn heads read fixed-size features, but this network's exits "
                "see token features with a padding mask: train neural token heads "
                "(sklearn=None)"
            )
        if val is not None and _layouts(net, val[0]) != layouts:
            raise ConfigError(
                "heads-only training caches token features and their padding mask at one "
                f"length: the training inputs are {tuple(x.shape[1:])} per sample, the "
                f"validation inputs {tuple(val[0].shape[1:])}; pad both to the same length"
            )
    store = FeatureStore()
    try:
        kw = {
            "store": store,
            "batch_size": max(512, cfg.batch_size),
            "mode": cache,
            "memory_budget_mb": memory_budget_mb,
            "cache_dir": cache_dir,
        }
        feats = cache_outputs(
            _features(net),
            x,
            tag=f"exits-train-rank{rank}",
            show_progress=cfg.show_progress and rank == 0,
            **kw,  # type: ignore[arg-type]
        )
        val_feats = (
            cache_outputs(_features(net), val[0], tag=f"exits-val-rank{rank}", **kw)  # type: ignore[arg-type]
            if val is not None
            else None
        )
        if sklearn is not None:
            t0 = time.perf_counter()
            accs = fit_sklearn_heads(net, feats, y, sklearn)
            for i, acc in enumerate(accs):
                val_acc = None
                if val_feats is not None:
                    pred = net.heads[i](val_feats[i]).argmax(1)
                    val_acc = [float((pred == val[1]).double().mean())]  # type: ignore[index]
                ent = EpochLog(0, float("nan"), [float("nan")], [acc], val_acc)
                ent.seconds = (time.perf_counter() - t0) / len(accs)
                wide = widen_log(ent, i, e, i + 1)
                history.append(wide)
                for cb in callbacks:
                    cb(wide)
            net.eval()
            return history
        for i in range(e - 1):
            front = nn.Identity() if layouts[i] is None else _Unpack(layouts[i])
            head_net = MultiExitNetwork([front], {0: net.heads[i]})
            head_cfg = replace(
                cfg,
                epochs=head_epochs or cfg.epochs,
                checkpoint=tagged_checkpoint(cfg.checkpoint, f"head{i}"),
            )
            cbs = [lambda ent, i=i, cb=cb: cb(widen_log(ent, i, e, i + 1)) for cb in callbacks]
            logs = fit(
                head_net,
                (feats[i], y),
                head_cfg,
                strategy=JointTraining(),
                val=(val_feats[i], val[1]) if val_feats is not None and val is not None else None,
                callbacks=cbs,
            )
            history += [widen_log(ent, i, e, i + 1) for ent in logs]
    finally:
        store.close()
    net.eval()
    return history
