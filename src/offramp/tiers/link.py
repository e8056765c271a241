"""Links between tiers, modelled and emulated.

- :class:`Link`: a link's bandwidth, one-way latency and loss, and the time a message of ``n``
  bytes takes over it (the model planning uses).
- :class:`LinkRelay`: that link made real for sockets — a TCP relay on loopback that forwards
  each direction through a token bucket at the link's bandwidth, holds every chunk for the
  one-way latency, and (with loss) stalls a chunk for a retransmission timeout now and then, as
  TCP does when a segment is lost. gRPC runs through it unchanged; no privileges needed, so
  tests and CI use it. (Kernel shaping — network namespaces, veth, ``tc tbf`` — is the
  benchmark's option where root is available; this kernel has no ``netem`` for delay, which is
  why delay lives here.)
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from dataclasses import dataclass

from offramp.errors import ConfigError

__all__ = ["LINKS", "Link", "LinkRelay"]

#: Per-message framing on top of the payload: HTTP/2 frame and gRPC headers, TCP/IP headers of
#: a small message (measured: a 1-row request costs about this much beyond its tensors).
OVERHEAD_BYTES = 200


@dataclass(frozen=True)
class Link:
    """A network link.

    Attributes:
        bandwidth_bps: bits per second, each direction.
        latency_s: one-way delay, seconds (a round trip is twice this).
        loss: chance that a message is stalled by a lost segment (TCP retransmits it).
        rto_s: the stall a loss causes (Linux's minimum retransmission timeout, 200 ms).
        name: how tables name it.

    Example:
        >>> link = Link(1e6, 0.05)
        >>> round(link.transfer_s(10_000), 4)  # 50 ms + 80,000 bits at 1 Mbit/s
        0.13
        >>> round(link.round_trip_s(10_000, 100), 4)
        0.1808
    """

    bandwidth_bps: float
    latency_s: float
    loss: float = 0.0
    rto_s: float = 0.2
    name: str = ""

    def __post_init__(self) -> None:
        if not self.bandwidth_bps > 0 or not self.latency_s >= 0 or not 0 <= self.loss < 1:
            raise ConfigError(
                f"a link needs bandwidth > 0, latency ≥ 0 and 0 ≤ loss < 1; got "
                f"{self.bandwidth_bps}, {self.latency_s}, {self.loss}"
            )

    def transfer_s(self, nbytes: float) -> float:
        """Expected seconds for ``nbytes`` to arrive: latency, serialisation, expected stall."""
        return self.latency_s + 8 * nbytes / self.bandwidth_bps + self.loss * self.rto_s

    def round_trip_s(self, up_bytes: float, down_bytes: float) -> float:
        """Expected seconds for a request of ``up_bytes`` and its reply of ``down_bytes``."""
        return self.transfer_s(up_bytes) + self.transfer_s(down_bytes)

    @property
    def label(self) -> str:
        """``name``, or e.g. ``"10 Mbit/s + 20 ms"``."""
        if self.name:
            return self.name
        return f"{self.bandwidth_bps / 1e6:g} Mbit/s + {1e3 * self.latency_s:g} ms"


#: The benchmark's three links.
LINKS = (Link(1e6, 0.050), Link(10e6, 0.020), Link(100e6, 0.005))


class _Pipe:
    """One direction: a token bucket at the link's rate, then the one-way delay."""

    def __init__(self, link: Link, rng: random.Random) -> None:
        self.link, self.rng = link, rng
        self.free_at = 0.0  # when the bucket has sent everything queued so far

    def due(self, nbytes: int, now: float) -> float:
        start = max(now, self.free_at)
        self.free_at = start + 8 * nbytes / self.link.bandwidth_bps
        stall = self.link.rto_s if self.link.loss and self.rng.random() < self.link.loss else 0.0
        return self.free_at + self.link.latency_s + stall


class LinkRelay:
    """A TCP relay on ``127.0.0.1`` emulating ``link`` towards ``target`` (see the module
    docstring); runs on its own thread. Connect to :attr:`address` instead of ``target``.

    Args:
        link: the link to emulate.
        target: ``host:port`` of the server behind it.
        seed: seeds the loss draws.

    Example:
        >>> # relay = LinkRelay(Link(10e6, 0.02), f"127.0.0.1:{port}"); client dials relay.address
    """

    def __init__(self, link: Link, target: str, *, seed: int = 0, chunk: int = 16384) -> None:
        host, _, port = target.rpartition(":")
        self.link, self.target = link, (host or "127.0.0.1", int(port))
        self.chunk = chunk
        self.bytes = {"up": 0, "down": 0}
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10) or self._server is None:
            raise ConfigError("the link relay did not start")
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        """``127.0.0.1:port`` to dial."""
        return f"127.0.0.1:{self.port}"

    def _main(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", 0)
        )
        ready.set()
        self._loop.run_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()  # the server is down: the client sees the connection drop
            return
        for src, dst, name in ((reader, up_w, "up"), (up_r, writer, "down")):
            task = asyncio.get_running_loop().create_task(
                self._pump(src, dst, _Pipe(self.link, self._rng), name)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, pipe: _Pipe, name: str
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                dst.write(data)
                await dst.drain()

        sender = asyncio.get_running_loop().create_task(deliver())
        self._tasks.add(sender)
        sender.add_done_callback(self._tasks.discard)
        try:
            while data := await src.read(self.chunk):
                self.bytes[name] += len(data)
                queue.put_nowait((pipe.due(len(data), time.monotonic()), data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait((0.0, b""))
            with contextlib.suppress(Exception):
                await sender
            with contextlib.suppress(Exception):
                dst.close()

    def close(self) -> None:
        """Stop relaying and close every connection."""

        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            tasks = list(self._tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> LinkRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
