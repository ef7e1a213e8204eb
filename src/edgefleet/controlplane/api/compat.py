"""The compatibility matrix: tier x runtime version x model version, each cell with its status under each agent
version its evidence came from; an operator clears a cell."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import Field

from edgefleet.controlplane import audit, compat, schemas
from edgefleet.controlplane.api._paging import PAGED, Page, in_memory
from edgefleet.controlplane.api._shared import _OUT, _In, _who
from edgefleet.controlplane.context import Context

router = APIRouter()


class CompatClear(_In):
    tier: str = Field(min_length=1, max_length=64)
    runtime_version: str = Field(max_length=64)
    model: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    reason: str | None = Field(None, max_length=2000)


@router.get("/compat", response_model=list[schemas.CompatCell], tags=["compat"], **_OUT, **PAGED)
def get_compat(
    ctx: Context,
    page: Page,
    request: Request,
    response: Response,
    model: str | None = None,
    agent_version: str | None = Query(None, max_length=64, description="only cells with evidence under this agent"),
) -> list[dict[str, Any]]:
    with ctx.store.db.session() as s:
        rows = [r for r in compat.matrix(s) if model is None or r["model"] == model]
    if agent_version is not None:
        rows = [r for r in rows if any(a["agent_version"] == agent_version for a in r["agents"])]
    cell = ("model", "version", "tier", "runtime", "runtime_version")
    return in_memory(request, response, page, rows, lambda r: [r[k] for k in cell])


@router.post("/compat/clear", response_model=schemas.CompatCleared, tags=["compat"], **_OUT)
def clear_compat(body: CompatClear, request: Request, ctx: Context) -> dict[str, Any]:
    """An operator clears a cell: its evidence stays, only what arrives from now on counts."""
    who = _who(request)
    with ctx.store.db.session() as s:
        out = compat.clear(
            s,
            tier=body.tier,
            runtime_version=body.runtime_version,
            model=body.model,
            version=body.version,
            actor=who.actor,
        )
        audit.record(
            s,
            who.actor,
            "compat.clear",
            f"{body.model}:{body.version}",
            tier=body.tier,
            runtime_version=body.runtime_version,
            previous_status=out["previous_status"],
            reason=body.reason,
        )
    return out
