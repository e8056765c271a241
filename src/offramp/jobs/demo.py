"""``offramp demo``: a small CNN with an early exit on scikit-learn's digits, end to end.

The network is :func:`offramp.models.vgg` on the digits resized bilinearly from 8×8 to 16×16:
a cheap stem with an exit after it, then two wider blocks that hold almost all the compute. Its
early exit is trained by self-distillation from the final exit (so it is confident where the
final exit is), its threshold calibrated on validation, and the plain backbone and the
early-exit runtime are timed side by side at batch 1 and batch 256 on the test split.

B-LeNet on the 8×8 digits, the demo's network before, saves 8.6× in FLOPs but little
wall-clock time (0.85–1.45× measured at batch 1 and 256, on one thread or two): its layers are
so small that each stage's fixed cost outweighs the work skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offramp.data.digits import load_digits_splits
from offramp.errors import ConfigError
from offramp.evaluation import ExitRecord
from offramp.files import write_json
from offramp.jobs.experiment import ExperimentConfig, run_experiment
from offramp.models import vgg
from offramp.report import format_table, plot_tradeoff, tradeoff_curve
from offramp.training.distill import SelfDistillation
from offramp.training.joint import JointTraining
from offramp.training.loop import FitConfig, Strategy

__all__ = ["DemoConfig", "format_results", "run_demo"]


@dataclass
class DemoConfig:
    """Settings of the demo (all have command-line flags).

    Attributes:
        epochs: training epochs.
        lr: learning rate.
        delta: accuracy loss allowed at calibration.
        criterion: exit criterion.
        head: head of the early exit.
        mode: runtime execution mode (``eager``, ``script`` or ``compile``), for the plain
            backbone and the early-exit runtime alike.
        size: image side the 8×8 digits are resized to.
        distill: share ``α`` of self-distillation from the final exit in the early exit's loss
            (0: plain joint training).
        threads: torch threads for the whole demo, training and timing alike (0: torch's
            default, one per core). One by default: on a small machine shared with other work,
            two intra-op threads keep waiting for each other whenever the other work holds a
            core (on 2 busy cores, the plain backbone at batch 1 took 6.7 ms a sample on two
            threads against 0.8 ms on one), which swamps the timing and the demo's minute.
        seed: seed for the split, initialisation and training.
        show_progress: progress bars.
    """

    epochs: int = 12
    lr: float = 5e-3
    delta: float = 0.0
    criterion: str = "entropy"
    head: str = "linear"
    mode: str = "script"
    size: int = 16
    distill: float = 0.9
    threads: int = 1
    seed: int = 0
    show_progress: bool = True


def format_results(r: dict[str, Any]) -> str:
    """The demo's text report: one row per exit, then the overall comparison."""
    rows = []
    t = r["timing"]
    times = r["exit_path_time_ratio_batch256"]
    for i, (acc, frac, cost) in enumerate(
        zip(r["exit_accuracy"], r["exit_fractions"], r["exit_relative_cost"], strict=True)
    ):
        leav = r["accuracy_of_leavers"][i]
        rows.append(
            [
                i,
                f"{acc:.4f}",
                f"{frac:.3f}",
                "-" if leav is None else f"{leav:.4f}",
                f"{cost:.3f}",
                f"{times[i]:.3f}",
            ]
        )
    table = format_table(
        [
            "exit",
            "accuracy (all)",
            "share leaving",
            "accuracy (leavers)",
            "C_i / backbone",
            "path time / backbone (b=256)",
        ],
        rows,
    )
    lines = [
        f"network                  {r['network']}",
        f"data                     {r['dataset']}",
        "",
        table,
        "",
        f"final-exit accuracy      {r['final_exit_accuracy']:.4f}",
        f"early-exit accuracy      {r['early_exit_accuracy']:.4f}"
        f"   ({r['criterion']} thresholds {', '.join(f'{t:.4g}' for t in r['thresholds'])})",
        f"oracle accuracy          {r['oracle_accuracy']:.4f}"
        f"   at relative cost {r['oracle_relative_cost']:.3f}",
        f"relative FLOPs           {r['relative_cost']:.3f}"
        f"   ({r['flops_reduction']:.2f}x fewer than the plain backbone)",
        f"wall-clock speedup b=1   {r['speedup_batch1']:.2f}x"
        f"   ({r['plain_us_per_sample_batch1']:.0f} -> "
        f"{r['early_exit_us_per_sample_batch1']:.0f} us/sample)",
        f"wall-clock speedup b=256 {r['speedup_batch256']:.2f}x"
        f"   ({r['plain_us_per_sample_batch256']:.1f} -> "
        f"{r['early_exit_us_per_sample_batch256']:.1f} us/sample, {r['mode']} mode, "
        f"{r['threads']} thread{'' if r['threads'] == 1 else 's'})",
        f"timing                   plain backbone and early-exit runtime interleaved, median "
        f"of {t['repeats']} repeats: {t['batch1_samples']} test samples one at a time, "
        f"{t['large_batches']} batches of {t['batch_size']}",
        f"runtime = simulation     exits {r['runtime_matches_simulation']['exits']:.4f}, "
        f"predictions {r['runtime_matches_simulation']['predictions']:.4f}",
    ]
    return "\n".join(lines)


def run_demo(
    cfg: DemoConfig, *, json_path: str | Path | None = None, plot_path: str | Path | None = None
) -> dict[str, Any]:
    """Train, calibrate and evaluate :func:`~offramp.models.vgg` with an exit after its stem on
    the digits resized to ``cfg.size``.

    Returns the result dict (also written to ``json_path``) and writes the accuracy–cost plot
    to ``plot_path`` when given.
    """
    if cfg.threads < 0:
        raise ConfigError(f"threads must be ≥ 0 (0: torch's default), got {cfg.threads}")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, json_path, plot_path)
    finally:
        torch.set_num_threads(threads)


def _run(
    cfg: DemoConfig, json_path: str | Path | None, plot_path: str | Path | None
) -> dict[str, Any]:
    splits = load_digits_splits(seed=cfg.seed, size=cfg.size)
    net = vgg(cfg.size, 10, exits_after=(0,), head=cfg.head, seed=cfg.seed)
    exp = ExperimentConfig(
        fit=FitConfig(
            epochs=cfg.epochs,
            lr=cfg.lr,
            batch_size=64,
            lr_schedule="cosine",
            seed=cfg.seed,
            show_progress=cfg.show_progress,
        ),
        criterion=cfg.criterion,
        delta=cfg.delta,
        mode=cfg.mode,
    )
    if cfg.distill:
        strategy: Strategy = SelfDistillation(alpha=cfg.distill)
        training = f"joint training with self-distillation (alpha {cfg.distill:g})"
    else:
        strategy, training = JointTraining(), "joint training"
    result = run_experiment(net, splits, exp, strategy=strategy)
    result["config"] = asdict(cfg)
    result["network"] = (
        f"vgg (stem 16-32 channels, blocks of 64 and 128), early exit after the stem "
        f"({cfg.head} head); {cfg.epochs} epochs of {training}"
    )
    result["dataset"] = (
        f"scikit-learn digits (8x8, resized bilinearly to {cfg.size}x{cfg.size}), "
        "stratified 60/20/20 train/val/test"
    )
    result["timing"] = {
        "batch1_samples": exp.batch1_samples,
        "batch_size": exp.batch_size,
        "large_batches": exp.large_batches,
        "repeats": exp.repeats,
    }
    if plot_path is not None:
        rec = ExitRecord.collect(net, splits.test)
        cum = np.asarray(result["costs"]["cumulative"])
        curve = tradeoff_curve(rec, cum, cfg.criterion)
        base = result["costs"]["backbone_flops"] / cum[-1]  # curve is relative to C_L
        curve[:, 0] /= base
        points = {
            "calibrated operating point": (result["relative_cost"], result["early_exit_accuracy"]),
            "oracle (earliest correct exit)": (
                result["oracle_relative_cost"],
                result["oracle_accuracy"],
            ),
            "final exit (plain backbone)": (1.0, result["final_exit_accuracy"]),
        }
        for i, (c, a) in enumerate(
            zip(result["exit_relative_cost"][:-1], result["exit_accuracy"][:-1], strict=True)
        ):
            points[f"exit {i} alone"] = (c, a)
        plot_tradeoff(
            plot_path,
            curve,
            points=points,
            title=f"vgg on digits at {cfg.size}x{cfg.size}: accuracy vs cost",
        )
        result["plot"] = str(plot_path)
    if json_path is not None:
        write_json(json_path, result)
    return result
