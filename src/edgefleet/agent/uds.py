"""The local inference API on a Unix domain socket, next to TCP (docs/agent.md, "Local zero-copy path").

Same HTTP stack, same OIP app, same handover as the TCP port (ADR 0032): the agent owns the listening socket and
answers 503 while no worker runs; once a worker is the active backend it is handed this socket with the TCP one
(both ride the ``serve`` frame) and accepts on it itself. A Unix socket skips the TCP/IP stack (no checksums,
no loopback device, no Nagle) and its access is the file's: whoever may open the path may call the model.

The path is replaced only when it is a socket nobody answers on (left by a killed agent); a live server there,
or any other kind of file, is an error rather than something to remove.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

from edgefleet.agent.httpserver import Handler, HTTPLimits, HTTPServer
from edgefleet.errors import AgentError

__all__ = ["UnixHTTPServer", "serve_uds"]

MAX_PATH = 107  # sun_path holds 108 bytes with the terminating NUL


class UnixHTTPServer(HTTPServer):
    """An :class:`HTTPServer` on a Unix socket; closing it removes the socket file it created."""

    path: Path

    @property
    def port(self) -> int:
        return 0

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                self.path.unlink()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.2)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError, TimeoutError):
            return False
        except OSError:
            return False
        return True


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_uds(handler: Handler | Any, path: Path | str, limits: HTTPLimits | None = None) -> UnixHTTPServer:
    """Listen on the Unix socket ``path`` in this event loop (``handler`` as for ``httpserver.serve_http``)."""
    path = Path(path)
    fn: Handler = getattr(handler, "handle", handler)
    if limits is None:
        limits = getattr(handler, "limits", None) or HTTPLimits.for_device(None)
    if len(os.fsencode(path)) > MAX_PATH:
        raise AgentError(f"the Unix socket path {path} is over {MAX_PATH} bytes; choose a shorter one")
    deadline = time.monotonic() + 3.0
    while True:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None:
            if not stat.S_ISSOCK(mode):
                raise AgentError(f"{path} exists and is not a socket; the inference API will not replace it")
            if _answers(path):
                # The worker of an agent that was just killed may still accept there for a few milliseconds.
                if time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                    continue
                raise AgentError(f"{path} is in use by another server")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # left by a server that is gone
        try:
            sock = _listen(path)
            break
        except OSError as err:
            if err.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                continue
            raise AgentError(f"the inference API could not listen on {path}: {err.strerror or err}") from None
    server = UnixHTTPServer(asyncio.get_running_loop(), sock, fn, limits)
    server.path = path
    return server
