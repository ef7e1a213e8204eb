"""Helpers for the package and repository tests: the CLI in process, a real HTTP server, repository surgery."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import os
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def serve_repository(repo: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving ``repo/metadata`` and ``repo/targets`` (never ``keys/``) from disk,
    so a test that changes the files changes what clients download."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            if not self.path.startswith(("/metadata/", "/targets/")):
                self.send_error(404)
                return
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(repo)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str | os.PathLike[str]) -> tuple[int, str, str]:
    """Run ``edgefleet ARGS`` in process through the real entry point; returns (exit code, stdout, stderr)."""
    from edgefleet.cli import _output
    from edgefleet.cli.main import run

    _output.console.width = 200  # tables unwrapped, whatever the terminal
    old = sys.argv
    sys.argv = ["edgefleet", *map(str, args)]
    code = 0
    capsys.readouterr()
    try:
        run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def listing(folder: Path) -> list[str]:
    """Every entry below ``folder`` (hidden and temporary files included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def assert_refused(code: int, err: str, *, match: str, exit_code: int = 2) -> None:
    """Exit ``exit_code`` (2: a usage error) with exactly one line on stderr, no traceback, mentioning ``match``."""
    assert code == exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert match.lower() in lines[0].lower(), lines[0]


def rewrite_member(pkg: Path, out: Path, name: str, data: bytes) -> Path:
    """Copy a package with one member's bytes replaced (hashes in the manifest left as they were)."""
    with tarfile.open(pkg) as src, tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as dst:
        for info in src:
            fh = src.extractfile(info)
            assert fh is not None
            content = data if info.name == name else fh.read()
            info.size = len(content)
            dst.addfile(info, io.BytesIO(content))
    return out


def read_member(pkg: Path, name: str) -> bytes:
    with tarfile.open(pkg) as tar:
        fh = tar.extractfile(name)
        assert fh is not None
        return fh.read()
