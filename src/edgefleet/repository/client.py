"""The verified client (``tuf.ngclient``): refresh metadata from a trusted root, look up and download targets.

A repository is a base URL (``http(s)://``) or a local folder / ``file://`` URL (air-gapped sites copy the
repository onto a USB stick); both map to ``<base>/metadata/`` and ``<base>/targets/``. Every ``tuf`` exception
is turned into :class:`~edgefleet.errors.VerificationError` or :class:`~edgefleet.errors.DownloadError` here.
HTTP goes through :class:`HttpxFetcher`, under the transport policy of :mod:`edgefleet.transport` (TLS verified,
optionally against a pinned CA; cleartext only to loopback unless allowed).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from edgefleet._fs import atomic_write
from edgefleet.errors import DownloadError, RepositoryError, UsageError, VerificationError
from edgefleet.repository.status import TargetInfo
from edgefleet.transport import check_url, verify_arg

__all__ = ["DirectoryFetcher", "HttpxFetcher", "TufClient", "default_metadata_dir", "fetch_package"]

_CHUNK = 1 << 16


class HttpxFetcher(FetcherInterface):
    """Fetches http(s) URLs with httpx, verifying TLS with ``verify`` (see :func:`edgefleet.transport.verify_arg`),
    so a device that pins its control plane's CA pins it for the repository too."""

    def __init__(self, verify: ssl.SSLContext | bool = True, *, timeout: float = 30.0) -> None:
        self._http = httpx.Client(verify=verify, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            r = self._http.send(self._http.build_request("GET", url), stream=True)
        except httpx.TimeoutException as err:
            raise tuf_exc.SlowRetrievalError(f"{url}: {err}") from err
        if r.status_code >= 400:
            r.close()
            raise tuf_exc.DownloadHTTPError(f"HTTP {r.status_code} for {url}", r.status_code)

        def chunks() -> Iterator[bytes]:
            try:
                yield from r.iter_bytes(_CHUNK)
            except httpx.TimeoutException as err:
                raise tuf_exc.SlowRetrievalError(f"{url}: {err}") from err
            except httpx.HTTPError as err:
                raise tuf_exc.DownloadError(f"{url}: {err}") from err
            finally:
                r.close()

        return chunks()


class DirectoryFetcher(FetcherInterface):
    """Serves ``file://`` URLs below one folder; a missing file answers like HTTP 404 (what ngclient expects)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _fetch(self, url: str) -> Iterator[bytes]:
        parsed = urlparse(url)
        if parsed.scheme != "file":
            raise tuf_exc.DownloadError(f"{url} is not a file:// URL")
        path = Path(unquote(parsed.path)).resolve()
        if not path.is_relative_to(self.root):
            raise tuf_exc.DownloadError(f"{url} is outside the repository folder {self.root}")
        if not path.is_file():
            raise tuf_exc.DownloadHTTPError(f"{path} not found", 404)

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 16):
                    yield chunk

        return chunks()


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


@contextlib.contextmanager
def _tuf_errors(what: str) -> Iterator[None]:
    """Translate tuf's exceptions into ours, each with what it means for the user."""
    try:
        yield
    except tuf_exc.ExpiredMetadataError as err:
        raise VerificationError(
            f"{what}: refused expired metadata ({_one_line(err)}); a freeze attack, or the repository needs "
            "`edgefleet repo refresh`"
        )
    except tuf_exc.BadVersionNumberError as err:
        raise VerificationError(
            f"{what}: refused metadata older than what this client already trusts ({_one_line(err)}); "
            "a rollback attack, or a stale mirror"
        )
    except tuf_exc.UnsignedMetadataError as err:
        raise VerificationError(f"{what}: refused metadata without enough valid signatures ({_one_line(err)})")
    except (tuf_exc.LengthOrHashMismatchError, tuf_exc.DownloadLengthMismatchError) as err:
        raise VerificationError(
            f"{what}: the file does not match its signed length/hash ({_one_line(err)}); it was tampered with "
            "or corrupted in transit"
        )
    except tuf_exc.RepositoryError as err:
        raise VerificationError(f"{what}: repository metadata failed verification ({_one_line(err)})")
    except tuf_exc.DownloadHTTPError as err:
        raise DownloadError(f"{what}: download failed with HTTP {err.status_code} ({_one_line(err)})")
    except tuf_exc.DownloadError as err:
        cause = err.__cause__
        detail = _one_line(cause) if cause else _one_line(err)
        raise DownloadError(f"{what}: download failed ({detail})")
    except ValueError as err:  # ngclient raises ValueError for JSON it cannot parse as the expected role
        raise VerificationError(f"{what}: malformed repository metadata ({_one_line(err)})")
    except OSError as err:  # the local metadata cache or the download folder
        raise RepositoryError(f"{what}: cannot write locally ({_one_line(err)})")


def default_metadata_dir(repo: str) -> Path:
    """Where ``edgefleet fetch`` keeps trusted metadata per repository (rollback protection across runs)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgefleet" / "tuf" / hashlib.sha256(repo.encode()).hexdigest()[:16]


class TufClient:
    """One repository seen through a local metadata cache and a trusted root.

    ``trusted_root`` is the root the user trusts (enrollment, ``--root``); ``None`` uses the root already cached
    in ``metadata_dir``. Each :meth:`refresh` starts a fresh ngclient ``Updater`` (it refreshes once per life).
    An http(s) repository is read with :class:`HttpxFetcher`: ``ca_file`` pins a private CA, and ``http://`` to
    another machine is refused unless ``insecure_http``.
    """

    def __init__(
        self,
        metadata_dir: Path | str,
        repo: str,
        trusted_root: bytes | None = None,
        *,
        fetcher: FetcherInterface | None = None,
        config: UpdaterConfig | None = None,
        ca_file: Path | str | None = None,
        insecure_http: bool = False,
    ) -> None:
        self.metadata_dir = Path(metadata_dir)
        self.repo = repo
        self._local: Path | None = None
        self._owns_fetcher = False
        if repo.startswith(("http://", "https://")):
            check_url(repo, insecure_http)
            base = repo.rstrip("/")
            self._owns_fetcher = fetcher is None
            fetcher = fetcher or HttpxFetcher(verify_arg(ca_file))
        else:
            local = Path(unquote(urlparse(repo).path)) if repo.startswith("file://") else Path(repo)
            if not (local / "metadata").is_dir():
                raise UsageError(f"{repo} is neither an http(s) URL nor a repository folder (no metadata/ in it)")
            self._local = local.resolve()
            base = self._local.as_uri()
            fetcher = fetcher or DirectoryFetcher(self._local)
        self.metadata_url = f"{base}/metadata/"
        self.targets_url = f"{base}/targets/"
        self._fetcher = fetcher
        self._config = config
        if trusted_root is None and not (self.metadata_dir / "root.json").exists():
            raise UsageError(f"no trusted root: give root.json (none is cached in {self.metadata_dir})")
        self._trusted_root = trusted_root
        self._updater: Updater | None = None

    def close(self) -> None:
        """Close the HTTP connections of the fetcher this client made (a passed-in fetcher is the caller's)."""
        if isinstance(self._fetcher, HttpxFetcher) and self._owns_fetcher:
            self._fetcher.close()

    def _new_updater(self) -> Updater:
        with _tuf_errors("trusted root"):
            self.metadata_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            return Updater(
                str(self.metadata_dir),
                self.metadata_url,
                target_base_url=self.targets_url,
                fetcher=self._fetcher,
                config=self._config,
                bootstrap=self._trusted_root,
            )

    def refresh(self) -> None:
        """Fetch and verify root → timestamp → snapshot → targets; refuses rollback, freeze and bad signatures."""
        updater = self._new_updater()
        with _tuf_errors(f"repository {self.repo}"):
            updater.refresh()
        self._updater = updater

    def _updated(self) -> Updater:
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        return self._updater

    def _tuf_target(self, name: str) -> TargetFile:
        updater = self._updated()
        with _tuf_errors(f"target {name}"):
            tf = updater.get_targetinfo(name)
        if tf is None:
            raise RepositoryError(f"{name} is not in the repository {self.repo}")
        return tf

    def target_info(self, name: str) -> TargetInfo:
        return TargetInfo.from_tuf(self._tuf_target(name))

    def targets(self) -> list[TargetInfo]:
        """Every target the (verified) top-level targets role lists."""
        updater = self._updated()
        targets = updater._trusted_set.targets  # ngclient has no public listing; the set is verified
        return [TargetInfo.from_tuf(tf) for _, tf in sorted(targets.targets.items())]

    def delta_for(self, target: str, base_sha256: str) -> TargetInfo | None:
        """A published delta that rebuilds ``target`` from the package file whose SHA-256 is ``base_sha256``
        (:mod:`edgefleet.package.delta`), or None. Its entry is signed like any target; what it rebuilds is checked
        against ``target``'s own signed length and hash by the caller (:meth:`verify_file`)."""
        for t in self.targets():
            d = t.custom.get("delta")
            if (
                t.name.endswith(".efdelta")
                and isinstance(d, dict)
                and d.get("target") == target
                and d.get("base_sha256") == base_sha256
            ):
                return t
        return None

    def target_url(self, name: str) -> str:
        """Absolute URL of the target file (a file path for a local repository), for resumable downloads."""
        info = self.target_info(name)
        if self._local is not None:
            return str(self._local / "targets" / info.path)
        return f"{self.targets_url}{info.path}"

    def verify_file(self, name: str, path: Path | str) -> None:
        """Check a downloaded file's length and SHA-256 against the signed metadata."""
        tf = self._tuf_target(name)
        try:
            with open(path, "rb") as fh, _tuf_errors(f"target {name}"):
                tf.verify_length_and_hashes(fh)
        except FileNotFoundError:
            raise UsageError(f"{path} does not exist")

    def download(self, name: str, out_dir: Path | str) -> Path:
        """Download ``name`` into ``out_dir`` verified; on any failure ``out_dir`` is left as it was."""
        tf = self._tuf_target(name)
        out = Path(out_dir)
        tmp: str | None = None
        try:
            with _tuf_errors(f"target {name}"):
                out.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".part")
                os.close(fd)
                self._updated().download_target(tf, filepath=tmp)
                final = out / name
                os.replace(tmp, final)
            return final
        except BaseException:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise


def fetch_package(
    name: str,
    version: str,
    repo: str,
    root: Path | str,
    out: Path | str,
    *,
    metadata_dir: Path | str | None = None,
    device_key: Path | str | None = None,
    ca_file: Path | str | None = None,
    insecure_http: bool = False,
) -> Path:
    """``edgefleet fetch``: verified download of ``{name}-{version}.efpkg`` into the folder ``out``.

    The package is checked (schema, member hashes, and decryption when ``device_key`` is given) before it is
    placed in ``out``; on any refusal ``out`` is left exactly as it was.
    """
    from edgefleet.package import open_package

    root_path = Path(root)
    if not root_path.is_file():
        raise UsageError(f"trusted root {root_path} does not exist")
    client = TufClient(
        metadata_dir or default_metadata_dir(repo),
        repo,
        root_path.read_bytes(),
        ca_file=ca_file,
        insecure_http=insecure_http,
    )
    target = f"{name}-{version}.efpkg"
    out_dir = Path(out)
    with contextlib.closing(client), tempfile.TemporaryDirectory(prefix="edgefleet-fetch-") as staging:
        downloaded = client.download(target, staging)
        open_package(downloaded, device_key=device_key)
        try:
            return atomic_write(out_dir / target, downloaded, mode=0o644, mkdir=True)
        except OSError as err:
            raise UsageError(f"cannot write {target} into {out_dir}: {err.strerror or err}")
