"""Every training strategy by name, behind one call: :func:`train`.

====================  =========================================================  ==========
name                  what it trains                                             survey
====================  =========================================================  ==========
``joint``             all exits at once, ``J_L + Σ λ_i J_i``                     eq. 6–7
``combined``          a trainable mix of the exits' outputs (+ joint)            eq. 8
``gated``             recursive confidence gates (+ joint)                       eq. 9
``cost``              gates + ``β ·`` soft expected cost                         eq. 13–14
``layerwise``         block by block, frozen prefix cached                       §5.3
``heads``             backbone first, then heads on frozen features              §5.4
``freezeout``         per-block cosine lr reaching 0 at freezing points          eq. 10
``distill``           early exits distil the final exit                          (ZTW)
``local``             each block by its own fixed random classifier              §7.1
``ib``                layer-wise with an HSIC information-bottleneck loss        eq. 15
====================  =========================================================  ==========

``options`` holds the strategy's own settings (``beta``, ``mode``, ``temperature`` …); see
:data:`OPTIONS` for what each name accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from offramp._values import to_bool, to_float, to_int
from offramp.errors import ConfigError
from offramp.network import MultiExitNetwork, block_outputs
from offramp.training.joint import (
    JointTraining,
    Schedule,
    constant,
    inception,
    linear_in_depth,
    sdn_growing,
)
from offramp.training.loop import EpochLog, FitConfig, fit

__all__ = [
    "FIXED_FEATURE_STRATEGIES",
    "MULTI_FIT",
    "OPTIONS",
    "OPTION_TYPES",
    "SCHEDULES",
    "STRATEGIES",
    "check_applies",
    "check_fit_options",
    "coerce_options",
    "make_schedule",
    "make_strategy",
    "prepare_strategy",
    "train",
]

STRATEGIES = (
    "joint",
    "combined",
    "gated",
    "cost",
    "layerwise",
    "heads",
    "freezeout",
    "distill",
    "local",
    "ib",
)

#: Strategies that drive several fits (stage by stage, or backbone then heads) rather than
#: one step object; :func:`check_fit_options` checks their option values.
MULTI_FIT = ("layerwise", "heads", "ib")

#: The λ schedules of eq. 6–7 by name; each takes one optional number (``value`` / ``top``).
SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": constant,
    "inception": inception,
    "linear": linear_in_depth,
    "sdn": sdn_growing,
}

#: Options each strategy accepts (default value in parentheses in the docs of each class).
OPTIONS: dict[str, tuple[str, ...]] = {
    "joint": ("schedule", "schedule_value"),
    "combined": ("mode", "exit_weight", "schedule", "schedule_value"),
    "gated": ("exit_weight", "schedule", "schedule_value"),
    "cost": ("beta", "exit_weight", "schedule", "schedule_value"),
    "layerwise": ("cache", "cache_dir", "memory_budget_mb", "epochs_per_stage"),
    "heads": (
        "train_backbone",
        "head_epochs",
        "sklearn",
        "cache",
        "cache_dir",
        "memory_budget_mb",
    ),
    "freezeout": ("t0", "spacing", "scale_lr", "schedule", "schedule_value"),
    "distill": ("temperature", "alpha", "schedule", "schedule_value"),
    "local": ("feedback_alignment", "pool_size", "seed"),
    "ib": ("beta", "sigma", "cache", "cache_dir", "memory_budget_mb", "epochs_per_stage"),
}


#: The type of every option; values are converted (``"1e-3"`` from YAML becomes a float).
OPTION_TYPES: dict[str, type] = {
    "schedule": str,
    "schedule_value": float,
    "mode": str,
    "exit_weight": float,
    "beta": float,
    "cache": str,
    "cache_dir": str,
    "memory_budget_mb": float,
    "epochs_per_stage": int,
    "train_backbone": bool,
    "head_epochs": int,
    "sklearn": str,
    "t0": float,
    "spacing": str,
    "scale_lr": bool,
    "temperature": float,
    "alpha": float,
    "feedback_alignment": bool,
    "pool_size": int,
    "seed": int,
    "sigma": float,
}


def _coerce(key: str, value: Any, tp: type) -> Any:
    if value is None or (tp is str and key == "sklearn" and not isinstance(value, str)):
        return value  # None = default; sklearn may also be an estimator object
    try:
        if tp is bool:
            return to_bool(value)
        if tp is int:
            return to_int(value)
        if tp is float:
            return to_float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"option {key!r} must be {'true or false' if tp is bool else tp.__name__}, "
            f"got {value!r}"
        ) from None


def coerce_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against what strategy ``name`` takes, values converted to their types.

    Example:
        >>> coerce_options("ib", {"beta": "1e-2", "epochs_per_stage": "2"})
        {'beta': 0.01, 'epochs_per_stage': 2}
    """
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {list(STRATEGIES)}")
    _check_options(name, options)
    return {k: _coerce(k, v, OPTION_TYPES[k]) for k, v in options.items()}


def make_schedule(name: str = "constant", value: float | None = None) -> Schedule:
    """A λ schedule by name (:data:`SCHEDULES`), with its one optional number."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown λ schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name]() if value is None else SCHEDULES[name](value)


def _check_options(name: str, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(OPTIONS[name]))
    if unknown:
        raise ConfigError(
            f"strategy {name!r} does not take option(s) {unknown}; it takes {list(OPTIONS[name])}"
        )


def check_fit_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options of a strategy of :data:`MULTI_FIT`, coerced and their values checked
    before any training (a step strategy's are checked when :func:`make_strategy` builds it).

    Example:
        >>> check_fit_options("layerwise", {"cache": "fast"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        offramp.errors.ConfigError: unknown cache mode 'fast' for strategy 'layerwise'; ...
    """
    from offramp.heads import SKLEARN_ESTIMATORS
    from offramp.training.cache import CACHE_MODES

    opts = coerce_options(name, options)
    modes = ("auto", "memory", "disk") if name == "heads" else CACHE_MODES
    cache = opts.get("cache")
    if cache is not None and cache not in modes:
        why = (
            " (the backbone runs once either way: nothing to recompute)" if name == "heads" else ""
        )
        raise ConfigError(
            f"unknown cache mode {cache!r} for strategy {name!r}; choose one of {list(modes)}{why}"
        )
    sklearn = opts.get("sklearn")
    if isinstance(sklearn, str) and sklearn not in SKLEARN_ESTIMATORS:
        raise ConfigError(
            f"unknown scikit-learn head {sklearn!r}; choose one of {list(SKLEARN_ESTIMATORS)}"
        )
    for key, ok, want in (
        ("epochs_per_stage", lambda v: v >= 1, "≥ 1 (or unset: the run's epochs)"),
        ("head_epochs", lambda v: v >= 1, "≥ 1 (or unset: the run's epochs)"),
        ("memory_budget_mb", lambda v: v > 0, "> 0"),
        ("beta", lambda v: v >= 0, "≥ 0"),
        ("sigma", lambda v: v > 0, "> 0 (or unset: the median heuristic)"),
    ):
        value = opts.get(key)
        if value is not None and not ok(value):  # NaN fails every comparison too
            raise ConfigError(f"option {key!r} of strategy {name!r} must be {want}, got {value!r}")
    return opts


#: Strategies that read every ``h_i`` as one fixed-size tensor (gates, local classifiers,
#: stage-by-stage caches, the information-bottleneck kernel on the inputs).
FIXED_FEATURE_STRATEGIES = ("gated", "cost", "layerwise", "local", "ib")


def check_applies(name: str, net: MultiExitNetwork, example_input: Tensor) -> None:
    """Refuse strategy ``name`` on a network it cannot train, before any training: the
    strategies of :data:`FIXED_FEATURE_STRATEGIES` on networks whose blocks pass token
    features with a padding mask (text models), and ``ib`` on integer inputs (token ids).

    Example:
        >>> import torch
        >>> from offramp.models import rnn_classifier
        >>> net = rnn_classifier(20, 2, layers=2)
        >>> check_applies("local", net, torch.tensor([[3, 4, 0]]))
        Traceback (most recent call last):
        ...
        offramp.errors.ConfigError: strategy 'local' reads every h_i as one fixed-size tensor, ...
    """
    if name not in FIXED_FEATURE_STRATEGIES:
        return
    others = ", ".join(s for s in STRATEGIES if s not in FIXED_FEATURE_STRATEGIES)
    if name == "ib" and not example_input.is_floating_point():
        raise ConfigError(
            f"strategy 'ib' compares the inputs with each h_i through a Gaussian kernel; "
            f"{example_input.dtype} inputs (token ids) have no such distance: use one of "
            f"{others}"
        )
    outs = block_outputs(list(net.blocks[:-1]), example_input[:2])
    if any(isinstance(h, tuple) for h in outs):
        raise ConfigError(
            f"strategy {name!r} reads every h_i as one fixed-size tensor, but this network's "
            "blocks pass token features with a padding mask (h, mask) between them: train it "
            f"with one of {others}"
        )


def prepare_strategy(
    name: str, net: MultiExitNetwork, example_input: Tensor, options: dict[str, Any]
) -> object | None:
    """Check strategy ``name``'s options against ``net`` before any training: the step
    strategy built (:func:`make_strategy`, pass it to :func:`train` as ``strategy``), or
    ``None`` for a strategy of :data:`MULTI_FIT` once :func:`check_fit_options` passed."""
    if name in MULTI_FIT:
        check_applies(name, net, example_input)
        check_fit_options(name, options)
        return None
    return make_strategy(name, net, example_input, **options)


def make_strategy(
    name: str, net: MultiExitNetwork, example_input: Tensor, **options: Any
) -> object:
    """The strategy object for one of the step-based strategies, shaped for ``net``.

    ``layerwise``, ``heads`` and ``ib`` are not step objects (they drive several fits); use
    :func:`train` for them.

    Example:
        >>> import torch
        >>> from offramp.models import mlp
        >>> net = mlp(4, 3, hidden=(8, 8))
        >>> type(make_strategy("cost", net, torch.randn(2, 4), beta=0.1)).__name__
        'GatedTraining'
    """
    opts = coerce_options(name, options)
    check_applies(name, net, example_input)
    sched = make_schedule(opts.pop("schedule", "constant"), opts.pop("schedule_value", None))
    if name == "joint":
        return JointTraining(sched)
    if name == "combined":
        from offramp.training.combined import CombinedOutput

        return CombinedOutput(net.num_exits, schedule=sched, **opts)
    if name in ("gated", "cost"):
        from offramp.costs import profile
        from offramp.training.gated import GatedTraining

        cumulative = profile(net, example_input[:1]).cumulative.tolist()
        beta = float(opts.pop("beta", 0.5)) if name == "cost" else 0.0
        return GatedTraining.for_network(
            net, example_input, beta=beta, cumulative=cumulative, schedule=sched, **opts
        )
    if name == "distill":
        from offramp.training.distill import SelfDistillation

        return SelfDistillation(schedule=sched, **opts)
    if name == "freezeout":
        from offramp.training.freezeout import Freezeout

        return Freezeout(schedule=sched, **opts)
    if name == "local":
        from offramp.training.local import LocalErrorLearning

        return LocalErrorLearning.for_network(net, example_input, **opts)
    raise ConfigError(f"strategy {name!r} drives several fits; call offramp.training.train")


def train(
    net: MultiExitNetwork,
    data: tuple[Tensor, Tensor],
    config: FitConfig | None = None,
    strategy: str | object = "joint",
    *,
    val: tuple[Tensor, Tensor] | None = None,
    options: dict[str, Any] | None = None,
    callbacks: Sequence[Callable[[EpochLog], None]] = (),
) -> list[EpochLog]:
    """Train ``net`` in place with the strategy called ``strategy``.

    Args:
        net: the network.
        data: training ``(X, y)`` tensors.
        config: loop settings; ``config.checkpoint`` is the checkpoint file (strategies that
            run several fits derive one file per fit from it).
        strategy: one of :data:`STRATEGIES`, or a step strategy already built by
            :func:`make_strategy` (to keep it, e.g. the gates of ``gated``; ``options`` then
            belong to the build, not here).
        val: optional ``(X, y)`` evaluated on every exit after each epoch.
        options: the strategy's own settings (:data:`OPTIONS`).
        callbacks: called with every :class:`EpochLog`.

    Returns:
        The history: one :class:`EpochLog` per epoch (per stage and epoch for the strategies
        that train stage by stage; ``extra["phase"]`` then says which).

    Example:
        >>> import torch
        >>> from offramp.models import mlp
        >>> net = mlp(4, 3, hidden=(8, 8))
        >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> cfg = FitConfig(epochs=1, show_progress=False)
        >>> len(train(net, data, cfg, "distill", options={"temperature": 2.0}))
        1
    """
    cfg = config or FitConfig()
    if not isinstance(strategy, str):
        if options:
            raise ConfigError(
                f"options {sorted(options)} go to make_strategy when the strategy is built "
                "there; pass a strategy name to train to have train build it"
            )
        return fit(net, data, cfg, strategy=strategy, val=val, callbacks=callbacks)  # type: ignore[arg-type]
    opts = coerce_options(strategy, dict(options or {}))
    if strategy in MULTI_FIT:
        check_applies(strategy, net, data[0][:2])
        check_fit_options(strategy, opts)
    if strategy in ("layerwise", "ib"):
        from offramp.training.layerwise import fit_layerwise

        return fit_layerwise(
            net,
            data,
            cfg,
            local_loss="ib" if strategy == "ib" else "ce",
            val=val,
            callbacks=callbacks,
            **opts,
        )
    if strategy == "heads":
        from offramp.training.heads_only import fit_backbone_then_heads

        return fit_backbone_then_heads(net, data, cfg, val=val, callbacks=callbacks, **opts)
    obj = make_strategy(strategy, net, data[0][:2], **opts)
    return fit(net, data, cfg, strategy=obj, val=val, callbacks=callbacks)  # type: ignore[arg-type]
