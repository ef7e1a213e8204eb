"""The append-only audit log: every mutating call and every rollout transition, with who and why.

Code only ever inserts here; the database refuses UPDATE and DELETE (triggers in the initial migration)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.controlplane.db import AuditEntry

__all__ = ["entry_dict", "list_entries", "record"]


def record(s: Session, actor: str, action: str, target: str = "", **detail: Any) -> None:
    s.add(AuditEntry(actor=actor, action=action, target=target, detail=detail))


def entry_dict(a: AuditEntry) -> dict[str, Any]:
    return {
        "id": a.id,
        "at": a.at.isoformat(),
        "actor": a.actor,
        "action": a.action,
        "target": a.target,
        "detail": a.detail,
    }


def list_entries(
    s: Session, *, limit: int = 200, action: str | None = None, target: str | None = None
) -> list[dict[str, Any]]:
    q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if action:
        q = q.where(AuditEntry.action == action)
    if target:
        q = q.where(AuditEntry.target == target)
    return [entry_dict(a) for a in s.scalars(q)]
