"""Reproducible tar writing and defensive tar reading for ``.efpkg`` files."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping
from pathlib import Path

from edgefleet._fs import atomic_write
from edgefleet.errors import PackageError, UsageError

__all__ = ["MEMBERS", "read_members", "write_tar"]

# Every member a package may hold; anything else means the file is not ours.
MEMBERS = (
    "manifest.json",
    "model.onnx",
    "model.onnx.enc",
    "model.tflite",
    "model.tflite.enc",
    "model.ir.tar",
    "model.ir.tar.enc",
    "golden.npz",
    "reference.json",
    "bom.cdx.json",
)


def _order(names: list[str]) -> list[str]:
    # manifest.json first so a streaming reader meets it before the model; the rest sorted.
    return sorted(names, key=lambda n: (n != "manifest.json", n))


def write_tar(out: Path, members: Mapping[str, bytes], mtime: int) -> None:
    """Write ``members`` to ``out`` atomically: fixed order, owner 0:0, mode 0644, mtime ``mtime``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in _order(list(members)):
            data = members[name]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = mtime
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    out = Path(out)
    try:
        atomic_write(out, buf.getvalue(), mode=0o644, mkdir=True)
    except OSError as err:
        raise UsageError(f"cannot write {out}: {err.strerror or err}")


def read_members(path: Path) -> dict[str, bytes]:
    """Read every member into memory, refusing anything a package never holds. Never extracts to disk."""
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if info.name not in MEMBERS:
                    raise PackageError(f"{path} is not a valid .efpkg: unexpected member {info.name!r}")
                if not info.isreg():
                    raise PackageError(f"{path} is not a valid .efpkg: member {info.name!r} is not a regular file")
                if info.name in out:
                    raise PackageError(f"{path} is not a valid .efpkg: member {info.name!r} appears twice")
                fh = tar.extractfile(info)
                if fh is None:  # pragma: no cover - regular files always have data
                    raise PackageError(f"{path}: member {info.name!r} has no data")
                data = fh.read()
                if len(data) != info.size:
                    raise PackageError(f"{path} is truncated: member {info.name!r} is cut short")
                out[info.name] = data
    except PackageError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise PackageError(f"{path} is not a valid .efpkg (corrupt or not a tar archive: {err})")
    if not out:
        raise PackageError(f"{path} is not a valid .efpkg (empty archive)")
    return out
