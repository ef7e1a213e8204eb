"""The registry: upload packages, versions, promotion, gate and bench evidence."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, Query, Request, Response
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from edgefleet.controlplane import audit, registry, schemas
from edgefleet.controlplane.api._paging import PAGED, Page, in_memory
from edgefleet.controlplane.api._shared import _OUT, _Override, _release_check, _who
from edgefleet.controlplane.auth import Principal
from edgefleet.controlplane.context import Context
from edgefleet.errors import TooLargeError, UsageError

if TYPE_CHECKING:
    from edgefleet.controlplane.store import Store

router = APIRouter()


class PromoteBody(_Override):
    to: str | None = Field(None, pattern="^(dev|canary|stable)$")


@router.post(
    "/packages",
    status_code=201,
    response_model=schemas.ModelVersion,
    tags=["models"],
    **_OUT,
    openapi_extra={
        "requestBody": {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "required": True,
        }
    },
)
async def upload_package(request: Request, ctx: Context) -> dict[str, Any]:
    """The body is streamed to a file under ``<repo>/uploads/`` and hashed on the way, never held whole: a 2 GiB
    model must not cost 2 GiB of server memory per upload. Over ``max_package_mb`` it is refused (413), from the
    declared Content-Length when there is one, else as soon as the stream passes the cap."""
    st = ctx.store
    limit = int(st.settings.max_package_mb * 1024 * 1024)
    too_large = f"package over the {st.settings.max_package_mb:g} MB upload cap (server setting max_package_mb)"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLargeError(too_large)
    who = _who(request)
    uploads = st.repo.path / "uploads"
    await run_in_threadpool(uploads.mkdir, parents=True, exist_ok=True)
    tmp = Path(await run_in_threadpool(tempfile.mkdtemp, "", "upload-", str(uploads)))
    try:
        path = tmp / "upload.efpkg"
        size, sha256 = await _spool(request, path, limit, too_large)
        if not size:
            raise UsageError("empty upload: send the .efpkg bytes as the request body")
        return await run_in_threadpool(_publish, st, who, path, sha256)
    finally:
        await run_in_threadpool(shutil.rmtree, tmp, True)


async def _spool(request: Request, path: Path, limit: int, too_large: str) -> tuple[int, str]:
    """Write the request body to ``path`` in writes of about 1 MiB, hashing it; (size, sha256)."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray()
    f = await run_in_threadpool(path.open, "wb")
    try:
        async for c in request.stream():
            size += len(c)
            if size > limit:
                raise TooLargeError(too_large)
            h.update(c)
            buf += c
            if len(buf) >= 1 << 20:
                await run_in_threadpool(f.write, buf)
                buf.clear()
        if buf:
            await run_in_threadpool(f.write, buf)
    finally:
        await run_in_threadpool(f.close)
    return size, h.hexdigest()


def _publish(st: Store, who: Principal, path: Path, sha256: str) -> dict[str, Any]:
    opened, info = st.repo.receive(path, sha256=sha256)
    with st.db.session() as s:
        mv = registry.register_version(
            s,
            opened.manifest,
            target=info.name,
            package_sha256=info.sha256,
            length=info.length,
            reference=opened.reference,
        )
        audit.record(
            s, who.actor, "package.publish", f"{mv.model}:{mv.version}", target_name=info.name, sha256=info.sha256
        )
        return registry.version_dict(mv)


@router.get("/models", response_model=list[schemas.Model], tags=["models"], **_OUT, **PAGED)
def list_models(ctx: Context, page: Page, request: Request, response: Response) -> list[dict[str, Any]]:
    with ctx.store.db.session() as s:
        models = registry.list_models(s)
    return in_memory(request, response, page, models, lambda m: [m["model"]])


@router.get("/models/{name}", response_model=schemas.Model, tags=["models"], **_OUT)
def get_model(name: str, ctx: Context) -> dict[str, Any]:
    with ctx.store.db.session() as s:
        return registry.list_models(s, name)[0]


@router.get("/models/{name}/versions/{version}", response_model=schemas.ModelVersionDetail, tags=["models"], **_OUT)
def get_version(name: str, version: str, ctx: Context) -> dict[str, Any]:
    with ctx.store.db.session() as s:
        mv = registry.get_version(s, name, version)
        return {**registry.version_dict(mv, full=True), "release": registry.release_status(s, mv)}


@router.post("/models/{name}/versions/{version}/promote", response_model=schemas.ModelVersion, tags=["models"], **_OUT)
def promote(name: str, version: str, request: Request, ctx: Context, body: PromoteBody | None = None) -> dict[str, Any]:
    who = _who(request)
    with ctx.store.db.session() as s:
        mv = registry.get_version(s, name, version)
        forced = _release_check(s, mv, body, who, "model.promote")
        old, new = registry.promote(s, mv, body.to if body else None)
        audit.record(
            s,
            who.actor,
            "model.promote",
            f"{name}:{version}",
            from_channel=old,
            to_channel=new,
            forced=forced is not None,
        )
        return registry.version_dict(mv)


@router.put(
    "/models/{name}/versions/{version}/gate", response_model=schemas.ModelVersionDetail, tags=["models"], **_OUT
)
def put_gate(
    name: str,
    version: str,
    request: Request,
    ctx: Context,
    verdict: dict[str, Any] = Body(...),
    package_sha256: str | None = Query(
        None, pattern="^[0-9a-fA-F]{64}$", description="the package the verdict judged, when it does not name it"
    ),
) -> dict[str, Any]:
    who = _who(request)
    with ctx.store.db.session() as s:
        mv = registry.get_version(s, name, version)
        rec = registry.attach_gate(s, mv, verdict, package_sha256=package_sha256, actor=who.actor)
        audit.record(
            s,
            who.actor,
            "model.gate",
            f"{name}:{version}",
            passed=rec["passed"],
            package_sha256=rec["package_sha256"],
        )
        return {**registry.version_dict(mv, full=True), "release": registry.release_status(s, mv)}


@router.put(
    "/models/{name}/versions/{version}/bench", response_model=schemas.ModelVersionDetail, tags=["models"], **_OUT
)
def put_bench(
    name: str, version: str, request: Request, ctx: Context, bench: dict[str, Any] = Body(...)
) -> dict[str, Any]:
    who = _who(request)
    with ctx.store.db.session() as s:
        mv = registry.get_version(s, name, version)
        n = registry.attach_bench(s, mv, bench, actor=who.actor)
        audit.record(s, who.actor, "model.bench", f"{name}:{version}", compat_entries=n)
        return {**registry.version_dict(mv, full=True), "release": registry.release_status(s, mv)}
