"""The append-only audit log."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from edgefleet.controlplane import audit, schemas
from edgefleet.controlplane.api._shared import _OUT
from edgefleet.controlplane.context import Context

router = APIRouter()


@router.get("/audit", response_model=list[schemas.AuditEntry], tags=["audit"], **_OUT)
def get_audit(
    ctx: Context, limit: int = 200, action: str | None = None, target: str | None = None
) -> list[dict[str, Any]]:
    with ctx.store.db.session() as s:
        return audit.list_entries(s, limit=max(1, min(limit, 10_000)), action=action, target=target)
