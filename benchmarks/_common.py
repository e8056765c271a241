"""What the benchmarks share: where the data is, and how their CNNs train."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from offramp.training.loop import FitConfig


def dataset_root(name: str) -> Path | None:
    """``$OFFRAMP_DATA/<name>`` (default ``../shared/data``), or ``None`` with a note on stderr
    when it is absent, so the benchmark can skip it."""
    root = Path(os.environ.get("OFFRAMP_DATA", "../shared/data")) / name
    if not root.is_dir():
        print(f"skipped {name}: not found at {root} (set OFFRAMP_DATA)", file=sys.stderr)
        return None
    return root


def cnn_fit_config(args: argparse.Namespace, checkpoint: str) -> FitConfig:
    """AdamW with cosine decay, batch 128, weight decay 5·10⁻⁴, ``args.epochs`` / ``args.lr`` /
    ``args.seed``; checkpointed as ``args.checkpoint_dir/checkpoint`` so a rerun resumes."""
    return FitConfig(
        epochs=args.epochs,
        batch_size=128,
        lr=args.lr,
        weight_decay=5e-4,
        lr_schedule="cosine",
        seed=args.seed,
        show_progress=not args.quiet,
        checkpoint=str(Path(args.checkpoint_dir) / checkpoint),
    )
