"""Reproducible tar writing and defensive tar reading for ``.efpkg`` files."""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path

from edgefleet.errors import PackageError, UsageError

__all__ = ["MEMBERS", "read_members", "write_tar"]

# Every member a package may hold; anything else means the file is not ours.
MEMBERS = ("manifest.json", "model.onnx", "model.onnx.enc", "golden.npz", "reference.json", "bom.cdx.json")


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
    tmp: str | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise UsageError(f"cannot write {out}: {err.strerror or err}")
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


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
