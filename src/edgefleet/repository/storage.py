"""Where a repository's signed files live: a local folder (the default) or S3-compatible object storage.

The signing side (``repo.py``) reads and writes through :class:`Storage` by key (``metadata/root.json``,
``targets/<sha256>.<name>``, ``repository.json``); private keys never go through it: they stay in local folders.

Each write replaces one whole file or object, never a part of one: in a folder by rename, in S3 by a single PUT (or
a multipart upload, which appears only when it completes). :meth:`Storage.lock` serializes writers: ``flock`` on
``REPO/.lock`` for a folder; for a bucket a lock object created with a conditional PUT (``If-None-Match: *``),
released with a conditional DELETE (``If-Match``), so that two servers signing into one bucket take turns
(docs/repository.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from edgefleet._fs import atomic_write
from edgefleet.errors import RepositoryError, UsageError

__all__ = ["LocalStorage", "S3Storage", "Storage", "is_s3", "open_storage"]

_LOCK = ".lock"
# Metadata that is replaced in place must not be cached by a CDN; everything else (N.snapshot.json,
# <sha256>.<name>, ...) never changes once written (consistent snapshots).
_MUTABLE = ("metadata/timestamp.json", "metadata/root.json", "repository.json")


class Storage(Protocol):
    """The files of one repository, by key (a relative path with ``/``)."""

    @property
    def location(self) -> str:
        """Where it is, for messages: a folder path or ``s3://bucket/prefix``."""
        ...

    def create(self) -> None:
        """Make it ready to receive a new repository (folders; a bucket must exist already)."""
        ...

    def read(self, key: str) -> bytes:
        """The whole file; :class:`FileNotFoundError` when there is none."""
        ...

    def exists(self, key: str) -> bool: ...

    def write(self, key: str, data: bytes | Path) -> None:
        """Replace ``key`` with ``data`` (bytes, or a local file's content) at once: a reader sees old or new."""
        ...

    def list(self, prefix: str) -> list[str]:
        """The keys under ``prefix`` (e.g. ``metadata/``), sorted."""
        ...

    def delete(self, key: str) -> None: ...

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Hold the repository's writer lock for the block."""
        ...


def is_s3(location: Path | str) -> bool:
    return isinstance(location, str) and location.startswith("s3://")


def open_storage(location: Path | str) -> Storage:
    """A folder, or ``s3://bucket[/prefix]`` (endpoint and credentials from the standard AWS variables)."""
    if is_s3(location):
        return S3Storage.from_url(str(location))
    return LocalStorage(Path(location))


class LocalStorage:
    """A folder: the layout of docs/repository.md, files 0644 (published as they are), written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def location(self) -> str:
        return str(self.path)

    def create(self) -> None:
        for sub in ("metadata", "targets"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    def read(self, key: str) -> bytes:
        return (self.path / key).read_bytes()

    def exists(self, key: str) -> bool:
        return (self.path / key).is_file()

    def write(self, key: str, data: bytes | Path) -> None:
        atomic_write(self.path / key, data, mode=0o644, mkdir=True)

    def list(self, prefix: str) -> list[str]:
        folder = self.path / prefix
        if not folder.is_dir():
            return []
        return sorted(f"{prefix.rstrip('/')}/{p.name}" for p in folder.iterdir() if p.is_file())

    def delete(self, key: str) -> None:
        (self.path / key).unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with (self.path / _LOCK).open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


class S3Storage:
    """A bucket and key prefix in S3-compatible storage, through boto3 (the ``s3`` extra, server side only).

    The endpoint and credentials come from the standard AWS variables (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``) or boto3's other sources. The writer lock is
    the object ``PREFIX/.lock``; one left by a writer that died is taken over once it is ``stale_after_s`` old."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        lock_wait_s: float = 600.0,
        stale_after_s: float = 3600.0,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.lock_wait_s = lock_wait_s
        self.stale_after_s = stale_after_s
        self._client = client if client is not None else _client()
        # threads of one process take turns here first, so only processes poll the lock object
        self._local = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> S3Storage:
        u = urlsplit(url)
        if u.scheme != "s3" or not u.netloc or u.query or u.fragment:
            raise UsageError(f"{url!r} is not an object storage location: give s3://BUCKET[/PREFIX]")
        return cls(u.netloc, u.path)

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, what: str, err: Exception) -> RepositoryError:
        return RepositoryError(f"{what} {self.location}: {_why(err)}")

    def create(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as err:
            if _code(err) in ("404", "NoSuchBucket", "NotFound"):
                raise UsageError(
                    f"bucket {self.bucket!r} does not exist: create it first, readable by devices (docs/repository.md)"
                ) from None
            raise self._fail("cannot reach", err) from None

    def read(self, key: str) -> bytes:
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            return bytes(body.read())
        except Exception as err:
            if _code(err) in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{self.location}/{key}") from None
            raise self._fail(f"cannot read {key} from", err) from None

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as err:
            if _code(err) in ("NoSuchKey", "404", "NotFound"):
                return False
            raise self._fail(f"cannot look up {key} in", err) from None

    def write(self, key: str, data: bytes | Path) -> None:
        extra = {
            "ContentType": "application/json" if key.endswith(".json") else "application/octet-stream",
            "CacheControl": "no-cache" if key in _MUTABLE else "public, max-age=31536000, immutable",
        }
        try:
            if isinstance(data, Path):
                # read in parts, never whole; a multipart upload becomes visible only once complete
                self._client.upload_file(str(data), self.bucket, self._key(key), ExtraArgs=extra)
            else:
                self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)
        except Exception as err:
            raise self._fail(f"cannot write {key} to", err) from None

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        strip = len(self._key(""))
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
            for page in pages:
                keys += [o["Key"][strip:] for o in page.get("Contents", [])]
        except Exception as err:
            raise self._fail(f"cannot list {prefix} in", err) from None
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as err:
            raise self._fail(f"cannot delete {key} from", err) from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with self._local:
            etag = self._acquire()
            try:
                yield
            finally:
                with contextlib.suppress(Exception):  # a lock we no longer own was taken over: leave it be
                    self._client.delete_object(Bucket=self.bucket, Key=self._key(_LOCK), IfMatch=etag)

    def _acquire(self) -> str:
        key = self._key(_LOCK)
        me = json.dumps({"owner": f"{socket.gethostname()}:{os.getpid()}", "since": _utcnow().isoformat()}).encode()
        deadline = time.monotonic() + self.lock_wait_s
        delay = 0.05
        while True:
            try:
                return str(self._client.put_object(Bucket=self.bucket, Key=key, Body=me, IfNoneMatch="*")["ETag"])
            except Exception as err:
                if _code(err) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    raise self._fail("cannot take the writer lock of", err) from None
            held = self._holder(key)
            if held is not None and held[1] > self.stale_after_s:
                etag = held[0]
                try:  # replace exactly the stale object: of two writers that find it stale, one wins
                    r = self._client.put_object(Bucket=self.bucket, Key=key, Body=me, IfMatch=etag)
                    return str(r["ETag"])
                except Exception as err:
                    if _code(err) not in ("PreconditionFailed", "412", "NoSuchKey", "404", "409"):
                        raise self._fail("cannot take over the writer lock of", err) from None
            if time.monotonic() > deadline:
                who = f" ({held[2]})" if held else ""
                raise RepositoryError(
                    f"{self.location} has been locked by another writer{who} for over {self.lock_wait_s:g} s; if "
                    f"that writer is gone, delete {self.location}/{_LOCK}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _holder(self, key: str) -> tuple[str, float, str] | None:
        """(ETag, age in seconds, owner) of the lock object, None when it is gone."""
        try:
            r = self._client.get_object(Bucket=self.bucket, Key=key)
            body = json.loads(r["Body"].read())
            since = datetime.fromisoformat(str(body["since"]))
            return str(r["ETag"]), (_utcnow() - since).total_seconds(), str(body.get("owner", "?"))
        except (ValueError, KeyError, TypeError):
            return None  # not ours to judge: wait for it
        except Exception as err:
            if _code(err) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._fail("cannot read the writer lock of", err) from None


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _client() -> Any:
    try:
        import boto3
    except ImportError:
        raise UsageError("an s3:// repository needs boto3: pip install 'edgefleet[s3]' (a server-side extra)") from None
    return boto3.client("s3")


def _code(err: Exception) -> str:
    """The S3 error code of a botocore ``ClientError`` ("" for anything else)."""
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return ""
    code = str(response.get("Error", {}).get("Code", ""))
    return code or str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _why(err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"[:300]
