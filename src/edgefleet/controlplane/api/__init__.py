"""The operator API: registry, devices, groups, rollouts, compatibility, fleet KPIs, audit, tokens.

One module per resource; this one mounts them all under ``API_PREFIX`` behind the same dependencies. Every route
depends on :func:`auth.authorize` (the matrix decides the role it needs) and every mutating one writes an audit
entry in the same transaction as its change."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response, Security

from edgefleet.controlplane.api import (
    audit,
    compat,
    devices,
    enrollment,
    fleet,
    groups,
    models,
    release_policy,
    rollouts,
    tokens,
)
from edgefleet.controlplane.api._shared import API_TOKEN
from edgefleet.controlplane.auth import authorize
from edgefleet.controlplane.context import context_of
from edgefleet.protocol import API_PREFIX

__all__ = ["API_TOKEN", "metrics_response", "router"]

router = APIRouter(prefix=API_PREFIX, dependencies=[Depends(authorize), Security(API_TOKEN)])
# The order the routes are matched in: within a module the order is the one it declares (``/devices/keys`` before
# ``/devices/{device_id}``); across modules no two paths overlap.
for _resource in (tokens, audit, fleet, compat, enrollment, devices, groups, models, release_policy, rollouts):
    router.include_router(_resource.router)


def metrics_response(request: Request) -> Response:
    return Response(context_of(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
