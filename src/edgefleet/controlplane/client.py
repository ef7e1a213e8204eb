"""A small HTTP client of the operator API, used by the CLI. Turns HTTP errors back into edgefleet errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from edgefleet.errors import (
    AuthError,
    ConflictError,
    DownloadError,
    EdgefleetError,
    ForbiddenError,
    InvalidReportError,
    NotFoundError,
    PackageError,
    TooLargeError,
    UsageError,
)

__all__ = ["DEFAULT_SERVER", "Client", "answer_of", "resolve_token", "upload_package"]

DEFAULT_SERVER = "http://127.0.0.1:8700"
_BY_STATUS: dict[int, type[EdgefleetError]] = {
    401: AuthError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    413: TooLargeError,
    422: UsageError,
    400: UsageError,
}


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
    the server's one-line detail — for this client and for async callers with their own ``httpx.AsyncClient``."""
    if r.status_code >= 400:
        body: Any = None
        try:
            body = r.json()
            detail = body.get("detail") if isinstance(body, dict) else body
        except ValueError:
            detail = r.text
        if isinstance(detail, list):  # FastAPI validation errors
            detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
        cls = _BY_STATUS.get(r.status_code, EdgefleetError)
        if r.status_code == 422 and isinstance(body, dict) and body.get("error", "").endswith("Error"):
            cls = InvalidReportError if body["error"] == "InvalidReportError" else PackageError
        raise cls(f"{detail} (HTTP {r.status_code})")
    if r.headers.get("content-type", "").startswith("application/json"):
        return r.json()
    return r.text


class Client:
    def __init__(self, server: str | None = None, token: str | None = None, *, timeout: float = 30.0) -> None:
        self.server = (server or os.environ.get("EDGEFLEET_SERVER") or DEFAULT_SERVER).rstrip("/")
        self.token = resolve_token(self.server, token)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

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
            raise DownloadError(f"cannot reach the control plane at {self.server}: {exc}") from exc
        return answer_of(r)

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=json, **kw)

    def put(self, path: str, json: Any = None) -> Any:
        return self.request("PUT", path, json=json)

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
