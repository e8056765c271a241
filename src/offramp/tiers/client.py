"""Clients of a tier server: the device's (blocking) and a tier's own (asyncio), one
protocol.

Both send the rows that go on — ``(h, state)`` at the next tier's first stage, ``h`` encoded
with the codec — with the shared-secret token and a deadline, and read the reply. A call that
fails (the tier down, past the deadline, refusing) is a :class:`~offramp.errors.TierError`
naming the status; after one, the client *backs off*: for ``retry_after_s`` (doubling on each
failure in a row, up to ``max_retry_after_s``) it does not try the tier at all, so callers fall
back at once instead of each waiting out a deadline; the first call after the pause tries
again, and a success ends the back-off.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

from torch import Tensor

from offramp.activations import Activation
from offramp.errors import ConfigError, DataError, TierError
from offramp.tiers.codecs import CODECS
from offramp.tiers.messages import Reply, pack_request, unpack_reply
from offramp.tiers.server import SERVICE, TOKEN_KEY, grpc_module

__all__ = [
    "AsyncTierClient",
    "Backoff",
    "BaseTierClient",
    "Pending",
    "TierClient",
    "channel_options",
]


class Backoff:
    """When to try a failing tier again.

    Example:
        >>> b = Backoff(1.0, 4.0)
        >>> b.failed(now=0.0); b.ready(now=0.5), b.ready(now=1.0)
        (False, True)
        >>> b.failed(now=1.0); b.failed(now=3.0); b.delay
        4.0
        >>> b.succeeded(); b.ready(now=3.0)
        True
    """

    def __init__(self, retry_after_s: float = 1.0, max_retry_after_s: float = 30.0) -> None:
        if not 0 < retry_after_s <= max_retry_after_s:
            raise ConfigError("need 0 < retry_after_s ≤ max_retry_after_s")
        self.base, self.cap = retry_after_s, max_retry_after_s
        self.delay = 0.0
        self.until = 0.0

    def ready(self, now: float | None = None) -> bool:
        """The tier may be tried now."""
        return (time.monotonic() if now is None else now) >= self.until

    def failed(self, now: float | None = None) -> None:
        """A call failed: pause, twice as long as last time (up to the cap)."""
        self.delay = min(self.cap, self.delay * 2 if self.delay else self.base)
        self.until = (time.monotonic() if now is None else now) + self.delay

    def succeeded(self) -> None:
        """A call succeeded: no pause."""
        self.delay, self.until = 0.0, 0.0


def channel_options(max_message_bytes: int, server_name: str | None) -> list[tuple[str, Any]]:
    """gRPC channel options of every offramp client: message caps both ways, no transparent
    retries (a failure falls back at once), the TLS name override when given."""
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),  # a failed call falls back at once; the back-off retries
    ]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts


class BaseTierClient:
    """What every client of a tier shares, whatever carries its bytes: the codec, the deadline,
    the back-off, request ids, bytes counted, and the checks on a reply."""

    def __init__(
        self,
        target: str,
        *,
        stage: int,
        codec: str = "fp32",
        timeout_s: float = 1.0,
        retry_after_s: float = 1.0,
        max_retry_after_s: float = 30.0,
    ) -> None:
        if codec not in CODECS:
            raise ConfigError(f"unknown codec {codec!r}; choose one of {sorted(CODECS)}")
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
        self.target, self.stage, self.codec = target, int(stage), codec
        self.timeout_s = float(timeout_s)
        self.backoff = Backoff(retry_after_s, max_retry_after_s)
        self.bytes_sent = 0
        self._ids = itertools.count()
        self._prefix = f"{os.getpid()}-{id(self):x}"

    def _request(self, h: Activation, state: Tensor) -> tuple[str, bytes]:
        rid = f"{self._prefix}-{next(self._ids)}"
        data = pack_request(rid, self.stage, h, state, self.codec)
        self.bytes_sent += len(data)
        return rid, data

    def _reply(self, data: bytes, rid: str, rows: int) -> Reply:
        try:
            reply = unpack_reply(data)
        except DataError as exc:
            raise TierError(f"{self.target} sent a malformed reply: {exc}", "DATA_LOSS") from exc
        if reply.request_id != rid or reply.exits.shape[0] != rows:
            raise TierError(f"{self.target} answered another request", "DATA_LOSS")
        return reply


class _Common(BaseTierClient):
    def __init__(
        self,
        target: str,
        *,
        token: str,
        tls_root_cert: bytes | None = None,
        server_name: str | None = None,
        max_message_bytes: int = 4 << 20,
        **requests: Any,
    ) -> None:
        if not token:
            raise ConfigError("a tier client needs the servers' shared-secret token")
        super().__init__(target, **requests)
        self.token = token
        self.tls_root_cert, self.server_name = tls_root_cert, server_name
        self.max_message_bytes = int(max_message_bytes)

    def _error(self, exc: Any) -> TierError:
        code = exc.code().name if hasattr(exc, "code") and exc.code() else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return TierError(f"{self.target}: {code}: {details}", code)


class TierClient(_Common):
    """The device's client of the next tier (blocking calls).

    Args:
        target: ``host:port`` of the next tier.
        token: the shared secret.
        stage: the next tier's first stage (each request names it).
        codec: how activations travel (:data:`~offramp.tiers.CODECS`).
        timeout_s: each call's deadline.
        tls_root_cert: PEM of the certificate (or its CA) the server presents; ``None`` for
            plaintext.
        server_name: the name the certificate was issued for, when it differs from ``target``'s
            host (a test certificate for ``localhost`` dialled at 127.0.0.1).
        max_message_bytes: the largest message sent or received.
        retry_after_s, max_retry_after_s: the back-off after a failure (module docstring).
    """

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        grpc = grpc_module()
        opts = channel_options(self.max_message_bytes, self.server_name)
        if self.tls_root_cert is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=self.tls_root_cert)
            self._channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        self._call = self._channel.unary_unary(SERVICE)

    def forward(self, h: Activation, state: Tensor) -> Reply:
        """Send the rows ``(h, state)``; their reply, or ``TierError`` (also when backing off,
        with code ``BACKING_OFF``, without a call)."""
        return self.forward_future(h, state).result()

    def forward_future(self, h: Activation, state: Tensor) -> Pending:
        """Send the rows ``(h, state)`` without waiting: :meth:`Pending.result` gives their
        reply (or raises ``TierError``), :meth:`Pending.cancel` drops the call. A hedge's
        call — the device goes on computing while it travels."""
        if not self.backoff.ready():
            return Pending(self, None, "", state.shape[0])
        rid, data = self._request(h, state)
        call = self._call.future(data, timeout=self.timeout_s, metadata=((TOKEN_KEY, self.token),))
        return Pending(self, call, rid, state.shape[0])

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> TierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Pending:
    """A call of :meth:`TierClient.forward_future` on its way."""

    def __init__(self, client: TierClient, call: Any, rid: str, rows: int) -> None:
        self.client, self.call, self.rid, self.rows = client, call, rid, rows

    def result(self) -> Reply:
        """The reply (waits for it, up to the client's deadline), or ``TierError``."""
        c = self.client
        if self.call is None:
            raise TierError(f"{c.target} failed recently; not tried", "BACKING_OFF")
        grpc = grpc_module()
        try:
            out = self.call.result()
        except grpc.RpcError as exc:
            c.backoff.failed()
            raise c._error(exc) from None
        try:
            reply = c._reply(out, self.rid, self.rows)
        except TierError:
            c.backoff.failed()
            raise
        c.backoff.succeeded()
        return reply

    def cancel(self) -> None:
        """Drop the call (its answer is no longer needed); not a failure of the tier."""
        if self.call is not None:
            self.call.cancel()


class AsyncTierClient(_Common):
    """A tier's client of the next tier (``grpc.aio``; same arguments as :class:`TierClient`).
    :meth:`forward` returns ``None`` instead of raising, and counts the failures."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self.failures: dict[str, int] = {}
        self._channel: Any = None
        self._call: Any = None

    def _open(self) -> None:
        grpc = grpc_module()
        opts = channel_options(self.max_message_bytes, self.server_name)
        if self.tls_root_cert is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=self.tls_root_cert)
            self._channel = grpc.aio.secure_channel(self.target, creds, options=opts)
        else:
            self._channel = grpc.aio.insecure_channel(self.target, options=opts)
        self._call = self._channel.unary_unary(SERVICE)

    async def forward(self, h: Activation, state: Tensor) -> Reply | None:
        """The reply to ``(h, state)``, or ``None`` when the tier did not answer."""
        if not self.backoff.ready():
            self.failures["BACKING_OFF"] = self.failures.get("BACKING_OFF", 0) + 1
            return None
        if self._channel is None:
            self._open()
        grpc = grpc_module()
        rid, data = self._request(h, state)
        try:
            out = await self._call(
                data, timeout=self.timeout_s, metadata=((TOKEN_KEY, self.token),)
            )
            reply = self._reply(out, rid, state.shape[0])
        except (grpc.RpcError, TierError) as exc:
            err = exc if isinstance(exc, TierError) else self._error(exc)
            self.failures[err.code] = self.failures.get(err.code, 0) + 1
            self.backoff.failed()
            return None
        self.backoff.succeeded()
        return reply

    async def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            await self._channel.close()
