"""What a version needs before it is promoted or rolled out: the global policy and per-model overrides."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from edgefleet.controlplane import audit, registry, schemas
from edgefleet.controlplane.api._shared import _ID, _OUT, _In, _who
from edgefleet.controlplane.context import Context
from edgefleet.errors import NotFoundError, UsageError

router = APIRouter()


class ReleasePolicyBody(_In):
    """Fields left out stay as they are; ``null`` inherits (a model from the global policy, the global policy from
    the built-in default)."""

    require_gate: bool | None = None
    require_bench: bool | None = None
    reason: str | None = Field(None, max_length=2000)


@router.get("/release-policy", response_model=schemas.ReleasePolicyDoc, tags=["release-policy"], **_OUT)
def get_release_policy(ctx: Context) -> dict[str, Any]:
    with ctx.store.db.session() as s:
        return registry.policy_doc(s)


def _set_policy(request: Request, ctx: Context, scope: str, body: ReleasePolicyBody) -> dict[str, Any]:
    who = _who(request)
    changes = {f: getattr(body, f) for f in body.model_fields_set if f != "reason"}
    with ctx.store.db.session() as s:
        registry.set_policy(s, scope, changes, actor=who.actor)
        audit.record(s, who.actor, "release.policy", scope, changes=changes, reason=body.reason)
        return registry.policy_doc(s, None if scope == registry.GLOBAL_SCOPE else scope)


@router.put("/release-policy", response_model=schemas.ReleasePolicyDoc, tags=["release-policy"], **_OUT)
def put_release_policy(body: ReleasePolicyBody, request: Request, ctx: Context) -> dict[str, Any]:
    """The global policy: what every model needs unless its own override says otherwise."""
    return _set_policy(request, ctx, registry.GLOBAL_SCOPE, body)


@router.get("/models/{name}/release-policy", response_model=schemas.ReleasePolicyDoc, tags=["release-policy"], **_OUT)
def get_model_release_policy(name: str, ctx: Context) -> dict[str, Any]:
    with ctx.store.db.session() as s:
        return registry.policy_doc(s, name)


@router.put("/models/{name}/release-policy", response_model=schemas.ReleasePolicyDoc, tags=["release-policy"], **_OUT)
def put_model_release_policy(name: str, body: ReleasePolicyBody, request: Request, ctx: Context) -> dict[str, Any]:
    """A model's override; it may be set before the model's first version is published."""
    if not _ID.match(name) or name == registry.GLOBAL_SCOPE:
        raise UsageError("model names use letters, digits, '.', '_', ':' and '-' (at most 128)")
    return _set_policy(request, ctx, name, body)


@router.delete(
    "/models/{name}/release-policy", response_model=schemas.ReleasePolicyDoc, tags=["release-policy"], **_OUT
)
def delete_model_release_policy(name: str, request: Request, ctx: Context) -> dict[str, Any]:
    who = _who(request)
    with ctx.store.db.session() as s:
        if not registry.clear_policy(s, name):
            raise NotFoundError(f"model {name} has no release policy override")
        audit.record(s, who.actor, "release.policy", name, cleared=True)
        return registry.policy_doc(s, name)
