"""Durable, atomic file replacement: the one way edgefleet writes a file that someone may read at any moment.

A reader sees the old content or the new, never a mix, and after a power cut the file holds one of the two:
the bytes go to a temporary file in the same folder, which is flushed and synced, renamed over the target, and
the folder is synced so that the rename itself survives. This module sits at the bottom of the layers (beside
``errors.py``): the agent, the repository, the packager, the optimizer and the data helpers all use it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir"]

_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (a rename, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_temp(path: Path, mode: int | None) -> tuple[int, Path]:
    # A fresh name per write (O_EXCL): two writers of the same file never share, or truncate, one temporary file.
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        except FileExistsError:
            continue
        if mode is not None:
            os.fchmod(fd, mode)  # the umask narrowed the mode given to open; the caller's mode is the one wanted
        return fd, tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_write(
    path: Path | str,
    data: bytes | Path,
    *,
    mode: int | None = None,
    mkdir: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> Path:
    """Replace ``path`` with ``data`` (bytes, or a file's content copied in chunks, never held whole).

    ``mode`` is the file's mode from the first byte on, whatever the umask (0o600 for a secret); None leaves it to
    the umask, as ``open`` would. ``mkdir`` creates missing parent folders. ``on_step`` is called with
    ``before_fsync``, ``after_fsync`` and ``after_rename`` (the agent's crash-point tests stop the process
    there). On an exception the temporary file is removed and the target is left as it was."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    step = on_step or (lambda _name: None)
    fd, tmp = _open_temp(path, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(data, Path):
                with data.open("rb") as src:
                    shutil.copyfileobj(src, fh, _CHUNK)
            else:
                fh.write(data)
            fh.flush()
            step("before_fsync")
            os.fsync(fh.fileno())
        step("after_fsync")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    step("after_rename")
    fsync_dir(path.parent)
    return path
