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
- ``links``: per dataset and link (``offramp.tiers.LINKS``), the planned system (exits, split,
  int8 on the wire, hedged where the plan says so) against all on the device, all in the
  cloud, and the best split without exits; the device an emulated ``--device-mflops`` CPU, the
  server ``offramp serve`` in its own process behind a ``LinkRelay`` (or ``tc tbf`` with
  ``--kernel-shaping``); ``--link-samples`` test images, one request each. Goal: lower mean and
  p95 than every baseline at ≤ 0.5 pp accuracy lost.
- ``faults``: ``--clients`` devices in closed loop for ``--load-seconds`` on the middle link;
  the cloud killed a third of the way in and restarted at two thirds.

Networks: B-LeNet (BranchyNet's exit after block 0, linear head) on MNIST, and B-LeNet with
exits after blocks 0 (linear head) and 1 (MLP head) on Fashion-MNIST — with linear heads at
both, even thresholds picked on the test set itself leave 6–7 % of the images to the final exit
at a 0.5 pp budget, so no plan can bring the p95 below the device's full path on a slow link;
the MLP head brings exit 1 to the final exit's accuracy. Trained jointly (AdamW, cosine,
``--epochs``) on the first 55,000 training images, checkpointed under ``--checkpoint-dir``; the
entropy threshold calibrated on the last 5,000 (accuracy ≥ the final exit's, δ = 0).

Usage:
    python tiers.py --json results/tiers.json [--only codecs,onnx]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import _netns
from _common import cnn_fit_config, dataset_root
from _tiers import (
    EmulatedDevice,
    cloud_answer,
    median,
    percentiles,
    served,
    tiered_answer,
    time_requests,
)
from offramp import EarlyExitRuntime, ExitRecord, ThresholdPolicy, files, profile
from offramp.calibration import calibrate_policies
from offramp.costs import cumulative_costs
from offramp.data import load_mnist
from offramp.export import export_segments, load_bundle
from offramp.jobs.experiment import measure_speedups
from offramp.models import blenet
from offramp.policies import decide_from_logits
from offramp.report import format_table
from offramp.runtime import MODES
from offramp.tiers import (
    CODECS,
    LINKS,
    Link,
    LinkRelay,
    ServeProcess,
    TierClient,
    TierCosts,
    TieredRuntime,
    codec_report,
    plan,
    sample_latencies,
    stage_seconds,
)
from offramp.tiers.link import OVERHEAD_BYTES
from offramp.tiers.messages import pack_reply, pack_request
from offramp.training import fit

#: Per dataset: the blocks with an exit, their heads, the checkpoint's name.
NETWORKS = {
    "mnist": ((0,), "linear", "tiers-mnist.pt"),
    "fashion-mnist": ((0, 1), ("linear", "mlp"), "tiers-fashion-mnist-mlp1.pt"),
}


def trained(name: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The network for dataset ``name``, trained (or resumed from its checkpoint), with its
    calibrated entropy policy and the test split."""
    root = dataset_root(name)
    if root is None:
        return None
    x, y = load_mnist(root, "train")
    xt, yt = load_mnist(root, "test")
    val = 5000
    exits_after, heads, checkpoint = NETWORKS[name]
    net = blenet(28, 10, exits_after=exits_after, head=heads, seed=args.seed)
    t0 = time.perf_counter()
    fit(net, (x[:-val], y[:-val]), cnn_fit_config(args, checkpoint))
    return calibrated(name, net.eval(), (x[-val:], y[-val:]), (xt, yt), xt[:256], t0)


def calibrated(
    name: str,
    net: Any,
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    flops_input: torch.Tensor,
    t0: float,
    **extra: Any,
) -> dict[str, Any]:
    """What the sections take of a trained network: its validation record, the entropy policy
    calibrated on it (accuracy ≥ the final exit's, costs in FLOPs of ``flops_input``), the
    splits, the seconds since ``t0``, and ``extra``."""
    record = ExitRecord.collect(net, val)
    cum = cumulative_costs(net, flops_input, "flops")
    chosen = next(c for c in calibrate_policies(record, cum, delta=0.0) if c.name == "entropy")
    return {
        "name": name,
        "net": net,
        "policy": chosen.policy,
        "test": test,
        "val": val,
        "record": record,
        "train_seconds": time.perf_counter() - t0,
        **extra,
    }


#: The text network: its name in ``--datasets``, and the tokens every input is padded to (the
#: exported segments compute all of them, so the emulated device is charged for all of them).
MINILM, TEXT_TOKENS = "sst2-minilm", 64


def trained_minilm(args: argparse.Namespace) -> dict[str, Any] | None:
    """``families.py``'s MiniLM on SST-2 (exits after its six layers; fine-tuned on all 67,349
    training phrases for one epoch — 78 minutes here — or its checkpoint under
    ``--checkpoint-dir``/families), inputs padded to ``TEXT_TOKENS``; the device is
    ``--text-device-gflops`` fast, and the plan keeps ``--text-delta`` (default 0) on dev: with
    872 sentences, dev's exit accuracies do not carry over (there the final exit is 0.5 pp
    worse than layer 5, on test 0.3 pp better), so a 0.5 pp target on dev loses 1.4 pp on
    test even at the 95 % bound, as families.py found."""
    from families import minilm_sst2

    t0 = time.perf_counter()
    got = minilm_sst2(0, 1, Path(args.checkpoint_dir) / "families", quiet=args.quiet)
    if got is None:
        return None
    net, pad = got["net"].eval(), got["pad_token_id"]

    def fixed(ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(ids, (0, TEXT_TOKENS - ids.shape[1]), value=pad)

    (xv, yv), (xt, yt) = got["val"], got["test"]
    full = torch.full((1, TEXT_TOKENS), pad + 1000)  # no padding: what the segments compute
    return calibrated(
        MINILM,
        net,
        (fixed(xv), yv),
        (fixed(xt), yt),
        full,
        t0,
        device_mflops=1e3 * args.text_device_gflops,
        full_input=full,
        delta=args.text_delta,
    )


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


# ------------------------------------------------------------------------------ links section


def flops_tables(net: Any, x: Any) -> dict[str, Any]:
    """Per-sample FLOPs: ``cum[i]`` to reach exit ``i`` (heads on the way included),
    ``bodies[k]`` of the blocks before stage ``k`` (no heads), ``plain`` of the backbone."""
    p = profile(net, x[:1])
    cum = np.asarray(p.cumulative, dtype=float)
    blocks = np.cumsum([0.0, *p.block_flops])
    ends = [b + 1 for b in p.exit_blocks]  # blocks before stage k+1 end at exit_blocks[k]
    bodies = np.array([0.0, *[blocks[e] for e in ends]])
    return {"cum": cum, "bodies": bodies, "plain": float(p.backbone_flops)}


def measure_tier_costs(
    m: dict[str, Any],
    fl: dict[str, Any],
    rate: float,
    codec: str,
    whole: ServeProcess,
    token: str,
) -> TierCosts:
    """Device stages from FLOPs at ``rate``; server stages measured here at the server's one
    thread; a request's fixed cost measured through a relay at 10 ms on ``whole`` (the whole
    network, no exit firing; the round trip and its stages subtracted), and a needless hedge's
    (sent, then cancelled); request bytes from the real messages plus framing."""
    net, policy = m["net"], m["policy"]
    xv, _ = m["val"]
    e = net.num_exits
    never = ThresholdPolicy.never(e)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `offramp serve --threads 1`
    try:
        srv = stage_seconds(net, never, xv)  # stage modules do not trim padding: as exported
    finally:
        torch.set_num_threads(threads)
    dev = list(np.diff(np.r_[0.0, fl["cum"]]) / rate)
    ref = Link(1e10, 0.01)
    from offramp.export import segment_examples

    examples = segment_examples(net, policy, xv[:1], list(range(1, e)))
    state = torch.zeros(1, policy.state_size, dtype=torch.long)
    up = [len(pack_request("r" * 24, 0, xv[:1], state, "fp32")) + OVERHEAD_BYTES]
    for k in range(1, e):
        up.append(len(pack_request("r" * 24, k, examples[k][0], state, codec)) + OVERHEAD_BYTES)
    logits = torch.zeros(1, 10)
    down = (
        len(
            pack_reply(
                "r" * 24,
                logits,
                torch.zeros(1, dtype=torch.long),
                torch.zeros(1, dtype=torch.bool),
                "cloud",
            )
        )
        + OVERHEAD_BYTES
    )
    with LinkRelay(ref, whole.target) as relay:
        client = TierClient(relay.address, token=token, stage=0)
        client.forward(xv[:1], state)
        times, hedge_times = [], []
        for _ in range(30):
            t0 = time.perf_counter()
            client.forward(xv[:1], state)
            times.append(time.perf_counter() - t0)
        pause = dev[0]  # a hedge the device's first exit made needless: sent, then cancelled
        for _ in range(31):
            t0 = time.perf_counter()
            pending = client.forward_future(xv[:1], state)
            time.sleep(pause)  # the device computing meanwhile, as the gRPC threads send
            pending.cancel()
            hedge_times.append(time.perf_counter() - t0 - pause)
        client.close()
    call = median(times) - sum(srv) - ref.round_trip_s(up[0], down)
    return TierCosts(dev, srv, max(call, 0.0), up, down, hedge_s=median(hedge_times[1:]))


def export_bundle(
    m: dict[str, Any], policy: Any, splits: list[int], codec: str, root: Path
) -> Path:
    """The network's ONNX bundle for ``policy``, ``splits`` and ``codec``, exported once: the
    cache key holds a digest of the weights and of the policy, so a retrained network or a
    changed policy never reuses a stale bundle."""
    if "digest" not in m:
        h = hashlib.sha256()
        for k, v in sorted(m["net"].state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        m["digest"] = h.hexdigest()[:10]
    key = hashlib.sha256(json.dumps(policy.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    name = f"{m['name']}-{m['digest']}-{'_'.join(map(str, splits)) or 'whole'}-{key}-{codec}"
    out = root / name
    if not (out / "manifest.json").is_file():
        export_segments(
            m["net"], policy, out, m["val"][0][:16], splits=splits, fmt="onnx", codec=codec
        )
    return out


def links_section(m: dict[str, Any], args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import secrets

    token = secrets.token_urlsafe(24)
    net = m["net"]
    e = net.num_exits
    xt, yt = m["test"]
    g = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(xt.shape[0], generator=g)[: args.link_samples]
    xs, ys = xt[pick], yt[pick]
    fl = flops_tables(net, m.get("full_input", xs))
    rate = m.get("device_mflops", args.device_mflops) * 1e6
    never = ThresholdPolicy.never(e)
    servers: dict[tuple[Path, str | None], ServeProcess] = {}
    where: dict[str, Any] = {"ns": None, "host": "127.0.0.1"}  # the link's namespace, if any

    def serve(bundle: Path) -> ServeProcess:
        key = (bundle, where["ns"])
        if key not in servers:
            servers[key] = served(bundle, token, netns=where["ns"], host=where["host"])
        return servers[key]

    rows: list[dict[str, Any]] = []
    plain_module = EarlyExitRuntime(net, never).plain_backbone()
    full_record = ExitRecord.collect(net, (xt, yt))
    sample_record = ExitRecord.collect(net, (xs, ys))  # the images timed, for the prediction
    plain_full = float(full_record.exit_accuracy()[-1])
    try:
        whole = export_bundle(m, never, [], "fp32", root)
        costs = measure_tier_costs(m, fl, rate, args.codec, serve(whole), token)
        delta = m.get("delta", args.delta)
        for index, link in enumerate(LINKS):
            if args.links is not None and index not in args.links:
                continue
            stack = contextlib.ExitStack()
            if args.kernel_shaping:  # bandwidth by tc tbf on a veth pair, latency by the relay
                where["ns"], where["host"] = stack.enter_context(
                    _netns.shaped(link.bandwidth_bps, index)
                )
            relay_link = Link(1e12, link.latency_s) if args.kernel_shaping else link
            try:
                t_link = time.perf_counter()
                planned = plan(
                    m["record"],
                    costs,
                    link,
                    delta=delta,
                    objective=args.objective,
                    confidence=args.confidence,
                    hedge=args.hedge,
                )
                flat = plan(
                    m["record"],
                    costs,
                    link,
                    delta=delta,
                    exits=False,
                    objective=args.objective,
                )
                systems: dict[str, tuple[Any, dict[str, Any]]] = {}

                def device_only(policy: Any) -> Any:
                    bundle = load_bundle(export_bundle(m, policy, [], args.codec, root), threads=1)
                    seg = bundle.segments[0]
                    dev = EmulatedDevice(
                        seg,
                        lambda out: fl["cum"][int(out[1][0])],
                        rate,
                    )
                    return tiered_answer(
                        TieredRuntime(dev, None, last_exit=e - 1, state_size=bundle.state_size)
                    )

                relays: list[LinkRelay] = []

                def linked(
                    bundle_dir: Path, relay_link: Link = relay_link, relays: list = relays
                ) -> LinkRelay:
                    """``bundle_dir`` served, behind a relay emulating the link."""
                    relay = LinkRelay(relay_link, serve(bundle_dir).target)
                    relays.append(relay)
                    return relay

                def split_system(
                    policy: Any, k: int, exits: bool, hedged: bool = False
                ) -> tuple[Any, LinkRelay]:
                    """Stages before ``k`` on the device; the rest on the server (hedged: the
                    input raced to the whole network, same policy, on the server instead)."""
                    codec = args.codec
                    bundle = load_bundle(export_bundle(m, policy, [k], codec, root), threads=1)

                    def flops(out: Any) -> float:
                        if not exits:
                            return fl["bodies"][k]
                        ex = int(out[1][0])
                        return fl["cum"][ex] if ex >= 0 else fl["cum"][k - 1]

                    dev = EmulatedDevice(bundle.segments[0], flops, rate)
                    if hedged:
                        relay = linked(export_bundle(m, policy, [], "fp32", root))
                        hedge = TierClient(relay.address, token=token, stage=0, timeout_s=5.0)
                        client = None
                    else:
                        relay = linked(export_bundle(m, policy, [k], codec, root))
                        client = TierClient(
                            relay.address, token=token, stage=k, codec=codec, timeout_s=5.0
                        )
                        hedge = None
                    rt = TieredRuntime(
                        dev, client, last_exit=k - 1, state_size=bundle.state_size, hedge=hedge
                    )
                    return tiered_answer(rt), relay

                def cloud_system(bundle_dir: Path) -> tuple[Any, LinkRelay]:
                    relay = linked(bundle_dir)
                    client = TierClient(relay.address, token=token, stage=0, timeout_s=5.0)
                    return cloud_answer(client), relay

                # ours: exits, the planned split, int8 on the wire
                k = planned.split
                if k == e:
                    ours, relay = device_only(planned.policy), None
                elif k == 0:
                    ours, relay = cloud_system(export_bundle(m, planned.policy, [], "fp32", root))
                else:
                    ours, relay = split_system(planned.policy, k, True, planned.hedge)
                systems["tiered (exits + split)"] = (
                    ours,
                    {"split": k, "relay": relay, "plan": planned},
                )
                plain_dev = EmulatedDevice(plain_module, lambda out: fl["plain"], rate)
                systems["all on device"] = (
                    lambda x, dev=plain_dev: (int(dev(x)[0].argmax()), False),
                    {"split": e, "relay": None},
                )
                cloud, crelay = cloud_system(whole)
                systems["all in the cloud"] = (cloud, {"split": 0, "relay": crelay})
                kf = flat.split
                if kf == e:
                    best, brelay = systems["all on device"][0], None
                elif kf == 0:
                    best, brelay = cloud, crelay
                else:
                    best, brelay = split_system(never, kf, False)
                systems["best split, no exits"] = (best, {"split": kf, "relay": brelay})
                for name, (answer, info) in systems.items():
                    relay = info["relay"]
                    before = dict(relay.bytes) if relay is not None else {"up": 0, "down": 0}
                    r = time_requests(answer, xs, ys)
                    after = relay.bytes if relay is not None else {"up": 0, "down": 0}
                    sent = (after["up"] - before["up"]) + (after["down"] - before["down"])
                    row = {
                        "dataset": m["name"],
                        "link": link.label,
                        "system": name,
                        "split": info["split"],
                        **r,
                        "bytes_per_request": sent / len(xs),
                    }
                    if "plan" in info:
                        p = info["plan"]
                        ex = decide_from_logits(p.policy, sample_record.logits)
                        # accuracy on all 10,000 test images (simulation = runtime, tested)
                        full = decide_from_logits(p.policy, full_record.logits)
                        row["accuracy_full_test"] = full_record.accuracy(full.numpy())
                        row["accuracy_drop_pp_full_test"] = 100 * (
                            plain_full - row["accuracy_full_test"]
                        )
                        pred = sample_latencies(ex.numpy(), costs, link, p.split, hedge=p.hedge)
                        row.update(
                            hedge=p.hedge,
                            offload_ratio=float((ex >= p.split).double().mean())
                            if p.split < e
                            else 0.0,
                            thresholds=list(getattr(p.policy, "thresholds", ())),
                            plan_val_mean_ms=1e3 * p.mean_s,
                            plan_val_p95_ms=1e3 * p.p95_s,
                            predicted_mean_ms=1e3 * float(pred.mean()),
                            predicted_p95_ms=1e3 * float(np.quantile(pred, 0.95)),
                        )
                    else:
                        row["offload_ratio"] = 1.0 if info["split"] < e else 0.0
                        row["accuracy_full_test"] = plain_full  # the plain network's
                    rows.append(row)
                for relay in relays:
                    relay.close()
                print(
                    f"  links {m['name']} {link.label}: {time.perf_counter() - t_link:.0f} s",
                    flush=True,
                )
            finally:
                for key in [key for key in servers if key[1] is not None]:
                    servers.pop(key).stop()
                where["ns"], where["host"] = None, "127.0.0.1"
                stack.close()
    finally:
        for srv in servers.values():
            srv.stop()
    return {
        "rows": rows,
        "costs": {
            "device_s": list(costs.device_s),
            "server_s": list(costs.server_s),
            "call_s": costs.call_s,
            "hedge_s": costs.hedge_s,
            "up_bytes": list(costs.up_bytes),
            "down_bytes": costs.down_bytes,
            "device_mflops": rate / 1e6,
            "kernel_shaping": bool(args.kernel_shaping),
        },
    }


# ------------------------------------------------------------------------------ faults section


def faults_section(m: dict[str, Any], args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """``args.clients`` devices in closed loop for ``args.load_seconds`` over the middle link;
    the cloud killed (SIGKILL) at a third of the run and restarted on its port at a half."""
    import secrets
    import threading

    token = secrets.token_urlsafe(24)
    net, policy = m["net"], m["policy"]
    xt, _ = m["test"]
    fl = flops_tables(net, xt)
    rate = args.device_mflops * 1e6
    link = LINKS[1]
    bundle_dir = export_bundle(m, policy, [1], args.codec, root)
    bundle = load_bundle(bundle_dir, threads=1)
    seg = bundle.segments[0]
    srv = served(bundle_dir, token)
    port = srv.port
    relay = LinkRelay(link, f"127.0.0.1:{port}")
    records: list[tuple[float, float, bool, bool, str | None]] = []
    lock = threading.Lock()
    started = [0]
    stop_at = time.monotonic() + args.load_seconds
    t_begin = time.monotonic()

    def flops(out: Any) -> float:
        ex = int(out[1][0])
        return fl["cum"][ex] if ex >= 0 else fl["cum"][0]

    def client_loop(i: int) -> None:
        dev = EmulatedDevice(seg, flops, rate)
        client = TierClient(
            relay.address,
            token=token,
            stage=1,
            codec=args.codec,
            timeout_s=args.deadline,
            retry_after_s=1.0,
            max_retry_after_s=4.0,
        )
        rt = TieredRuntime(dev, client, last_exit=0, state_size=bundle.state_size)
        j = i
        while time.monotonic() < stop_at:
            x = xt[j % xt.shape[0]].unsqueeze(0)
            j += args.clients
            with lock:
                started[0] += 1
            t0 = time.monotonic()
            try:
                r = rt(x)
                rec = (
                    t0 - t_begin,
                    time.monotonic() - t0,
                    bool(r.offloaded[0]),
                    bool(r.degraded[0]),
                    None,
                )
            except Exception as exc:  # counted as failed, never lost
                rec = (t0 - t_begin, time.monotonic() - t0, False, False, type(exc).__name__)
            with lock:
                records.append(rec)
        client.close()

    threads = [
        threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(args.clients)
    ]
    memory: list[tuple[float, float | None]] = []
    kill_at, restart_at = args.load_seconds / 3, args.load_seconds / 2
    for t in threads:
        t.start()
    killed = restarted = False
    while time.monotonic() < stop_at:
        now = time.monotonic() - t_begin
        memory.append((now, srv.rss_mib()))
        if not killed and now >= kill_at:
            srv.kill()
            killed = True
            kill_at = now
            print(f"  faults: cloud killed at {now:.1f} s", flush=True)
        if killed and not restarted and now >= restart_at:
            srv = served(bundle_dir, token, port)
            restarted = True
            restart_at = time.monotonic() - t_begin  # serving again from here
            print(f"  faults: cloud restarted at {time.monotonic() - t_begin:.1f} s", flush=True)
        time.sleep(1.0)
    for t in threads:
        t.join(timeout=args.deadline + 30)
    hung = sum(t.is_alive() for t in threads)
    srv.stop()
    relay.close()
    sent = started[0]
    answered = sum(1 for r in records if r[4] is None)
    failed = sum(1 for r in records if r[4] is not None)

    resumed = min(
        (r[0] + r[1] for r in records if r[0] >= restart_at and r[2] and not r[3]), default=None
    )

    def phase(lo: float, hi: float) -> dict[str, Any]:
        lat = [r[1] for r in records if lo <= r[0] < hi and r[4] is None]
        deg = sum(1 for r in records if lo <= r[0] < hi and r[3])
        return {"requests": len(lat), "degraded": deg, **(percentiles(lat) if lat else {})}

    return {
        "link": link.label,
        "clients": args.clients,
        "seconds": args.load_seconds,
        "deadline_s": args.deadline,
        "sent": sent,
        "answered": answered,
        "degraded": sum(1 for r in records if r[3]),
        "offloaded": sum(1 for r in records if r[2]),
        "failed": failed,
        "lost": sent - answered - failed,
        "hung_clients": hung,
        "slowest_ms": 1e3 * max((r[1] for r in records), default=0.0),
        "kill_at_s": kill_at,
        "restart_at_s": restart_at,
        "offloading_resumed_s_after_restart": None if resumed is None else resumed - restart_at,
        "before": phase(0, kill_at),
        "during": phase(kill_at, restart_at),
        "after": phase(restart_at, args.load_seconds),
        "server_rss_mb": memory,
    }


def links_table(rows: list[dict[str, Any]]) -> str:
    """The links section as a text table."""
    return format_table(
        [
            "dataset",
            "link",
            "system",
            "split",
            "mean ms",
            "p50",
            "p95",
            "p99",
            "pred. mean",
            "pred. p95",
            "bytes/req",
            "offload",
            "accuracy",
            "acc. 10k",
            "req/s",
        ],
        [
            [
                r["dataset"],
                r["link"],
                r["system"],
                f"{r['split']}{' hedged' if r.get('hedge') else ''}",
                f"{r['mean_ms']:.1f}",
                f"{r['p50_ms']:.1f}",
                f"{r['p95_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['predicted_mean_ms']:.1f}" if "predicted_mean_ms" in r else "",
                f"{r['predicted_p95_ms']:.1f}" if "predicted_p95_ms" in r else "",
                f"{r['bytes_per_request']:.0f}",
                f"{r['offload_ratio']:.3f}",
                f"{r['accuracy']:.4f}",
                f"{r['accuracy_full_test']:.4f}",
                f"{r['throughput_per_s']:.0f}",
            ]
            for r in rows
        ],
    )


def save(out: dict[str, Any], args: argparse.Namespace) -> None:
    """Write what has been measured so far (atomically), when ``--json`` was given."""
    if args.json:
        files.write_json(Path(args.json), out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument(
        "--only", default="codecs,onnx,links,faults", help="sections: codecs,onnx,links,faults"
    )
    p.add_argument("--codec", default="int8", choices=sorted(CODECS), help="codec on the wire")
    p.add_argument("--delta", type=float, default=0.005, help="accuracy loss allowed (fraction)")
    p.add_argument(
        "--text-delta",
        type=float,
        default=0.0,
        help=f"{MINILM}: accuracy loss allowed on its small dev set (default 0)",
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        help="the planner's thresholds keep --delta at this one-sided confidence on validation",
    )
    p.add_argument(
        "--datasets",
        default=f"mnist,fashion-mnist,{MINILM}",
        help=f"networks to measure (mnist, fashion-mnist, {MINILM})",
    )
    p.add_argument(
        "--text-device-gflops",
        type=float,
        default=20.0,
        help=f"the emulated device's speed for {MINILM}, GFLOP/s (a phone's CPU; default 20)",
    )
    p.add_argument(
        "--device-mflops",
        type=float,
        default=50.0,
        help="the emulated device's speed, MFLOP/s (compute-bound; default 50)",
    )
    p.add_argument("--link-samples", type=int, default=300, help="test images per system/link")
    p.add_argument(
        "--links",
        type=lambda v: sorted({int(i) for i in v.split(",")}),
        help="links to measure, by index in offramp.tiers.LINKS (default: all three)",
    )
    p.add_argument(
        "--objective",
        default="mean+p95",
        choices=["mean", "p95", "mean+p95"],
        help="what the planner minimises (default: mean + p95)",
    )
    p.add_argument(
        "--no-hedge",
        dest="hedge",
        action="store_false",
        help="links: plan without hedged splits (the input raced to a whole-network server)",
    )
    p.add_argument("--clients", type=int, default=64, help="load test: concurrent devices")
    p.add_argument("--load-seconds", type=float, default=60.0, help="load test: duration")
    p.add_argument("--deadline", type=float, default=0.5, help="load test: seconds per call")
    p.add_argument(
        "--kernel-shaping",
        action="store_true",
        help="links: bandwidth by tc tbf on a veth pair into a network namespace (root)",
    )
    p.add_argument("--bundle-dir", default="results/tiers-bundles", help="exported segments")
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
    names = [n for n in args.datasets.split(",") if n in NETWORKS or n == MINILM]
    models = [
        m
        for m in (trained_minilm(args) if n == MINILM else trained(n, args) for n in names)
        if m is not None
    ]
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
        rows = codecs_section([m for m in models if m["name"] != MINILM])
        out["codecs"] = rows
        save(out, args)
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
        save(out, args)
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
    root = Path(args.bundle_dir)
    if "links" in sections:
        out["links"], out["link_costs"] = [], {}
        for m in models:
            r = links_section(m, args, root)
            out["links"] += r["rows"]
            out["link_costs"][m["name"]] = r["costs"]
            save(out, args)  # nothing measured is lost to a later failure
        print(links_table(out["links"]))
    if "faults" in sections:
        m = next((m for m in models if m["name"] == "fashion-mnist"), models[0])
        f = faults_section(m, args, root)
        out["faults"] = f
        save(out, args)
        print(
            f"faults ({m['name']}, {f['link']}, {f['clients']} clients, {f['seconds']:.0f} s, "
            f"cloud killed at {f['kill_at_s']:.0f} s, restarted at {f['restart_at_s']:.0f} s): "
            f"sent {f['sent']}, answered {f['answered']}, degraded {f['degraded']}, failed "
            f"{f['failed']}, lost {f['lost']}, hung clients {f['hung_clients']}, slowest "
            f"{f['slowest_ms']:.0f} ms; offloading resumed "
            f"{f['offloading_resumed_s_after_restart']} s after the restart"
        )
        for ph in ("before", "during", "after"):
            q = f[ph]
            print(
                f"  {ph}: {q['requests']} answered, {q['degraded']} degraded; "
                + (
                    f"p50 {q['p50_ms']:.1f} ms, p95 {q['p95_ms']:.1f}, p99 {q['p99_ms']:.1f}"
                    if q["requests"]
                    else ""
                )
            )
        rss = [v for _, v in f["server_rss_mb"] if v is not None]
        if rss:
            print(f"  server memory: {min(rss):.0f}–{max(rss):.0f} MiB over the run")
    out["seconds"] = time.perf_counter() - t_start
    if args.json:
        print(f"wrote {files.write_json(Path(args.json), out)}")
    print(f"took {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
