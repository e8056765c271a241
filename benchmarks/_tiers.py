"""Helpers of ``tiers.py``: tier server processes, an emulated device, the four systems.

The device is emulated as a compute-bound processor of ``rate`` FLOP/s: each call runs the
device's segment for real (its answer is the real one), then sleeps until ``FLOPs / rate``
seconds have passed since the call began — the FLOPs of the stages each sample really ran
(``offramp.profile``). The server is this machine, running the exported segment in its own
process (``offramp serve``); the link between them is a ``LinkRelay``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from offramp.tiers import ServeProcess, TierClient, TieredRuntime


def served(
    bundle: Path,
    token: str,
    port: int = 0,
    *,
    max_wait_ms: float = 1.0,
    netns: str | None = None,
    host: str = "127.0.0.1",
) -> ServeProcess:
    """``offramp serve`` as the cloud tier, one compute thread, at ``host:port`` (0: any free
    port), inside network namespace ``netns`` when given."""
    args = ["--max-wait-ms", str(max_wait_ms), "--threads", "1"]
    if host != "127.0.0.1":
        args.append("--allow-plaintext-remote")  # the benchmark's private veth link
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return ServeProcess(bundle, token, bind=f"{host}:{port}", args=args, prefix=prefix)


class EmulatedDevice:
    """Runs ``fn`` for real, then waits until ``flops(out) / rate`` seconds have passed."""

    def __init__(self, fn: Callable[..., Any], flops: Callable[[Any], float], rate: float):
        self.fn, self.flops, self.rate = fn, flops, rate

    def __call__(self, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = self.fn(*args)
        left = self.flops(out) / self.rate - (time.perf_counter() - t0)
        if left > 0:
            time.sleep(left)
        return out


def percentiles(seconds: list[float]) -> dict[str, float]:
    a = 1e3 * np.asarray(seconds)
    return {
        "mean_ms": float(a.mean()),
        "p50_ms": float(np.quantile(a, 0.5)),
        "p95_ms": float(np.quantile(a, 0.95)),
        "p99_ms": float(np.quantile(a, 0.99)),
    }


def time_requests(
    answer: Callable[[Tensor], tuple[int, bool]], x: Tensor, y: Tensor
) -> dict[str, Any]:
    """One request per sample, in turn: latency percentiles, throughput, accuracy."""
    answer(x[:1])  # connections, once
    lat, right, degraded = [], 0, 0
    t_all = time.perf_counter()
    for i in range(x.shape[0]):
        t0 = time.perf_counter()
        pred, bad = answer(x[i : i + 1])
        lat.append(time.perf_counter() - t0)
        right += int(pred == int(y[i]))
        degraded += int(bad)
    wall = time.perf_counter() - t_all
    return {
        **percentiles(lat),
        "throughput_per_s": x.shape[0] / wall,
        "accuracy": right / x.shape[0],
        "degraded": degraded,
        "samples": x.shape[0],
    }


def tiered_answer(rt: TieredRuntime) -> Callable[[Tensor], tuple[int, bool]]:
    def answer(x: Tensor) -> tuple[int, bool]:
        r = rt(x)
        return int(r.predictions[0]), bool(r.degraded[0])

    return answer


def cloud_answer(client: TierClient, state_size: int = 0) -> Callable[[Tensor], tuple[int, bool]]:
    """All in the cloud: the input itself is the request."""

    def answer(x: Tensor) -> tuple[int, bool]:
        reply = client.forward(x, torch.zeros((x.shape[0], state_size), dtype=torch.long))
        return int(reply.logits[0].argmax()), bool(reply.degraded[0])

    return answer


def median(values: list[float]) -> float:
    return float(statistics.median(values))
