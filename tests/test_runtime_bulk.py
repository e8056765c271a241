"""The pooled runtime (``EarlyExitRuntime.map``): per batch, the same results as the runtime
called on that batch alone, in input order; later stages really run on pooled rows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offramp import EarlyExitRuntime, ExitRecord, ThresholdPolicy, profile, simulate
from offramp.errors import ConfigError, ShapeError
from offramp.models import mlp
from offramp.policies import PatiencePolicy


@pytest.fixture(scope="module")
def net_x():
    net = mlp(6, 5, hidden=(16, 16, 16), seed=0).eval()
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(1))
    return net, x


def _median_policy(net, x) -> ThresholdPolicy:
    rec = ExitRecord.collect(net, (x, torch.zeros(x.shape[0], dtype=torch.long)))
    s = rec.scores("max_prob")[:-1].double().numpy()
    return ThresholdPolicy("max_prob", tuple(float(t) - 1e-7 for t in np.median(s, axis=1)))


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    pool=st.integers(1, 64),
    patience=st.booleans(),
)
def test_pooled_equals_batch_by_batch(net_x, sizes, pool, patience):
    net, x = net_x
    policy = PatiencePolicy(net.num_exits, 1) if patience else _median_policy(net, x)
    rt = EarlyExitRuntime(net, policy, costs=profile(net, x[:1]))
    bounds = np.cumsum([0, *sizes])
    batches = [x[a:b] for a, b in itertools.pairwise(bounds)]
    got = list(rt.map(iter(batches), pool=pool))
    assert len(got) == len(batches)
    for r, b in zip(got, batches, strict=True):
        assert r.exits.shape == (b.shape[0],)
        if b.shape[0] == 0:
            continue
        want = rt(b)
        torch.testing.assert_close(r.exits, want.exits, rtol=0, atol=0)
        torch.testing.assert_close(r.predictions, want.predictions, rtol=0, atol=0)
        torch.testing.assert_close(r.logits, want.logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r.costs, want.costs)


def test_pooled_equals_simulation_and_pools_later_stages(net_x, monkeypatch):
    net, x = net_x
    policy = _median_policy(net, x)
    sim = simulate(ExitRecord.collect(net, (x, torch.zeros(300, dtype=torch.long))), policy)
    rt = EarlyExitRuntime(net, policy)
    calls: list[tuple[int, int]] = []
    stage = rt.stage

    def spy(i, h, state):
        calls.append((i, h.shape[0]))
        return stage(i, h, state)

    monkeypatch.setattr(rt, "stage", spy)
    exits = torch.cat([r.exits for r in rt.map(x.split(20), pool=50)])
    np.testing.assert_array_equal(exits.numpy(), sim.exits)
    for i in range(1, net.num_exits):  # every call of a later stage but its last has 50 rows
        rows = [n for j, n in calls if j == i]
        assert rows[:-1] == [50] * (len(rows) - 1) and 0 < rows[-1] <= 50, (i, rows)
        assert sum(rows) == int((sim.exits >= i).sum())
    assert [n for j, n in calls if j == 0] == [20] * 15


def test_results_come_out_as_soon_as_their_batch_is_done(net_x):
    net, x = net_x
    rt = EarlyExitRuntime(net, ThresholdPolicy("max_prob", (0.0, 0.0)))  # all leave at 0
    read = []

    def batches():
        for k in range(5):
            read.append(k)
            yield x[10 * k : 10 * (k + 1)]

    it = rt.map(batches())
    assert next(it).exits.tolist() == [0] * 10
    assert read == [0]  # the first result came before the second batch was read
    assert len(list(it)) == 4


def test_pooled_refuses_bad_pool_and_bad_batches(net_x):
    net, x = net_x
    rt = EarlyExitRuntime(net, _median_policy(net, x))
    with pytest.raises(ConfigError, match="pool"):
        list(rt.map([x[:4]], pool=0))
    with pytest.raises(ShapeError):
        list(rt.map([x[:4], torch.randn(3, 7)]))
