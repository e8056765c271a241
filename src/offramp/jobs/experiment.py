"""The end-to-end job behind ``offramp demo`` and the benchmarks.

train → profile → record (val, test) → calibrate on val → simulate on test → run the real
runtime on test (and check it against the simulation) → time the plain backbone and the
early-exit runtime side by side at batch 1 and batch 256.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from offramp.analysis import oracle_summary
from offramp.calibration import ThresholdCalibrator
from offramp.costs import profile
from offramp.data.digits import Splits
from offramp.errors import ConfigError
from offramp.evaluation import record_splits, simulate
from offramp.network import MultiExitNetwork
from offramp.runtime import EarlyExitRuntime
from offramp.timing import compare_wallclock
from offramp.training.joint import JointTraining, Schedule
from offramp.training.loop import FitConfig, Strategy, fit

__all__ = ["CONTRACT_KEYS", "ExperimentConfig", "measure_speedups", "run_experiment"]

#: Keys every result JSON (``offramp demo --json``, benchmarks) carries at its top level.
CONTRACT_KEYS = (
    "final_exit_accuracy",
    "early_exit_accuracy",
    "relative_cost",
    "speedup_batch1",
    "speedup_batch256",
    "exit_fractions",
)

log = logging.getLogger("offramp.jobs.experiment")


@dataclass
class ExperimentConfig:
    """Settings of :func:`run_experiment`.

    Attributes:
        fit: training loop settings.
        criterion: exit criterion (``entropy`` or ``max_prob``).
        delta: accuracy loss allowed at calibration, relative to the final exit on val.
        mode: runtime execution mode for both the early-exit runtime and the plain backbone.
        batch1_samples: test samples timed one at a time.
        batch_size: the large batch size timed.
        large_batches: number of large batches timed per repeat.
        repeats: timing repeats (median reported), after 2 warm-up runs.
        train: train the network first (``False`` to evaluate a trained one).
    """

    fit: FitConfig = field(default_factory=FitConfig)
    criterion: str = "entropy"
    delta: float = 0.0
    mode: str = "eager"
    batch1_samples: int = 300
    batch_size: int = 256
    large_batches: int = 4
    repeats: int = 5
    train: bool = True


def _over(fn: Callable[[Tensor], object], batches: Sequence[Tensor]) -> Callable[[], None]:
    """A callable that runs ``fn`` on every batch (for timing)."""

    def run() -> None:
        for b in batches:
            fn(b)

    return run


def _cycle(x: Tensor, n: int) -> Tensor:
    reps = -(-n // x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n]


@torch.no_grad()
def measure_speedups(
    runtime: EarlyExitRuntime,
    x: Tensor,
    *,
    batch1_samples: int = 300,
    batch_size: int = 256,
    large_batches: int = 4,
    repeats: int = 5,
) -> dict[str, Any]:
    """Wall-clock of the plain backbone vs the early-exit runtime, interleaved in one run.

    Both run in the runtime's execution mode on the same thread count, with input validation
    off on both sides. Large batches cycle through ``x`` when it has fewer samples than needed.

    Returns:
        ``speedup_batch1`` and ``speedup_batch{batch_size}`` (plain / early exit), and the
        median seconds per sample of each side.
    """
    plain = runtime.plain_backbone()
    validate, runtime.validate = runtime.validate, False
    try:
        one = [x[i : i + 1] for i in range(min(batch1_samples, x.shape[0]))]
        big = _cycle(x, batch_size * large_batches).split(batch_size)
        t1 = compare_wallclock(
            {"plain": _over(plain, one), "ee": _over(runtime.run_one, one)}, repeats=repeats
        )
        paths = {f"path{i}": _over(runtime.path(i), big) for i in range(runtime.net.num_exits - 1)}
        tb = compare_wallclock(
            {"plain": _over(plain, big), "ee": _over(runtime, big), **paths}, repeats=repeats
        )
    finally:
        runtime.validate = validate
    nb = batch_size * large_batches
    return {
        "speedup_batch1": t1["plain"] / t1["ee"],
        f"speedup_batch{batch_size}": tb["plain"] / tb["ee"],
        "plain_us_per_sample_batch1": 1e6 * t1["plain"] / len(one),
        "early_exit_us_per_sample_batch1": 1e6 * t1["ee"] / len(one),
        f"plain_us_per_sample_batch{batch_size}": 1e6 * tb["plain"] / nb,
        f"early_exit_us_per_sample_batch{batch_size}": 1e6 * tb["ee"] / nb,
        # wall-clock of each early exit's own path relative to the plain backbone, to set
        # beside its FLOPs ratio: the gap is per-op inefficiency, not runtime overhead
        f"exit_path_time_ratio_batch{batch_size}": [
            tb[f"path{i}"] / tb["plain"] for i in range(runtime.net.num_exits - 1)
        ]
        + [1.0],
    }


def run_experiment(
    net: MultiExitNetwork,
    splits: Splits,
    cfg: ExperimentConfig,
    *,
    schedule: Schedule | None = None,
    strategy: Strategy | None = None,
) -> dict[str, Any]:
    """Train (optionally), calibrate on ``splits.val`` and evaluate ``net`` on ``splits.test``.

    Args:
        net: the network.
        splits: train, validation (calibration) and test data.
        cfg: the settings.
        schedule: λ schedule of the default strategy, joint training.
        strategy: the training strategy instead of joint training (e.g.
            :class:`~offramp.training.distill.SelfDistillation`); it has its own schedule.

    Returns:
        A JSON-ready dict with at least ``final_exit_accuracy``, ``early_exit_accuracy``,
        ``relative_cost``, ``speedup_batch1``, ``speedup_batch256`` and ``exit_fractions``.
    """
    if strategy is not None and schedule is not None:
        raise ConfigError("give either a schedule (for joint training) or a strategy, not both")
    t0 = time.perf_counter()
    history = []
    if cfg.train:
        strat = strategy if strategy is not None else JointTraining(schedule)
        history = fit(net, splits.train, cfg.fit, strategy=strat, val=splits.val)
    train_s = time.perf_counter() - t0
    net.eval()
    x_test, y_test = splits.test
    prof = profile(net, x_test[:1])
    cum = prof.cumulative
    rec_val, rec_test = record_splits(net, splits.val, splits.test)
    cal = ThresholdCalibrator(cfg.criterion, cfg.delta).fit(rec_val, cum)
    sim = simulate(rec_test, cal.policy_)
    summ = rec_test.summary(sim.exits, cum)
    runtime = EarlyExitRuntime(
        net, cal.policy_, costs=prof, mode=cfg.mode, example_input=x_test[:2]
    )
    res = runtime(x_test)
    agree_exits = float((res.exits.numpy() == sim.exits).mean())
    agree_preds = float((res.predictions.numpy() == sim.predictions).mean())
    oracle = oracle_summary(rec_test, cum)
    speed = measure_speedups(
        runtime,
        x_test,
        batch1_samples=cfg.batch1_samples,
        batch_size=cfg.batch_size,
        large_batches=cfg.large_batches,
        repeats=cfg.repeats,
    )
    acc = rec_test.exit_accuracy()
    frac = np.asarray(summ["exit_fractions"])
    return {
        "final_exit_accuracy": float(acc[-1]),
        "early_exit_accuracy": float(summ["accuracy"]),
        "relative_cost": float(summ["expected_cost"]) / prof.backbone_flops,
        "flops_reduction": prof.backbone_flops / float(summ["expected_cost"]),
        **speed,
        "exit_fractions": frac.tolist(),
        "exit_accuracy": acc.tolist(),
        "accuracy_of_leavers": summ["accuracy_of_leavers"],
        "exit_relative_cost": prof.relative_cumulative.tolist(),
        "oracle_accuracy": oracle["accuracy"],
        # relative to the plain backbone, as every cost of this result
        "oracle_relative_cost": oracle["relative_cost"] * float(cum[-1]) / prof.backbone_flops,
        "thresholds": list(cal.thresholds_),
        "criterion": cfg.criterion,
        "delta": cfg.delta,
        "val_accuracy": cal.accuracy_,
        "val_final_accuracy": cal.final_accuracy_,
        "runtime_matches_simulation": {"exits": agree_exits, "predictions": agree_preds},
        "costs": prof.to_dict(),
        "history": [asdict(h) for h in history],
        "train_seconds": train_s,
        "mode": cfg.mode,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "n_test": int(y_test.shape[0]),
    }
