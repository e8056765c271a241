"""``offramp train CONFIG``: one training run described by a config file, with its results on
disk.

A run reads a :class:`TrainConfig` (YAML or JSON), loads the data, builds the network, trains it
with any strategy of :data:`offramp.training.registry.STRATEGIES` and writes into
``output_dir``:

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

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every rank trains its share of each
batch with DDP and only rank 0 writes files; :func:`launch` starts such a run on this machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from offramp.data.digits import Splits
from offramp.errors import ConfigError, DataError
from offramp.files import read_torch, save_torch, write_csv, write_json, write_text
from offramp.heads import SklearnHead
from offramp.network import MultiExitNetwork
from offramp.training.config import DATASETS, TrainConfig, load_config
from offramp.training.loop import EpochLog, load_checkpoint

__all__ = [
    "DATASETS",
    "TrainConfig",
    "build_network",
    "format_summary",
    "launch",
    "load_config",
    "load_datasets",
    "load_gates",
    "load_model",
    "load_model_and_gates",
    "run_training",
]

#: Share of scikit-learn digits held out (stratified) as the test split, as in ``offramp demo``.
DIGITS_TEST_FRACTION = 0.2

#: Strategies whose gates (recursive gating, eq. 9) are saved in ``model.pt`` as ``gates``.
GATED = ("gated", "cost")

# What model.pt must hold.
_MODEL_KEYS = ("config", "in_size", "num_classes", "state_dict")

# Keys that may differ between a run and the run it resumes.
_RESUME_FREE = ("output_dir", "resume", "show_progress", "data_dir")


def _data_dir(cfg: TrainConfig) -> Path:
    if cfg.data_dir is not None:
        path = Path(cfg.data_dir)
        how = f"data_dir is {cfg.data_dir!r}"
    elif os.environ.get("OFFRAMP_DATA"):
        path = Path(os.environ["OFFRAMP_DATA"]) / cfg.dataset
        how = f"data_dir is unset and OFFRAMP_DATA is {os.environ['OFFRAMP_DATA']!r}"
    else:
        raise ConfigError(
            f"dataset {cfg.dataset!r} needs its IDX files: set data_dir in the config to the "
            f"directory holding them, or set OFFRAMP_DATA to a directory with a {cfg.dataset}/ "
            "subdirectory"
        )
    if not path.is_dir():
        raise DataError(
            f"{cfg.dataset} directory {path} does not exist ({how}); point data_dir or "
            "OFFRAMP_DATA at the files (train-images-idx3-ubyte[.gz] …)"
        )
    return path


def _holdout(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(keep, held_out)``: a seeded split stratified by class, ``round(fraction·N)``
    (at least one) samples held out, both in their original order."""
    n = y.shape[0]
    k = max(1, round(fraction * n))
    if k >= n:
        raise ConfigError(
            f"val_fraction {fraction} of {n} training samples leaves none to train on; lower "
            "val_fraction or raise train_limit"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    order = perm[torch.argsort(y[perm], stable=True)]  # grouped by class, random within
    pos = ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long()  # evenly spaced
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[pos]] = True
    return (~mask).nonzero().squeeze(1), mask.nonzero().squeeze(1)


def load_datasets(cfg: TrainConfig) -> Splits:
    """The train, validation and test ``(X, y)`` tensors of ``cfg`` (validation may be empty:
    zero rows when ``val_fraction`` is 0).

    Example:
        >>> s = load_datasets(TrainConfig(train_limit=100, val_fraction=0.2))
        >>> len(s.train[1]), len(s.val[1]), tuple(s.test[0].shape[1:])
        (80, 20, (1, 8, 8))
    """
    if cfg.dataset == "digits":
        from offramp.data import load_digits_splits

        # Every image outside the stratified test split is a training sample.
        s = load_digits_splits(val_fraction=0.2, test_fraction=DIGITS_TEST_FRACTION, seed=0)
        x = torch.cat([s.train[0], s.val[0]])
        y = torch.cat([s.train[1], s.val[1]])
        if cfg.train_limit is not None:
            x, y = x[: cfg.train_limit], y[: cfg.train_limit]
        test = s.test
    else:
        from offramp.data import load_mnist

        root = _data_dir(cfg)
        x, y = load_mnist(root, "train", limit=cfg.train_limit)
        test = load_mnist(root, "test")
    if cfg.val_fraction > 0:
        keep, held = _holdout(y, cfg.val_fraction, cfg.seed)
        return Splits((x[keep], y[keep]), (x[held], y[held]), test)
    return Splits((x, y), (x[:0], y[:0]), test)


# -------------------------------------------------------------------------------- network


def build_network(cfg: TrainConfig, in_size: int, num_classes: int) -> MultiExitNetwork:
    """The network ``cfg`` names, initialised from ``cfg.seed``.

    Example:
        >>> build_network(TrainConfig(exits=[1]), 8, 10).exit_blocks
        (1, 3)
    """
    from offramp.models import MODELS, blenet, mlp

    if cfg.backbone == "blenet":
        exits = (0, 1) if cfg.exits is None else tuple(cfg.exits)
        if not all(0 <= e <= 2 for e in exits):
            raise ConfigError(
                f"blenet takes early exits after blocks 0, 1 and 2 (3 is the final exit), got "
                f"exits {list(exits)}"
            )
        return blenet(
            in_size, num_classes, exits_after=exits, head=cfg.head or "conv", seed=cfg.seed
        )
    if cfg.backbone == "resnet":
        from offramp.models import resnet

        return resnet(
            in_size,
            num_classes,
            widths=(8, 16, 32),
            blocks_per_stage=(2, 2, 2),
            exits_after=cfg.exits,
            head=cfg.head or "pool",
            seed=cfg.seed,
        )
    if cfg.exits is not None:
        raise ConfigError(
            f"backbone {cfg.backbone!r} has fixed exits (mlp: one after every hidden layer); "
            "remove `exits` from the config"
        )
    if cfg.backbone == "mlp":
        return mlp(
            (1, in_size, in_size),
            num_classes,
            hidden=(64, 64, 64),
            head=cfg.head or "linear",
            seed=cfg.seed,
        )
    if cfg.head is not None:
        raise ConfigError(f"backbone {cfg.backbone!r} has fixed heads; remove `head`")
    torch.manual_seed(cfg.seed)
    return MODELS[cfg.backbone](in_size, num_classes)


def _resolved(cfg: TrainConfig, net: MultiExitNetwork) -> TrainConfig:
    """``cfg`` with the defaults that depend on the backbone and the environment filled in."""
    updates: dict[str, Any] = {}
    if cfg.backbone == "blenet":
        updates["exits"] = list(net.exit_blocks[:-1])
        updates["head"] = cfg.head or "conv"
    elif cfg.backbone == "mlp":
        updates["head"] = cfg.head or "linear"
    if cfg.dataset != "digits":
        updates["data_dir"] = str(_data_dir(cfg))
    return dataclasses.replace(cfg, **updates)


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
    """Rebuild the network saved as ``model.pt`` by :func:`run_training` (in eval mode).

    The file is read without pickle; scikit-learn heads are stored in the skops format and
    read back with :func:`offramp.heads.load_sklearn_estimator`.

    Args:
        path: the ``model.pt`` file.
    """
    return _network(_read_model(Path(path)))


def load_model_and_gates(path: str | Path) -> tuple[MultiExitNetwork, tuple[Any, ...] | None]:
    """:func:`load_model` and :func:`load_gates` from one read of ``model.pt``."""
    state = _read_model(Path(path))
    return _network(state), _gates(state)


def _network(state: dict[str, Any]) -> MultiExitNetwork:
    cfg = TrainConfig.from_dict(state["config"])
    num_classes = int(state["num_classes"])
    net = build_network(cfg, int(state["in_size"]), num_classes)
    for i in state.get("sklearn_heads", []):
        net.heads[i] = SklearnHead("logistic", num_classes)  # estimator replaced on load
    try:
        net.load_state_dict(state["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()
        raise DataError(
            f"{state.get('path', 'model.pt')} does not fit the network its config describes "
            f"({first[0] if first else type(exc).__name__}…); the file was changed or written "
            "by another version: retrain the run"
        ) from exc
    return net.eval()


def _gates(state: dict[str, Any]) -> tuple[Any, ...] | None:
    from offramp.training.gated import gate_scorers_from_state

    return gate_scorers_from_state(state["gates"]) if "gates" in state else None


# -------------------------------------------------------------------------------- outputs


def _clean(v: Any) -> Any:
    """NaN and ±inf -> None (JSON null / empty CSV cell)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _row(log: EpochLog, num_exits: int) -> dict[str, Any]:
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


def _write_history(out: Path, rows: list[dict[str, Any]]) -> None:
    cols = _columns(rows)
    write_csv(out / "history.csv", cols, [[r.get(c) for c in cols] for r in rows])
    write_json(out / "history.json", [{c: r.get(c) for c in cols} for r in rows])


def _write_config(out: Path, cfg: TrainConfig) -> None:
    d = cfg.to_dict()
    write_json(out / "config.json", d)
    try:
        import yaml
    except ImportError:
        return
    text = "# resolved config of this run; `offramp train` on this file resumes it\n"
    write_text(out / "config.yaml", text + yaml.safe_dump(d, sort_keys=False))


def _check_resumable(out: Path, cfg: TrainConfig) -> None:
    """Refuse to resume a checkpoint in ``out`` that a run with other settings wrote."""
    if not cfg.resume or not any(out.glob("checkpoint*.pt")) or not (out / "config.json").exists():
        return
    try:
        old = json.loads((out / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    new = cfg.to_dict()
    diff = sorted(k for k in new if k not in _RESUME_FREE and old.get(k) != new[k])
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diff)
        raise ConfigError(
            f"{out} holds a checkpoint of a run with other settings ({changes}); use another "
            "output_dir, or resume: false to start over there"
        )


def _previous_rows(out: Path, cfg: TrainConfig, num_exits: int) -> list[dict[str, Any]]:
    """History rows of the run being resumed (rewritten from the returned history at the end)."""
    if not cfg.resume:
        return []
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        return [_row(EpochLog(**h), num_exits) for h in load_checkpoint(ckpt)["history"]]
    if (out / "history.json").exists():  # strategies with one checkpoint per fit
        try:
            return list(json.loads((out / "history.json").read_text()))
        except (OSError, json.JSONDecodeError):
            return []
    return []


# ---------------------------------------------------------------------------------- runs


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Run the training ``cfg`` describes and write its results into ``cfg.output_dir``.

    Re-running with the same config resumes from ``output_dir/checkpoint.pt`` (a finished run
    trains no further epochs and rewrites the same results). Under ``torchrun`` (environment
    ``WORLD_SIZE`` > 1) this joins the process group, trains with DDP, writes files from rank 0
    only and leaves the group at the end.

    Returns:
        The metrics also written to ``metrics.json``: ``strategy``, ``dataset``, ``backbone``,
        ``num_exits``, ``exit_accuracies`` (test accuracy of every exit), ``final_accuracy``,
        ``train_seconds`` (sum of the epochs' times), ``epochs`` (history rows), ``test_samples``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     cfg = TrainConfig(epochs=1, train_limit=200, output_dir=d, show_progress=False)
        ...     m = run_training(cfg)
        ...     sorted(p.name for p in Path(d).iterdir())[:4]
        ['checkpoint.pt', 'config.json', 'config.yaml', 'history.csv']
        >>> m["num_exits"], len(m["exit_accuracies"])
        (3, 3)
    """
    import torch.distributed as dist

    from offramp.evaluation import ExitRecord
    from offramp.training.distributed import barrier, init_process_group, world_info
    from offramp.training.registry import make_strategy, train

    joined = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (
        dist.is_available() and dist.is_initialized()
    ):
        init_process_group()
        joined = True
    try:
        rank, _ = world_info()
        data = load_datasets(cfg)
        x_train, y_train = data.train
        num_classes = int(torch.cat([y_train, data.test[1]]).max()) + 1
        in_size = int(x_train.shape[-1])
        net = build_network(cfg, in_size, num_classes)
        cfg = _resolved(cfg, net)
        out = Path(cfg.output_dir)
        _check_resumable(out, cfg)
        barrier()  # every rank has read the old config before rank 0 replaces it
        rows: list[dict[str, Any]] = []
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            _write_config(out, cfg)
            rows = _previous_rows(out, cfg, net.num_exits)

        def record(log: EpochLog) -> None:
            if rank == 0:
                rows.append(_row(log, net.num_exits))
                _write_history(out, rows)

        gated = None
        if cfg.strategy in GATED:  # built here and kept: its gates are saved with the model
            gated = make_strategy(cfg.strategy, net, data.train[0][:2], **cfg.options)
        history = train(
            net,
            data.train,
            cfg.fit_config(),
            cfg.strategy if gated is None else gated,
            val=data.val if len(data.val[1]) else None,
            options=cfg.options if gated is None else None,
            callbacks=[record],
        )
        rec = ExitRecord.collect(net, data.test)
        acc = [float(a) for a in rec.exit_accuracy().tolist()]
        metrics: dict[str, Any] = {
            "strategy": cfg.strategy,
            "dataset": cfg.dataset,
            "backbone": cfg.backbone,
            "num_exits": net.num_exits,
            "exit_accuracies": acc,
            "final_accuracy": acc[-1],
            "train_seconds": float(sum(h.seconds for h in history)),
            "epochs": len(history),
            "test_samples": len(data.test[1]),
        }
        if rank == 0:
            _write_history(out, [_row(h, net.num_exits) for h in history])
            model = {
                "format": 1,
                "config": cfg.to_dict(),
                "in_size": in_size,
                "num_classes": num_classes,
                "state_dict": net.state_dict(),
                "sklearn_heads": [i for i, h in enumerate(net.heads) if isinstance(h, SklearnHead)],
            }
            if gated is not None:
                model["gates"] = gated.gates_state()  # type: ignore[attr-defined]
            save_torch(out / "model.pt", model)
            write_json(out / "metrics.json", metrics)
        barrier()
        return metrics
    finally:
        if joined:
            dist.destroy_process_group()


def format_summary(metrics: dict[str, Any], output_dir: str | Path) -> str:
    """The text ``offramp train`` prints: per-exit test accuracy and where the files are.

    Example:
        >>> print(format_summary({"exit_accuracies": [0.5, 0.75], "train_seconds": 1.0}, "out"))
        exit  test accuracy
        ----  -------------
           0         0.5000
           1         0.7500
        <BLANKLINE>
        trained in 1.0 s; results written to out/
    """
    from offramp.report import format_table

    rows = [[i, float(a)] for i, a in enumerate(metrics["exit_accuracies"])]
    table = format_table(["exit", "test accuracy"], rows)
    secs = metrics.get("train_seconds", 0.0)
    return f"{table}\n\ntrained in {secs:.1f} s; results written to {Path(output_dir)}/"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    config_path: str | Path,
    nproc: int,
    extra_args: Sequence[str] = (),
    *,
    verbose: bool = False,
) -> int:
    """Run ``offramp train config_path`` on ``nproc`` local ranks with ``torchrun`` (DDP, gloo
    on 127.0.0.1, a free port) and wait for it.

    Args:
        config_path: the config file.
        nproc: number of ranks (processes).
        extra_args: further ``offramp train`` flags for every rank (``--epochs 3`` …).
        verbose: pass ``-v`` (log every epoch).

    Returns:
        torchrun's exit code (0 when every rank succeeded).
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be ≥ 1, got {nproc}")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "offramp.cli",
        *(["-v"] if verbose else []),
        "train",
        str(config_path),
        *extra_args,
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(cmd, env=env, check=False).returncode
