"""The append-only audit log."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import select

from edgefleet.controlplane import audit, schemas
from edgefleet.controlplane.api._paging import PAGED, Page, finish
from edgefleet.controlplane.api._shared import _OUT
from edgefleet.controlplane.context import Context
from edgefleet.controlplane.db import AuditEntry

router = APIRouter()


@router.get("/audit", response_model=list[schemas.AuditEntry], tags=["audit"], **_OUT, **PAGED)
def get_audit(
    ctx: Context,
    page: Page,
    request: Request,
    response: Response,
    action: str | None = None,
    target: str | None = None,
) -> list[dict[str, Any]]:
    """Newest first, a page at a time."""
    q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(page.limit + 1)
    if (last := page.key(int)) is not None:
        q = q.where(AuditEntry.id < last[0])
    if action:
        q = q.where(AuditEntry.action == action)
    if target:
        q = q.where(AuditEntry.target == target)
    with ctx.store.db.session() as s:
        rows = finish(request, response, page, list(s.scalars(q)), lambda a: (a.id,))
        return [audit.entry_dict(a) for a in rows]
