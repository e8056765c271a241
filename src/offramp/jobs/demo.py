"""``offramp demo``: B-LeNet with two early exits on scikit-learn's digits, end to end."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offramp.data.digits import load_digits_splits
from offramp.evaluation import ExitRecord
from offramp.files import write_json
from offramp.jobs.experiment import ExperimentConfig, run_experiment
from offramp.models import blenet
from offramp.report import format_table, plot_tradeoff, tradeoff_curve
from offramp.training.loop import FitConfig

__all__ = ["DemoConfig", "format_results", "run_demo"]


@dataclass
class DemoConfig:
    """Settings of the demo (all have command-line flags).

    Attributes:
        epochs: training epochs.
        lr: learning rate.
        delta: accuracy loss allowed at calibration.
        criterion: exit criterion.
        head: head for the two early exits.
        mode: runtime execution mode (``eager`` or ``script``).
        seed: seed for the split, initialisation and training.
        show_progress: progress bars.
    """

    epochs: int = 60
    lr: float = 3e-3
    delta: float = 0.0
    criterion: str = "entropy"
    head: str = "conv"
    mode: str = "script"
    seed: int = 0
    show_progress: bool = True


def format_results(r: dict[str, Any]) -> str:
    """The demo's text report: one row per exit, then the overall comparison."""
    rows = []
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
        f"{r['threads']} threads)",
        f"runtime = simulation     exits {r['runtime_matches_simulation']['exits']:.4f}, "
        f"predictions {r['runtime_matches_simulation']['predictions']:.4f}",
    ]
    return "\n".join(lines)


def run_demo(
    cfg: DemoConfig, *, json_path: str | Path | None = None, plot_path: str | Path | None = None
) -> dict[str, Any]:
    """Train, calibrate and evaluate B-LeNet with exits after blocks 0 and 1 on digits.

    Returns the result dict (also written to ``json_path``) and writes the accuracy–cost plot
    to ``plot_path`` when given.
    """
    splits = load_digits_splits(seed=cfg.seed)
    net = blenet(8, 10, exits_after=(0, 1), head=cfg.head, seed=cfg.seed)
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
    result = run_experiment(net, splits, exp)
    result["config"] = asdict(cfg)
    result["dataset"] = "scikit-learn digits (8x8), stratified 60/20/20 train/val/test"
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
        plot_tradeoff(plot_path, curve, points=points, title="B-LeNet on digits: accuracy vs cost")
        result["plot"] = str(plot_path)
    if json_path is not None:
        write_json(json_path, result)
    return result
