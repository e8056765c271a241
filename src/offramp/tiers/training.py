"""Training across tiers (survey §7.2: layer-wise training lends itself to it): each tier
trains its own stages on the activations it receives from the tier below, over the wire.

The device trains its stages layer-wise (:func:`~offramp.training.fit_layerwise`) on its
data, computes its last stage's outputs ``h_k`` over the training set exactly as single-process
layer-wise training caches them (same batches, no gradients), and streams them with the labels
to the next tier (:func:`send_training`, float32: lossless). The tier
(:class:`TrainServer`) trains its stages layer-wise on what it received, with the same
settings and seed — so the weights equal those of layer-wise training of the whole network in
one process (``tests/test_tiers_training.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from offramp.activations import Activation, concat, select_rows
from offramp.errors import ConfigError, DataError, TierError
from offramp.network import MultiExitNetwork, Stage
from offramp.training.cache import FeatureStore, cache_outputs
from offramp.training.layerwise import fit_layerwise
from offramp.training.loop import FitConfig

__all__ = [
    "TRAIN_SERVICE",
    "TrainServer",
    "send_training",
    "stage_network",
    "tier_outputs",
]

#: The gRPC method of a training tier.
TRAIN_SERVICE = "/offramp.tier.Tier/Train"
# what travels of a FitConfig: the settings that shape training (no paths on another machine)
_SENT = (
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "optimizer",
    "momentum",
    "lr_schedule",
    "seed",
)


def stage_network(stages: Sequence[Stage], num_classes: int) -> MultiExitNetwork:
    """Consecutive stages of a network as a network of their own (sharing their modules):
    what a tier trains."""
    blocks = [s.body for s in stages]
    heads = {i: s.head for i, s in enumerate(stages)}
    return MultiExitNetwork(blocks, heads, num_classes=num_classes)


def tier_outputs(stages: Sequence[Stage], x: Tensor, config: FitConfig) -> Tensor:
    """The last stage's output over ``x``, chained stage by stage in batches as layer-wise
    training caches them (so the next tier trains on exactly those values)."""
    store = FeatureStore()
    try:
        h = x
        for st in stages:
            (h,) = cache_outputs(
                lambda b, body=st.body: (body(b),),
                h,
                store=store,
                tag="tier",
                batch_size=max(512, config.batch_size),
                mode="memory",
            )
        return h.clone()
    finally:
        store.close()


def _settings(config: FitConfig) -> str:
    d = asdict(config)
    return json.dumps({k: d[k] for k in _SENT})


def _config(text: str) -> FitConfig:
    try:
        d = json.loads(text)
        if not isinstance(d, dict) or set(d) - set(_SENT):
            raise ValueError(f"unexpected keys {sorted(set(d) - set(_SENT))}")
        return FitConfig(show_progress=False, checkpoint=None, **d)
    except (ValueError, TypeError) as exc:
        raise DataError(f"training settings are not valid JSON for FitConfig ({exc})") from exc


def _chunks(h: Activation, y: Tensor, rows: int) -> Iterator[tuple[Activation, Tensor]]:
    for start in range(0, y.shape[0], rows):
        idx = torch.arange(start, min(start + rows, y.shape[0]))
        yield select_rows(h, idx), y[idx]


def send_training(
    target: str,
    h: Activation,
    y: Tensor,
    config: FitConfig,
    *,
    token: str,
    rows_per_message: int = 1024,
    timeout_s: float = 3600.0,
    tls_root_cert: bytes | None = None,
    server_name: str | None = None,
    max_message_bytes: int = 4 << 20,
) -> dict[str, Any]:
    """Stream ``(h, y)`` and the settings to the training tier at ``target``; its report.

    Raises:
        TierError: the tier refused (token, malformed data) or failed, with its status.
    """
    from offramp.tiers.client import channel_options
    from offramp.tiers.messages import pack_train_chunk, unpack_train_reply
    from offramp.tiers.server import TOKEN_KEY, grpc_module

    grpc = grpc_module()
    members = h if isinstance(h, tuple) else (h,)
    if y.dim() != 1 or any(t.shape[0] != y.shape[0] for t in members):
        raise ConfigError(
            f"h and y have different row counts ({[t.shape[0] for t in members]} vs "
            f"{tuple(y.shape)}): send one label per row"
        )
    opts = channel_options(max_message_bytes, server_name)
    if tls_root_cert is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=tls_root_cert)
        channel = grpc.secure_channel(target, creds, options=opts)
    else:
        channel = grpc.insecure_channel(target, options=opts)
    settings = _settings(config)

    def messages() -> Iterator[bytes]:
        for i, (hc, yc) in enumerate(_chunks(h, y, rows_per_message)):
            yield pack_train_chunk(hc, yc, settings if i == 0 else "")

    try:
        call = channel.stream_unary(TRAIN_SERVICE)
        out = call(messages(), timeout=timeout_s, metadata=((TOKEN_KEY, token),))
    except grpc.RpcError as exc:
        raise TierError(f"{target}: {exc.code().name}: {exc.details()}", exc.code().name) from None
    finally:
        channel.close()
    return json.loads(unpack_train_reply(out))


class TrainServer:
    """A tier that trains its stages on the activations streamed to it.

    Args:
        stages: the tier's stages (trained in place).
        num_classes: classes of the network.
        config: listening, token, TLS and message caps
            (:class:`~offramp.tiers.server.ServerConfig`).
        max_rows: the most training rows it accepts in one stream.
    """

    def __init__(
        self, stages: Sequence[Stage], num_classes: int, config: Any, *, max_rows: int = 10**7
    ) -> None:
        config.check()
        if not stages:
            raise ConfigError("a training tier needs at least one stage")
        self.stages, self.num_classes, self.config = list(stages), int(num_classes), config
        self.max_rows = int(max_rows)
        self.port: int | None = None
        self.reports: list[dict[str, Any]] = []
        self._server: Any = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="offramp-train")

    async def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        from offramp.tiers.server import bind, grpc_module

        grpc = grpc_module()
        handler = grpc.stream_unary_rpc_method_handler(self._train)
        self._server, self.port = bind(self.config, {TRAIN_SERVICE: handler})
        await self._server.start()
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving."""
        if self._server is not None:
            await self._server.stop(grace)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _train(self, stream: Any, context: Any) -> bytes:
        from offramp.tiers.messages import pack_train_reply, unpack_train_chunk
        from offramp.tiers.server import check_token, grpc_module

        grpc = grpc_module()
        if not check_token(context.invocation_metadata(), self.config.token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
        hs: list[Activation] = []
        ys: list[Tensor] = []
        settings = ""
        rows = 0
        try:
            async for data in stream:
                h, y, cfg = unpack_train_chunk(data)
                settings = settings or cfg
                rows += y.shape[0]
                if rows > self.max_rows:
                    raise DataError(f"more than {self.max_rows} training rows")
                hs.append(h)
                ys.append(y)
            if not ys:
                raise DataError("no training rows were sent")
            config = _config(settings)
        except DataError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        h_all, y_all = concat(hs, pad_tokens=False), torch.cat(ys)
        loop = asyncio.get_running_loop()
        try:
            report = await loop.run_in_executor(self._pool, self._fit, h_all, y_all, config)
        except Exception as exc:  # a failure answers the caller, never the server
            await context.abort(grpc.StatusCode.INTERNAL, f"training failed: {exc}")
        self.reports.append(report)
        return pack_train_reply(json.dumps(report))

    def _fit(self, h: Activation, y: Tensor, config: FitConfig) -> dict[str, Any]:
        sub = stage_network(self.stages, self.num_classes)
        assert isinstance(h, Tensor), "training tiers take one-tensor activations"
        history = fit_layerwise(sub, (h, y), config)
        return {
            "rows": int(y.shape[0]),
            "stages": [s.index for s in self.stages],
            "epochs": len(history),
            "final_loss": history[-1].loss if history else None,
        }
