"""Fleet KPIs: latency, crash-free rate, update outcomes, drift, field accuracy."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Query, Request, Response

from edgefleet.controlplane import field_accuracy, kpi, schemas
from edgefleet.controlplane.api._paging import PAGED, Page, in_memory
from edgefleet.controlplane.api._shared import _OUT
from edgefleet.controlplane.context import Context
from edgefleet.controlplane.db import utcnow

router = APIRouter()


@router.get("/fleet", response_model=schemas.FleetKpis, tags=["fleet"], **_OUT)
def fleet(ctx: Context) -> dict[str, Any]:
    st = ctx.store
    with st.db.session() as s:
        return kpi.fleet_kpis(s, overdue_after_s=st.settings.overdue_after_s)


@router.get("/fleet/field-accuracy", response_model=list[schemas.FieldAccuracyKpi], tags=["fleet"], **_OUT, **PAGED)
def fleet_field_accuracy(
    ctx: Context,
    page: Page,
    request: Request,
    response: Response,
    window_s: float = Query(86_400.0, gt=0, le=90 * 86_400, description="the period, seconds back from now"),
) -> list[dict[str, Any]]:
    """Field accuracy per model × version × tier over the last ``window_s`` seconds (docs/operations.md)."""
    with ctx.store.db.session() as s:
        rows = field_accuracy.rows(s, utcnow() - timedelta(seconds=window_s))
    return in_memory(request, response, page, rows, lambda r: [r["model"], r["version"], r["tier"]])
