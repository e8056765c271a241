"""A tier server: one segment of a network behind gRPC, batching the rows of concurrent
requests, forwarding what goes on to the next tier, refusing what it must.

The server runs on ``grpc.aio``: each request is checked (token, message, stage, shapes) and
queued; one batcher task groups queued requests into a batch (up to ``max_batch_rows`` rows, or
whatever arrived within ``max_wait_ms`` of the first), runs the segment on a single worker
thread — the rows that leave at each of its exits dropped inside the segment — and answers
each request with its rows. Rows that go on past the segment travel to the next tier
(``next_tier``) in one request per batch; when that tier does not answer (down, too slow for
the deadline, refusing) they are answered from this segment's last exit and marked degraded.

Refusals, each with a status and a message saying why:

============================  ============================================================
``UNAUTHENTICATED``           missing or wrong token (compared in constant time)
``INVALID_ARGUMENT``          not a request; a tensor that does not decode; the wrong stage;
                              an activation or state of the wrong shape or dtype; more rows
                              than one batch holds
``RESOURCE_EXHAUSTED``        the queue is full (retry later), or the message is larger than
                              ``max_message_bytes`` (refused by gRPC before it is read)
``DEADLINE_EXCEEDED``         the caller's deadline passed while the request waited
============================  ============================================================

Nothing a client sends can crash the server: every request is handled inside its own task.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from offramp.activations import Activation, concat
from offramp.errors import ConfigError, DataError
from offramp.export.segment import SegmentOutput, segment_output
from offramp.tiers.messages import merge_reply, pack_reply, unpack_request

__all__ = [
    "SERVICE",
    "ServerConfig",
    "ServerThread",
    "TensorSpec",
    "TierServer",
    "bind",
    "check_token",
    "grpc_module",
]

_log = logging.getLogger("offramp.tiers")

#: The gRPC method every tier serves.
SERVICE = "/offramp.tier.Tier/Run"
#: Metadata key of the shared-secret token.
TOKEN_KEY = "x-offramp-token"


def grpc_module() -> Any:
    """``grpc``, or a ``ConfigError`` naming the extra to install."""
    try:
        import grpc
    except ImportError as exc:
        raise ConfigError("the tier wire needs grpcio: pip install 'offramp[net]'") from exc
    return grpc


def bind(config: ServerConfig, handlers: dict[str, Any]) -> tuple[Any, int]:
    """A ``grpc.aio`` server for ``handlers`` (``"/service/Method"`` → method handler), bound
    as ``config`` says (address, TLS, message caps); returns it, not started, and its port."""
    grpc = grpc_module()
    config.check()
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    by_service: dict[str, dict[str, Any]] = {}
    for path, handler in handlers.items():
        service, method = path.strip("/").split("/")
        by_service.setdefault(service, {})[method] = handler
    server.add_generic_rpc_handlers(
        tuple(grpc.method_handlers_generic_handler(s, m) for s, m in by_service.items())
    )
    address = f"{config.host}:{config.port}"
    if config.tls is not None:
        port = server.add_secure_port(address, grpc.ssl_server_credentials([config.tls]))
    else:
        port = server.add_insecure_port(address)
    if not port:
        raise ConfigError(f"cannot bind {address} (in use, or not an address of this host)")
    return server, port


def check_token(metadata: Any, token: str) -> bool:
    """The request's metadata carries ``token`` (compared in constant time)."""
    got = dict(metadata or ()).get(TOKEN_KEY, "")
    return isinstance(got, str) and hmac.compare_digest(got.encode(), token.encode())


@dataclass(frozen=True)
class TensorSpec:
    """What one tensor of a request must be: per-sample shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def check(self, t: Tensor, what: str) -> None:
        """``DataError`` unless ``t`` is a batch of this spec."""
        if t.dtype != self.dtype or tuple(t.shape[1:]) != self.shape or t.dim() == 0:
            raise DataError(
                f"{what}: expected (rows, {', '.join(map(str, self.shape))}) {self.dtype}, got "
                f"{tuple(t.shape)} {t.dtype}"
            )


@dataclass
class ServerConfig:
    """How a tier server listens, authenticates and batches.

    Attributes:
        host: the address to bind; loopback unless told otherwise.
        port: the port (0: any free port, reported by :attr:`TierServer.port`).
        token: the shared secret every request must carry (16 characters or more).
        tls: ``(private key PEM, certificate chain PEM)`` to serve TLS; ``None`` for plaintext.
        allow_plaintext_remote: serve plaintext on an address other than loopback (the token
            would cross the network in the clear); refused unless set.
        max_batch_rows: rows in one batch of the segment (and most rows one request may carry).
        max_wait_ms: how long the first queued request waits for others to join its batch.
        max_queue_rows: rows waiting at most; beyond, requests are refused with
            ``RESOURCE_EXHAUSTED``.
        max_message_bytes: the largest message received or sent.
        tier: this tier's name, returned in every reply.
    """

    token: str
    host: str = "127.0.0.1"
    port: int = 0
    tls: tuple[bytes, bytes] | None = None
    allow_plaintext_remote: bool = False
    max_batch_rows: int = 64
    max_wait_ms: float = 2.0
    max_queue_rows: int = 1024
    max_message_bytes: int = 4 << 20
    tier: str = "cloud"

    def check(self) -> None:
        """``ConfigError`` for a setting that is unsafe or impossible."""
        if len(self.token) < 16:
            raise ConfigError(
                "a tier server needs a shared-secret token of 16 characters or more (e.g. "
                "python -c 'import secrets; print(secrets.token_urlsafe(24))')"
            )
        loopback = self.host in ("127.0.0.1", "::1", "localhost")
        if not loopback and self.tls is None and not self.allow_plaintext_remote:
            raise ConfigError(
                f"refusing to serve plaintext on {self.host}: the token would cross the network "
                "in the clear; give a TLS key and certificate, or allow plaintext explicitly"
            )
        if self.max_batch_rows < 1 or self.max_queue_rows < self.max_batch_rows:
            raise ConfigError(
                f"need 1 ≤ max_batch_rows ≤ max_queue_rows, got {self.max_batch_rows}, "
                f"{self.max_queue_rows}"
            )
        if not self.max_wait_ms >= 0 or self.max_message_bytes < 1024:
            raise ConfigError("max_wait_ms must be ≥ 0 and max_message_bytes ≥ 1024")


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Item:
    request_id: str
    h: Activation
    state: Tensor
    future: asyncio.Future[Any]

    @property
    def rows(self) -> int:
        return self.state.shape[0]


SegmentFn = Callable[[Activation, Tensor], Sequence[Any]]


class TierServer:
    """One segment served over gRPC (see the module docstring).

    Args:
        segment: ``(h, state) -> (logits, exits, rows, *h members, state)`` — a
            :class:`~offramp.export.Segment`, or a bundle's
            :class:`~offramp.export.LoadedSegment`; final segments return ``(logits, exits)``.
        stages: the segment's stages ``(first, last)``: requests for another stage than
            ``first`` are refused; rows the next tier leaves unanswered fall back on exit
            ``last − 1``.
        final: the segment ends with the final exit.
        h_spec: the activation's members, one :class:`TensorSpec` each.
        state_size: columns of the exit tests' state.
        config: how to listen, authenticate and batch.
        next_tier: where rows that go on are sent (an async client with ``forward(h, state)``
            returning a :class:`~offramp.tiers.messages.Reply`); needed unless ``final``.
    """

    def __init__(
        self,
        segment: SegmentFn,
        *,
        stages: tuple[int, int],
        final: bool,
        h_spec: Sequence[TensorSpec],
        state_size: int,
        config: ServerConfig,
        next_tier: Any = None,
    ) -> None:
        config.check()
        if not final and next_tier is None:
            raise ConfigError(
                "this segment does not end with the final exit: give the next tier's address"
            )
        self.segment, self.final = segment, bool(final)
        self.stage, self.last = int(stages[0]), int(stages[1])
        self.h_spec = list(h_spec)
        self.state_spec = TensorSpec((int(state_size),), torch.long)
        self.config, self.next_tier = config, next_tier
        self.port: int | None = None
        self.stats = {
            "requests": 0,
            "rows": 0,
            "batches": 0,
            "refused": 0,
            "degraded_rows": 0,
            "abandoned_rows": 0,
        }
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="offramp-tier")
        self._queue: asyncio.Queue[_Item] | None = None
        self._queued_rows = 0
        self._server: Any = None
        self._batcher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        grpc = grpc_module()
        handler = grpc.unary_unary_rpc_method_handler(self._handle)  # raw bytes in and out
        self._server, port = bind(self.config, {SERVICE: handler})
        self._queue = asyncio.Queue()
        self._batcher = asyncio.get_running_loop().create_task(self._batch_forever())
        await self._server.start()
        self.port = port
        return port

    async def stop(self, grace: float = 1.0) -> None:
        """Stop accepting, let running requests finish for ``grace`` seconds, stop."""
        if self._server is not None:
            await self._server.stop(grace)
        if self._batcher is not None:
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def wait(self) -> None:
        """Serve until the server is stopped."""
        await self._server.wait_for_termination()

    # ------------------------------------------------------------------ requests

    async def _handle(self, data: bytes, context: Any) -> bytes:
        grpc = grpc_module()
        try:
            item = self._admit(data, context.invocation_metadata())
        except _Refused as r:
            self.stats["refused"] += 1
            await context.abort(getattr(grpc.StatusCode, r.code), str(r))
            raise  # abort raises; this line is never reached
        assert self._queue is not None
        self._queued_rows += item.rows
        self._queue.put_nowait(item)
        logits, exits, degraded = await item.future  # cancelled if the caller goes away
        return pack_reply(item.request_id, logits, exits, degraded, self.config.tier)

    def _admit(self, data: bytes, metadata: Any) -> _Item:
        if not check_token(metadata, self.config.token):
            raise _Refused("UNAUTHENTICATED", "missing or wrong token")
        try:
            req = unpack_request(data)
        except DataError as exc:
            raise _Refused("INVALID_ARGUMENT", str(exc)) from exc
        if req.stage != self.stage:
            raise _Refused(
                "INVALID_ARGUMENT",
                f"this tier runs stage {self.stage}; the request is for stage {req.stage}",
            )
        members = req.h if isinstance(req.h, tuple) else (req.h,)
        try:
            if len(members) != len(self.h_spec):
                raise DataError(
                    f"expected an activation of {len(self.h_spec)} tensors, got {len(members)}"
                )
            for i, (t, spec) in enumerate(zip(members, self.h_spec, strict=True)):
                spec.check(t, f"h[{i}]")
            self.state_spec.check(req.state, "state")
            if any(t.shape[0] != req.state.shape[0] for t in members):
                raise DataError("the activation and the state have different row counts")
        except DataError as exc:
            raise _Refused("INVALID_ARGUMENT", str(exc)) from exc
        rows = req.state.shape[0]
        if not 1 <= rows <= self.config.max_batch_rows:
            raise _Refused(
                "INVALID_ARGUMENT",
                f"a request carries 1 … {self.config.max_batch_rows} rows, got {rows}; split it",
            )
        if self._queued_rows + rows > self.config.max_queue_rows:
            raise _Refused(
                "RESOURCE_EXHAUSTED",
                f"queue full ({self._queued_rows} rows waiting); retry later or add a replica",
            )
        self.stats["requests"] += 1
        self.stats["rows"] += rows
        future = asyncio.get_running_loop().create_future()
        return _Item(req.request_id, req.h, req.state, future)

    # ------------------------------------------------------------------ batching

    async def _batch_forever(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carry: _Item | None = None
        while True:
            first = carry if carry is not None else await self._queue.get()
            carry = None
            items, rows = [first], first.rows
            until = loop.time() + self.config.max_wait_ms / 1000
            while rows < self.config.max_batch_rows:
                left = until - loop.time()
                try:
                    item = (
                        self._queue.get_nowait()
                        if left <= 0
                        else await asyncio.wait_for(self._queue.get(), left)
                    )
                except (asyncio.QueueEmpty, TimeoutError, asyncio.TimeoutError):
                    break
                if rows + item.rows > self.config.max_batch_rows:
                    carry = item  # opens the next batch
                    break
                items.append(item)
                rows += item.rows
            self._queued_rows -= rows
            live = [it for it in items if not it.future.done()]  # callers still waiting
            if live:
                await self._run_batch(live)

    async def _run_batch(self, items: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            h = concat([it.h for it in items])
            state = torch.cat([it.state for it in items])
            out = await loop.run_in_executor(self._pool, self._compute, h, state, items)
            logits, exits = out.logits, out.exits
            degraded = torch.zeros_like(exits, dtype=torch.bool)
            if not self.final and out.rows is not None and out.rows.numel():
                assert out.h is not None and out.state is not None
                logits, exits, degraded = logits.clone(), exits.clone(), degraded.clone()
                reply = await self.next_tier.forward(out.h, out.state)
                if reply is None:  # the next tier did not answer
                    self.stats["degraded_rows"] += out.rows.numel()
                merge_reply(logits, exits, degraded, out.rows, reply, self.last - 1)
        except Exception as exc:  # a failing segment answers its requests, never the loop
            _log.exception("batch of %d requests failed", len(items))
            for it in items:
                if not it.future.done():
                    it.future.set_exception(exc)
            return
        self.stats["batches"] += 1
        self.stats["abandoned_rows"] += sum(it.rows for it in items if it.future.cancelled())
        start = 0
        for it in items:
            stop = start + it.rows
            if not it.future.done():
                it.future.set_result((logits[start:stop], exits[start:stop], degraded[start:stop]))
            start = stop
        _log.debug("batch of %d rows in %.2f ms", start, 1e3 * (time.perf_counter() - t0))

    def _compute(self, h: Activation, state: Tensor, items: list[_Item]) -> SegmentOutput:
        with torch.no_grad():
            if not getattr(self.segment, "stops_early", False):
                return segment_output(self.segment(h, state))
            sizes = torch.tensor([it.rows for it in items])

            def wanted() -> Tensor:  # the rows whose caller still waits (a hedge may not)
                waiting = torch.tensor([not it.future.done() for it in items])
                return waiting.repeat_interleave(sizes)

            return segment_output(self.segment(h, state, wanted=wanted))


class ServerThread:
    """A :class:`TierServer` running on its own event loop in a background thread — for
    tests, notebooks, and processes that serve beside other work.

    Example:
        >>> # srv = ServerThread(TierServer(...)); client = TierClient(f"127.0.0.1:{srv.port}", ...)
        >>> # ...; srv.stop()
    """

    def __init__(self, server: TierServer, *, timeout_s: float = 10.0) -> None:
        import threading

        self.server = server
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="offramp-tier-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise ConfigError(f"the tier server did not start within {timeout_s} s")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.start())
        except BaseException as exc:  # reported to the constructor
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    @property
    def port(self) -> int:
        """The bound port."""
        assert self.server.port is not None
        return self.server.port

    def stop(self, grace: float = 0.5) -> None:
        """Stop the server and its thread."""
        if not self._thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop)
        fut.result(timeout=grace + 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
