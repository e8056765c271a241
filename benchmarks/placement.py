"""Where to put the exits: every placement rule on a 10-block residual CNN, Fashion-MNIST.

The backbone (``offramp.models.resnet``, widths 16/32/64, three basic blocks per stage: block
0 is the stem, blocks 1–9 residual) is trained with its final exit only on 55,000 training
images. For each head design of ``--heads`` — SDN's mixed-pooling head (``mixpool``, the
contract's ``rows``), BranchyNet's conv branch (``conv``, costly at full resolution) and global
average pooling (``pool``) — a head is put after every block boundary (nine candidates,
blocks 0–8) and trained on the frozen backbone for ``--head-epochs`` epochs on
``--head-limit`` images (the quick estimate of each candidate's share ``γ_i``). Every rule
(``offramp.placement``) picks its exits and is calibrated on the 5,000 held-out training
images — one shared max-prob threshold, the cheapest whose accuracy is within
``--target-drop`` pp of the final exit's — and reported on the 10,000 test images: the exits,
expected cost relative to the plain backbone, and accuracy. Cost is FLOPs for the contract
rows, and measured seconds per sample (batch 256) for a second table.

Usage:
    python benchmarks/placement.py --json results/placement.json

Data: ``$OFFRAMP_DATA/fashion-mnist`` (default ``../shared/data``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import cnn_fit_config, dataset_root
from offramp.data import load_mnist
from offramp.evaluation import ExitRecord
from offramp.files import write_json
from offramp.models import resnet
from offramp.placement import (
    PlacementRecord,
    candidate_costs,
    exhaustive,
    members,
    operating_points,
    place,
    placement_table,
    train_candidate_heads,
    with_candidate_exits,
)
from offramp.report import format_table
from offramp.training.loop import fit


def train_backbone(x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> Any:
    net = resnet(28, 10, widths=(16, 32, 64), blocks_per_stage=(3, 3, 3), exits_after=(),
                 seed=args.seed)  # fmt: skip
    hist = fit(net, (x, y), cnn_fit_config(args, f"backbone-e{args.epochs}-n{len(y)}.pt"))
    return net, sum(h.seconds for h in hist)


def same_size_check(cands: Any, val: ExitRecord, spaced: dict[str, Any], delta: float) -> dict:
    """Exhaustive search restricted to as many exits as FLOPs spacing kept, on the same
    validation record: never more expensive by construction; reported as a check."""
    rec = PlacementRecord.from_exit_record(val, "max_prob")
    size = len(spaced["candidates"])
    best = exhaustive(cands, rec, delta, size=size)
    sp = operating_points(cands, rec, np.array([sum(1 << j for j in spaced["candidates"])]), delta)
    return {
        "exits": size,
        "flops_spacing_val_cost": sp[0].cost,
        "exhaustive_val_cost": best.cost,
        "exhaustive_exits": [cands.blocks[j] for j in members(best.subset, cands.num)],
    }


def run_head(
    head: str, backbone: Any, train: Any, val: Any, test: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Candidates with ``head`` heads after blocks 0–8, trained on the frozen backbone; every
    rule with cost in FLOPs and in measured seconds."""
    cand = with_candidate_exits(backbone, head, seed=args.seed)
    t0 = time.perf_counter()
    train_candidate_heads(
        cand,
        train,
        epochs=args.head_epochs,
        limit=args.head_limit,
        lr=args.lr,
        seed=args.seed,
        memory_budget_mb=4096,
        show_progress=not args.quiet,
    )
    head_seconds = time.perf_counter() - t0
    cand.eval()
    rec_val, rec_test = ExitRecord.collect(cand, val), ExitRecord.collect(cand, test)
    delta = args.target_drop / 100
    final = float(rec_test.correct()[-1].double().mean())
    out: dict[str, Any] = {"final_accuracy": final, "head_seconds": head_seconds}
    out["candidates"] = [
        {"block": b, "val_accuracy": float(a), "test_accuracy": float(t)}
        for b, a, t in zip(
            cand.exit_blocks, rec_val.exit_accuracy(), rec_test.exit_accuracy(), strict=True
        )
    ]
    text = [
        format_table(
            ["candidate block", "val acc %", "test acc %"],
            [
                [c["block"], f"{100 * c['val_accuracy']:.2f}", f"{100 * c['test_accuracy']:.2f}"]
                for c in out["candidates"]
            ],
        ),
        f"final exit test accuracy {100 * final:.2f} %, target drop {args.target_drop} pp",
    ]
    for cost in ("flops", "latency"):
        cands = candidate_costs(cand, val[0][:256], cost, repeats=7)
        t0 = time.perf_counter()
        placements = place(cands, rec_val, rec_test, delta=delta)
        rows = [pl.to_dict() for pl in placements]
        # every rule's exits at *equal test accuracy*: the cheapest shared threshold whose test
        # accuracy is within the target of the final exit's (chosen on test, so optimistic
        # for every rule alike; the calibrated rows above are the honest prediction)
        on_test = PlacementRecord.from_exit_record(rec_test, "max_prob")
        masks = np.array([sum(1 << j for j in r["candidates"]) for r in rows], dtype=np.int64)
        for r, pt in zip(rows, operating_points(cands, on_test, masks, delta), strict=True):
            r["cost_at_equal_test_accuracy"] = pt.cost
            r["equal_test_accuracy"] = pt.accuracy
        out["rows" if cost == "flops" else "latency_rows"] = rows
        out[f"{cost}_place_seconds"] = time.perf_counter() - t0
        out[f"{cost}_candidates"] = {
            "blocks": list(cands.blocks),
            "block_costs": cands.block_costs.tolist(),
            "head_costs": cands.head_costs.tolist(),
            "unit": cands.unit,
        }
        if cost == "flops":
            spaced = next(r for r in rows if r["rule"] == "flops_spacing")
            out["same_size_check"] = same_size_check(cands, rec_val, spaced, delta)
        eq = ", ".join(f"{r['rule']} {r['cost_at_equal_test_accuracy']:.3f}" for r in rows)
        text.append(
            f"cost = {cost}\n" + placement_table(placements, final)
            + f"\ncost at equal test accuracy (≥ final − target): {eq}"
        )  # fmt: skip
    text.append(f"same-size check: {out['same_size_check']}")
    out["text"] = "\n\n".join(text)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", default="results/placement.json")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--val", type=int, default=5000)
    p.add_argument(
        "--heads", default="mixpool,conv,pool", help="head designs; the first gives `rows`"
    )
    p.add_argument("--head-epochs", type=int, default=3)
    p.add_argument("--head-limit", type=int, default=10_000)
    p.add_argument("--target-drop", type=float, default=0.5, help="percentage points")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default="results/checkpoints/placement")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = dataset_root("fashion-mnist")
    if root is None:
        return 0
    x, y = load_mnist(root, "train")
    xt, yt = load_mnist(root, "test")
    n_train = min(x.shape[0] - args.val, args.train_limit or x.shape[0])
    train, val = (x[:n_train], y[:n_train]), (x[-args.val :], y[-args.val :])
    backbone, train_seconds = train_backbone(*train, args)
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    out: dict[str, Any] = {"train_seconds": train_seconds, "by_head": {}}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    for head in heads:
        print(f"--- {head} heads", file=sys.stderr)
        r = run_head(head, backbone, train, val, (xt, yt), args)
        out["by_head"][head] = r
        if head == heads[0]:  # the contract's rows: the first head design
            out.update(head=head, rows=r["rows"], final_accuracy=r["final_accuracy"])
        out.update(args=vars(args), torch=torch.__version__)
        write_json(path, out)
        print(f"\n=== {head} heads", r["text"], sep="\n")
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
