"""A real ``edgefleet server`` in a subprocess, on a free port, with its database and repository in a folder."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from edgefleet.errors import EdgefleetError

__all__ = ["ServerProcess", "die_with_parent", "edgefleet_command", "free_port"]


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the process that started it dies, however it dies (a test
    runner's timeout, kill -9): a demo or simulator never leaves servers and agents running behind it. Linux only;
    elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; elsewhere a guess that only narrows the choice


_given: set[int] = set()
_PORTS_FROM = 20000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing holds now, for a child process to listen on.

    The child binds it seconds later, so another process can take it meanwhile. The kernel's own choice (``bind``
    to port 0) comes from the ephemeral range, where every outgoing connection on the host also takes its local
    port and another process's ``bind(0)`` picks at random: a busy test run met that race (an agent that could not
    listen, and so never enrolled). The port is therefore chosen below the ephemeral range, where only explicit
    binds go, in a slice of that range picked by this process's id, and never twice by one process."""
    hi = _ephemeral_low()
    lo = min(_PORTS_FROM, hi // 2)
    slices = 16
    width = max(1, (hi - lo) // slices)
    start = lo + (os.getpid() % slices) * width
    candidates = [p for p in range(start, start + width) if p not in _given]
    if not candidates:  # one process that used up its slice: start over
        _given.clear()
        candidates = list(range(start, start + width))
    rng = random.Random()
    rng.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    with socket.socket() as s:  # a crowded slice: the kernel's choice, with its race
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def edgefleet_command() -> list[str]:
    """The ``edgefleet`` console script next to this interpreter, else the module entry point."""
    script = Path(sys.executable).parent / "edgefleet"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from edgefleet.cli.main import run; run()"]


class _PortTaken(Exception):
    """The server's port went to another process between :func:`free_port` and its bind."""


class ServerProcess:
    def __init__(self, workdir: Path, *, port: int | None = None, reconcile_interval_s: float = 0.5) -> None:
        self.workdir = workdir
        self._own_port = port is None  # chosen here: may be lost to another process before the server binds it
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.reconcile_interval_s = reconcile_interval_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "server.log"

    def start(self, timeout_s: float = 60.0) -> str:
        for _ in range(3):
            try:
                return self._start(timeout_s)
            except _PortTaken:
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
        return self._start(timeout_s)

    def _start(self, timeout_s: float) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        seen = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        cmd = [
            *edgefleet_command(),
            "server",
            "--db",
            f"sqlite:///{self.workdir / 'edgefleet.db'}",
            "--repo",
            str(self.workdir / "tuf-repo"),
            "--port",
            str(self.port),
            "--reconcile-interval",
            str(self.reconcile_interval_s),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir, preexec_fn=die_with_parent
        )
        log.close()
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                with self.log_path.open("rb") as f:
                    f.seek(seen)
                    said = f.read().decode(errors="replace")
                if self._own_port and "address already in use" in said:
                    raise _PortTaken
                raise EdgefleetError(f"edgefleet server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise EdgefleetError(f"edgefleet server did not answer within {timeout_s:.0f} s; see {self.log_path}")

    @property
    def admin_token(self) -> str:
        return (self.workdir / "admin-token").read_text().strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
