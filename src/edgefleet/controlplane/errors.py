"""The one table from edgefleet error families to HTTP status codes (the core never imports FastAPI)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc

from edgefleet import errors as e

__all__ = ["DB_UNAVAILABLE", "STATUS", "install", "status_for"]

log = logging.getLogger("edgefleet.controlplane")

# Most specific first: the first family an error belongs to decides.
STATUS: list[tuple[type[e.EdgefleetError], int]] = [
    (e.AuthError, 401),
    (e.ForbiddenError, 403),
    (e.NotFoundError, 404),
    (e.ConflictError, 409),
    (e.InvalidReportError, 422),
    (e.TooLargeError, 413),
    (e.IncompatibleError, 409),
    (e.RolloutError, 409),
    (e.PackageError, 422),
    (e.VerificationError, 422),
    (e.RepositoryError, 500),
    (e.UsageError, 400),
    (e.RegistryError, 400),
    (e.EdgefleetError, 500),
]


def status_for(err: e.EdgefleetError) -> int:
    for family, code in STATUS:
        if isinstance(err, family):
            return code
    return 500


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, e.EdgefleetError)
    code = status_for(exc)
    headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
    return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=code, headers=headers)


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, without echoing the input: its own handler encodes a body that is not UTF-8 (``b"\\x84l"``) by
    decoding it and answered 500 instead. Where and why each part failed is what a client needs."""
    assert isinstance(exc, RequestValidationError)
    detail: list[Any] = []
    for err in exc.errors():
        part = {k: v for k, v in err.items() if k != "input"}
        try:
            detail.append(jsonable_encoder(part))
        except (UnicodeDecodeError, TypeError, ValueError):
            detail.append({"loc": [str(x) for x in part.get("loc", ())], "msg": str(part.get("msg", "invalid"))})
    return JSONResponse({"detail": detail}, status_code=422)


DB_UNAVAILABLE = "the control plane's database is unavailable; retry later"
RETRY_AFTER_S = 5


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """A database that is down or unreachable is the server's trouble, and passing: 503 with Retry-After (a device
    keeps its report and sends it again; a load balancer's readiness probe says the same), never a 500 that reads
    like a bug. What the driver said goes to the log, not to the client."""
    first = (str(exc).splitlines() or [""])[0][:300]
    where = f"{request.method} {request.url.path}"
    log.error("database unavailable answering %s: %s: %s", where, type(exc).__name__, first)
    return JSONResponse(
        {"detail": DB_UNAVAILABLE, "error": "DatabaseUnavailable"},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(e.EdgefleetError, _handle)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    # connection refused, dropped or timed out, and a pool with no connection to give: not a constraint or a bug
    for family in (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError):
        app.add_exception_handler(family, _database_unavailable)
