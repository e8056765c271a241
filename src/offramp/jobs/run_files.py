"""The files of a training run's ``output_dir``, read and written in one place.

==================  ============================================================================
``config.yaml``     the resolved config (every default filled in); needs pyyaml
``config.json``     the same, always written
``checkpoint.pt``   the fit loop's checkpoint: re-running the same command resumes from it
``history.csv``     one row per epoch: epoch, phase, loss, seconds, per-exit loss / train / val
                    accuracy, then the strategy's extra statistics (empty cell = no value)
``history.json``    the same rows as a JSON list (``null`` = no value)
``model.pt``        the trained weights and the config that rebuilds the network
                    (:func:`load_model`); for strategies ``gated`` and ``cost`` also their
                    gates, a confidence policy of their own (:func:`load_gates`)
``metrics.json``    per-exit test accuracy, final accuracy, training time, number of exits
==================  ============================================================================

Every file is written atomically (:mod:`offramp.files`) and read without pickle.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from offramp.errors import CheckpointError, ConfigError, DataError
from offramp.files import read_json, read_torch, save_torch, write_csv, write_json, write_text
from offramp.heads import SklearnHead
from offramp.jobs.config import TrainConfig
from offramp.models import build_model
from offramp.network import MultiExitNetwork
from offramp.training.loop import EpochLog, epochs_change_problem, load_fit_checkpoint

__all__ = [
    "RESUME_FREE",
    "build_network",
    "check_resumable",
    "history_row",
    "load_gates",
    "load_model",
    "load_model_and_gates",
    "previous_rows",
    "save_model",
    "write_config",
    "write_history",
]

#: Config keys that may differ between a run and the run it resumes.
RESUME_FREE = ("output_dir", "resume", "show_progress", "data_dir")

# What model.pt must hold.
_MODEL_KEYS = ("config", "in_size", "num_classes", "state_dict")


def build_network(cfg: TrainConfig, in_size: int, num_classes: int) -> MultiExitNetwork:
    """The network ``cfg`` names, initialised from ``cfg.seed``
    (:func:`offramp.models.build_model`).

    Example:
        >>> build_network(TrainConfig(exits=[1]), 8, 10).exit_blocks
        (1, 3)
    """
    return build_model(
        cfg.backbone, in_size, num_classes, exits=cfg.exits, head=cfg.head, seed=cfg.seed
    )


# -------------------------------------------------------------------------------- model.pt


def save_model(
    out: Path,
    cfg: TrainConfig,
    net: MultiExitNetwork,
    in_size: int,
    num_classes: int,
    gates: dict[str, Any] | None = None,
) -> Path:
    """Write ``out/model.pt``: the weights, and what rebuilds the network around them."""
    model: dict[str, Any] = {
        "format": 1,
        "config": cfg.to_dict(),
        "in_size": in_size,
        "num_classes": num_classes,
        "state_dict": net.state_dict(),
        "sklearn_heads": [i for i, h in enumerate(net.heads) if isinstance(h, SklearnHead)],
    }
    if gates is not None:
        model["gates"] = gates
    return save_torch(out / "model.pt", model)


def _read_model(path: Path) -> dict[str, Any]:
    """``model.pt`` read with ``weights_only=True`` (no pickle: a crafted file runs no code)."""
    state = read_torch(path)
    missing = [k for k in _MODEL_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise DataError(
            f"{path} is not a model written by `offramp train`: it lacks {missing}; retrain "
            "the run or point at its model.pt"
        )
    state["path"] = str(path)
    return state


def load_gates(path: str | Path) -> tuple[Any, ...] | None:
    """The gates of recursive gating saved in ``model.pt`` by a run trained with strategy
    ``gated`` or ``cost``, as :class:`~offramp.policies.GateScorer` s for policies,
    calibration and the runtime (see :meth:`GatedTraining.gate_scorers`); ``None`` for other
    runs."""
    return _gates(_read_model(Path(path)))


def load_model(path: str | Path) -> MultiExitNetwork:
    """Rebuild the network saved as ``model.pt`` by ``offramp train`` (in eval mode).

    The file is read without pickle; scikit-learn heads are stored in the skops format and
    read back with :func:`offramp.heads.load_sklearn_estimator`.

    Raises:
        DataError: the file is not a model ``offramp train`` wrote, or its tensors do not fit
            the network its config describes.
    """
    return _network(_read_model(Path(path)))


def load_model_and_gates(path: str | Path) -> tuple[MultiExitNetwork, tuple[Any, ...] | None]:
    """:func:`load_model` and :func:`load_gates` from one read of ``model.pt``."""
    state = _read_model(Path(path))
    return _network(state), _gates(state)


def _network(state: dict[str, Any]) -> MultiExitNetwork:
    where = state.get("path", "model.pt")
    try:
        cfg = TrainConfig.from_dict(state["config"])
        num_classes = int(state["num_classes"])
        in_size = int(state["in_size"])
    except (ConfigError, TypeError, ValueError) as exc:
        raise DataError(f"{where} holds a config offramp cannot use ({exc}); retrain") from exc
    net = build_network(cfg, in_size, num_classes)
    for i in state.get("sklearn_heads", []):
        net.heads[i] = SklearnHead("logistic", num_classes)  # estimator replaced on load
    try:
        net.load_state_dict(state["state_dict"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(
            f"{where} does not fit the network its config describes ({_first_problem(exc)}); "
            "the file was changed or written by another version: retrain the run"
        ) from exc
    return net.eval()


def _first_problem(exc: BaseException, limit: int = 160) -> str:
    """The first specific line of a ``load_state_dict`` error (``Missing key(s) …``,
    ``size mismatch for …``), shortened to ``limit`` characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _gates(state: dict[str, Any]) -> tuple[Any, ...] | None:
    from offramp.training.gated import gate_scorers_from_state

    return gate_scorers_from_state(state["gates"]) if "gates" in state else None


# -------------------------------------------------------------------------------- history


def _clean(v: Any) -> Any:
    """NaN and ±inf -> None (JSON null / empty CSV cell)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def history_row(log: EpochLog, num_exits: int) -> dict[str, Any]:
    """One epoch as a ``history.csv`` / ``history.json`` row."""
    row: dict[str, Any] = {
        "epoch": log.epoch,
        "phase": log.extra.get("phase", ""),
        "loss": log.loss,
        "seconds": log.seconds,
    }
    val = log.val_exit_accuracy or []
    for i in range(max(num_exits, len(log.exit_losses))):
        row[f"exit{i}_loss"] = log.exit_losses[i] if i < len(log.exit_losses) else None
        row[f"exit{i}_train_acc"] = log.exit_accuracy[i] if i < len(log.exit_accuracy) else None
        row[f"exit{i}_val_acc"] = val[i] if i < len(val) else None
    for k in sorted(log.extra):
        if k != "phase":
            row[k] = log.extra[k]
    return {k: _clean(v) for k, v in row.items()}


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = ["epoch", "phase", "loss", "seconds"]
    exit_cols = {k for r in rows for k in r if k.startswith("exit") and "_" in k}
    n = 1 + max((int(k[4 : k.index("_")]) for k in exit_cols), default=-1)
    for i in range(n):
        cols += [f"exit{i}_loss", f"exit{i}_train_acc", f"exit{i}_val_acc"]
    cols += sorted({k for r in rows for k in r} - set(cols))
    return cols


def write_history(out: Path, rows: list[dict[str, Any]]) -> None:
    """``history.csv`` and ``history.json`` of ``rows``."""
    cols = _columns(rows)
    write_csv(out / "history.csv", cols, [[r.get(c) for c in cols] for r in rows])
    write_json(out / "history.json", [{c: r.get(c) for c in cols} for r in rows])


def previous_rows(out: Path, cfg: TrainConfig, num_exits: int) -> list[dict[str, Any]]:
    """History rows of the run being resumed (rewritten from the returned history at the end)."""
    if not cfg.resume:
        return []
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        history = load_fit_checkpoint(ckpt)["history"]
        try:
            return [history_row(EpochLog(**h), num_exits) for h in history]
        except TypeError as exc:
            raise CheckpointError(
                f"checkpoint {ckpt} holds a history offramp cannot read ({exc}); delete it to "
                "start over, or resume: false"
            ) from exc
    if (out / "history.json").exists():  # strategies with one checkpoint per fit
        try:
            return list(read_json(out / "history.json"))
        except DataError:
            return []
    return []


# --------------------------------------------------------------------------------- config


def write_config(out: Path, cfg: TrainConfig) -> None:
    """``config.json`` and (with pyyaml) ``config.yaml``: the resolved config of the run."""
    d = cfg.to_dict()
    write_json(out / "config.json", d)
    try:
        import yaml
    except ImportError:
        return
    text = "# resolved config of this run; `offramp train` on this file resumes it\n"
    write_text(out / "config.yaml", text + yaml.safe_dump(d, sort_keys=False))


def check_resumable(out: Path, cfg: TrainConfig, strategy: object = None) -> None:
    """Refuse to resume a checkpoint in ``out`` that a run with other settings wrote.

    ``epochs`` may change (``strategy``: the step strategy the run trains with, ``None`` for
    the strategies of :data:`~offramp.training.registry.MULTI_FIT`): to more epochs than
    trained when nothing in the training depends on the total
    (:func:`~offramp.training.loop.total_epochs_use`), never to fewer.
    """
    from offramp.training.registry import MULTI_FIT

    if not cfg.resume or not any(out.glob("checkpoint*.pt")) or not (out / "config.json").exists():
        return
    try:
        old = read_json(out / "config.json")
    except DataError:
        return
    new = cfg.to_dict()
    diff = sorted(k for k in new if k not in (*RESUME_FREE, "epochs") and old.get(k) != new[k])
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diff)
        raise ConfigError(
            f"{out} holds a checkpoint of a run with other settings ({changes}); use another "
            "output_dir, or resume: false to start over there"
        )
    before = old.get("epochs")
    if before == cfg.epochs:
        return
    fix = "start a new output_dir (or resume: false to start over there)"
    if cfg.strategy in MULTI_FIT:
        raise ConfigError(
            f"{out} holds a run of {before} epoch{'' if before == 1 else 's'} and this run asks "
            f"for {cfg.epochs}, but "
            f"strategy {cfg.strategy!r} trains stage by stage, each stage on the ones before "
            f"it: changing epochs would change stages trained already; keep epochs: {before} "
            f"to resume it, or {fix}"
        )
    ckpt = out / "checkpoint.pt"
    trained = int(load_fit_checkpoint(ckpt)["epoch"]) if ckpt.exists() else 0
    problem = epochs_change_problem(trained, before, cfg.fit_config(), strategy)
    if problem is None:
        return
    fix = f"keep epochs: {before} to resume it, or {fix}" if cfg.epochs >= trained else f"or {fix}"
    raise ConfigError(f"the run in {out} {problem}; {fix}")
