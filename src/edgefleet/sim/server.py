"""A real ``edgefleet server`` in a subprocess, on a free port, with its database and repository in a folder."""

from __future__ import annotations

import os
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def edgefleet_command() -> list[str]:
    """The ``edgefleet`` console script next to this interpreter, else the module entry point."""
    script = Path(sys.executable).parent / "edgefleet"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from edgefleet.cli.main import run; run()"]


class ServerProcess:
    def __init__(self, workdir: Path, *, port: int | None = None, reconcile_interval_s: float = 0.5) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.reconcile_interval_s = reconcile_interval_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "server.log"

    def start(self, timeout_s: float = 60.0) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
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
