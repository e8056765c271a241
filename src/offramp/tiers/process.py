"""A tier server in its own process: ``offramp serve`` started, watched and stopped from Python.

Tests, benchmarks and notebooks that want a real server process (a crash to survive, a port to
dial, memory to watch) start it here instead of each spelling out the command line and parsing
its first line.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from offramp.errors import TierError

__all__ = ["ServeProcess"]


class ServeProcess:
    """``offramp serve BUNDLE`` as a child process, ready to dial once constructed.

    The token reaches the child through a file only this user can read (``--token-file``,
    removed once the server has read it), never its command line or environment, where other
    processes could read it. The server's log goes to a temporary file, so a chatty server
    never blocks on a full pipe; its tail is in the error when the server does not start.

    Args:
        bundle: a directory written by ``offramp export`` / :func:`offramp.export.export_segments`.
        token: the shared secret clients must present (16 characters or more).
        tier: ``"edge"`` or ``"cloud"``.
        bind: ``HOST:PORT``; port 0 lets the server pick a free one (read back into
            :attr:`port`).
        args: further ``offramp serve`` options, e.g. ``["--max-wait-ms", "1"]``.
        prefix: a command to run the server under, e.g. ``["ip", "netns", "exec", "ns0"]``.
        start_timeout_s: how long to wait for the server's ``listening on`` line.

    Raises:
        TierError: the server exited or stayed silent instead of listening; the message holds
            the end of its log.

    Example:
        >>> import tempfile, torch
        >>> from offramp.export import export_segments
        >>> from offramp.models import mlp
        >>> from offramp.policies import ThresholdPolicy
        >>> from offramp.tiers import TieredRuntime
        >>> net = mlp(4, 3, hidden=(8, 8)).eval()
        >>> d = tempfile.mkdtemp()
        >>> _ = export_segments(net, ThresholdPolicy("max_prob", (0.9,)), d,
        ...                     torch.randn(2, 4), splits=[1], fmt="torchscript")
        >>> with ServeProcess(d, token="a-secret-of-24-chars-ok!") as srv:
        ...     rt = TieredRuntime.from_bundle(d, srv.target, token="a-secret-of-24-chars-ok!")
        ...     len(rt(torch.randn(5, 4)).predictions)
        5
    """

    def __init__(
        self,
        bundle: str | Path,
        token: str,
        *,
        tier: str = "cloud",
        bind: str = "127.0.0.1:0",
        args: Sequence[str] = (),
        prefix: Sequence[str] = (),
        start_timeout_s: float = 60.0,
    ) -> None:
        self.bundle = Path(bundle)
        self.host = bind.rsplit(":", 1)[0]
        fd, token_file = tempfile.mkstemp(prefix="offramp-token-")  # mode 0600
        with os.fdopen(fd, "w") as f:
            f.write(token)
        cmd = [*prefix, sys.executable, "-m", "offramp.cli", "serve", str(bundle)]
        cmd += ["--tier", tier, "--bind", bind, "--token-file", token_file, *args]
        self._log = tempfile.TemporaryFile(mode="a+", prefix="offramp-serve-")  # O_APPEND
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True)
            line = self._first_line(start_timeout_s)
        finally:
            os.unlink(token_file)  # read at start-up: no copy of the secret left behind
        if "listening on" not in line:
            self.kill()
            tail = self.log_tail()
            self._close()
            raise TierError(
                f"offramp serve {self.bundle} did not start ({line.strip() or 'no output'}); "
                f"its log ends:\n{tail}"
            )
        self.banner = line.strip()
        self.port = int(line.split()[2].rsplit(":", 1)[1])

    def _first_line(self, timeout_s: float) -> str:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout_s):
                return f"silent for {timeout_s:g} s"
        return self.proc.stdout.readline()

    @property
    def target(self) -> str:
        """``host:port`` to dial."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self.proc.poll() is None

    def rss_mib(self) -> float | None:
        """Resident memory of the server, MiB (``None`` once it has exited; Linux only)."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        for ln in status.splitlines():
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) / 1024
        return None

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's stderr."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-chars:]

    def kill(self) -> None:
        """SIGKILL: the tier dies at once, as in a crash (its log stays readable)."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()

    def stop(self, timeout_s: float = 10.0) -> str:
        """SIGTERM, letting requests in flight finish (SIGKILL after ``timeout_s``).

        Returns:
            What the server printed after its first line (its closing statistics).
        """
        out = ""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            try:
                out, _ = self.proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()
        return out or ""

    def _close(self) -> None:
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()
        if not self._log.closed:
            self._log.close()

    def __del__(self) -> None:  # a killed server nobody stopped: no descriptor left open
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
