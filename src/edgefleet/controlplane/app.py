"""The FastAPI app factory of the control plane.

``create_app(settings)`` migrates the database, makes sure an admin API token exists, opens the TUF repository
and warms the check-in cache, so the app answers at once (also under ``httpx.ASGITransport``, which runs no
lifespan). The lifespan starts the background loops: last-seen flush + cache sync, reconciler, TUF refresh.

Other routers (the dashboard at ``/``) are added with ``create_app(settings, routers=[(router, access)])``: every
route of such a router gets ``access`` in the authorization matrix unless the matrix already names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Security
from pydantic.json_schema import models_json_schema
from sqlalchemy import or_, select
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from edgefleet import __version__
from edgefleet.config import ServerSettings
from edgefleet.controlplane import api, apidocs, dashboard, errors, loops, nudge
from edgefleet.controlplane.api import checkin
from edgefleet.controlplane.auth import (
    MATRIX,
    Access,
    app_route_keys,
    authorize,
    check_routes,
    effective_routes,
    hash_secret,
    new_secret,
)
from edgefleet.controlplane.context import ServerContext
from edgefleet.controlplane.db import ApiToken, Database, utcnow
from edgefleet.controlplane.metrics import ServerMetrics
from edgefleet.controlplane.repo_service import RepoService
from edgefleet.controlplane.store import Store
from edgefleet.errors import UsageError
from edgefleet.protocol import CrashUpload, Report, SampleUpload

__all__ = ["admin_token_path", "create_app"]

READY_TIMEOUT_S = 3.0  # a database slower than this to answer SELECT 1 makes the replica not ready

log = logging.getLogger(__name__)


def admin_token_path(settings: ServerSettings) -> Path:
    """``<repo>/../admin-token``; with the repository in object storage, ``<repo_keys>/../admin-token``
    (docs/controlplane.md)."""
    if settings.repo_s3 is not None and settings.repo_keys is not None:
        return settings.repo_keys.resolve().parent / "admin-token"
    return settings.repo.resolve().parent / "admin-token"


def _repo_service(settings: ServerSettings) -> RepoService:
    if settings.repo_s3 is None:
        settings.repo.mkdir(parents=True, exist_ok=True)
    elif settings.repository_url is None:
        # the server does not serve a bucket: devices must be told where they can read it
        raise UsageError(
            f"the repository {settings.repo_s3} is in object storage: give --repository-url URL, the base URL "
            "devices read it from (the bucket's public endpoint or a CDN)"
        )
    return RepoService(
        settings.repo,
        passphrase=settings.repo_passphrase,
        s3=settings.repo_s3,
        keys_dir=settings.repo_keys,
        deltas=settings.repo_deltas,
    )


async def _not_here(scope: Scope, receive: Receive, send: Send) -> None:
    """``/tuf/`` of a server whose repository is in object storage: the files are in the bucket, not here."""
    body = b'{"error": "this server signs into object storage: fetch the repository from its repository_url"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 404, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _bootstrap_admin(db: Database, settings: ServerSettings) -> Path | None:
    """Make sure an admin can log in. Returns the token file written on first start, else None."""
    with db.session() as s:
        if settings.admin_token:
            h = hash_secret(settings.admin_token)
            if s.scalar(select(ApiToken).where(ApiToken.token_hash == h)) is None:
                s.add(ApiToken(name="admin (settings)", role="admin", token_hash=h))
            return None
        live = or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > utcnow())
        q = select(ApiToken.id).where(ApiToken.role == "admin", ApiToken.revoked_at.is_(None), live)
        if s.scalar(q) is not None:
            return None  # an admin can still sign in (every admin token expired: a new bootstrap token below)
        token = new_secret("efa")
        s.add(ApiToken(name="admin (bootstrap)", role="admin", token_hash=hash_secret(token)))
        path = admin_token_path(settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.chmod(path, 0o600)
        return path


# Tag descriptions for /docs and /redoc, in the order they are listed there.
OPENAPI_TAGS: list[dict[str, str]] = [
    {"name": "devices", "description": "Enrolled devices: pins, groups, revocation, credential and key rotation."},
    {"name": "enrollment", "description": "One-time enrollment tokens for new devices."},
    {"name": "groups", "description": "Device groups: channel, configuration, pinned version."},
    {"name": "models", "description": "The registry: upload packages, versions, promotion, gate and bench evidence."},
    {"name": "release-policy", "description": "What a version needs before it is promoted or rolled out."},
    {"name": "rollouts", "description": "Staged rollouts gated on runtime metrics: plan, start, pause, roll back."},
    {"name": "compat", "description": "The compatibility matrix: tier x runtime version x model version."},
    {"name": "fleet", "description": "Fleet KPIs: latency, crash-free rate, update outcomes, drift."},
    {"name": "audit", "description": "The append-only audit log."},
    {"name": "tokens", "description": "Operator API tokens (admin), and who the caller is."},
    {"name": "check-in", "description": "What devices call: enroll, desired state, reports, credential rotation."},
    {"name": "meta", "description": "Liveness and Prometheus metrics."},
]

DEVICE_CREDENTIAL: dict[str, str] = {
    "type": "http",
    "scheme": "bearer",
    "description": "A device's own credential, issued at enrollment (the check-in routes).",
}


def _with_extra_components(app: FastAPI) -> None:
    """Put :class:`Report`, :class:`CrashUpload` and the device credential scheme among the OpenAPI components. The
    report and crash upload routes read their bodies themselves (size cap first), so FastAPI does not see the
    models, yet clients and fuzzers need their schemas; the check-in routes check the credential in their handlers
    (no dependency on the hot path), so their ``security`` is written by hand and its scheme is added here."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = generate()
            bodies = [(Report, "validation"), (CrashUpload, "validation"), (SampleUpload, "validation")]
            _, defs = models_json_schema(bodies, ref_template="#/components/schemas/{model}")  # type: ignore[arg-type]
            components = doc.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            for name, schema in defs.get("$defs", {}).items():
                schemas.setdefault(name, schema)
            components.setdefault("securitySchemes", {}).setdefault(checkin.DEVICE_SCHEME, DEVICE_CREDENTIAL)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: ServerSettings, *, routers: Sequence[tuple[APIRouter, Access]] = ()) -> FastAPI:
    repo = _repo_service(settings)
    db = Database(settings.db)
    db.migrate()
    store = Store(settings, db, repo)
    written = _bootstrap_admin(db, settings)
    if written is not None:
        log.info("admin API token written to %s (mode 0600)", written)
    for warning in store.repo.warnings:  # where root keys sit (docs/security/keys.md)
        log.warning("%s", warning)
    store.sync()
    store.nudger = nudge.from_url(settings.mqtt, rate=settings.nudge_rate)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.bind_loop()
        tasks = [
            asyncio.create_task(loops.flush_loop(store)),
            asyncio.create_task(loops.reconcile_loop(store, app.state.context.metrics)),
            asyncio.create_task(loops.prune_loop(store)),
            asyncio.create_task(loops.refresh_loop(store.repo, settings.metadata_refresh_s)),
        ]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            store.flush_and_sync()
            if store.nudger is not None:
                store.nudger.close()
            db.dispose()

    app = FastAPI(
        title="edgefleet control plane",
        version=__version__,
        description="Registry, devices, check-ins, rollouts gated on runtime metrics, fleet KPIs.",
        lifespan=lifespan,
        openapi_tags=OPENAPI_TAGS,
        # served from the package's own assets (apidocs), not FastAPI's CDN pages
        docs_url=None,
        redoc_url=None,
    )
    # what handlers use of this server: the ``server_context`` dependency hands it to them
    app.state.context = ServerContext(store, ServerMetrics(store))
    errors.install(app)

    @app.get("/healthz", tags=["meta"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok", "version": __version__}

    @app.get("/health/ready", tags=["meta"], responses={503: {"description": "the database does not answer"}})
    async def ready() -> JSONResponse:
        """Readiness, for a load balancer: this replica reaches its database within a few seconds. A replica that
        does not still answers check-ins from memory, but should get no operator traffic or reports."""
        try:
            await asyncio.wait_for(run_in_threadpool(store.db.ping), READY_TIMEOUT_S)
        except Exception as exc:  # whatever the driver raises, or the timeout: not ready, and why
            why = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
            return JSONResponse({"status": "not ready", "reason": f"database: {why}"}, status_code=503)
        return JSONResponse({"status": "ready", "version": __version__})

    @app.get(
        "/metrics",
        tags=["meta"],
        dependencies=[Depends(authorize), Security(api.API_TOKEN)],
        response_model=None,
        response_class=PlainTextResponse,
    )
    def metrics(request: Request) -> object:
        return api.metrics_response(request)

    app.include_router(checkin.router)
    app.include_router(api.router)
    app.include_router(dashboard.router)  # the browser dashboard at / (its routes are in auth.MATRIX)
    app.include_router(apidocs.router)  # /docs and /redoc (in auth.MATRIX, public)
    matrix = dict(MATRIX)
    for r, access in routers:
        for key in app_route_keys(r.routes):
            # the router's own paths: include it without a prefix (or give its routes full paths)
            matrix.setdefault(key, access)
        app.include_router(r)
    # Only the signed parts of the repository: keys/ must never be served.
    tuf = [
        Mount("/metadata", StaticFiles(directory=settings.repo / "metadata", check_dir=False)),
        Mount("/targets", StaticFiles(directory=settings.repo / "targets", check_dir=False)),
    ]
    if repo.in_object_storage:
        app.router.routes.append(Mount("/tuf", app=_not_here, name="tuf"))
    else:
        app.router.routes.append(Mount("/tuf", routes=tuf, name="tuf"))
    _with_extra_components(app)
    app.state.matrix = matrix
    app.state.route_paths = {id(route): path for route, path, _ in effective_routes(app.routes)}
    check_routes(app.routes, matrix)
    return app
