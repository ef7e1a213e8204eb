"""The one mapping from a control plane's error answer to the :mod:`edgefleet.errors` exception it stands for.

Every operator API client uses it — the SDK (``edgefleet.Client``), the CLI's helpers and the simulator's async
client — so a given answer is the same exception, hence the same CLI exit code (docs/cli.md), whoever asked. It
sits low (next to :mod:`edgefleet.transport`) so that clients on any layer can import it without the control
plane.

The class is the one the server names in its body (``{"detail": ..., "error": "ConflictError"}``) when that is an
edgefleet error, else the one the HTTP status means: 401 AuthError, 403 ForbiddenError, 404 NotFoundError,
409 ConflictError, 413 TooLargeError, other 4xx UsageError, 502-504 ServerUnreachable (a proxy answering for a
control plane that is down), other 5xx ServerError."""

from __future__ import annotations

from typing import Any

import httpx

from edgefleet import errors as e
from edgefleet.transport import untrusted_hint

__all__ = ["BY_STATUS", "error_of", "unreachable"]

BY_STATUS: dict[int, type[e.EdgefleetError]] = {
    401: e.AuthError,
    403: e.ForbiddenError,
    404: e.NotFoundError,
    409: e.ConflictError,
    413: e.TooLargeError,
    # a proxy in front of a control plane that is down or slow: the server is unreachable, not broken
    502: e.ServerUnreachable,
    503: e.ServerUnreachable,
    504: e.ServerUnreachable,
}


def _detail(r: httpx.Response, body: Any) -> str:
    detail: Any = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # FastAPI's request validation: one "field: message" per problem
        detail = "; ".join(
            f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg')}" if isinstance(d, dict) else str(d)
            for d in detail
        )
    if not detail:
        detail = r.text.strip()[:500] or r.reason_phrase
    # one line: a proxy's HTML error page must not spill over the terminal
    return " ".join(str(detail).split())


def error_of(r: httpx.Response) -> e.EdgefleetError:
    """The exception the error response ``r`` (status 400 or more) stands for, with the server's message and
    ``(HTTP <status>)``."""
    body: Any = None
    try:
        body = r.json()
    except ValueError:  # not JSON: a proxy's page, or an empty body
        pass
    detail = _detail(r, body)
    named = getattr(e, str(body.get("error")), None) if isinstance(body, dict) else None
    cls: type[e.EdgefleetError]
    if isinstance(named, type) and issubclass(named, e.EdgefleetError):
        cls = named
    elif r.status_code in BY_STATUS:
        cls = BY_STATUS[r.status_code]
    elif 400 <= r.status_code < 500:
        cls = e.UsageError
    else:
        cls = e.ServerError
        detail = f"the control plane failed: {detail}"
    return cls(f"{detail} (HTTP {r.status_code})")


def unreachable(server: str, exc: BaseException, fix: str) -> e.ServerUnreachable:
    """What a failed connection to ``server`` (refused, timed out, TLS refused) is: :class:`ServerUnreachable`
    naming the server, with ``fix`` (how to pin a CA) when the TLS certificate was not trusted."""
    return e.ServerUnreachable(f"cannot reach the control plane at {server}: {exc}{untrusted_hint(exc, fix)}")
