"""The server's own TUF repository: upload → validate → publish, timestamp and snapshot re-signed before they
expire by a background task. A repository in a folder is also served under ``/tuf/``; one in object storage
(``s3://bucket/prefix``) is served by the bucket (or a CDN in front of it), never through the server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.errors import ConflictError, PackageError, UsageError

if TYPE_CHECKING:
    from edgefleet.package.reader import OpenedPackage
    from edgefleet.repository import Repository, TargetInfo

__all__ = ["RepoService"]


class RepoService:
    def __init__(
        self,
        path: Path,
        *,
        passphrase: str | None = None,
        s3: str | None = None,
        keys_dir: Path | None = None,
        deltas: int = 3,
    ) -> None:
        """Open the repository with its online keys only (``keys_dir``, default ``<repo>/keys``): publishing and
        refreshing timestamp/snapshot/targets never need root. A repository that does not exist yet is created with
        its root key written outside it, to ``<repo>.root-keys/`` (``<keys_dir>.root-keys/`` for object storage;
        docs/security/keys.md). ``warnings`` holds what the operator must hear at startup.

        With ``s3`` the signed files go to that bucket and ``path`` is not used for them; :attr:`path` is then the
        local folder the keys folder sits in, where uploads are spooled before they are published."""
        from edgefleet.repository import Repository, default_root_keys_dir, root_key_files
        from edgefleet.repository.storage import open_storage

        if s3 is not None and keys_dir is None:
            raise UsageError(
                f"the repository {s3} is in object storage: give the server a local folder for its online keys "
                "(--repo-keys DIR); private keys never go to a bucket"
            )
        self.deltas = deltas  # each upload also publishes deltas from this many previous versions (0: none)
        where: Path | str = s3 if s3 is not None else path
        self.location = str(where)
        self.in_object_storage = s3 is not None
        # the server's local files about the repository (the upload spool): next to the keys for object storage
        self.path = keys_dir.resolve().parent if s3 is not None and keys_dir is not None else path
        self.warnings: list[str] = []
        root_dir = default_root_keys_dir(where, keys_dir)
        created = False
        storage = open_storage(where)
        if not storage.exists("metadata/root.json"):
            try:
                Repository.init(where, passphrase=passphrase, keys_dir=keys_dir, root_keys_dir=root_dir)
                created = True
                self.warnings.append(f"root key written to {root_dir}: move it offline (docs/security/keys.md)")
            except UsageError:
                if not storage.exists("metadata/root.json"):
                    raise
                # another replica made it first, under the repository's lock: use that one
        self._repo: Repository = Repository(where, passphrase, keys_dir=keys_dir)
        if root_key_files(self._repo.keys_dir):
            self.warnings.append(
                f"root private key(s) in {self._repo.keys_dir}, next to the online keys: whoever takes over this "
                "server can re-sign root; move them offline (docs/security/keys.md)"
            )
        if not created and root_key_files(root_dir):
            self.warnings.append(f"root private key(s) still in {root_dir}: move them offline (docs/security/keys.md)")

    def root_json(self) -> bytes:
        return self._repo.root_json()

    def current_root(self) -> tuple[int, bytes]:
        """The repository's current root: its version and exact bytes."""
        raw = self._repo.root_json()
        return int(json.loads(raw)["signed"]["version"]), raw

    def root_version_json(self, version: int) -> bytes:
        """``metadata/N.root.json``: the root a token pinned, kept by the repository after every rotation."""
        try:
            return self._repo.root_version_json(version)
        except FileNotFoundError:
            raise ConflictError(
                f"the TUF root version {version} this token pins is gone from the repository: mint a new token"
            ) from None

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
            self._repo.publish_deltas(info, self.deltas)
            return opened, info
        except PackageError:
            raise
        except (OSError, ValueError) as exc:
            raise PackageError(f"the upload is not a valid .efpkg: {exc}") from exc

    def refresh(self) -> list[str]:
        return self._repo.refresh()

    def targets(self) -> list[TargetInfo]:
        """Every target the repository's current metadata signs (agent bundles among them)."""
        return self._repo.targets()

    def status(self) -> Any:
        return self._repo.status()
