"""``offramp train CONFIG``: one training run described by a config file, with its results on
disk.

A run reads a :class:`TrainConfig` (YAML or JSON), loads the data, builds the network, trains it
with any strategy of :data:`offramp.training.registry.STRATEGIES` and writes into
``output_dir`` the files :mod:`offramp.jobs.run_files` lists (resolved config, checkpoint,
history, ``model.pt``, ``metrics.json``).

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every rank trains its share of each
batch with DDP and only rank 0 writes files; :func:`launch` starts such a run on this machine.
This module and :mod:`offramp.cli` are the only places that read the environment
(``OFFRAMP_DATA``, ``RANK``, ``WORLD_SIZE``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from offramp.data import Splits, load_splits
from offramp.errors import ConfigError, DataError
from offramp.files import write_json
from offramp.jobs.config import DATASETS, TrainConfig, load_config
from offramp.jobs.run_files import (
    build_network,
    check_resumable,
    history_row,
    load_gates,
    load_model,
    load_model_and_gates,
    previous_rows,
    save_model,
    write_config,
    write_history,
)
from offramp.network import MultiExitNetwork
from offramp.training.loop import EpochLog

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

#: Strategies whose gates (recursive gating, eq. 9) are saved in ``model.pt`` as ``gates``.
GATED = ("gated", "cost")


def data_dir(cfg: TrainConfig) -> Path | None:
    """Where ``cfg``'s dataset files are: ``data_dir``, else ``$OFFRAMP_DATA/<dataset>``
    (``None`` for ``digits``, which reads no files)."""
    if cfg.dataset == "digits":
        return None
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


def load_datasets(cfg: TrainConfig) -> Splits:
    """The train, validation and test ``(X, y)`` tensors of ``cfg``
    (:func:`offramp.data.load_splits` on the files :func:`data_dir` finds).

    Example:
        >>> s = load_datasets(TrainConfig(train_limit=100, val_fraction=0.2))
        >>> len(s.train[1]), len(s.val[1]), tuple(s.test[0].shape[1:])
        (80, 20, (1, 8, 8))
    """
    return load_splits(
        cfg.dataset,
        data_dir=data_dir(cfg),
        train_limit=cfg.train_limit,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
    )


def _resolved(cfg: TrainConfig, net: MultiExitNetwork) -> TrainConfig:
    """``cfg`` with the defaults that depend on the backbone and the environment filled in."""
    from offramp.models import BACKBONES

    updates: dict[str, Any] = {}
    if cfg.backbone == "blenet":
        updates["exits"] = list(net.exit_blocks[:-1])
        updates["head"] = cfg.head or BACKBONES["blenet"].head
    elif cfg.backbone == "mlp":
        updates["head"] = cfg.head or BACKBONES["mlp"].head
    if cfg.dataset != "digits":
        updates["data_dir"] = str(data_dir(cfg))
    return dataclasses.replace(cfg, **updates)


# ---------------------------------------------------------------------------------- runs


def run_training(cfg: TrainConfig, *, config_path: str | Path | None = None) -> dict[str, Any]:
    """Run the training ``cfg`` describes and write its results into ``cfg.output_dir``.

    Everything is checked before anything is written: the data, the network, the strategy and
    its options (the strategy is built), the loop's settings and whether ``output_dir``'s
    checkpoint may be resumed. A ``ConfigError`` found then names ``config_path`` (the file
    ``cfg`` was read from) when it is given.

    Re-running with the same config resumes from ``output_dir/checkpoint.pt`` (a finished run
    trains no further epochs and rewrites the same results). Under ``torchrun`` (environment
    ``WORLD_SIZE`` > 1) this joins the process group, trains with DDP, writes files from rank 0
    only and leaves the group at the end.

    Returns:
        The metrics also written to ``metrics.json``: ``strategy``, ``dataset``, ``backbone``,
        ``num_exits``, ``exit_accuracies`` (test accuracy of every exit), ``final_accuracy``,
        ``train_seconds`` (sum of the epochs' times), ``epochs`` (history rows),
        ``epochs_this_run`` and ``seconds_this_run`` (what this call trained: 0 when the run
        was finished already), ``test_samples``.

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
    from offramp.training.loop import check_fit
    from offramp.training.registry import prepare_strategy, train

    joined = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (
        dist.is_available() and dist.is_initialized()
    ):  # started by torchrun: it gives this rank its place in the environment
        init_process_group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        joined = True
    try:
        rank, world = world_info()
        with _naming(config_path):  # every check before the first file is written
            data = load_datasets(cfg)
            x_train, y_train = data.train
            num_classes = int(torch.cat([y_train, data.test[1]]).max()) + 1
            in_size = int(x_train.shape[-1])
            net = build_network(cfg, in_size, num_classes)
            cfg = _resolved(cfg, net)
            strategy = prepare_strategy(cfg.strategy, net, x_train[:2], cfg.options)
            check_fit(cfg.fit_config(), strategy, world)
            out = Path(cfg.output_dir)
            check_resumable(out, cfg, strategy)
        barrier()  # every rank has read the old config before rank 0 replaces it
        rows: list[dict[str, Any]] = []
        this_run: list[EpochLog] = []  # the epochs this call trains (none when finished)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            write_config(out, cfg)
            rows = previous_rows(out, cfg, net.num_exits)

        def record(log: EpochLog) -> None:
            this_run.append(log)
            if rank == 0:
                rows.append(history_row(log, net.num_exits))
                write_history(out, rows)

        history = train(
            net,
            data.train,
            cfg.fit_config(),
            cfg.strategy if strategy is None else strategy,
            val=data.val if len(data.val[1]) else None,
            options=cfg.options if strategy is None else None,
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
            "epochs_this_run": len(this_run),
            "seconds_this_run": float(sum(h.seconds for h in this_run)),
            "test_samples": len(data.test[1]),
        }
        if rank == 0:
            write_history(out, [history_row(h, net.num_exits) for h in history])
            gates = strategy.gates_state() if cfg.strategy in GATED else None  # type: ignore[union-attr]
            save_model(out, cfg, net, in_size, num_classes, gates)
            write_json(out / "metrics.json", metrics)
        barrier()
        return metrics
    finally:
        if joined:
            dist.destroy_process_group()


@contextlib.contextmanager
def _naming(config_path: str | Path | None) -> Iterator[None]:
    """A ``ConfigError`` raised inside, prefixed with the config file it is about."""
    try:
        yield
    except ConfigError as exc:
        if config_path is None:
            raise
        raise ConfigError(f"{config_path}: {exc}") from exc


def format_summary(metrics: dict[str, Any], output_dir: str | Path) -> str:
    """The text ``offramp train`` prints: per-exit test accuracy, what this call trained and
    where the files are.

    Example:
        >>> m = {"exit_accuracies": [0.5, 0.75], "epochs": 3, "epochs_this_run": 3,
        ...      "seconds_this_run": 1.0}
        >>> print(format_summary(m, "out"))
        exit  test accuracy
        ----  -------------
           0         0.5000
           1         0.7500
        <BLANKLINE>
        trained 3 epochs in 1.0 s; results written to out/
        >>> print(format_summary({**m, "epochs_this_run": 0}, "out").splitlines()[-1])
        already trained: 3 epochs in out/, nothing to do (results rewritten)
        >>> print(format_summary({**m, "epochs_this_run": 1}, "out").splitlines()[-1])
        trained 1 more epoch in 1.0 s (resumed after epoch 2); results written to out/
    """
    from offramp.report import format_table

    rows = [[i, float(a)] for i, a in enumerate(metrics["exit_accuracies"])]
    table = format_table(["exit", "test accuracy"], rows)
    out = f"{Path(output_dir)}/"
    total, done = metrics.get("epochs"), metrics.get("epochs_this_run")
    if total is None or done is None:  # metrics of another version
        secs = metrics.get("train_seconds", 0.0)
        return f"{table}\n\ntrained in {secs:.1f} s; results written to {out}"

    def epochs(n: int) -> str:
        return f"{n} epoch{'' if n == 1 else 's'}"

    secs = metrics.get("seconds_this_run", 0.0)
    line = f"trained {epochs(done)} in {secs:.1f} s; results written to {out}"
    if done == 0:
        line = f"already trained: {epochs(total)} in {out}, nothing to do (results rewritten)"
    elif done < total:
        line = (
            f"trained {done} more epoch{'' if done == 1 else 's'} in {secs:.1f} s (resumed "
            f"after epoch {total - done}); results written to {out}"
        )
    return f"{table}\n\n{line}"


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
