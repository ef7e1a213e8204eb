"""The one table from edgefleet error families to HTTP status codes (the core never imports FastAPI)."""

from __future__ import annotations

from fastapi import FastAPI, Request
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


def install(app: FastAPI) -> None:
    app.add_exception_handler(e.EdgefleetError, _handle)
