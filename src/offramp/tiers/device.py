"""The device side: run the first segment locally, answer from its exits when they fire,
forward the rest to the next tier, and answer anyway when that tier does not.

:class:`TieredRuntime` never loses a request and never waits past its deadline: a row the next
tier answers gets that answer; a row it does not (down, past the deadline, refusing, or backed
off after a recent failure) gets the device's own last exit, marked ``degraded`` and counted.
When the tier answers again, offloading resumes (:class:`~offramp.tiers.client.Backoff`).

With a *hedge* — a tier serving the whole network from its input — the device sends each
input there as it starts computing ("The Tail at Scale"'s hedged request): a sample the
device's exits answer never waits for it (the call is cancelled), one they do not takes the
hedge's answer as soon as the device has given up, instead of starting a round trip then. On
a fast link this takes the device's compute off the tail's latency, for the bytes of every
input on the wire and the server's compute for every request. When the hedge fails, the rows
go to ``client`` (or degrade) as without one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from offramp.activations import Activation, select_rows
from offramp.errors import ConfigError, TierError
from offramp.export.segment import segment_output
from offramp.tiers.client import TierClient
from offramp.tiers.messages import Reply, merge_reply

__all__ = ["TieredResult", "TieredRuntime"]


@dataclass
class TieredResult:
    """Per sample of a batch: its prediction, exit, logits, and where it was answered.

    Attributes:
        predictions: ``(n,)`` class indices.
        exits: ``(n,)`` exit index (a degraded row: the device's last exit).
        logits: ``(n, C)``.
        offloaded: ``(n,)`` the row was sent to the next tier.
        degraded: ``(n,)`` the row should have been answered by a later tier and was not.
        bytes_sent: request bytes sent for this batch.
        error: the next tier's failure, if one happened (``None`` otherwise).
    """

    predictions: Tensor
    exits: Tensor
    logits: Tensor
    offloaded: Tensor
    degraded: Tensor
    bytes_sent: int = 0
    error: str | None = None


@dataclass
class _Stats:
    requests: int = 0
    samples: int = 0
    local: int = 0
    offloaded: int = 0
    hedged: int = 0
    degraded: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    hedge_failures: dict[str, int] = field(default_factory=dict)
    bytes_sent: int = 0


class TieredRuntime:
    """The device's runtime (see the module docstring).

    Args:
        segment: the device segment, ``(h, state) -> (logits, exits, rows, *h, state)`` (or a
            :class:`~offramp.export.SegmentOutput`) — a
            :class:`~offramp.export.Segment` or a bundle's first
            :class:`~offramp.export.LoadedSegment`; a final segment (``(logits, exits)``:
            the whole network) answers everything on the device.
        client: the next tier's :class:`~offramp.tiers.client.TierClient` (``None``: every
            forwarded row answered degraded — the device alone).
        last_exit: the device's last exit (a degraded row's exit).
        state_size: columns of the exit tests' state.
        request_rows: most rows in one request (a server refuses requests larger than its
            batch); more forwarded rows travel as several requests.
        hedge: a client of a tier that serves the whole network (stage 0; ``offramp serve``
            of a bundle exported without ``--split``), raced against the device (see the
            module docstring); ``None`` for none.

    Example:
        >>> import torch
        >>> from offramp import ThresholdPolicy
        >>> from offramp.export import segments
        >>> from offramp.models import mlp
        >>> net = mlp(4, 3, hidden=(8, 8), seed=0).eval()
        >>> device, _ = segments(net, ThresholdPolicy("max_prob", (0.5,)), [1])
        >>> rt = TieredRuntime(device, None, last_exit=0)  # no server: the device alone
        >>> r = rt(torch.randn(6, 4))
        >>> bool((r.degraded == r.offloaded).all()), rt.stats["samples"]
        (True, 6)
    """

    def __init__(
        self,
        segment: Callable[[Activation, Tensor], Sequence[Any]],
        client: TierClient | None,
        *,
        last_exit: int,
        state_size: int = 0,
        request_rows: int = 64,
        hedge: TierClient | None = None,
    ) -> None:
        if request_rows < 1:
            raise ConfigError(f"request_rows must be ≥ 1, got {request_rows}")
        if hedge is not None and hedge.stage != 0:
            raise ConfigError(
                f"a hedge serves the whole network from its input (stage 0), not stage "
                f"{hedge.stage}: serve a bundle exported without --split"
            )
        if hedge is not None and getattr(segment, "is_final", False):
            raise ConfigError(
                "the device segment ends with the final exit: it answers every row itself, "
                "so a hedge would only cost bytes and server time; export with --split"
            )
        self.segment, self.client, self.hedge = segment, client, hedge
        self.last_exit, self.state_size = int(last_exit), int(state_size)
        self.request_rows = int(request_rows)
        self._stats = _Stats()

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        target: str | None,
        *,
        threads: int | None = None,
        hedge: str | None = None,
        **client: Any,
    ) -> TieredRuntime:
        """The device runtime of an export bundle: its first segment, and a client of
        ``target`` (the next tier; ``None`` for none) with the bundle's codec unless
        ``codec=`` is given; other keyword arguments go to :class:`TierClient`. ``hedge``:
        ``host:port`` of a tier serving the whole network (its input travels as is)."""
        from offramp.export import load_bundle

        bundle = load_bundle(path, threads=threads)
        first = bundle.segments[0]
        if first.final:
            raise ConfigError(
                f"{path} is one segment (exported without --split): there is no next tier"
            )
        tc = None
        if target is not None:
            client.setdefault("codec", bundle.manifest.get("codec", "fp32"))
            tc = TierClient(target, stage=first.last, **client)
        hc = None
        if hedge is not None:
            hc = TierClient(hedge, stage=0, **{**client, "codec": "fp32"})
        return cls(first, tc, last_exit=first.last - 1, state_size=bundle.state_size, hedge=hc)

    @property
    def stats(self) -> dict[str, Any]:
        """Counts since construction: requests, samples, answered locally, offloaded (of
        which answered by the hedge), degraded, the next tier's failures and the hedge's by
        status, bytes sent."""
        s = self._stats
        return {
            "requests": s.requests,
            "samples": s.samples,
            "local": s.local,
            "offloaded": s.offloaded,
            "hedged": s.hedged,
            "degraded": s.degraded,
            "failures": dict(s.failures),
            "hedge_failures": dict(s.hedge_failures),
            "bytes_sent": s.bytes_sent,
        }

    @torch.no_grad()
    def __call__(self, x: Tensor) -> TieredResult:
        """Every sample of ``x`` answered: locally, by the next tier, or degraded."""
        n = x.shape[0]
        state = torch.zeros((n, self.state_size), dtype=torch.long)
        sent, pending = 0, []
        if self.hedge is not None:  # on their way while the device computes
            before = self.hedge.bytes_sent
            for start in range(0, n, self.request_rows):
                part = slice(start, min(start + self.request_rows, n))
                pending.append((part, self.hedge.forward_future(x[part], state[part])))
            sent = self.hedge.bytes_sent - before
        out = segment_output(self.segment(x, state))
        logits, exits = out.logits.clone(), out.exits.clone()
        rows = out.rows if out.rows is not None else exits[:0]  # final: the device alone
        offloaded = torch.zeros(n, dtype=torch.bool)
        degraded = torch.zeros(n, dtype=torch.bool)
        error, hedge_error, hedged = None, None, 0
        left = torch.ones(rows.numel(), dtype=torch.bool)  # rows still to answer, by position
        for part, call in pending:
            at = ((rows >= part.start) & (rows < part.stop)).nonzero().squeeze(1)
            if not at.numel():
                call.cancel()  # the device answered all of them
                continue
            try:
                reply = _rows(call.result(), rows[at] - part.start)
            except TierError as exc:  # these rows go on as without a hedge
                hedge_error = hedge_error or exc.code
                self._failed(exc, self._stats.hedge_failures)
                continue
            merge_reply(logits, exits, degraded, rows[at], reply, self.last_exit)
            offloaded[rows[at]] = True
            hedged += at.numel()
            left[at] = False
        todo = left.nonzero().squeeze(1)  # positions in out.rows / out.h
        if todo.numel():
            offloaded[rows[todo]] = True
            assert out.h is not None and out.state is not None
            for start in range(0, todo.numel(), self.request_rows):
                part = todo[start : start + self.request_rows]
                where = rows[part]
                reply = None
                if self.client is not None:
                    before = self.client.bytes_sent
                    try:
                        reply = self.client.forward(select_rows(out.h, part), out.state[part])
                    except TierError as exc:
                        error = error or exc.code
                        self._failed(exc, self._stats.failures)
                    sent += self.client.bytes_sent - before
                merge_reply(logits, exits, degraded, where, reply, self.last_exit)
        s = self._stats
        s.requests += 1
        s.samples += n
        s.offloaded += int(offloaded.sum())
        s.hedged += hedged
        s.local += n - int(offloaded.sum())
        s.degraded += int(degraded.sum())
        s.bytes_sent += sent
        if error is None and degraded.any():
            error = hedge_error  # the hedge failed and no tier made up for it
        return TieredResult(logits.argmax(1), exits, logits, offloaded, degraded, sent, error)

    @staticmethod
    def _failed(exc: TierError, failures: dict[str, int]) -> None:
        failures[exc.code] = failures.get(exc.code, 0) + 1


def _rows(reply: Reply, rows: Tensor) -> Reply:
    """The hedge's reply (every input row) cut to ``rows``."""
    return reply._replace(
        logits=reply.logits[rows], exits=reply.exits[rows], degraded=reply.degraded[rows]
    )
