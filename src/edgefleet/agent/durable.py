"""Durable file writes (write temp, fsync, rename, fsync dir) with named crash points for kill -9 tests.

``EDGEFLEET_AGENT_CRASHPOINT=<name>`` makes the agent ``os._exit`` at that point, which is what a power cut or a
``kill -9`` does: no ``finally``, no flush. Every durable step names three points: ``<step>.before_fsync``,
``<step>.after_fsync`` (written and synced, not yet renamed) and ``<step>.after_rename``.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgefleet import _fs
from edgefleet._fs import fsync_dir

__all__ = ["CRASHPOINT_ENV", "CRASH_EXIT_CODE", "atomic_write", "crashpoint", "durable_rename", "fsync_dir"]

CRASHPOINT_ENV = "EDGEFLEET_AGENT_CRASHPOINT"
CRASH_EXIT_CODE = 87


def crashpoint(name: str) -> None:
    """Exit at once, like a power cut, when the crash-point variable names this point (a test hook)."""
    wanted = os.environ.get(CRASHPOINT_ENV)
    if wanted and name in wanted.split(","):
        os._exit(CRASH_EXIT_CODE)


def atomic_write(path: Path, data: bytes, step: str, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old or the new content, never a mix. ``mode``
    (0o600 for a secret) is set before the first byte is written, whatever the umask."""
    _fs.atomic_write(path, data, mode=mode, on_step=lambda point: crashpoint(f"{step}.{point}"))


def durable_rename(src: Path, dst: Path, step: str) -> None:
    """Sync ``src``'s content, then rename it over ``dst`` atomically."""
    with open(src, "rb+") as f:
        crashpoint(f"{step}.before_fsync")
        os.fsync(f.fileno())
    crashpoint(f"{step}.after_fsync")
    os.replace(src, dst)
    crashpoint(f"{step}.after_rename")
    fsync_dir(dst.parent)
