"""What every operator route shares: the token scheme, the response options, body-model base, the caller, and
the release-policy check that promotion and rollouts both apply."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from edgefleet.controlplane import audit, registry
from edgefleet.controlplane.auth import Principal
from edgefleet.controlplane.db import ModelVersion
from edgefleet.errors import ConflictError, ForbiddenError, UsageError

if TYPE_CHECKING:
    pass

# Declares the operator token in the OpenAPI document (Swagger's "Authorize" button sends it). It never refuses a
# request itself (auto_error=False): ``authorize`` does, with the matrix's role check and the server's own messages.
API_TOKEN = HTTPBearer(
    scheme_name="apiToken",
    description="An operator API token (`edgefleet tokens create --role R`, or the admin token the server wrote).",
    auto_error=False,
)

# Every route answers with its response model's schema, serialized with exactly the keys the route's dict holds.
_OUT: dict[str, Any] = {"response_model_exclude_unset": True}


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Override(_In):
    """``force`` releases a version the release policy refuses (admin only; ``reason`` goes to the audit log)."""

    force: bool = False
    reason: str | None = Field(None, max_length=2000)


def _who(request: Request) -> Principal:
    p: Principal = request.state.principal
    return p


_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _release_check(s: Any, mv: ModelVersion, body: _Override | None, who: Principal, action: str) -> str | None:
    """Refuse a version the release policy does not admit, unless an admin forces it: then the override (actor,
    reason, what it overrode) is audited in the same transaction as the promotion or rollout. Returns the
    overridden refusal, if any."""
    force, reason = (body.force, (body.reason or "").strip()) if body else (False, "")
    if force and not reason:
        raise UsageError("--force needs --reason: overriding the release policy is written to the audit log")
    refusal = registry.release_refusal_of(s, mv)
    if refusal is None:
        return None
    if not force:
        raise ConflictError(refusal)
    if who.role != "admin":
        raise ForbiddenError(f"overriding the release policy needs an admin token ({who.actor} is {who.role})")
    audit.record(
        s,
        who.actor,
        "release.override",
        f"{mv.model}:{mv.version}",
        overrode=action,
        reason=reason,
        refusal=refusal,
        package_sha256=mv.package_sha256,
    )
    return refusal
