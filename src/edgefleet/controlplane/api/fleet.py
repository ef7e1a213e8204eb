"""Fleet KPIs: latency, crash-free rate, update outcomes, drift."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from edgefleet.controlplane import kpi, schemas
from edgefleet.controlplane.api._shared import _OUT
from edgefleet.controlplane.context import Context

router = APIRouter()


@router.get("/fleet", response_model=schemas.FleetKpis, tags=["fleet"], **_OUT)
def fleet(ctx: Context) -> dict[str, Any]:
    st = ctx.store
    with st.db.session() as s:
        return kpi.fleet_kpis(s, overdue_after_s=st.settings.overdue_after_s)
