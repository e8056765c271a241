"""Exit policies, calibration and the real early-exit runtime on MNIST and Fashion-MNIST.

For each dataset: a residual CNN (``offramp.models.resnet``, widths ``--widths`` — 32/64/128 by
default; 16/32/64 is a narrow variant whose full-resolution first stage is memory-bound — two
basic blocks per stage, exits after blocks 2 and 4 with ``--head`` heads, by default SDN's
mixed max/avg pooling to a 4×4 grid and a linear layer) is trained jointly for ``--epochs``
(12) epochs on the training images but the last ``--val`` (10,000); every policy family
(entropy, max-prob, margin — plain and temperature-scaled — learned confidence, one shared
threshold, patience) is calibrated on those held-out images for a target accuracy drop of
``--target-drop`` percentage points, required at ``--confidence`` one-sided confidence
*for the chosen family* (a lower confidence bound of the paired accuracy difference, each of
the k families at ``1 − (1 − confidence) / k`` (Bonferroni), since the cheapest of k is
chosen; the plain calibration is reported beside it); the family with the lowest expected cost
*on the calibration split* is chosen (no test-set selection) and reported on the 10,000 test
images: accuracy drop, expected FLOPs relative to the backbone, and the share of the oracle's
saving it captures.

The share of the oracle's saving the chosen policy captures is set beside a ceiling: the best
any family reaches at the same target when its thresholds are fitted on the *test* split itself
(in-sample, so no real calibration can do better with these exits' scores; it measures the
exits, not the calibration).

Then wall-clock, side by side in one run: the plain backbone, the early-exit runtime with no
exit firing, and the runtime with the chosen policy, over the whole test set in batches of
256, with TorchScript (each stage traced, frozen and optimised for inference) and with
torch.compile (frozen, channels-last, each stage exported and compiled ahead of time where it
exports, ``--buckets`` batch-size buckets per octave: 16 by default, so padding adds < 6.25 %
rows; ``--cpp-wrapper`` has Inductor drive the stages from C++); ``--modes`` adds eager mode. The
batches are handed to the candidates eight at a time, each in turn (order shuffled for every
group, each turn starting from one untimed batch), so slow drifts of a shared machine hit all
candidates alike; every ratio is taken pass by pass, and the median over the passes after a
warm-up pass is reported. The fastest early-exit mode is kept, and every ratio is taken
against the *fastest* plain backbone (same-mode ratios are in the JSON too). Each exit's path
is timed as well in that mode, giving the speedup its measured latencies predict (FLOPs
under-count the memory-bound early stage). Bulk inference is timed too: chunks of eight
batches through ``EarlyExitRuntime.map``, where the samples that go on are pooled across the
chunk's batches, so later stages run on full batches instead of a few rows per batch.
Batch-1 latency p50/p95 for plain vs early exit on ``--batch1`` test images. The runtime's
decisions (per batch, pooled, batch 1) are checked against the simulation.

By default glibc is told to keep freed memory (``offramp.allocator.keep_freed_memory``;
``--malloc default`` leaves it alone): with its own thresholds every batch's large
activations are page-faulted in afresh, which cost ~15 % of the plain backbone's time here
and moved every ratio by a few per cent with whatever ran before.

Usage:
    python benchmarks/runtime.py --json results/runtime.json

Data: ``$OFFRAMP_DATA/mnist`` and ``$OFFRAMP_DATA/fashion-mnist`` (default ``../shared/data``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import cnn_fit_config, dataset_root
from offramp.allocator import keep_freed_memory
from offramp.analysis import oracle_saving_captured, oracle_summary
from offramp.calibration import calibrate_policies
from offramp.costs import profile
from offramp.data import load_mnist
from offramp.errors import ConfigError
from offramp.evaluation import ExitRecord, simulate
from offramp.files import write_json
from offramp.models import resnet
from offramp.policies import ThresholdPolicy
from offramp.report import format_table
from offramp.runtime import MODES, EarlyExitRuntime, bucket_size
from offramp.timing import paired_ratio, time_over_batches
from offramp.training import fit

#: Keys every dataset's entry carries (the contract outside checks read).
CONTRACT_KEYS = (
    "overhead_no_exit",
    "speedup_batch256",
    "flops_speedup",
    "oracle_saving_captured",
    "accuracy_drop_pp",
    "calibration_seconds",
)
DATASETS = ("mnist", "fashion-mnist")


def build(seed: int, widths: tuple[int, ...], head: str) -> torch.nn.Module:
    return resnet(28, 10, widths=widths, exits_after=(2, 4), head=head, seed=seed)


def batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[s : s + size] for s in range(0, x.shape[0], size)]


def time_all(
    fns: dict[str, Any], xs: list[Any], repeats: int, group: int = 8
) -> dict[str, list[float]]:
    """Seconds of each pass over all batches ``xs``, per callable (interleaved group by group)."""
    with torch.no_grad():
        return time_over_batches(fns, xs, repeats=repeats, group=group)


def time_batch1(plain, rt, x: torch.Tensor) -> dict[str, list[float]]:
    """Per-sample latencies, plain and early exit interleaved sample by sample, after one
    untimed pass (batch-size-1 variants of the stages each sample reaches compile on first
    use)."""
    out: dict[str, list[float]] = {"plain": [], "early_exit": []}
    with torch.no_grad():
        for i in range(x.shape[0]):
            plain(x[i : i + 1])
            rt.run_one(x[i : i + 1])
        for i in range(x.shape[0]):
            xi = x[i : i + 1]
            for name, fn in (("plain", plain), ("early_exit", rt.run_one)):
                t0 = time.perf_counter()
                fn(xi)
                out[name].append(time.perf_counter() - t0)
    return out


def pooled_timing(
    rt: EarlyExitRuntime, xs: list[torch.Tensor], repeats: int, want: np.ndarray
) -> dict[str, Any]:
    """Bulk inference: the batches in chunks of eight, each chunk a stream whose later stages
    run on pooled rows (``rt.map``), against the plain backbone and the per-batch runtime on
    the same chunks (each turn starts with one untimed chunk)."""
    plain = rt.plain_backbone()
    got = torch.cat([r.exits for r in rt.map(xs)])
    assert np.array_equal(got.numpy(), want), "pooled runtime != simulation"
    chunks = [xs[i : i + 8] for i in range(0, len(xs), 8)]
    passes = time_all(
        {
            "plain": lambda c: [plain(b) for b in c],
            "per_batch": lambda c: [rt(b) for b in c],
            "pooled": lambda c: list(rt.map(c)),
        },
        chunks,
        repeats,
        group=1,
    )
    return {
        "passes": passes,
        "speedup_per_batch": paired_ratio(passes["plain"], passes["per_batch"]),
        "speedup_pooled": paired_ratio(passes["plain"], passes["pooled"]),
        "chunk_batches": 8,
    }


def pct(v: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(v), q))


def run_dataset(name: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    x, y = load_mnist(root, "train")
    xt, yt = load_mnist(root, "test")
    n_train = min(x.shape[0] - args.val, args.train_limit or x.shape[0])
    train, val = (x[:n_train], y[:n_train]), (x[-args.val :], y[-args.val :])
    widths = tuple(int(w) for w in args.widths.split(","))
    net = build(args.seed, widths, args.head)
    tag = "-w" + "x".join(map(str, widths)) + ("" if args.head == "pool" else f"-{args.head}")
    hist = fit(net, train, cnn_fit_config(args, f"{name}{tag}-e{args.epochs}-n{n_train}.pt"))
    net.eval()
    rec_val = ExitRecord.collect(net, val)
    rec_test = ExitRecord.collect(net, (xt, yt))
    prof = profile(net, xt[:1])
    cum = prof.cumulative
    rel = cum / cum[-1]
    delta = args.target_drop / 100
    final_test = float(rec_test.correct()[-1].double().mean())
    plain_cands = calibrate_policies(rec_val, cum, delta=delta)
    plain = min([c for c in plain_cands if c.val_bound >= -delta - 1e-12], key=lambda c: c.val_cost)
    plain_sim = simulate(rec_test, plain.policy)
    per_family = 1 - (1 - args.confidence) / len(plain_cands)  # Bonferroni over the families
    t0 = time.perf_counter()
    cands = calibrate_policies(rec_val, cum, delta=delta, confidence=per_family)
    suite_seconds = time.perf_counter() - t0
    chosen = min([c for c in cands if c.val_bound >= -delta - 1e-12], key=lambda c: c.val_cost)
    sim = simulate(rec_test, chosen.policy)
    acc = rec_test.accuracy(sim.exits)
    cost = float(rel[sim.exits].mean())
    oracle = oracle_summary(rec_test, cum)
    in_sample = [  # thresholds fitted on test: a ceiling for these exits, not a result
        oracle_saving_captured(
            float(rel[simulate(rec_test, c.policy).exits].mean()), oracle["relative_cost"]
        )
        for c in calibrate_policies(rec_test, cum, delta=delta)
    ]
    families = []
    for c in cands:
        s = simulate(rec_test, c.policy)
        families.append(
            {
                "policy": c.name,
                "val_accuracy": c.val_accuracy,
                "val_relative_cost": c.val_cost,
                "test_accuracy_drop_pp": 100 * (final_test - rec_test.accuracy(s.exits)),
                "test_relative_cost": float(rel[s.exits].mean()),
                "calibration_seconds": c.seconds,
            }
        )

    xs = batches(xt, 256)
    fns: dict[str, Any] = {}
    modes = args.modes.split(",")
    for mode in modes:
        ex = xt[:4]
        opts = {"example_input": ex, "validate": False, "buckets_per_octave": args.buckets}
        if mode == "compile":
            opts["cpp_wrapper"] = args.cpp_wrapper
        rt = EarlyExitRuntime(net, chosen.policy, mode=mode, **opts)
        never = EarlyExitRuntime(net, ThresholdPolicy.never(net.num_exits), mode=mode, **opts)
        res = torch.cat([rt(b).exits for b in xs])
        assert np.array_equal(res.numpy(), sim.exits), f"{mode}: runtime != simulation"
        fns[f"plain/{mode}"] = rt.plain_backbone()
        fns[f"never/{mode}"] = never
        fns[f"policy/{mode}"] = rt
    passes = time_all(fns, xs, args.repeats)
    t = {k: statistics.median(v) for k, v in passes.items()}

    def ratio(a: str, b: str) -> float:  # pass by pass, then the median
        return paired_ratio(passes[a], passes[b])

    mode = min(modes, key=lambda m: t[f"policy/{m}"])  # the faster early-exit runtime
    plain_key = min((f"plain/{m}" for m in modes), key=t.__getitem__)  # fastest plain backbone
    timing = {
        "seconds": t,
        "passes": passes,
        "same_mode": {
            m: {
                "overhead_no_exit": ratio(f"never/{m}", f"plain/{m}"),
                "speedup_batch256": ratio(f"plain/{m}", f"policy/{m}"),
            }
            for m in modes
        },
        "plain": plain_key,
    }
    timing["overhead_no_exit"] = ratio(f"never/{mode}", plain_key)
    timing["speedup_batch256"] = ratio(plain_key, f"policy/{mode}")
    rt = fns[f"policy/{mode}"]  # the runtime just timed, already compiled
    pooled = pooled_timing(rt, xs, args.repeats, sim.exits)
    # what the measured latency of each exit's path predicts for this policy (FLOPs cannot see
    # memory-bound layers: the wide early stage costs more time per FLOP than later ones)
    tp = {
        k: statistics.median(v)
        for k, v in time_all(
            {str(i): rt.path(i) for i in range(net.num_exits)}, xs, args.repeats
        ).items()
    }
    frac = np.bincount(sim.exits, minlength=net.num_exits) / len(sim.exits)
    path_seconds = [tp[str(i)] for i in range(net.num_exits)]
    latency_speedup = path_seconds[-1] / float(np.dot(frac, path_seconds))
    same_mode_speedup = timing["same_mode"][mode]["speedup_batch256"]
    lat = time_batch1(rt.plain_backbone(), rt, xt[: args.batch1])
    ee_one = [rt.run_one(xt[i : i + 1])[1] for i in range(args.batch1)]
    assert np.array_equal(np.asarray(ee_one), sim.exits[: args.batch1]), "batch-1 != simulation"
    return {
        "overhead_no_exit": timing["overhead_no_exit"],
        "speedup_batch256": timing["speedup_batch256"],
        "flops_speedup": 1.0 / cost,
        "oracle_saving_captured": oracle_saving_captured(cost, oracle["relative_cost"]),
        "accuracy_drop_pp": 100 * (final_test - acc),
        "calibration_seconds": chosen.seconds,
        "oracle_saving_captured_in_sample_ceiling": max(in_sample),
        "speedup_over_flops_prediction": timing["speedup_batch256"] * cost,
        "speedup_batch256_pooled": pooled["speedup_pooled"],
        "pooled_over_flops_prediction": pooled["speedup_pooled"] * cost,
        "pooled": pooled,
        "latency_speedup": latency_speedup,
        "speedup_over_latency_prediction": same_mode_speedup / latency_speedup,
        "relative_cumulative_latency": [v / path_seconds[-1] for v in path_seconds],
        "mode": mode,
        "timing": timing,
        "batch1": {
            "plain_p50_ms": 1e3 * pct(lat["plain"], 50),
            "plain_p95_ms": 1e3 * pct(lat["plain"], 95),
            "early_exit_p50_ms": 1e3 * pct(lat["early_exit"], 50),
            "early_exit_p95_ms": 1e3 * pct(lat["early_exit"], 95),
            "speedup_mean": statistics.mean(lat["plain"]) / statistics.mean(lat["early_exit"]),
            "samples": args.batch1,
        },
        "policy": chosen.name,
        "policy_description": chosen.policy.to_dict(),  # type: ignore[attr-defined]
        "final_exit_accuracy": final_test,
        "early_exit_accuracy": acc,
        "relative_cost": cost,
        "exit_fractions": np.bincount(sim.exits, minlength=net.num_exits).tolist(),
        "exit_accuracy": rec_test.exit_accuracy().tolist(),
        "oracle": oracle,
        "relative_cumulative_cost": rel.tolist(),
        "policy_families": families,
        "confidence": args.confidence,
        "confidence_per_family": per_family,
        "head": args.head,
        "without_confidence_bound": {
            "policy": plain.name,
            "accuracy_drop_pp": 100 * (final_test - rec_test.accuracy(plain_sim.exits)),
            "relative_cost": float(rel[plain_sim.exits].mean()),
            "oracle_saving_captured": oracle_saving_captured(
                float(rel[plain_sim.exits].mean()), oracle["relative_cost"]
            ),
        },
        "suite_calibration_seconds": suite_seconds,
        "train_seconds": sum(h.seconds for h in hist),
        "train_samples": n_train,
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    head = [
        "dataset",
        "policy",
        "drop pp",
        "FLOPs speedup",
        "b=256 speedup",
        "ratio",
        "pooled (ratio)",
        "latency-pred.",
        "ratio (lat.)",
        "no-exit overhead",
        "oracle captured / ceiling",
        "b=1 p50 plain/EE ms",
        "calib s",
    ]
    rows = []
    for ds, r in results.items():
        b1 = r["batch1"]
        rows.append(
            [
                ds,
                r["policy"],
                f"{r['accuracy_drop_pp']:+.2f}",
                f"{r['flops_speedup']:.2f}x",
                f"{r['speedup_batch256']:.2f}x ({r['mode']})",
                f"{r['speedup_over_flops_prediction']:.2f}",
                f"{r['speedup_batch256_pooled']:.2f}x ({r['pooled_over_flops_prediction']:.2f})",
                f"{r['latency_speedup']:.2f}x",
                f"{r['speedup_over_latency_prediction']:.2f}",
                f"{r['overhead_no_exit']:.3f}",
                f"{r['oracle_saving_captured']:.3f} / "
                f"{r['oracle_saving_captured_in_sample_ceiling']:.3f}",
                f"{b1['plain_p50_ms']:.2f} / {b1['early_exit_p50_ms']:.2f}",
                f"{r['calibration_seconds']:.3f}",
            ]
        )
    return format_table(head, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", default="results/runtime.json")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument(
        "--widths",
        default="32,64,128",
        help="channels of the three stages (16,32,64 = the narrow, memory-bound variant)",
    )
    p.add_argument(
        "--head", default="mixpool", help="early-exit head (offramp.heads.HEADS); pool = global"
    )
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-limit", type=int, default=None, help="use fewer training images")
    p.add_argument(
        "--val",
        type=int,
        default=10_000,
        help="held-out training images to calibrate on (the rest train the network)",
    )
    p.add_argument("--target-drop", type=float, default=0.1, help="percentage points")
    p.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        help="one-sided confidence at which the chosen family's target must hold on the "
        "calibration split (each of the k families is calibrated at 1 - (1 - c) / k)",
    )
    p.add_argument(
        "--modes",
        default="script,compile",
        help=f"runtime modes to time, from {','.join(MODES)} (eager is slowest, never kept)",
    )
    p.add_argument(
        "--buckets",
        type=int,
        default=16,
        help="compile mode: batch-size buckets per octave (EarlyExitRuntime's "
        "buckets_per_octave; 16 pads a stage's rows by < 6.25 %%, the default 4 by < 25 %%, at "
        "the price of more compilations)",
    )
    p.add_argument(
        "--cpp-wrapper",
        action="store_true",
        help="compile mode: Inductor's C++ wrapper for every compiled stage (EarlyExitRuntime's "
        "cpp_wrapper; lower batch-1 latency, longer compilation)",
    )
    p.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="keep: glibc keeps freed memory (offramp.allocator.keep_freed_memory), so batches "
        "are not page-faulted in afresh; default: glibc's own thresholds",
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch1", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default="results/checkpoints/runtime")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        p.error(f"unknown --modes {sorted(unknown)}; choose from {MODES}")
    try:
        bucket_size(1, args.buckets)
    except ConfigError as exc:
        p.error(f"--buckets: {exc}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.malloc == "keep" else False
    results: dict[str, Any] = {}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    for ds in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        root = dataset_root(ds)
        if root is None:
            continue
        print(f"--- {ds}", file=sys.stderr)
        results[ds] = run_dataset(ds, root, args)
        out = {**results, "args": vars(args), "memory_kept": kept, "torch": torch.__version__}
        write_json(path, out)
    if results:
        print(table(results))
        print(
            "\nratio = measured b=256 speedup / FLOPs-predicted speedup (target ≥ 0.9); pooled = "
            "bulk inference, later stages on rows pooled across 8 batches (EarlyExitRuntime.map); "
            "latency-pred. = speedup predicted by each exit path's measured latency, and ratio "
            "(lat.) the same-mode measured speedup over it; no-exit overhead = runtime with no "
            "exit firing / plain backbone (target ≤ 1.03)"
        )
        print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
