"""The cloud tier as a Ray Serve deployment: replicas, and Ray's ``@serve.batch`` grouping
concurrent requests (the optional ``ray`` extra, ``pip install 'offramp[ray]'``).

Each replica loads one final segment of an export bundle (checksums checked). Requests and
replies are the wire's protobuf bytes (:mod:`offramp.tiers.messages`) — offramp hands Ray
bytes only; Ray's own transport between its processes is Ray's. The device talks to it through
:class:`RayTierClient`, which :class:`~offramp.tiers.device.TieredRuntime` takes like a gRPC
client: a call that fails or passes its deadline is answered from the device's exit, degraded.

Example (needs a Ray instance)::

    from ray import serve
    handle = serve.run(cloud_deployment("run/export/onnx"), name="offramp", route_prefix=None)
    device = load_bundle("run/export/onnx").segments[0]
    rt = TieredRuntime(lambda h, s: tuple(device.module(h, s)),
                       RayTierClient(handle, stage=1), last_exit=0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from offramp.activations import Activation, concat
from offramp.errors import ConfigError, DataError, TierError
from offramp.tiers.client import BaseTierClient

__all__ = ["RayTierClient", "cloud_deployment", "require_ray"]


def require_ray() -> Any:
    """``ray.serve``, or a ``ConfigError`` naming the extra."""
    try:
        from ray import serve
    except ImportError as exc:
        raise ConfigError("Ray Serve is not installed: pip install 'offramp[ray]'") from exc
    return serve


class _Replica:
    """One replica's work: a final segment of a bundle over batches of request bytes."""

    def __init__(self, bundle_dir: str, segment: int | None) -> None:
        from offramp.export import load_bundle

        bundle = load_bundle(bundle_dir, threads=1)
        k = len(bundle.segments) - 1 if segment is None else int(segment)
        seg = bundle.segments[k]
        if not seg.final:
            raise ConfigError(f"segment {k} of {bundle_dir} is not final: a Ray tier ends the net")
        self.seg, self.stage = seg, seg.first
        self.batches: list[int] = []  # rows of each batch run (for inspection)

    def run(self, requests: list[bytes]) -> list[bytes]:
        from offramp.tiers.messages import pack_reply, unpack_request

        parsed: list[Any] = []
        for data in requests:
            try:
                r = unpack_request(data)
                if r.stage != self.stage:
                    raise DataError(f"this tier runs stage {self.stage}, not {r.stage}")
                parsed.append(r)
            except DataError as exc:
                parsed.append(exc)
        good = [r for r in parsed if not isinstance(r, Exception)]
        outs: list[bytes] = []
        if good:
            h = concat([r.h for r in good])
            state = torch.cat([r.state for r in good])
            with torch.no_grad():
                logits, exits = tuple(self.seg.module(h, state))[:2]
            self.batches.append(int(state.shape[0]))
            start = 0
            done = {}
            for r in good:
                n = r.state.shape[0]
                done[id(r)] = pack_reply(
                    r.request_id,
                    logits[start : start + n],
                    exits[start : start + n],
                    torch.zeros(n, dtype=torch.bool),
                    "ray",
                )
                start += n
        for r in parsed:
            outs.append(b"" if isinstance(r, Exception) else done[id(r)])
        return outs


def cloud_deployment(
    bundle_dir: str | Path,
    *,
    segment: int | None = None,
    replicas: int = 2,
    max_batch_size: int = 32,
    batch_wait_timeout_s: float = 0.002,
    num_cpus: float = 0.5,
) -> Any:
    """A Ray Serve application (``serve.run`` it) serving the final segment of a bundle with
    ``replicas`` replicas, each batching up to ``max_batch_size`` requests."""
    serve = require_ray()
    root = str(Path(bundle_dir).resolve())

    @serve.deployment(
        num_replicas=replicas,
        max_ongoing_requests=max(2 * max_batch_size, 8),  # else batches stay small
        ray_actor_options={"num_cpus": num_cpus},
    )
    class OfframpTier:
        def __init__(self) -> None:
            self.replica = _Replica(root, segment)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def run(self, requests: list[bytes]) -> list[bytes]:
            return self.replica.run(requests)

        async def __call__(self, data: bytes) -> bytes:
            return await self.run(data)

        def batch_sizes(self) -> list[int]:
            return list(self.replica.batches)

    return OfframpTier.bind()


class RayTierClient(BaseTierClient):
    """The device's client of a Ray Serve tier (a ``DeploymentHandle``); the same contract as
    :class:`~offramp.tiers.client.TierClient`: ``forward(h, state)`` returns the reply or
    raises :class:`~offramp.errors.TierError`, with a back-off after failures. Keyword
    arguments: ``stage``, ``codec``, ``timeout_s``, ``retry_after_s``, ``max_retry_after_s``."""

    def __init__(self, handle: Any, **requests: Any) -> None:
        super().__init__("the Ray tier", **requests)
        self.handle = handle

    def forward(self, h: Activation, state: Tensor) -> Any:
        if not self.backoff.ready():
            raise TierError("the Ray tier failed recently; not tried", "BACKING_OFF")
        rid, data = self._request(h, state)
        try:
            out = self.handle.remote(data).result(timeout_s=self.timeout_s)
            if not out:
                raise DataError("the tier refused the request as malformed")
        except Exception as exc:  # Ray's timeout and actor errors have many types
            self.backoff.failed()
            code = "DEADLINE_EXCEEDED" if "imeout" in type(exc).__name__ else "UNAVAILABLE"
            raise TierError(f"Ray tier: {type(exc).__name__}: {exc}"[:300], code) from None
        try:
            reply = self._reply(out, rid, state.shape[0])
        except TierError:
            self.backoff.failed()
            raise
        self.backoff.succeeded()
        return reply

    def close(self) -> None:
        """Nothing to close (the handle belongs to the caller)."""
