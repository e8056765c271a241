"""``offramp serve BUNDLE --tier edge|cloud``: one segment of an export bundle as a tier server.

The token comes from the environment variable ``OFFRAMP_TOKEN`` or ``--token-file`` (never the
command line, where other users of the machine could read it). The server binds loopback
unless ``--bind`` says otherwise; plaintext on another address needs
``--allow-plaintext-remote`` (give ``--tls-cert`` / ``--tls-key`` instead). It prints one line,
``listening on HOST:PORT ...``, then serves until SIGINT or SIGTERM, letting requests in flight
finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import torch

from offramp.errors import ConfigError, DataError

__all__ = ["TOKEN_ENV", "read_token", "serve_bundle", "server_for_bundle"]

#: The environment variable holding the shared-secret token.
TOKEN_ENV = "OFFRAMP_TOKEN"


def read_token(token_file: str | Path | None) -> str:
    """The token from ``token_file`` (its first line) or ``$OFFRAMP_TOKEN``."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {token_file}: {exc.strerror}") from exc
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(
            f"no token: set {TOKEN_ENV} or pass --token-file (the same secret on every tier)"
        )
    return token


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from exc


def _address(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--bind takes HOST:PORT (e.g. 127.0.0.1:50051), got {bind!r}")
    return host.strip("[]"), int(port)


def server_for_bundle(
    bundle_dir: str | Path,
    *,
    tier: str,
    token: str,
    segment: int | None = None,
    bind: str = "127.0.0.1:0",
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    allow_plaintext_remote: bool = False,
    next_tier: str | None = None,
    next_timeout_s: float = 1.0,
    next_tls_root: str | Path | None = None,
    next_server_name: str | None = None,
    max_batch_rows: int = 64,
    max_wait_ms: float = 2.0,
    max_queue_rows: int = 1024,
    max_message_bytes: int = 4 << 20,
    threads: int | None = 1,
) -> Any:
    """The :class:`~offramp.tiers.server.TierServer` of one segment of a bundle (not
    started). ``segment`` defaults to the last for ``tier="cloud"``, the second for
    ``"edge"``; a bundle of one segment (exported without a split) is served whole, the
    device sending its input."""
    from offramp.export import load_bundle
    from offramp.tiers.client import AsyncTierClient
    from offramp.tiers.server import ServerConfig, TensorSpec, TierServer

    if tier not in ("edge", "cloud"):
        raise ConfigError(f"--tier is edge or cloud, got {tier!r}")
    bundle = load_bundle(bundle_dir, threads=threads)
    n = len(bundle.segments)
    k = segment if segment is not None else (n - 1 if tier == "cloud" else 1)
    if not (1 if n > 1 else 0) <= k < n:  # one segment: the whole network on the server
        raise ConfigError(
            f"segment {k} is not a server's: {bundle_dir} has segments 0 … {n - 1}, and "
            "segment 0 runs on the device"
        )
    seg = bundle.segments[k]
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    cert, key = _read(tls_cert, "certificate"), _read(tls_key, "key")
    try:
        spec = [
            TensorSpec(tuple(int(d) for d in m["shape"]), getattr(torch, str(m["dtype"])))
            for m in bundle.manifest["segments"][k]["inputs"]["h"]
        ]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(
            f"{bundle_dir}: the manifest's inputs of segment {k} are malformed"
        ) from exc
    host, port = _address(bind)
    cfg = ServerConfig(
        token=token,
        host=host,
        port=port,
        tls=(key, cert) if key is not None and cert is not None else None,
        allow_plaintext_remote=allow_plaintext_remote,
        max_batch_rows=max_batch_rows,
        max_wait_ms=max_wait_ms,
        max_queue_rows=max_queue_rows,
        max_message_bytes=max_message_bytes,
        tier=tier,
    )
    nxt = None
    if next_tier is not None:
        if seg.final:
            raise ConfigError(f"segment {k} ends with the final exit: there is no next tier")
        nxt = AsyncTierClient(
            next_tier,
            token=token,
            stage=seg.last,
            codec=bundle.manifest.get("codec", "fp32"),
            timeout_s=next_timeout_s,
            tls_root_cert=_read(next_tls_root, "root certificate"),
            server_name=next_server_name,
            max_message_bytes=max_message_bytes,
        )
    return TierServer(
        seg,
        stages=(seg.first, seg.last),
        final=seg.final,
        h_spec=spec,
        state_size=bundle.state_size,
        config=cfg,
        next_tier=nxt,
    )


def serve_bundle(bundle_dir: str | Path, **kwargs: Any) -> int:
    """Serve until SIGINT / SIGTERM (see :func:`server_for_bundle` for the arguments)."""
    if kwargs.get("threads"):
        torch.set_num_threads(int(kwargs["threads"]))
    server = server_for_bundle(bundle_dir, **kwargs)

    async def main() -> None:
        port = await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        cfg = server.config
        print(
            f"listening on {cfg.host}:{port} (tier {cfg.tier}, stages {server.stage}…"
            f"{server.last - 1}, {'TLS' if cfg.tls else 'plaintext'}, max batch "
            f"{cfg.max_batch_rows} rows, wait {cfg.max_wait_ms:g} ms, queue {cfg.max_queue_rows})",
            flush=True,
        )
        await stop.wait()
        await server.stop(grace=1.0)
        if server.next_tier is not None:
            await server.next_tier.close()
        print(f"stopped; {server.stats}", flush=True)

    asyncio.run(main())
    return 0
