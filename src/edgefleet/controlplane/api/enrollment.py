"""One-time enrollment tokens for new devices."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from edgefleet.controlplane import audit, devices, schemas
from edgefleet.controlplane.api._shared import _OUT, _In, _who
from edgefleet.controlplane.context import Context

router = APIRouter()


class EnrollTokenCreate(_In):
    tier: str = Field(min_length=1, max_length=64)
    group: str | None = Field(None, max_length=128)
    expires_s: float = Field(3600.0, gt=0, le=365 * 86400)


@router.post("/enrollment-tokens", status_code=201, response_model=schemas.EnrollmentToken, tags=["enrollment"], **_OUT)
def create_enrollment_token(body: EnrollTokenCreate, request: Request, ctx: Context) -> dict[str, Any]:
    st = ctx.store
    # the token pins today's TUF root: the device accepts only that root in its enroll answer
    root = st.repo.current_root()
    with st.db.session() as s:
        token, row = devices.create_enrollment_token(
            s, tier=body.tier, group=body.group, expires_s=body.expires_s, root=root
        )
        audit.record(s, _who(request).actor, "enrollment_token.create", str(row.id), tier=body.tier, group=body.group)
        return {
            "token": token,
            "tier": row.tier,
            "group": row.group,
            "expires_at": row.expires_at.isoformat(),
            "root_version": row.root_version,
        }
