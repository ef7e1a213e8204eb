"""The server's own TUF repository: upload → validate → publish, served statically under ``/tuf/``,
timestamp and snapshot re-signed before they expire by a background task."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.errors import PackageError

if TYPE_CHECKING:
    from edgefleet.package.reader import OpenedPackage
    from edgefleet.repository import Repository, TargetInfo

__all__ = ["RepoService"]


class RepoService:
    def __init__(self, path: Path, *, passphrase: str | None = None) -> None:
        """Open the repository with its online keys only (``<repo>/keys``): publishing and refreshing
        timestamp/snapshot/targets never need root. A repository that does not exist yet is created with its root
        key written outside it, to ``<repo>.root-keys/`` (docs/security/keys.md). ``warnings`` holds what the
        operator must hear at startup."""
        from edgefleet.repository import Repository, default_root_keys_dir, root_key_files

        self.path = path
        self.warnings: list[str] = []
        root_dir = default_root_keys_dir(path)
        created = False
        if not (path / "metadata" / "root.json").exists():
            Repository.init(path, passphrase=passphrase, root_keys_dir=root_dir)
            created = True
            self.warnings.append(f"root key written to {root_dir}: move it offline (docs/security/keys.md)")
        self._repo: Repository = Repository(path, passphrase)
        if root_key_files(self._repo.keys_dir):
            self.warnings.append(
                f"root private key(s) in {self._repo.keys_dir}, next to the online keys: whoever takes over this "
                "server can re-sign root; move them offline (docs/security/keys.md)"
            )
        if not created and root_key_files(root_dir):
            self.warnings.append(f"root private key(s) still in {root_dir}: move them offline (docs/security/keys.md)")

    def root_json(self) -> bytes:
        return self._repo.root_json()

    def receive(self, path: Path, *, sha256: str | None = None) -> tuple[OpenedPackage, TargetInfo]:
        """Validate an uploaded package file with ``open_package`` (schema, member hashes), then publish it.

        The caller streamed the upload to ``path`` (and removes it); ``sha256`` is the hash it took while
        streaming, checked against the file opened here. The package is opened once: the target is signed in
        under the manifest's name straight from this file, as ``Repository.publish`` would."""
        from edgefleet.package import open_package

        try:
            opened = open_package(path)
            if sha256 is not None and opened.package_sha256 != sha256:
                raise PackageError("the upload changed on disk before it was published: upload it again")
            summary = opened.manifest.summary() | {"package_sha256": opened.package_sha256}
            info = self._repo.add_target(opened.manifest.target_name, path, summary)
            return opened, info
        except PackageError:
            raise
        except (OSError, ValueError) as exc:
            raise PackageError(f"the upload is not a valid .efpkg: {exc}") from exc

    def refresh(self) -> list[str]:
        return self._repo.refresh()

    def status(self) -> Any:
        return self._repo.status()
