"""A small HTTP client of the operator API, used by the CLI. Turns HTTP errors back into edgefleet errors.

Transport policy (:mod:`edgefleet.transport`): https is verified (``EDGEFLEET_CA_FILE`` pins a private CA), and
``http://`` to another machine is refused unless ``EDGEFLEET_INSECURE_HTTP=1``: the operator token rides in every
request."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from edgefleet.apierrors import error_of, unreachable
from edgefleet.errors import UsageError
from edgefleet.transport import check_url, verify_arg

__all__ = [
    "CA_FILE_ENV",
    "DEFAULT_SERVER",
    "INSECURE_HTTP_ENV",
    "Client",
    "Connection",
    "answer_of",
    "attach_evidence",
    "judged_package",
    "read_bench_report",
    "read_gate_verdict",
    "resolve_connection",
    "resolve_token",
    "sha256_file",
    "upload_package",
]

DEFAULT_SERVER = "http://127.0.0.1:8700"
CA_FILE_ENV = "EDGEFLEET_CA_FILE"
INSECURE_HTTP_ENV = "EDGEFLEET_INSECURE_HTTP"


def resolve_token(server: str, token: str | None, token_file: Path | None = None) -> str | None:
    """``--api-token``, else ``EDGEFLEET_API_TOKEN``, else — for a server on this machine — the admin token file
    the server wrote next to its repository (``./admin-token`` by default)."""
    if token:
        return token
    env = os.environ.get("EDGEFLEET_API_TOKEN")
    if env:
        return env
    host = urlparse(server).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        p = token_file or Path("admin-token")  # the default --repo tuf-repo puts it in the working directory
        if p.is_file():
            return p.read_text().strip()
    return None


def answer_of(r: httpx.Response) -> Any:
    """A control-plane response's body (JSON or text), or its error as the matching :class:`EdgefleetError` with
    the server's one-line detail (:func:`edgefleet.apierrors.error_of`, the mapping every client shares)."""
    if r.status_code >= 400:
        raise error_of(r)
    if r.headers.get("content-type", "").startswith("application/json"):
        return r.json()
    return r.text


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise UsageError(f"{name}={os.environ[name]!r}: use 1 or 0")


@dataclass(frozen=True)
class Connection:
    """Where an operator command goes and as whom: what :func:`resolve_connection` found."""

    server: str
    token: str | None
    ca_file: str | None
    insecure_http: bool


def resolve_connection(
    server: str | None,
    token: str | None,
    *,
    ca_file: Path | str | None = None,
    insecure_http: bool | None = None,
) -> Connection:
    """The one resolution every operator client of the CLI follows: ``server`` else ``EDGEFLEET_SERVER`` else
    :data:`DEFAULT_SERVER`; the token of :func:`resolve_token`; ``ca_file`` and ``insecure_http`` default to
    ``EDGEFLEET_CA_FILE`` and ``EDGEFLEET_INSECURE_HTTP``. The URL is checked against the transport policy here."""
    url = (server or os.environ.get("EDGEFLEET_SERVER") or DEFAULT_SERVER).rstrip("/")
    allow = _env_flag(INSECURE_HTTP_ENV) if insecure_http is None else insecure_http
    check_url(url, allow, allow_with=f"{INSECURE_HTTP_ENV}=1")
    ca = str(ca_file) if ca_file is not None else os.environ.get(CA_FILE_ENV) or None
    return Connection(url, resolve_token(url, token), ca, allow)


class Client:
    """``ca_file`` and ``insecure_http`` default to ``EDGEFLEET_CA_FILE`` and ``EDGEFLEET_INSECURE_HTTP``."""

    def __init__(
        self,
        server: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        ca_file: Path | str | None = None,
        insecure_http: bool | None = None,
    ) -> None:
        conn = resolve_connection(server, token, ca_file=ca_file, insecure_http=insecure_http)
        self.server = conn.server
        verify = verify_arg(conn.ca_file)
        self.token = conn.token
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout, verify=verify)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise unreachable(self.server, exc, f"set {CA_FILE_ENV} to the CA file that signed it") from exc
        return answer_of(r)

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=json, **kw)

    def put(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("PUT", path, json=json, **kw)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def upload_package(server: str, token: str | None, pkg: Path) -> dict[str, Any]:
    """``edgefleet publish --server URL``: the server validates the package and publishes it to its TUF repo."""
    pkg = Path(pkg)
    if not pkg.is_file():
        raise UsageError(f"no package at {pkg}")
    with Client(server, token, timeout=300.0) as c, pkg.open("rb") as f:
        out: dict[str, Any] = c.request(
            "POST", "/api/v1/packages", content=f, headers={"Content-Type": "application/octet-stream"}
        )
        return out


# ------------------------------------------------------------------------------------------------ release evidence


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_object(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{what} {path} is not JSON: {err}")
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path} is not a JSON object")
    return data


def read_gate_verdict(path: Path) -> dict[str, Any]:
    """The JSON ``edgefleet gate --json`` printed, checked to be a verdict (a wrong file is one line, not a 4xx)."""
    from pydantic import ValidationError

    from edgefleet.gate.verdict import Verdict

    data = _json_object(Path(path), "gate verdict")
    hint = f"write one with `edgefleet gate … --package PKG --json > {Path(path).name}`"
    if "results" in data and "environment" in data:
        raise UsageError(f"{path} is a bench report, not a gate verdict: pass it as --bench; {hint}")
    try:
        Verdict.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        field = ".".join(str(x) for x in e["loc"]) or "(root)"
        raise UsageError(f"{path} is not a gate verdict (field {field!r}: {e['msg']}); {hint}")
    return data


def read_bench_report(path: Path) -> dict[str, Any]:
    """A ``BENCH.json`` of ``edgefleet bench``, validated against its schema and sent as written."""
    from edgefleet.bench.report import load_report

    data = _json_object(Path(path), "bench report")
    if "checks" in data and "passed" in data:
        raise UsageError(f"{path} is a gate verdict, not a bench report: pass it as --gate")
    load_report(path)
    return data


def judged_package(verdict: dict[str, Any], package: Path | None = None) -> str | None:
    """The SHA-256 of the package a verdict judged: its own ``package_sha256``, else the file it names under
    ``inputs.package`` when that file is here. ``package`` is the file the caller means; a verdict that judged
    another one is refused here, before anything is sent."""
    own = verdict.get("package_sha256")
    inputs = verdict.get("inputs")
    judged_path = inputs.get("package") if isinstance(inputs, dict) else None
    judged = own if isinstance(own, str) else None
    if judged is None and isinstance(judged_path, str) and Path(judged_path).is_file():
        judged = sha256_file(Path(judged_path))
    if package is not None:
        mine = sha256_file(package)
        if judged is not None and judged != mine:
            raise UsageError(
                f"the gate verdict judged {judged_path or 'another package'} (sha256 {judged[:12]}…), not {package} "
                f"(sha256 {mine[:12]}…): gate this package"
            )
        return mine
    return judged


def attach_evidence(
    c: Client,
    name: str,
    version: str,
    *,
    gate: dict[str, Any] | None = None,
    bench: dict[str, Any] | None = None,
    package_sha256: str | None = None,
) -> dict[str, Any]:
    """Send a gate verdict (bound to ``package_sha256``) and/or a bench report; returns the version's release
    status after the last one."""
    base = f"/api/v1/models/{name}/versions/{version}"
    out: dict[str, Any] = {}
    if bench is not None:
        out = c.put(f"{base}/bench", bench)
    if gate is not None:
        params = {"package_sha256": package_sha256} if package_sha256 else None
        out = c.put(f"{base}/gate", gate, params=params)
    return dict(out.get("release") or {})
