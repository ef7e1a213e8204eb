"""The server's own TUF repository: upload → validate → publish, served statically under ``/tuf/``,
timestamp and snapshot re-signed before they expire by a background task."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from edgefleet.errors import PackageError

if TYPE_CHECKING:
    from edgefleet.package.reader import OpenedPackage
    from edgefleet.repository import Repository, TargetInfo

__all__ = ["RepoService"]


class RepoService:
    def __init__(self, path: Path) -> None:
        from edgefleet.repository import Repository

        self.path = path
        if not (path / "metadata" / "root.json").exists():
            Repository.init(path)
        self._repo: Repository = Repository(path)

    def root_json(self) -> bytes:
        return self._repo.root_json()

    def receive(self, chunks: list[bytes] | bytes, *, tmp_dir: Path | None = None) -> tuple[OpenedPackage, TargetInfo]:
        """Validate an uploaded package with ``open_package`` (schema, member hashes), then publish it."""
        from edgefleet.package import open_package

        tmp = Path(tempfile.mkdtemp(prefix="upload-", dir=tmp_dir))
        try:
            f = tmp / "upload.efpkg"
            f.write_bytes(chunks if isinstance(chunks, bytes) else b"".join(chunks))
            opened = open_package(f)
            named = tmp / opened.manifest.target_name
            f.rename(named)
            opened = open_package(named)
            info = self._repo.publish(named)
            return opened, info
        except PackageError:
            raise
        except (OSError, ValueError) as exc:
            raise PackageError(f"the upload is not a valid .efpkg: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def refresh(self) -> list[str]:
        return self._repo.refresh()

    def status(self) -> Any:
        return self._repo.status()


async def refresh_loop(service: RepoService, interval_s: float, log: Any) -> None:
    """Re-sign timestamp/snapshot near expiry on a timer, so devices never meet expired metadata."""
    while True:
        try:
            roles = await run_in_threadpool(service.refresh)
            if roles:
                log(f"re-signed TUF metadata: {', '.join(roles)}")
        except Exception as exc:  # keep the loop alive; the next round retries and `repo status` warns
            log(f"TUF metadata refresh failed: {exc}")
        await asyncio.sleep(interval_s)
