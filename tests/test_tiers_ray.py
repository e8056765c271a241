"""The cloud tier as a Ray Serve deployment (optional extra ``ray``; slow: a local Ray
instance takes seconds to start)."""

from __future__ import annotations

import threading

import pytest
import torch

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray", reason="the ray extra is not installed: offramp[ray]")
serve = pytest.importorskip("ray.serve", reason="the ray extra is not installed: offramp[ray]")

from offramp import EarlyExitRuntime, ThresholdPolicy  # noqa: E402
from offramp.export import export_segments, load_bundle  # noqa: E402
from offramp.models import blenet  # noqa: E402
from offramp.tiers.device import TieredRuntime  # noqa: E402
from offramp.tiers.ray_serve import RayTierClient, cloud_deployment  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    yield
    serve.shutdown()
    ray.shutdown()


def test_a_ray_serve_tier_with_replicas_batches_and_equals_one_process(local_ray, tmp_path):
    net = blenet(8, 10, exits_after=(0, 1), head="linear", seed=0).eval()
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        t = float(net(x)[0].softmax(1).max(1).values.median())
    policy = ThresholdPolicy("max_prob", (t, t))
    want = EarlyExitRuntime(net, policy)(x)
    export_segments(net, policy, tmp_path, x[:8], splits=[1], fmt="torchscript")
    handle = serve.run(
        cloud_deployment(tmp_path, replicas=2, max_batch_size=16, batch_wait_timeout_s=0.05),
        name="offramp",
        route_prefix=None,
    )
    first = load_bundle(tmp_path).segments[0]

    def device():
        return TieredRuntime(
            lambda h, s: tuple(first.module(h, s)),
            RayTierClient(handle, stage=1, timeout_s=30),
            last_exit=0,
        )

    r = device()(x)
    assert torch.equal(r.exits, want.exits) and not r.degraded.any()
    torch.testing.assert_close(r.logits, want.logits)
    results = {}

    def one(i):
        results[i] = device()(x[i * 8 : i * 8 + 8])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert torch.equal(torch.cat([results[i].exits for i in range(8)]), want.exits)
    sizes = handle.batch_sizes.remote().result(timeout_s=30)  # one replica's batches
    assert sizes and max(sizes) > 8  # requests of a few rows each were grouped
    serve.delete("offramp")
    dead = device()(x)  # the deployment is gone: answered from the device, degraded
    assert torch.equal(dead.degraded, want.exits > 0)
