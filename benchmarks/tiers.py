"""Across tiers (issue 20): what the wire and the device's runtime cost, measured.

Sections (``--only``, comma-separated; default all):

- ``codecs``: each activation codec's bytes per forwarded sample against the accuracy lost,
  on the 10,000 test images, the network cut after its first exit (the device runs stage 0)
  and, for the Fashion-MNIST network, after its second too. Requests of one sample each, as a
  device sends them (int8's scale is one sample's). Goal: int8 ≥ 3.5× fewer bytes than fp32
  at ≤ 0.1 pp accuracy lost.
- ``onnx``: B-LeNet on MNIST at batch 1 and 256 in every runtime mode (eager, TorchScript,
  Inductor, ONNX Runtime): plain backbone against the early-exit runtime, same mode and
  threads, interleaved (``offramp.jobs.experiment.measure_speedups``).

Networks: B-LeNet (BranchyNet's exit after block 0, linear head) on MNIST, and B-LeNet with
exits after blocks 0 and 1 on Fashion-MNIST; trained jointly (AdamW, cosine, ``--epochs``) on
the first 55,000 training images, checkpointed under ``--checkpoint-dir``; the entropy
threshold calibrated on the last 5,000 (accuracy ≥ the final exit's, δ = 0).

Usage:
    python tiers.py --json results/tiers.json [--only codecs,onnx]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _common import cnn_fit_config, dataset_root
from offramp import EarlyExitRuntime, ExitRecord, files
from offramp.calibration import calibrate_policies
from offramp.costs import cumulative_costs
from offramp.data import load_mnist
from offramp.jobs.experiment import measure_speedups
from offramp.models import blenet
from offramp.report import format_table
from offramp.runtime import MODES
from offramp.tiers import CODECS, codec_report
from offramp.training import fit

NETWORKS = {"mnist": (0,), "fashion-mnist": (0, 1)}


def trained(name: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The network for dataset ``name``, trained (or resumed from its checkpoint), with its
    calibrated entropy policy and the test split."""
    root = dataset_root(name)
    if root is None:
        return None
    x, y = load_mnist(root, "train")
    xt, yt = load_mnist(root, "test")
    val = 5000
    net = blenet(28, 10, exits_after=NETWORKS[name], head="linear", seed=args.seed)
    t0 = time.perf_counter()
    fit(net, (x[:-val], y[:-val]), cnn_fit_config(args, f"tiers-{name}.pt"))
    net.eval()
    record = ExitRecord.collect(net, (x[-val:], y[-val:]))
    cum = cumulative_costs(net, xt[:256], "flops")
    chosen = next(c for c in calibrate_policies(record, cum, delta=0.0) if c.name == "entropy")
    return {
        "name": name,
        "net": net,
        "policy": chosen.policy,
        "test": (xt, yt),
        "train_seconds": time.perf_counter() - t0,
    }


def codecs_section(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for m in models:
        xt, yt = m["test"]
        for split in range(1, m["net"].num_exits):
            t0 = time.perf_counter()
            for r in codec_report(m["net"], m["policy"], xt, yt, split, codecs=list(CODECS)):
                rows.append({"dataset": m["name"], "split": split, **r})
            print(f"  codecs {m['name']} split {split}: {time.perf_counter() - t0:.0f} s")
    return rows


def onnx_section(m: dict[str, Any], modes: list[str]) -> list[dict[str, Any]]:
    xt, _ = m["test"]
    rows = []
    for mode in modes:
        t0 = time.perf_counter()
        rt = EarlyExitRuntime(m["net"], m["policy"], mode=mode, example_input=xt[:2])
        sp = measure_speedups(rt, xt, batch1_samples=300, batch_size=256, repeats=7)
        share = float((rt(xt[:2000]).exits == 0).double().mean())
        row = {"dataset": m["name"], "mode": mode, "exit0_share": share, **sp}
        if mode == "onnx":  # the whole network as one ONNX graph, compaction inside it
            row["fused_us_per_sample_batch1"] = fused_batch1(m, rt)
        rows.append(row)
        print(f"  onnx section, mode {mode}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def fused_batch1(m: dict[str, Any], rt: EarlyExitRuntime, samples: int = 300) -> float:
    """Batch-1 µs per sample of the network exported as one segment (one ONNX Runtime call
    per sample, the exit decided inside the graph), timed beside the plain backbone."""
    from offramp.export import OrtModule, segments, to_onnx
    from offramp.timing import compare_wallclock

    xt, _ = m["test"]
    policy = m["policy"]
    seg = segments(m["net"], policy, [])[0]
    fused = OrtModule(*to_onnx(seg, (xt[:2], policy.initial_state(2))))
    state = policy.initial_state(1)
    one = [xt[i : i + 1] for i in range(samples)]
    plain = rt.plain_backbone()

    def run_fused() -> None:
        for x in one:
            logits, exits = fused(x, state)
            int(logits[0].argmax()), int(exits[0])

    def run_plain() -> None:
        for x in one:
            plain(x)

    with torch.no_grad():
        t = compare_wallclock({"fused": run_fused, "plain": run_plain}, repeats=7)
    return 1e6 * t["fused"] / samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--only", default="codecs,onnx", help="sections: codecs,onnx")
    p.add_argument("--modes", default=",".join(MODES), help=f"runtime modes ({','.join(MODES)})")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default="results/checkpoints")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sections = set(args.only.split(","))
    t_start = time.perf_counter()
    models = [m for m in (trained(n, args) for n in NETWORKS) if m is not None]
    if not models:
        print("no dataset found: nothing measured", file=sys.stderr)
        return 1
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "args": vars(args),
        "networks": {
            m["name"]: {
                "thresholds": list(m["policy"].thresholds),
                "train_seconds": m["train_seconds"],
            }
            for m in models
        },
    }
    if "codecs" in sections:
        rows = codecs_section(models)
        out["codecs"] = rows
        print(
            format_table(
                [
                    "dataset",
                    "split",
                    "codec",
                    "bytes/sample",
                    "× fewer",
                    "sent",
                    "accuracy",
                    "drop pp",
                    "pred. changed",
                ],
                [
                    [
                        r["dataset"],
                        r["split"],
                        r["codec"],
                        f"{r['bytes_per_sample']:.0f}",
                        f"{r['ratio_to_fp32']:.2f}",
                        f"{r['forwarded']:.3f}",
                        f"{r['accuracy']:.4f}",
                        f"{r['accuracy_drop_pp']:+.2f}",
                        r["predictions_changed"],
                    ]
                    for r in rows
                ],
            )
        )
    if "onnx" in sections and models[0]["name"] == "mnist":
        rows = onnx_section(models[0], args.modes.split(","))
        out["onnx"] = rows
        print(
            format_table(
                [
                    "mode",
                    "plain µs b=1",
                    "early exit µs b=1",
                    "speedup b=1",
                    "plain µs b=256",
                    "early exit µs b=256",
                    "speedup b=256",
                    "exit 0",
                ],
                [
                    [
                        r["mode"],
                        f"{r['plain_us_per_sample_batch1']:.0f}",
                        f"{r['early_exit_us_per_sample_batch1']:.0f}",
                        f"{r['speedup_batch1']:.2f}",
                        f"{r['plain_us_per_sample_batch256']:.1f}",
                        f"{r['early_exit_us_per_sample_batch256']:.1f}",
                        f"{r['speedup_batch256']:.2f}",
                        f"{r['exit0_share']:.3f}",
                    ]
                    for r in rows
                ],
            )
        )
        for r in rows:
            if "fused_us_per_sample_batch1" in r:
                f = r["fused_us_per_sample_batch1"]
                print(
                    f"onnx, the network as one graph: {f:.0f} µs at batch 1 "
                    f"({r['plain_us_per_sample_batch1'] / f:.2f}x the plain backbone's)"
                )
    out["seconds"] = time.perf_counter() - t_start
    if args.json:
        print(f"wrote {files.write_json(Path(args.json), out)}")
    print(f"took {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
