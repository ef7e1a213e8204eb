"""The transport policy every edgefleet HTTP client follows: TLS verified, cleartext only to loopback.

Operator tokens, device credentials and enrollment tokens travel in request headers and bodies, so ``http://`` to
another machine would hand them to anyone on the path. Clients call :func:`check_url` before they connect and
:func:`verify_arg` for httpx's ``verify=``. This module is a low layer: it imports nothing from the control plane
or the agent (docs/security/tls.md, docs/adr/0100-tls-and-offline-root.md).
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from urllib.parse import urlparse

from edgefleet.errors import UsageError

__all__ = ["check_server_tls", "check_url", "is_loopback", "untrusted_hint", "verify_arg"]


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and the name ``localhost``: traffic that never leaves this machine."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, insecure_http: bool = False, *, allow_with: str = "--insecure-http") -> str:
    """``url`` if its scheme is https, or http to loopback (or anywhere when ``insecure_http``); else a
    :class:`UsageError` that says how to fix it. ``allow_with`` names the switch that allows cleartext for the
    caller (a flag or an environment variable)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"{url!r} is not an http(s) URL: give e.g. https://edgefleet.example.com")
    if parsed.scheme == "http" and not insecure_http and not is_loopback(parsed.hostname):
        raise UsageError(
            f"refusing cleartext {url}: credentials would cross the network unencrypted; use https:// "
            f"(with a CA file for a private CA), or {allow_with} on a network you trust"
        )
    return url


def verify_arg(ca_file: Path | str | None) -> ssl.SSLContext | bool:
    """What httpx's ``verify=`` needs: a context that trusts only the CA(s) in ``ca_file`` (a pinned private CA),
    or ``True`` (the system's trust store) when none is given."""
    if ca_file is None or str(ca_file) == "":
        return True
    path = Path(ca_file)
    if not path.is_file():
        raise UsageError(f"CA file {path} does not exist")
    try:
        return ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, ValueError) as err:
        raise UsageError(f"CA file {path} holds no usable PEM certificate: {err}")


def untrusted_hint(err: BaseException, fix: str) -> str:
    """``"; the server's TLS certificate is not trusted: <fix>"`` when ``err`` comes from a failed certificate
    check, else ``""`` — the raw ssl message does not say what to do."""
    seen: BaseException | None = err
    for _ in range(8):  # a bounded walk: exception chains can loop
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return f"; the server's TLS certificate is not trusted: {fix}"
        seen = seen.__cause__ or seen.__context__
    return ""


def check_server_tls(cert: Path | str | None, key: Path | str | None) -> bool:
    """Whether the server serves https: both files given and usable (checked here, so a wrong file is one line
    instead of a failure deep in the server's start), neither given, or a :class:`UsageError`."""
    if cert is None and key is None:
        return False
    if cert is None or key is None:
        raise UsageError("give both --tls-cert PEM and --tls-key PEM (or neither, behind a TLS-terminating proxy)")
    for what, p in (("--tls-cert", Path(cert)), ("--tls-key", Path(key))):
        if not p.is_file():
            raise UsageError(f"{what} {p} does not exist")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, ValueError) as err:
        raise UsageError(f"--tls-cert {cert} / --tls-key {key} are not a matching PEM certificate and key: {err}")
    return True
