"""Where an operator command goes and as whom: ``--server`` / ``EDGEFLEET_SERVER``, ``--api-token`` /
``EDGEFLEET_API_TOKEN`` (or, for a server on this machine, its admin token file), ``EDGEFLEET_CA_FILE`` and
``EDGEFLEET_INSECURE_HTTP`` — resolved once, here, for every client command, which then talks to the control
plane through the SDK (:class:`edgefleet.Client`).

Transport policy (:mod:`edgefleet.transport`): https is verified (``EDGEFLEET_CA_FILE`` pins a private CA), and
``http://`` to another machine is refused unless ``EDGEFLEET_INSECURE_HTTP=1``: the operator token rides in every
request."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import typer

from edgefleet.errors import AuthError, UsageError
from edgefleet.transport import check_url

if TYPE_CHECKING:
    from edgefleet.sdk import Client

__all__ = [
    "CA_FILE_ENV",
    "DEFAULT_SERVER",
    "INSECURE_HTTP_ENV",
    "Connection",
    "ServerOpt",
    "TokenOpt",
    "client",
    "resolve_connection",
    "resolve_token",
]

# every client command's two connection options, spelled once
ServerOpt = typer.Option(None, "--server", envvar="EDGEFLEET_SERVER", help="Control plane URL [http://127.0.0.1:8700].")
TokenOpt = typer.Option(
    None,
    "--api-token",
    envvar="EDGEFLEET_API_TOKEN",
    help="Operator API token [for a server on this machine: the file ./admin-token].",
)

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


def client(server: str | None, token: str | None, *, timeout: float = 30.0) -> Client:
    """The SDK's client for ``--server``/``--api-token``, resolved by :func:`resolve_connection`; no token found
    is refused here, with where to get one."""
    from edgefleet.sdk import Client

    class CliClient(Client):
        _untrusted_fix = f"set {CA_FILE_ENV} to the CA file that signed it"

    conn = resolve_connection(server, token)
    if not conn.token:
        raise AuthError(
            f"no API token for {conn.server}: pass --api-token or set EDGEFLEET_API_TOKEN (a server on this "
            "machine writes its admin token to ./admin-token)"
        )
    return CliClient(conn.server, conn.token, ca_file=conn.ca_file, insecure_http=conn.insecure_http, timeout=timeout)
