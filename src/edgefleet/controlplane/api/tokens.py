"""Operator API tokens (admin), and who the caller is."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import Field
from sqlalchemy import select

from edgefleet.controlplane import audit, schemas
from edgefleet.controlplane.api._paging import PAGED, Page, finish
from edgefleet.controlplane.api._shared import _OUT, _In, _who
from edgefleet.controlplane.auth import hash_secret, new_secret
from edgefleet.controlplane.context import Context
from edgefleet.controlplane.db import (
    ApiToken,
    utcnow,
)
from edgefleet.errors import ConflictError, NotFoundError

router = APIRouter()


_TOKEN_MAX_S = 10 * 365 * 86400.0


class TokenCreate(_In):
    role: str = Field(pattern="^(admin|operator|viewer)$")
    name: str = Field("api", min_length=1, max_length=128)
    # default: the server's ``token_expires_s``; only the bootstrap / configured admin token never expires
    expires_s: float | None = Field(None, gt=0, le=_TOKEN_MAX_S)


class TokenRotate(_In):
    grace_s: float = Field(0.0, ge=0, le=30 * 86400)
    # default: the old token's kind (a never-expiring token stays so), else the server's ``token_expires_s``
    expires_s: float | None = Field(None, gt=0, le=_TOKEN_MAX_S)


@router.get("/whoami", response_model=schemas.WhoAmI, tags=["tokens"], **_OUT)
def whoami(request: Request) -> dict[str, Any]:
    p = _who(request)
    return {"name": p.name, "role": p.role}


def _token_dict(t: ApiToken, now: datetime) -> dict[str, Any]:
    expired = t.expires_at is not None and t.expires_at <= now
    status = "revoked" if t.revoked_at is not None else "expired" if expired else "active"
    return {
        "id": t.id,
        "name": t.name,
        "role": t.role,
        "created_at": t.created_at.isoformat(),
        "expires_at": t.expires_at.isoformat() if t.expires_at else None,
        "never_expires": t.expires_at is None,
        "status": status,
        "revoked": t.revoked_at is not None,
        "replaced_by": t.replaced_by,
    }


@router.get("/tokens", response_model=list[schemas.ApiToken], tags=["tokens"], **_OUT, **PAGED)
def list_tokens(ctx: Context, page: Page, request: Request, response: Response) -> list[dict[str, Any]]:
    now = utcnow()
    q = select(ApiToken).order_by(ApiToken.id).limit(page.limit + 1)
    if (last := page.key(int)) is not None:
        q = q.where(ApiToken.id > last[0])
    with ctx.store.db.session() as s:
        return [_token_dict(t, now) for t in finish(request, response, page, list(s.scalars(q)), lambda t: (t.id,))]


@router.post("/tokens", status_code=201, response_model=schemas.ApiTokenCreated, tags=["tokens"], **_OUT)
def create_token(body: TokenCreate, request: Request, ctx: Context) -> dict[str, Any]:
    token = new_secret("efa")
    st = ctx.store
    now = utcnow()
    expires_at = now + timedelta(seconds=body.expires_s or st.settings.token_expires_s)
    with st.db.session() as s:
        row = ApiToken(name=body.name, role=body.role, token_hash=hash_secret(token), expires_at=expires_at)
        s.add(row)
        s.flush()
        audit.record(
            s,
            _who(request).actor,
            "token.create",
            str(row.id),
            role=body.role,
            name=body.name,
            expires_at=expires_at.isoformat(),
        )
        return _token_dict(row, now) | {"token": token}


@router.post(
    "/tokens/{token_id}/rotate", status_code=201, response_model=schemas.ApiTokenRotated, tags=["tokens"], **_OUT
)
def rotate_token(token_id: int, request: Request, ctx: Context, body: TokenRotate | None = None) -> dict[str, Any]:
    """A new secret for the same name and role; the old one keeps working for ``grace_s`` (default 0), then is
    refused as expired, naming its replacement."""
    b = body or TokenRotate()
    st = ctx.store
    token = new_secret("efa")
    now = utcnow()
    with st.db.session() as s:
        old = s.scalar(select(ApiToken).where(ApiToken.id == token_id).with_for_update())
        if old is None:
            raise NotFoundError(f"no API token {token_id}")
        if old.revoked_at is not None or (old.expires_at is not None and old.expires_at <= now):
            raise ConflictError(
                f"API token {token_id} is revoked or expired: create a new one with `edgefleet tokens create`"
            )
        if old.replaced_by is not None:
            raise ConflictError(f"API token {token_id} was rotated already (replaced by {old.replaced_by})")
        if b.expires_s is not None:
            expires_at: datetime | None = now + timedelta(seconds=b.expires_s)
        else:
            expires_at = None if old.expires_at is None else now + timedelta(seconds=st.settings.token_expires_s)
        new = ApiToken(name=old.name, role=old.role, token_hash=hash_secret(token), expires_at=expires_at)
        s.add(new)
        s.flush()
        old.replaced_by = new.id
        until = now + timedelta(seconds=b.grace_s)
        old.expires_at = until if old.expires_at is None else min(old.expires_at, until)
        audit.record(
            s,
            _who(request).actor,
            "token.rotate",
            str(token_id),
            replaced_by=new.id,
            old_valid_until=old.expires_at.isoformat(),
        )
        return _token_dict(new, now) | {
            "token": token,
            "replaces": token_id,
            "old_valid_until": old.expires_at.isoformat(),
        }


@router.delete("/tokens/{token_id}", response_model=schemas.ApiTokenRevoked, tags=["tokens"], **_OUT)
def revoke_token(token_id: int, request: Request, ctx: Context) -> dict[str, Any]:
    with ctx.store.db.session() as s:
        row = s.get(ApiToken, token_id)
        if row is None:
            raise NotFoundError(f"no API token {token_id}")
        row.revoked_at = row.revoked_at or utcnow()
        audit.record(s, _who(request).actor, "token.revoke", str(token_id))
        return {"id": token_id, "revoked": True}
