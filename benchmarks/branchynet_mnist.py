"""Reproduce BranchyNet's Table I B-LeNet row on real MNIST.

BranchyNet (Teerapittayanon, McDanel, Kung, ICPR 2016), Table I, B-LeNet on MNIST, CPU:
baseline 99.20 %, BranchyNet 99.25 %, 5.4× speedup, 94.3 % of samples leaving at the branch.

We train B-LeNet (BranchyNet's main path, one exit after the first conv block) jointly, once
with BranchyNet's own branch (``conv`` head) and once per cheaper head from the zoo, calibrate
the exit threshold on 5,000 held-out training images (accuracy ≥ final exit's − δ), and report
on the 10,000 test images: accuracy, exit shares, FLOPs reduction and wall-clock speedup at batch
1 and batch 256 — plain backbone and early-exit runtime in the same execution mode and thread
count, timed interleaved in one run (median of repeats after warm-up).

Usage:
    python benchmarks/branchynet_mnist.py --json results/branchynet_mnist.json

Data: ``$OFFRAMP_DATA/mnist`` (default ``../shared/data/mnist``) with the four IDX files.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

from offramp import files
from offramp.data import Splits, load_mnist
from offramp.jobs.experiment import CONTRACT_KEYS, ExperimentConfig, run_experiment
from offramp.models import blenet
from offramp.report import format_table
from offramp.runtime import MODES
from offramp.training import FitConfig

PAPER = {
    "final_exit_accuracy": 0.9920,
    "early_exit_accuracy": 0.9925,
    "exit_fractions": [0.943, 0.057],
    "speedup_cpu": 5.4,
}


def mnist_splits(root: Path, val: int, train_limit: int | None) -> Splits:
    x, y = load_mnist(root, "train")
    xt, yt = load_mnist(root, "test")
    n_train = x.shape[0] - val
    if train_limit is not None:
        n_train = min(n_train, train_limit)
    return Splits(train=(x[:n_train], y[:n_train]), val=(x[-val:], y[-val:]), test=(xt, yt))


def write_json(results: dict[str, dict], args: argparse.Namespace) -> Path:
    """Write the JSON contract: top level = the run with the largest FLOPs reduction."""
    best = max(results.values(), key=lambda r: r["flops_reduction"])
    out = {
        **{k: best[k] for k in CONTRACT_KEYS},
        "head": best["head"],
        "paper": PAPER,
        "runs": results,
        "args": vars(args),
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, out)
    return path


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    """Print the paper's row beside ours."""
    header = ["", "final acc", "early-exit acc", "at branch", "FLOPs red.", "b=1", "b=256"]
    rows: list[list[object]] = [
        [
            "BranchyNet (paper)",
            f"{PAPER['final_exit_accuracy']:.4f}",
            f"{PAPER['early_exit_accuracy']:.4f}",
            f"{PAPER['exit_fractions'][0]:.3f}",
            "-",
            f"{PAPER['speedup_cpu']:.1f}x (CPU)",
            "-",
        ]
    ]
    for head, r in results.items():
        rows.append(
            [
                f"offramp, {head} head",
                f"{r['final_exit_accuracy']:.4f}",
                f"{r['early_exit_accuracy']:.4f}",
                f"{r['exit_fractions'][0]:.3f}",
                f"{r['flops_reduction']:.2f}x",
                f"{r['speedup_batch1']:.2f}x",
                f"{r['speedup_batch256']:.2f}x",
            ]
        )
    print()
    print(format_table(header, rows))
    print(
        f"\nmode={args.mode}, threads={torch.get_num_threads()}, torch {torch.__version__}; "
        "speedups are plain backbone / early-exit runtime wall-clock, same mode and threads"
    )
    print(f"results written to {args.json}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", default="results/branchynet_mnist.json", help="output JSON path")
    p.add_argument("--heads", default="conv,linear", help="comma-separated early-exit heads")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--delta", type=float, default=0.0, help="accuracy loss allowed on val")
    p.add_argument("--criterion", default="entropy", choices=["entropy", "max_prob"])
    p.add_argument("--mode", default="script", choices=MODES)
    p.add_argument("--val", type=int, default=5000, help="training images held out to calibrate")
    p.add_argument("--train-limit", type=int, default=None, help="use fewer training images")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default="results/checkpoints")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    root = Path(os.environ.get("OFFRAMP_DATA", "../shared/data")) / "mnist"
    if not root.is_dir():
        print(f"skipped: MNIST not found at {root} (set OFFRAMP_DATA)", file=sys.stderr)
        return 0
    splits = mnist_splits(root, args.val, args.train_limit)
    results: dict[str, dict] = {}
    for head in args.heads.split(","):
        t0 = time.perf_counter()
        net = blenet(28, 10, exits_after=(0,), head=head, seed=args.seed)
        ckpt = Path(args.checkpoint_dir) / (
            f"blenet_{head}_e{args.epochs}_lr{args.lr:g}_wd{args.weight_decay:g}_s{args.seed}.pt"
        )
        cfg = ExperimentConfig(
            fit=FitConfig(
                epochs=args.epochs,
                batch_size=64,
                lr=args.lr,
                weight_decay=args.weight_decay,
                lr_schedule="cosine",
                seed=args.seed,
                checkpoint=str(ckpt),
                show_progress=not args.quiet,
            ),
            criterion=args.criterion,
            delta=args.delta,
            mode=args.mode,
            repeats=args.repeats,
        )
        r = run_experiment(net, splits, cfg)
        r["head"] = head
        r["wall_seconds"] = time.perf_counter() - t0
        results[head] = r
        write_json(results, args)  # after every head: nothing is lost if a later one fails

    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
