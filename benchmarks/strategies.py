"""Every training strategy on Fashion-MNIST, same backbone, comparable budget.

B-LeNet (BranchyNet's main path) with early exits after conv blocks 1 and 2 (BranchyNet's
``conv`` branch as head), trained from the same seeded initialisation by each strategy of
``offramp.training.STRATEGIES``. Budget: ``--epochs`` passes over the 55,000 training images for
the strategies that train everything at once; the stage-by-stage strategies (``layerwise``,
``ib``) get ``ceil(epochs / stages)`` epochs per stage (the same number of passes in total,
each over one stage only); ``heads`` trains the backbone ``--epochs`` epochs, then each early head
``ceil(epochs / 2)`` epochs on cached features. Training wall-clock is measured for each.

Evaluation on the 10,000 test images: per-exit accuracy and final-exit accuracy. Then a
calibrated policy: for each criterion (normalised entropy, max-prob) the per-exit thresholds are
calibrated on 5,000 held-out training images (expected cost minimal subject to accuracy ≥ the
final exit's on that split + a margin m ∈ {0, 0.1, 0.2, 0.3, 0.5} pp) and applied to the test
split. ``relative_cost_at_final_accuracy`` is the expected cost (eq. 12, FLOPs, relative to the
plain backbone) of the cheapest of these calibrated policies whose **test** accuracy is at least
the final exit's test accuracy — ``null`` when none holds up. Choosing among these ten on test
is what the definition asks for and is mildly optimistic; the plain held-out point (m = 0) and
its test accuracy drop are reported beside it, with the oracle's cost for reference.

Usage:
    python benchmarks/strategies.py --json results/strategies.json

Data: ``$OFFRAMP_DATA/fashion-mnist`` (default ``../shared/data/fashion-mnist``).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import dataset_root
from offramp.analysis import oracle_summary
from offramp.calibration import ThresholdCalibrator
from offramp.costs import profile
from offramp.data import load_mnist
from offramp.errors import ConfigError
from offramp.evaluation import ExitRecord, simulate
from offramp.files import write_json
from offramp.models import blenet
from offramp.report import format_table
from offramp.training import STRATEGIES, FitConfig, train

#: Each strategy's own settings in this benchmark (``epochs`` is filled in by ``options_for``).
SETTINGS: dict[str, dict[str, Any]] = {
    "joint": {},
    "combined": {"mode": "softmax"},
    "gated": {},
    "cost": {"beta": 0.5},
    "layerwise": {},
    "heads": {},
    "freezeout": {"t0": 0.5, "spacing": "cubic"},
    "distill": {"temperature": 3.0, "alpha": 0.5},
    "local": {},
    "ib": {"beta": 5.0},
}

#: Extra rows (not part of the contract's ``rows``): variants worth a line in the table.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "heads+sklearn-logistic": ("heads", {"sklearn": "logistic"}),
    "local+feedback-alignment": ("local", {"feedback_alignment": True}),
}


def options_for(strategy: str, base: dict[str, Any], epochs: int, stages: int) -> dict[str, Any]:
    """The benchmark's options for ``strategy`` with the epoch budget filled in."""
    opts = dict(base)
    if strategy in ("layerwise", "ib"):
        opts["epochs_per_stage"] = math.ceil(epochs / stages)
    if strategy == "heads" and "sklearn" not in opts:
        opts["head_epochs"] = math.ceil(epochs / 2)
    return opts


#: Safety margins (percentage points above the final exit's accuracy on the calibration split)
#: of the calibrated policies the benchmark tries, for each criterion.
MARGINS_PP = (0.0, 0.1, 0.2, 0.3, 0.5)


def calibrated_cost(
    val: ExitRecord, test: ExitRecord, cumulative: np.ndarray
) -> tuple[float | None, dict[str, Any]]:
    """The cheapest calibrated policy matching the final exit on test, and every candidate.

    Candidates: for each criterion and each margin ``m`` of :data:`MARGINS_PP`, thresholds
    calibrated on ``val`` for accuracy ≥ final-exit accuracy + ``m`` there (``δ = −m``). The
    ``m = 0`` policy is the plain held-out calibration; the margins buy robustness to the
    val→test gap, and the choice among these few candidates is made on test, as the contract's
    definition asks (a mild optimism, stated in the docs).
    """
    rel = cumulative / cumulative[-1]
    final_test = float(test.correct()[-1].double().mean())
    candidates = []
    for criterion in ("entropy", "max_prob"):
        for m in MARGINS_PP:
            try:
                cal = ThresholdCalibrator(criterion, delta=-m / 100).fit(val, rel)
            except ConfigError:  # no thresholds reach that margin on val
                continue
            summ = test.summary(simulate(test, cal.policy_).exits, rel)
            candidates.append(
                {
                    "criterion": criterion,
                    "margin_pp": m,
                    "thresholds": list(cal.thresholds_),
                    "val_accuracy": cal.accuracy_,
                    "test_accuracy": summ["accuracy"],
                    "relative_cost": summ["expected_cost"],
                    "exit_fractions": summ["exit_fractions"],
                    "accuracy_drop_pp": 100 * (final_test - summ["accuracy"]),
                }
            )
    ok = [c for c in candidates if c["test_accuracy"] >= final_test]
    best = min(ok, key=lambda c: c["relative_cost"]) if ok else None
    plain = [c for c in candidates if c["margin_pp"] == 0.0]
    oracle = oracle_summary(test, rel)["relative_cost"]
    return (None if best is None else best["relative_cost"]), {
        "chosen": best,
        "at_margin_0": min(plain, key=lambda c: c["relative_cost"]) if plain else None,
        "candidates": candidates,
        "oracle_relative_cost": oracle,
    }


def run_one(
    name: str, strategy: str, opts: dict[str, Any], data: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Train one strategy from the common initialisation and evaluate it."""
    net = blenet(28, 10, exits_after=(0, 1), head="conv", seed=args.seed)
    stages = net.num_exits
    opts = options_for(strategy, opts, args.epochs, stages)
    cfg = FitConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule="constant" if strategy == "freezeout" else "cosine",  # freezeout: eq. 10
        seed=args.seed,
        show_progress=not args.quiet,
        checkpoint=str(Path(args.checkpoint_dir) / f"{name}-e{args.epochs}-s{args.seed}.pt"),
    )
    t0 = time.perf_counter()
    history = train(net, data["train"], cfg, strategy, options=opts)
    wall = time.perf_counter() - t0
    train_seconds = float(sum(h.seconds for h in history))  # resumed epochs count as measured
    test = ExitRecord.collect(net, data["test"])
    val = ExitRecord.collect(net, data["val"])
    cum = profile(net, data["test"][0][:1]).cumulative
    best, cal = calibrated_cost(val, test, cum)
    acc = test.exit_accuracy().tolist()
    return {
        "strategy": strategy,
        "name": name,
        "options": opts,
        "final_accuracy": acc[-1],
        "exit_accuracies": acc,
        "train_seconds": train_seconds,
        "wall_seconds_this_run": wall,
        "epoch_seconds": [h.seconds for h in history],
        "relative_cost_at_final_accuracy": best,
        "calibrated": cal,
        "relative_cumulative_cost": (cum / cum[-1]).tolist(),
    }


def table(rows: list[dict[str, Any]]) -> str:
    header = [
        "strategy",
        "exit 1",
        "exit 2",
        "final",
        "train s",
        "cost @ final acc",
        "margin",
        "cost @ m=0 (drop pp)",
        "oracle",
    ]
    body = []
    for r in rows:
        a = r["exit_accuracies"]
        c, cal = r["relative_cost_at_final_accuracy"], r["calibrated"]
        chosen, plain = cal["chosen"], cal["at_margin_0"]
        body.append(
            [
                r["name"],
                f"{a[0]:.4f}",
                f"{a[1]:.4f}",
                f"{a[-1]:.4f}",
                f"{r['train_seconds']:.0f}",
                "none" if c is None else f"{c:.3f}",
                "-" if chosen is None else f"{chosen['margin_pp']:.1f} pp",
                "-"
                if plain is None
                else f"{plain['relative_cost']:.3f} ({plain['accuracy_drop_pp']:+.2f})",
                f"{cal['oracle_relative_cost']:.3f}",
            ]
        )
    return format_table(header, body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", default="results/strategies.json", help="output JSON path")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset")
    p.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--val", type=int, default=5000, help="training images held out to calibrate")
    p.add_argument("--train-limit", type=int, default=None, help="use fewer training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint-dir", default="results/checkpoints/strategies")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)

    root = dataset_root("fashion-mnist")
    if root is None:
        return 0
    x, y = load_mnist(root, "train")
    n_train = x.shape[0] - args.val
    if args.train_limit is not None:
        n_train = min(n_train, args.train_limit)
    data = {
        "train": (x[:n_train], y[:n_train]),
        "val": (x[-args.val :], y[-args.val :]),
        "test": load_mnist(root, "test"),
    }
    wanted = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(STRATEGIES))
    if unknown:
        p.error(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    jobs = [(s, s, SETTINGS[s]) for s in wanted]
    if args.variants:
        jobs += [(n, s, o) for n, (s, o) in VARIANTS.items() if s in wanted]
    out: dict[str, Any] = {"rows": [], "variants": [], "args": vars(args)}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    for name, strategy, opts in jobs:
        print(f"--- {name}", file=sys.stderr)
        row = run_one(name, strategy, opts, data, args)
        out["rows" if name == strategy else "variants"].append(row)
        write_json(path, out)  # after every strategy: nothing lost
    out["environment"] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    write_json(path, out)
    print()
    print(table(out["rows"] + out["variants"]))
    print(
        "\naccuracies on the 10,000 test images; cost = expected FLOPs / plain backbone FLOPs of "
        "the cheapest policy calibrated on held-out data (margin above the final exit's "
        "accuracy there) whose test accuracy matches the final exit ('none': none held up); "
        "m=0: the plain calibration (δ = 0) and its test accuracy drop; oracle = earliest "
        "correct exit"
    )
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
