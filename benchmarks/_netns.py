"""Kernel-shaped links for the benchmark: the server in its own network namespace behind a
veth pair, each end's egress shaped by ``tc tbf`` at the link's bandwidth (root only; this
kernel has no ``netem``, so the latency stays in the userspace relay in front). Everything
made is removed in ``finally``, the namespace named after this process so aborted runs never
collide.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def available() -> str | None:
    """``None`` when namespaces and tbf work here, else why not."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (iproute2) not found"
    name = f"orprobe{os.getpid()}"
    r = _run("ip", "netns", "add", name)
    if r.returncode:
        return f"ip netns add failed: {r.stderr.strip()}"
    try:
        r = _run(
            "tc",
            "-n",
            name,
            "qdisc",
            "add",
            "dev",
            "lo",
            "root",
            "tbf",
            "rate",
            "1mbit",
            "burst",
            "32kbit",
            "latency",
            "400ms",
        )
        if r.returncode:
            return f"tc tbf failed: {r.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", name)
    return None


@contextlib.contextmanager
def shaped(bandwidth_bps: float, index: int = 0) -> Iterator[tuple[str, str]]:
    """A namespace whose only link, to this one, is shaped at ``bandwidth_bps`` both ways;
    yields ``(namespace, server address)``: start the server with ``ip netns exec NS ...
    --bind ADDRESS:PORT`` and dial ``ADDRESS:PORT`` from here."""
    ns = f"orS{os.getpid()}x{index}"
    host, peer = f"orH{os.getpid() % 10000}x{index}", f"orP{os.getpid() % 10000}x{index}"
    net = f"10.{77 + index}.0"
    rate = f"{int(bandwidth_bps)}bit"
    # a bucket of at least one MTU, and about 5 ms of traffic
    burst = str(max(1600, int(bandwidth_bps * 0.005 / 8)))  # bytes
    tbf = ("root", "tbf", "rate", rate, "burst", burst, "latency", "1s")
    steps = [
        ("ip", "netns", "add", ns),
        ("ip", "link", "add", host, "type", "veth", "peer", "name", peer),
        ("ip", "link", "set", peer, "netns", ns),
        ("ip", "addr", "add", f"{net}.1/30", "dev", host),
        ("ip", "-n", ns, "addr", "add", f"{net}.2/30", "dev", peer),
        ("ip", "link", "set", host, "up"),
        ("ip", "-n", ns, "link", "set", peer, "up"),
        ("ip", "-n", ns, "link", "set", "lo", "up"),
        ("tc", "qdisc", "add", "dev", host, *tbf),  # egress only: shape both ends
        ("tc", "-n", ns, "qdisc", "add", "dev", peer, *tbf),
    ]
    try:
        for cmd in steps:
            r = _run(*cmd)
            if r.returncode:
                raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
        yield ns, f"{net}.2"
    finally:
        _run("ip", "link", "del", host)  # takes its peer with it
        _run("ip", "netns", "del", ns)
