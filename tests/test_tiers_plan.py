"""Communication-aware planning: the latency formula by hand, the planner's choices at the
extremes, and its prediction checked against a real gRPC tier behind an emulated link."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch

from offramp import ExitRecord
from offramp.errors import ConfigError
from offramp.tiers.link import Link, LinkRelay
from offramp.tiers.plan import TierCosts, plan, sample_latencies, split_costs, stage_seconds


def test_split_costs_by_hand():
    c = TierCosts([1.0, 2.0, 4.0], [0.5, 1.0, 2.0], 0.25, [800.0, 80.0, 40.0], 8.0)
    link = Link(64.0, 1.0)  # 8 bytes a second, 1 s each way
    # split 1: device stage 0; then 0.25 + (1 + 80/8) + (1 + 8/8) = 13.25 s of wire
    assert split_costs(c, link, 1).tolist() == [1.0, 1.0 + 13.25 + 1.0, 1.0 + 13.25 + 3.0]
    assert split_costs(c, link, 3).tolist() == [1.0, 3.0, 7.0]  # all on the device
    # split 0 sends the input: 0.25 + (1 + 100) + (1 + 1), then every stage on the server
    assert split_costs(c, link, 0).tolist() == [103.75, 104.75, 106.75]
    assert sample_latencies(np.array([0, 2, 2]), c, link, 3).tolist() == [1.0, 7.0, 7.0]
    with pytest.raises(ConfigError, match="outside 0 … 3"):
        split_costs(c, link, 4)
    with pytest.raises(ConfigError, match="E device and server stage costs"):
        TierCosts([1.0], [1.0, 2.0], 0.0, [1.0])
    # hedged at split 1: exit 0 on the device; later exits when both the device has given up
    # (1 s) and the whole-network server has answered (103.25 s of wire, then its stages)
    assert split_costs(c, link, 1, hedge=True).tolist() == [1.0, 104.75, 106.75]
    fast = Link(64e6, 0.0)  # 808 bytes: 101 µs
    got = split_costs(c, fast, 2, hedge=True)  # the server answers at 3.75 s, after the device
    assert got.tolist() == pytest.approx([1.0, 3.0, 0.25 + 101e-6 + 3.5])
    quick = TierCosts([1.0, 2.0, 4.0], [0.05, 0.1, 0.2], 0.25, [800.0, 80.0, 40.0], 8.0)
    got = split_costs(quick, fast, 2, hedge=True)  # it answers at 0.6 s: the device's 3 s
    assert got.tolist() == [1.0, 3.0, 3.0]
    priced = TierCosts([1.0, 2.0, 4.0], [0.05, 0.1, 0.2], 0.25, [800.0, 80.0, 40.0], 8.0, 0.0, 0.5)
    assert split_costs(priced, fast, 2, hedge=True).tolist() == [1.5, 3.5, 3.5]  # h on all
    with pytest.raises(ConfigError, match="hedged split is 1 … 2"):
        split_costs(c, link, 0, hedge=True)


def _record(n=400, seed=0):
    """Three exits; half the samples confident and right at exit 0, the rest only at the end."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    logits = torch.randn(3, n, 4, generator=g) * 0.1
    easy = torch.arange(n) % 2 == 0
    logits[0, easy, y[easy]] += 6.0
    logits[2, torch.arange(n), y] += 6.0
    return ExitRecord(logits, y)


def test_the_planner_keeps_work_local_on_a_slow_link_and_offloads_on_a_fast_one():
    rec = _record()
    costs = TierCosts(
        [0.002, 0.010, 0.010], [0.0002, 0.001, 0.001], 0.001, [1e6, 2000.0, 1000.0], 100.0
    )
    slow = plan(rec, costs, Link(0.5e6, 0.1))
    assert slow.split == 3 and slow.offload == 0.0  # a 200 ms round trip loses to 20 ms here
    fast = plan(rec, costs, Link(1e9, 0.0005))
    assert fast.split in (1, 2) and 0 < fast.offload < 1  # easy samples never leave
    assert fast.accuracy >= float(rec.correct()[-1].double().mean()) - 1e-12
    assert fast.mean_s < slow.mean_s
    assert {r["split"] for r in fast.table} == {0, 1, 2, 3}
    plain = plan(rec, costs, Link(1e9, 0.0005), exits=False)
    assert plain.mean_s > fast.mean_s  # exits pay off
    by_p95 = plan(rec, costs, Link(1e9, 0.0005), objective="p95")
    assert by_p95.p95_s <= min(r["p95_s"] for r in by_p95.table) + 1e-12
    both = plan(rec, costs, Link(1e9, 0.0005), objective="mean+p95")
    assert both.mean_s + both.p95_s <= min(r["mean_s"] + r["p95_s"] for r in both.table) + 1e-12
    with pytest.raises(ConfigError, match="objective is one of"):
        plan(rec, costs, Link(1e6, 0.0), objective="p99")


def test_the_planner_hedges_where_the_device_would_delay_the_tail():
    """Half the samples leave at exit 0 (5 ms on the device); the rest need the final exit. On
    a fast link, racing the input to the server takes the device's 5 ms off their latency."""
    rec = _record()
    costs = TierCosts([0.005, 0.015, 0.027], [0.0004] * 3, 0.008, [3400.0, 1400.0, 1100.0], 400.0)
    fast = Link(100e6, 0.005)
    p = plan(rec, costs, fast, hedge=True, objective="mean+p95")
    assert (p.split, p.hedge) == (1, True)
    unhedged = next(r for r in p.table if r["split"] == 1 and not r["hedge"])
    assert p.p95_s < unhedged["p95_s"] - 0.004  # the device's stage 0, off the tail
    assert p.mean_s < min(r["mean_s"] for r in p.table if not r["hedge"])
    assert not plan(rec, costs, fast).hedge  # only when asked
    slow = plan(rec, costs, Link(1e6, 0.05), hedge=True, objective="mean+p95")
    assert not slow.hedge and slow.split == 3  # a 100 ms round trip: stay on the device


@pytest.fixture(scope="module")
def digits_net():
    pytest.importorskip("sklearn", reason="the digits need scikit-learn")
    from offramp.data import load_digits_splits
    from offramp.models import blenet
    from offramp.training import FitConfig, fit

    s = load_digits_splits(seed=0)
    net = blenet(8, 10, exits_after=(0, 1), head="linear", seed=0)
    fit(net, s.train, FitConfig(epochs=6, lr=3e-3, show_progress=False, seed=0))
    return net.eval(), s


def test_predicted_latency_is_within_15_percent_of_a_real_tier_behind_an_emulated_link(digits_net):
    """Costs measured once (stages at batch 1; the device runtime's own cost; a request's fixed
    cost through the relay at 10 ms, its round trip subtracted), then the plan's latency model
    predicts each test sample's latency from the exit the policy gives it in the simulation;
    the tiered runtime then runs those samples over a real gRPC tier behind a 10 Mbit/s,
    20 ms emulated link."""
    pytest.importorskip("grpc", reason="the net extra is not installed: offramp[net]")
    from offramp.export import segments
    from offramp.policies import ThresholdPolicy, decide_from_logits
    from offramp.tiers.client import TierClient
    from offramp.tiers.device import TieredRuntime
    from offramp.tiers.server import ServerConfig, ServerThread, TensorSpec, TierServer

    net, s = digits_net
    xv, yv = s.val
    xt, yt = s.test
    token = "plan-test-token-0123456789"
    dev = stage_seconds(net, ThresholdPolicy.never(3), xv)
    served = [segments(net, ThresholdPolicy.never(3), [1])[1]]
    srv = ServerThread(
        TierServer(
            lambda h, st: served[0](h, st),
            stages=(1, 3),
            final=True,
            h_spec=[TensorSpec((5, 5, 5), torch.float32)],
            state_size=0,
            config=ServerConfig(token=token, max_wait_ms=0.0),
        )
    )

    def latencies(rt, xs):
        rt(xs[:1])  # the connection, once
        out = []
        for i in range(len(xs)):
            t0 = time.perf_counter()
            r = rt(xs[i : i + 1])
            out.append(time.perf_counter() - t0)
            assert not r.degraded.any()
        return out

    try:
        always = ThresholdPolicy("entropy", (float("inf"), float("-inf")))  # all leave at 0
        local = latencies(TieredRuntime(segments(net, always, [1])[0], None, last_exit=0), xv[:100])
        local_s = statistics.median(local) - dev[0]
        ref = Link(1e10, 0.01)
        with LinkRelay(ref, f"127.0.0.1:{srv.port}") as relay:
            client = TierClient(relay.address, token=token, stage=1)
            h1 = net.blocks[0](xv[:1]).detach()
            state = torch.zeros(1, 0, dtype=torch.long)
            client.forward(h1, state)
            up0, down0 = relay.bytes["up"], relay.bytes["down"]
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                client.forward(h1, state)
                times.append(time.perf_counter() - t0)
            up, down = (relay.bytes["up"] - up0) / 30, (relay.bytes["down"] - down0) / 30
            client.close()
        call = statistics.median(times) - sum(dev[1:]) - ref.round_trip_s(up, down)
        costs = TierCosts(dev, dev, call, [xv[0].numel() * 4 + 200.0, up, up], down, local_s)
        link = Link(10e6, 0.02)
        p = plan(ExitRecord.collect(net, (xv, yv)), costs, link, delta=0.0, splits=[1])
        assert 0.05 < p.offload < 0.95  # some samples stay, some travel
        exits = decide_from_logits(p.policy, ExitRecord.collect(net, (xt, yt)).logits)
        predicted = sample_latencies(exits.numpy(), costs, link, 1)
        device, cloud = segments(net, p.policy, [1])
        served[0] = cloud
        with LinkRelay(link, f"127.0.0.1:{srv.port}") as relay:
            client = TierClient(relay.address, token=token, stage=1)
            measured = np.array(latencies(TieredRuntime(device, client, last_exit=0), xt))
    finally:
        srv.stop()
    assert abs(predicted.mean() - measured.mean()) <= 0.15 * measured.mean(), (
        predicted.mean(),
        measured.mean(),
    )
    p95, m95 = np.quantile(predicted, 0.95), np.quantile(measured, 0.95)
    share = float((exits > 0).float().mean())
    print(  # shown with pytest -s: the figures of the closing note
        f"mean predicted {1e3 * predicted.mean():.2f} ms, measured {1e3 * measured.mean():.2f} ms; "
        f"p95 {1e3 * p95:.2f} vs {1e3 * m95:.2f} ms; offload {share:.3f}"
    )
    assert abs(p95 - m95) <= 0.15 * m95, (p95, m95)
