"""The signing side of the TUF repository (``tuf.api.metadata``): init, publish, refresh, status, key rotation.

Layout (docs/repository.md): ``metadata/`` (``root.json`` + ``N.root.json``, ``timestamp.json``, ``N.snapshot.json``,
``N.targets.json``; consistent snapshots), ``targets/<sha256>.<name>``, ``keys/`` (private, 0600) and
``repository.json`` (expiry periods). Serve only ``metadata/`` and ``targets/``. Root keys belong in a separate
folder (``root_keys_dir``, offline): nothing an online server signs needs them (docs/security/keys.md).

The signed files live in a :class:`~edgefleet.repository.storage.Storage`: a folder, or ``s3://bucket/prefix``
(object storage), whose online keys then stay in a local ``keys_dir``: a bucket is for publishing, never for keys.

Every change is written leaves-first (target file, targets, snapshot, then timestamp), each file atomically, so a
client that reads mid-publish sees the old consistent state or the new one. The storage's lock serializes writers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import (
    SPECIFICATION_VERSION,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from edgefleet.errors import ConflictError, RepositoryError, UsageError
from edgefleet.repository import _keys
from edgefleet.repository.status import (
    WARN_FRACTION,
    RepoStatus,
    RoleStatus,
    TargetInfo,
    due,
    expiry_warning,
    human_duration,
)
from edgefleet.repository.storage import Storage, is_s3, open_storage

__all__ = [
    "DEFAULT_DELTAS",
    "DEFAULT_EXPIRY",
    "ROLES",
    "WARN_FRACTION",
    "RepoStatus",
    "Repository",
    "RoleStatus",
    "TargetInfo",
    "default_root_keys_dir",
    "delta_bases",
    "human_duration",
    "root_key_files",
]

ROLES = ("root", "targets", "snapshot", "timestamp")
DEFAULT_DELTAS = 3  # deltas published with each version: from this many previous versions of the model
DEFAULT_EXPIRY = {
    "root": timedelta(days=365),
    "targets": timedelta(days=90),
    "snapshot": timedelta(days=7),
    "timestamp": timedelta(days=1),
}
_CONFIG = "repository.json"
_ROOT = "metadata/root.json"
_KEYS_NEEDED = (
    "{} is in object storage: give a local folder for its online keys with --keys DIR (private keys never go to a "
    "bucket)"
)
_SERIALIZER = JSONSerializer(compact=False)


def default_root_keys_dir(path: Path | str, keys_dir: Path | str | None = None) -> Path:
    """``<repo>.root-keys``: next to the repository, never inside what is served or the online keys folder. For a
    repository in object storage, ``<keys_dir>.root-keys``: root keys never go to a bucket."""
    if is_s3(path):
        if keys_dir is None:
            raise UsageError(_KEYS_NEEDED.format(path))
        path = keys_dir
    p = Path(path).resolve()  # "." has no name of its own to put a suffix on
    return p.parent / f"{p.name}.root-keys"


def root_key_files(folder: Path | str) -> list[Path]:
    """Root private key files in ``folder``, current or retired: a retired root key can still sign a forged next
    root for a client that has not moved past the root it belonged to."""
    p = Path(folder)
    return sorted(p.glob("root-*.pem")) if p.is_dir() else []


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Repository:
    """A TUF repository in a local folder or at ``s3://bucket/prefix``, with the online keys in ``keys_dir``
    (default ``<folder>/keys``; required for object storage) and the root keys in ``root_keys_dir`` (default:
    ``keys_dir``; offline in production). ``root_passphrase`` decrypts the root keys (default: ``passphrase``)."""

    def __init__(
        self,
        path: Path | str,
        passphrase: str | None = None,
        *,
        keys_dir: Path | str | None = None,
        root_keys_dir: Path | str | None = None,
        root_passphrase: str | None = None,
    ) -> None:
        self._attach(path, passphrase, keys_dir, root_keys_dir, root_passphrase)
        if not self.storage.exists(_ROOT):
            raise UsageError(f"{self.location} is not an edgefleet repository (create one with `edgefleet repo init`)")

    def _attach(
        self,
        path: Path | str,
        passphrase: str | None,
        keys_dir: Path | str | None,
        root_keys_dir: Path | str | None = None,
        root_passphrase: str | None = None,
        storage: Storage | None = None,
    ) -> None:
        self.storage = storage or _storage(path, keys_dir)
        self.location = self.storage.location
        self.passphrase = passphrase
        self.root_passphrase = root_passphrase or passphrase
        self.keys_dir = Path(keys_dir) if keys_dir else Path(path) / "keys"
        self.root_keys_dir = Path(root_keys_dir) if root_keys_dir else self.keys_dir
        try:
            raw = self.storage.read(_CONFIG)
        except FileNotFoundError:
            raise UsageError(f"{self.location} is not an edgefleet repository (create one with `edgefleet repo init`)")
        try:
            config = json.loads(raw)
            self.expiry = {role: timedelta(seconds=float(config["expiry_s"][role])) for role in ROLES}
        except (ValueError, KeyError, TypeError) as err:
            raise RepositoryError(f"{self.location}/{_CONFIG} is damaged: {err}")

    @property
    def path(self) -> Path:
        """The repository's folder (a repository in object storage has none: :class:`UsageError`)."""
        folder = getattr(self.storage, "path", None)
        if not isinstance(folder, Path):
            raise UsageError(f"{self.location} is in object storage, not a folder")
        return folder

    @property
    def metadata_dir(self) -> Path:
        return self.path / "metadata"

    @property
    def targets_dir(self) -> Path:
        return self.path / "targets"

    # -- creation ---------------------------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        path: Path | str,
        *,
        root_keys: int = 1,
        root_threshold: int = 1,
        passphrase: str | None = None,
        expiry: dict[str, timedelta] | None = None,
        keys_dir: Path | str | None = None,
        root_keys_dir: Path | str | None = None,
        root_passphrase: str | None = None,
    ) -> Repository:
        """Create a repository: root (``root_threshold`` of ``root_keys``), one key each for the other roles.

        Root keys go to ``root_keys_dir`` (default: ``keys_dir``), which must not be inside the repository: a
        served or online folder holding them would make a server compromise a root compromise."""
        storage = _storage(path, keys_dir)
        if not 1 <= root_threshold <= root_keys:
            raise UsageError(f"root threshold {root_threshold} must be between 1 and the key count {root_keys}")
        unknown = set(expiry or {}) - set(ROLES)
        if unknown:
            raise UsageError(f"unknown role(s) {', '.join(sorted(unknown))}; roles are {', '.join(ROLES)}")
        periods = DEFAULT_EXPIRY | (expiry or {})
        storage.create()
        # under the lock: two servers starting on one empty bucket must not both make a root
        with storage.lock():
            if storage.list("metadata/"):
                raise UsageError(f"{storage.location} already holds a repository; refusing to overwrite it")
            kdir = Path(keys_dir) if keys_dir else Path(path) / "keys"
            rdir = Path(root_keys_dir) if root_keys_dir else kdir
            inside = not is_s3(path) and rdir.resolve().is_relative_to(Path(path).resolve())
            if root_keys_dir is not None and (rdir.resolve() == kdir.resolve() or inside):
                raise UsageError(
                    f"--root-keys-dir {rdir} is inside the repository or its online keys folder: give a folder outside "
                    f"{storage.location} and {kdir} (ideally removable media)"
                )
            kdir.mkdir(parents=True, exist_ok=True, mode=0o700)
            rdir.mkdir(parents=True, exist_ok=True, mode=0o700)
            config = {
                "expiry_s": {r: int(p.total_seconds()) for r, p in periods.items()},
                "spec": SPECIFICATION_VERSION,
            }
            storage.write(_CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())

            now = _now()
            root = Root(expires=now + periods["root"], consistent_snapshot=True)
            signers: dict[str, list[CryptoSigner]] = {}
            for role in ROLES:
                count = root_keys if role == "root" else 1
                signers[role] = [_keys.generate() for _ in range(count)]
                for s in signers[role]:
                    root.add_key(s.public_key, role)
                    if role == "root":
                        _keys.save_signer(rdir, role, s, root_passphrase or passphrase)
                    else:
                        _keys.save_signer(kdir, role, s, passphrase)
            root.roles["root"].threshold = root_threshold

            repo_md: dict[str, Metadata[Any]] = {
                "root": Metadata(root),
                "targets": Metadata(Targets(expires=now + periods["targets"])),
                "snapshot": Metadata(Snapshot(expires=now + periods["snapshot"])),
                "timestamp": Metadata(Timestamp(expires=now + periods["timestamp"])),
            }
            self = cls.__new__(cls)
            self._attach(path, passphrase, kdir, rdir, root_passphrase, storage)
            for role in ROLES:
                md = repo_md[role]
                if role == "snapshot":
                    md.signed.meta["targets.json"] = self._metafile(repo_md["targets"])
                if role == "timestamp":
                    md.signed.snapshot_meta = self._metafile(repo_md["snapshot"])
                self._sign(md, signers[role])
                self._write(role, md)
            return self

    # -- reading ----------------------------------------------------------------------------------------------

    def _read(self, filename: str) -> Metadata[Any]:
        p = f"{self.location}/metadata/{filename}"
        try:
            return Metadata.from_bytes(self.storage.read(f"metadata/{filename}"))
        except FileNotFoundError:
            raise RepositoryError(f"{p} is missing; the repository is incomplete")
        except DeserializationError as err:
            raise RepositoryError(f"{p} is not valid TUF metadata: {err}")

    def _root(self) -> Metadata[Root]:
        return self._read("root.json")

    def _timestamp(self) -> Metadata[Timestamp]:
        return self._read("timestamp.json")

    def _snapshot(self) -> Metadata[Snapshot]:
        return self._read(f"{self._timestamp().signed.snapshot_meta.version}.snapshot.json")

    def _targets(self) -> Metadata[Targets]:
        return self._read(f"{self._snapshot().signed.meta['targets.json'].version}.targets.json")

    def _current(self, role: str) -> Metadata[Any]:
        if role == "root":
            return self._root()
        if role == "targets":
            return self._targets()
        if role == "snapshot":
            return self._snapshot()
        return self._timestamp()

    def root_json(self) -> bytes:
        """The current ``root.json``: what clients are given to trust (enrollment, ``edgefleet fetch --root``)."""
        return self.storage.read(_ROOT)

    def root_version_json(self, version: int) -> bytes:
        """``metadata/N.root.json``, kept after every rotation; :class:`FileNotFoundError` when there is none."""
        return self.storage.read(f"metadata/{version}.root.json")

    def keys(self) -> list[dict[str, Any]]:
        """Every signing key by role: id, type, the role's threshold, whether its private key is at hand (in
        ``root_keys_dir`` for root, ``keys_dir`` for the others)."""
        root = self._root().signed
        rows = []
        for role in ROLES:
            r = root.roles[role]
            for keyid in r.keyids:
                rows.append(
                    {
                        "role": role,
                        "keyid": keyid,
                        "keytype": root.keys[keyid].keytype,
                        "threshold": r.threshold,
                        "private_key": _keys.key_path(self._dir(role), role, keyid).is_file(),
                    }
                )
        return rows

    def targets(self) -> list[TargetInfo]:
        return [TargetInfo.from_tuf(tf) for _, tf in sorted(self._targets().signed.targets.items())]

    def _dir(self, role: str) -> Path:
        return self.root_keys_dir if role == "root" else self.keys_dir

    def _passphrase_of(self, role: str) -> str | None:
        return self.root_passphrase if role == "root" else self.passphrase

    # -- signing plumbing -------------------------------------------------------------------------------------

    @staticmethod
    def _metafile(md: Metadata[Any]) -> MetaFile:
        return MetaFile(version=md.signed.version)

    @staticmethod
    def _sign(md: Metadata[Any], signers: list[CryptoSigner]) -> None:
        md.signatures.clear()
        for s in signers:
            md.sign(s, append=True)

    def _write(self, role: str, md: Metadata[Any]) -> None:
        data = md.to_bytes(_SERIALIZER)
        if role == "timestamp":
            self.storage.write("metadata/timestamp.json", data)
        elif role == "root":
            self.storage.write(f"metadata/{md.signed.version}.root.json", data)
            self.storage.write(_ROOT, data)
        else:
            self.storage.write(f"metadata/{md.signed.version}.{role}.json", data)

    def _signers(self, role: str, root: Root | None = None) -> list[CryptoSigner]:
        """The role's signers found in its keys folder; at least its threshold, else :class:`RepositoryError`."""
        root = root or self._root().signed
        r = root.roles[role]
        found = []
        for keyid in r.keyids:
            key = root.keys[keyid]
            assert isinstance(key, SSlibKey)
            signer = _keys.load_signer(self._dir(role), role, key, self._passphrase_of(role))
            if signer is not None:
                found.append(signer)
        if len(found) < r.threshold:
            raise RepositoryError(
                f"only {len(found)} of the {r.threshold} {role} key(s) needed to sign are in {self._dir(role)}"
                + (" (root keys kept offline? pass --root-keys-dir DIR)" if role == "root" else "")
            )
        return found

    def _bump(self, md: Metadata[Any], role: str, expires: datetime | None) -> None:
        md.signed.version += 1
        md.signed.expires = expires or (_now() + self.expiry[role])

    def _commit(self, role: str, md: Metadata[Any] | None = None, *, expires: datetime | None = None) -> list[str]:
        """New signed version of ``role`` and of every role above it (targets → snapshot → timestamp)."""
        chain = ["targets", "snapshot", "timestamp"]
        done: list[str] = []
        previous: Metadata[Any] | None = None
        for r in chain[chain.index(role) :]:
            cur = md if r == role and md is not None else self._current(r)
            if r == "snapshot" and previous is not None:
                cur.signed.meta["targets.json"] = self._metafile(previous)
            if r == "timestamp" and previous is not None:
                cur.signed.snapshot_meta = self._metafile(previous)
            self._bump(cur, r, expires if r == role else None)
            self._sign(cur, self._signers(r))
            self._write(r, cur)
            done.append(r)
            previous = cur
        return done

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        return self.storage.lock()

    # -- operations -------------------------------------------------------------------------------------------

    def add_target(self, name: str, data: bytes | Path, custom: dict[str, Any]) -> TargetInfo:
        """Sign ``data`` (bytes, or a file read in chunks, never whole) in as target ``name`` (no package checks:
        :meth:`publish` is the normal way in)."""
        if "/" in name or name.startswith("."):
            raise UsageError(f"target name {name!r} must be a plain file name")
        with self._lock():
            targets = self._targets()
            if isinstance(data, Path):
                tf = TargetFile.from_file(name, str(data), ["sha256"])
            else:
                tf = TargetFile.from_data(name, data, ["sha256"])
            tf.unrecognized_fields["custom"] = _canonical_safe(custom)
            old = targets.signed.targets.get(name)
            if old is not None:
                if old.hashes == tf.hashes:
                    return TargetInfo.from_tuf(old)
                # a conflict with what is published, not a broken repository (HTTP 409, not 500)
                raise ConflictError(
                    f"{name} is already published with different content; publish it under a new version"
                )
            info = TargetInfo.from_tuf(tf)
            self.storage.write(f"targets/{info.path}", data)
            targets.signed.targets[name] = tf
            self._commit("targets", targets)
            return info

    def publish(self, package: Path | str, *, deltas: int = 0) -> TargetInfo:
        """Add a checked ``.efpkg`` as target ``{name}-{version}.efpkg`` with its manifest summary as custom data,
        then deltas to it from the ``deltas`` previous versions of the model (:meth:`publish_deltas`). The library
        publishes none unless asked; ``edgefleet publish`` and the control plane ask for :data:`DEFAULT_DELTAS`."""
        from edgefleet.package import open_package

        opened = open_package(Path(package))
        summary = opened.manifest.summary() | {"package_sha256": opened.package_sha256}
        info = self.add_target(opened.manifest.target_name, Path(package), summary)
        self.publish_deltas(info, deltas)
        return info

    def publish_deltas(self, new: TargetInfo, count: int = DEFAULT_DELTAS) -> list[TargetInfo]:
        """Sign in deltas to the published package ``new`` from the ``count`` newest other versions of its model
        (by manifest ``created``), each a target ``<name>-<from>-to-<to>.efdelta`` (:mod:`edgefleet.package.delta`).
        Encrypted packages get none (each version is new ciphertext: nothing to share), and a delta no smaller than
        the package is not published. Returns the deltas now published to ``new`` (those there before included)."""
        from edgefleet.package.delta import delta_custom, delta_target_name, make_delta

        if count <= 0 or new.custom.get("encrypted"):
            return []
        name, version = new.custom.get("name"), new.custom.get("version")
        if not isinstance(name, str) or not isinstance(version, str):
            return []
        with self._lock():
            targets = self._targets()
            listed = [TargetInfo.from_tuf(tf) for tf in targets.signed.targets.values()]
            new_bytes: bytes | None = None
            done: list[TargetInfo] = []
            added = False
            for base in delta_bases(listed, name, version, count):
                dname = delta_target_name(name, str(base.custom["version"]), version)
                have = targets.signed.targets.get(dname)
                if have is not None:
                    done.append(TargetInfo.from_tuf(have))
                    continue
                new_bytes = new_bytes if new_bytes is not None else self._target_bytes(new)
                delta = make_delta(self._target_bytes(base), new_bytes)
                if len(delta) >= new.length:
                    continue  # no saving: devices take the full package
                tf = TargetFile.from_data(dname, delta, ["sha256"])
                tf.unrecognized_fields["custom"] = delta_custom(
                    name=name,
                    from_version=str(base.custom["version"]),
                    to_version=version,
                    base_sha256=base.sha256,
                    target=new.name,
                    target_sha256=new.sha256,
                )
                info = TargetInfo.from_tuf(tf)
                self.storage.write(f"targets/{info.path}", delta)
                targets.signed.targets[dname] = tf
                done.append(info)
                added = True
            if added:
                self._commit("targets", targets)
            return done

    def _target_bytes(self, info: TargetInfo) -> bytes:
        """A published target's bytes, checked against its signed hash (a delta is made from exactly those)."""
        data = self.storage.read(f"targets/{info.path}")
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise RepositoryError(f"{self.location}/targets/{info.path} does not match its signed hash: restore it")
        return data

    def resign(self, role: str, *, expires: datetime | None = None) -> list[str]:
        """Sign a new version of ``role`` now (and of the roles that point at it). ``expires`` overrides the
        configured period (tests sign metadata that is already expired)."""
        if role not in ROLES:
            raise UsageError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        with self._lock():
            if role == "root":
                root = self._root()
                self._bump(root, "root", expires)
                self._sign(root, self._signers("root"))
                self._write("root", root)
                return ["root"]
            return self._commit(role, expires=expires)

    def refresh(self, force: bool = False) -> list[str]:
        """Re-sign every online role that is within :data:`WARN_FRACTION` of its period of expiring (all of them
        with ``force``); root only when its keys are here. Returns the roles re-signed."""
        resigned: list[str] = []
        root = self._root()
        if force or self._due(root.signed, "root"):
            with contextlib.suppress(RepositoryError):
                self._signers("root")
                resigned += self.resign("root")
        for role in ("targets", "snapshot", "timestamp"):
            if role in resigned:
                continue
            if force or self._due(self._current(role).signed, role):
                resigned += self.resign(role)
        return resigned

    def _due(self, signed: Signed, role: str) -> bool:
        return due(signed.expires, self.expiry[role], _now())

    def status(self) -> RepoStatus:
        root = self._root()
        mds: dict[str, Metadata[Any]] = {
            "root": root,
            "targets": self._targets(),
            "snapshot": self._snapshot(),
            "timestamp": self._timestamp(),
        }
        roles: list[RoleStatus] = []
        warnings: list[str] = []
        now = _now()
        for role in ROLES:
            signed = mds[role].signed
            r = root.signed.roles[role]
            available = sum(_keys.key_path(self._dir(role), role, k).is_file() for k in r.keyids)
            warning = expiry_warning(role, signed.expires, self.expiry[role], now)
            if warning:
                warnings.append(warning)
            if available < r.threshold and role != "root":
                warnings.append(f"only {available} of {r.threshold} {role} key(s) are in {self.keys_dir}")
            roles.append(
                RoleStatus(
                    role=role,
                    version=signed.version,
                    expires=signed.expires,
                    period=self.expiry[role],
                    keys=len(r.keyids),
                    threshold=r.threshold,
                    keys_available=available,
                    warning=warning,
                )
            )
        return RepoStatus(
            path=self.location,
            roles=roles,
            targets=len(mds["targets"].signed.targets),
            consistent_snapshot=bool(root.signed.consistent_snapshot),
            warnings=warnings,
        )

    def rotate_key(self, role: str, *, keyid: str | None = None) -> list[str]:
        """Replace ``role``'s keys (all of them, or the one whose id starts with ``keyid``) with new ones.

        A new root version lists the new keys, signed by the old root threshold (and, for root, by the new keys
        too), so clients holding any older root follow the chain. Then the role itself is re-signed with its new
        key. Old private key files are deleted. Returns the ids of the new keys.
        """
        if role not in ROLES:
            raise UsageError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        with self._lock():
            root_md = self._root()
            root = root_md.signed
            old_root_signers = self._signers("root", root)
            current = list(root.roles[role].keyids)
            replace = [k for k in current if keyid is None or k.startswith(keyid)]
            if not replace:
                raise UsageError(f"{role} has no key starting with {keyid!r} (it has {', '.join(current)})")
            new_signers = [_keys.generate() for _ in replace]
            for s in new_signers:
                root.add_key(s.public_key, role)
            for old in replace:
                root.revoke_key(old, role)
            self._bump(root_md, "root", None)
            new_paths = [_keys.save_signer(self._dir(role), role, s, self._passphrase_of(role)) for s in new_signers]
            try:
                # The old root's threshold vouches for the new root; for a root rotation the new keys sign too.
                self._sign(root_md, old_root_signers + (new_signers if role == "root" else []))
                self._write("root", root_md)
            except BaseException:
                for p in new_paths:
                    p.unlink(missing_ok=True)
                raise
            for old in replace:
                _keys.key_path(self._dir(role), role, old).unlink(missing_ok=True)
            if role != "root":
                self._commit(role)
            return [s.public_key.keyid for s in new_signers]


def delta_bases(targets: list[TargetInfo], name: str, version: str, count: int) -> list[TargetInfo]:
    """The published packages a delta to ``name`` ``version`` is made from: the ``count`` newest other unencrypted
    versions of the model, newest first (by manifest ``created``, then name)."""
    same = [
        t
        for t in targets
        if t.name.endswith(".efpkg")
        and t.custom.get("name") == name
        and isinstance(t.custom.get("version"), str)
        and t.custom.get("version") != version
        and not t.custom.get("encrypted")
    ]
    same.sort(key=lambda t: (str(t.custom.get("created", "")), t.name), reverse=True)
    return same[: max(0, count)]


def _storage(path: Path | str, keys_dir: Path | str | None) -> Storage:
    if is_s3(path) and keys_dir is None:
        raise UsageError(_KEYS_NEEDED.format(path))
    return open_storage(path)


def _canonical_safe(value: Any) -> Any:
    """TUF signs canonical JSON, which has no floats: keep them as their decimal strings."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _canonical_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical_safe(v) for v in value]
    return value
