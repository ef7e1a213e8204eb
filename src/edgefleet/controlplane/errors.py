"""The one table from edgefleet error families to HTTP status codes (the core never imports FastAPI)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from edgefleet import errors as e

__all__ = ["STATUS", "install", "status_for"]

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


def install(app: FastAPI) -> None:
    app.add_exception_handler(e.EdgefleetError, _handle)
    app.add_exception_handler(RequestValidationError, _invalid_request)
