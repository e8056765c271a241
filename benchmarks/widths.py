"""How a backbone's width decides what the early-exit runtime can turn into wall-clock.

For the runtime benchmark's residual CNN (``runtime.build``: two basic blocks per stage, exits
after blocks 2 and 4, ``--head`` heads) at each of several widths, with random weights (the
time of a pass does not depend on them), compiled as in the runtime benchmark's faster mode
(``mode="compile"``, 16 batch-size buckets per octave), on batches of 256 Fashion-MNIST test
images:

- **no-exit overhead**: the early-exit runtime with no exit firing / the plain backbone (the
  issue's target: ≤ 1.03). The heads read the exits' feature maps once more; how much that
  costs next to the convolutions depends on channels (map size grows with the width, a 3×3
  convolution's work with its square).
- **each exit's path**: its measured share of the plain backbone's time (its blocks and head,
  same mode) beside its share of the FLOPs (``offramp.costs.profile``). A wide early stage that
  runs fewer FLOPs per second than the later ones makes every early exit save less time than
  FLOPs.
- **ceiling**: for the exit fractions ``--fractions``, the speedup the paths' measured times
  predict over the one their FLOPs predict. The runtime's measured speedup over its FLOPs
  prediction (the target: ≥ 0.9) cannot beat it by more than noise; what the runtime itself
  loses (heads, compaction, smaller batches after an exit) comes on top.

All candidates of one width are timed side by side (``offramp.timing.time_over_batches``,
pass-by-pass ratios, median over ``--repeats`` passes after a warm-up pass).

Usage:
    python benchmarks/widths.py --json results/widths.json

Data: ``$OFFRAMP_DATA/fashion-mnist`` (default ``../shared/data``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import dataset_root
from offramp.allocator import keep_freed_memory
from offramp.costs import profile
from offramp.data import load_mnist
from offramp.files import write_json
from offramp.policies import ThresholdPolicy
from offramp.report import format_table
from offramp.runtime import EarlyExitRuntime
from offramp.timing import paired_ratio
from runtime import batches, build, time_all


def measure(
    widths: tuple[int, ...], head: str, xs: list[torch.Tensor], fractions: np.ndarray, repeats: int
) -> dict[str, Any]:
    """The overhead, path shares and ceiling of one width (see the module docstring)."""
    net = build(0, widths, head).eval()
    if len(fractions) != net.num_exits:
        raise SystemExit(f"--fractions needs {net.num_exits} values, got {len(fractions)}")
    rel_flops = profile(net, xs[0][:1]).cumulative
    rel_flops = rel_flops / rel_flops[-1]
    opts = {"example_input": xs[0][:4], "validate": False, "buckets_per_octave": 16}
    never = EarlyExitRuntime(net, ThresholdPolicy.never(net.num_exits), mode="compile", **opts)
    plain = never.plain_backbone()
    passes = time_all({"plain": plain, "never": never}, xs, repeats)
    paths = time_all({str(i): never.path(i) for i in range(net.num_exits)}, xs, repeats)
    path_s = np.array([statistics.median(paths[str(i)]) for i in range(net.num_exits)])
    rel_time = path_s / path_s[-1]
    latency_pred = 1.0 / float(fractions @ rel_time)
    flops_pred = 1.0 / float(fractions @ rel_flops)
    return {
        "widths": list(widths),
        "overhead_no_exit": paired_ratio(passes["never"], passes["plain"]),
        "overhead_passes": [a / b for a, b in zip(passes["never"], passes["plain"], strict=True)],
        "plain_ms_per_batch": 1000 * statistics.median(passes["plain"]) / len(xs),
        "path_time_share": rel_time.tolist(),
        "path_flops_share": [float(v) for v in rel_flops],
        "latency_predicted_speedup": latency_pred,
        "flops_predicted_speedup": flops_pred,
        "ceiling": latency_pred / flops_pred,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", default="results/widths.json")
    p.add_argument(
        "--widths",
        default="32,64,128;48,96,192;64,128,256",
        help="';'-separated stage widths, one backbone each",
    )
    p.add_argument("--head", default="mixpool")
    p.add_argument(
        "--fractions",
        default="0.9271,0.0447,0.0282",
        help="share of samples leaving at each exit (default: the runtime benchmark's chosen "
        "policy on Fashion-MNIST, widths 32/64/128)",
    )
    p.add_argument("--batches", type=int, default=20, help="test batches of 256 per pass")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    root = dataset_root("fashion-mnist")
    if root is None:
        return 0
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    fractions = np.array([float(v) for v in args.fractions.split(",")])
    if fractions.min() < 0 or abs(fractions.sum() - 1) > 1e-6:
        p.error(f"--fractions must be non-negative and sum to 1, got {fractions.tolist()}")
    xt, _ = load_mnist(root, "test")
    xs = batches(xt, 256)[: args.batches]
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for spec in args.widths.split(";"):
        widths = tuple(int(w) for w in spec.split(","))
        print(f"--- widths {widths}", file=sys.stderr)
        results["x".join(map(str, widths))] = measure(
            widths, args.head, xs, fractions, args.repeats
        )
        out = {"results": results, "args": vars(args), "memory_kept": kept}
        write_json(path, {**out, "torch": torch.__version__})

    def shares(r: dict[str, Any], key: str) -> str:
        return " / ".join(f"{v:.3f}" for v in r[key][:-1])

    rows = [
        [
            name,
            f"{r['plain_ms_per_batch']:.1f}",
            f"{r['overhead_no_exit']:.3f}",
            shares(r, "path_time_share"),
            shares(r, "path_flops_share"),
            f"{r['latency_predicted_speedup']:.2f}x / {r['flops_predicted_speedup']:.2f}x",
            f"{r['ceiling']:.3f}",
        ]
        for name, r in results.items()
    ]
    head = ["widths", "plain ms/256", "no-exit overhead", "exit paths' time share"]
    head += ["FLOPs share", "latency / FLOPs pred.", "ceiling"]
    print(format_table(head, rows))
    print(
        "\nno-exit overhead = runtime with no exit firing / plain backbone (target ≤ 1.03); "
        "ceiling = latency-predicted / FLOPs-predicted speedup for --fractions (the runtime's "
        f"b=256 speedup / FLOPs prediction, target ≥ 0.9, sits below it)\nresults written to {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
