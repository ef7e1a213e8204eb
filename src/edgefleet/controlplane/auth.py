"""Who may call what: operator API tokens with roles, device credentials, and the route authorization matrix.

Secrets are random 256-bit strings, so a plain SHA-256 is the right hash (a slow password hash would only slow
the check-in path; there is nothing to brute-force). The server stores hashes only.

API tokens expire (``expires_at``; None only for the bootstrap or configured admin token) and are rotated by
issuing a new secret and letting the old one live out a grace period (docs/adr/0102-sessions-and-token-expiry.md).

Deny by default: :data:`MATRIX` names the access of every route; :func:`check_routes` refuses to build an app
with a route missing from it, and :func:`authorize` refuses a request whose route has no entry.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum

from fastapi import Request
from fastapi.routing import iter_route_contexts
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.routing import BaseRoute, Mount, Route

from edgefleet.controlplane.context import context_of
from edgefleet.controlplane.credentials import hash_secret, new_secret
from edgefleet.controlplane.db import ApiToken, utcnow
from edgefleet.errors import AuthError, ConfigError, ForbiddenError

__all__ = [
    "MATRIX",
    "Access",
    "Principal",
    "app_route_keys",
    "authorize",
    "bearer",
    "check_routes",
    "hash_secret",
    "new_secret",
    "route_keys",
    "token_refusal",
]

ROLES = ("viewer", "operator", "admin")


class Access(IntEnum):
    """Ordered: an operator may do what a viewer may, an admin what an operator may."""

    public = 0
    device = 1  # a device credential, and only for its own {device_id}
    viewer = 2
    operator = 3
    admin = 4


ROLE_ACCESS = {"viewer": Access.viewer, "operator": Access.operator, "admin": Access.admin}

A = "/api/v1"
# (method, path template) → access. Mounts use method "MOUNT".
MATRIX: dict[tuple[str, str], Access] = {
    ("GET", "/healthz"): Access.public,
    ("GET", "/health/ready"): Access.public,
    ("GET", "/openapi.json"): Access.public,
    ("GET", "/docs"): Access.public,
    ("GET", "/docs/oauth2-redirect"): Access.public,
    ("GET", "/redoc"): Access.public,
    ("MOUNT", "/tuf"): Access.public,  # TUF metadata and targets are signed: integrity does not need auth
    ("POST", f"{A}/enroll"): Access.public,  # the one-time enrollment token in the body is the credential
    ("GET", f"{A}/devices/{{device_id}}/desired"): Access.device,
    ("POST", f"{A}/devices/{{device_id}}/report"): Access.device,
    ("POST", f"{A}/devices/{{device_id}}/credential"): Access.device,
    ("POST", f"{A}/devices/{{device_id}}/logs"): Access.device,
    ("POST", f"{A}/devices/{{device_id}}/crashes"): Access.device,
    ("POST", f"{A}/devices/{{device_id}}/samples"): Access.device,
    ("POST", f"{A}/devices/{{device_id}}/key"): Access.device,
    ("GET", "/metrics"): Access.viewer,
    ("GET", f"{A}/whoami"): Access.viewer,
    ("GET", f"{A}/devices"): Access.viewer,
    ("GET", f"{A}/devices/keys"): Access.viewer,
    ("GET", f"{A}/devices/{{device_id}}"): Access.viewer,
    # a worker's traceback and numbers, no inputs: as readable as the device page that lists them
    ("GET", f"{A}/devices/{{device_id}}/crashes"): Access.viewer,
    ("GET", f"{A}/groups"): Access.viewer,
    ("GET", f"{A}/models"): Access.viewer,
    ("GET", f"{A}/models/{{name}}"): Access.viewer,
    ("GET", f"{A}/models/{{name}}/versions/{{version}}"): Access.viewer,
    ("GET", f"{A}/rollouts"): Access.viewer,
    ("GET", f"{A}/rollouts/{{rollout_id}}"): Access.viewer,
    ("GET", f"{A}/compat"): Access.viewer,
    ("GET", f"{A}/fleet"): Access.viewer,
    ("GET", f"{A}/fleet/field-accuracy"): Access.viewer,
    ("GET", f"{A}/audit"): Access.viewer,
    ("GET", f"{A}/release-policy"): Access.viewer,
    ("GET", f"{A}/models/{{name}}/release-policy"): Access.viewer,
    ("POST", f"{A}/enrollment-tokens"): Access.operator,
    ("POST", f"{A}/devices/{{device_id}}/pin"): Access.operator,
    ("POST", f"{A}/devices/{{device_id}}/unpin"): Access.operator,
    ("POST", f"{A}/devices/{{device_id}}/group"): Access.operator,
    ("POST", f"{A}/devices/{{device_id}}/revoke"): Access.operator,
    ("POST", f"{A}/devices/{{device_id}}/decommission"): Access.operator,
    ("POST", f"{A}/devices/{{device_id}}/rotate-credential"): Access.operator,
    ("POST", f"{A}/devices/{{device_id}}/rotate-key"): Access.operator,
    # a device's log lines may say more than its inventory: operators ask for and read them, both audited
    ("POST", f"{A}/devices/{{device_id}}/logs/request"): Access.operator,
    ("GET", f"{A}/devices/{{device_id}}/logs"): Access.operator,
    # served inputs, even sealed for the operator's key: listed and handed out to operators, the download audited
    ("GET", f"{A}/devices/{{device_id}}/samples"): Access.operator,
    ("GET", f"{A}/devices/{{device_id}}/samples/{{sample_id}}"): Access.operator,
    ("POST", f"{A}/groups/{{name}}/rotate-credential"): Access.operator,
    ("PUT", f"{A}/groups/{{name}}"): Access.operator,
    ("POST", f"{A}/packages"): Access.operator,
    ("POST", f"{A}/models/{{name}}/versions/{{version}}/promote"): Access.operator,
    ("PUT", f"{A}/models/{{name}}/versions/{{version}}/gate"): Access.operator,
    ("PUT", f"{A}/models/{{name}}/versions/{{version}}/bench"): Access.operator,
    ("POST", f"{A}/rollouts"): Access.operator,
    ("POST", f"{A}/rollouts/plan"): Access.operator,
    ("POST", f"{A}/compat/clear"): Access.operator,
    ("POST", f"{A}/rollouts/{{rollout_id}}/pause"): Access.operator,
    ("POST", f"{A}/rollouts/{{rollout_id}}/resume"): Access.operator,
    ("POST", f"{A}/rollouts/{{rollout_id}}/abort"): Access.operator,
    ("POST", f"{A}/rollouts/{{rollout_id}}/rollback"): Access.operator,
    ("GET", f"{A}/tokens"): Access.admin,
    ("POST", f"{A}/tokens"): Access.admin,
    ("DELETE", f"{A}/tokens/{{token_id}}"): Access.admin,
    ("POST", f"{A}/tokens/{{token_id}}/rotate"): Access.admin,
    # relaxing what a release needs is an admin's call (forcing one past it too: checked in the route)
    ("PUT", f"{A}/release-policy"): Access.admin,
    ("PUT", f"{A}/models/{{name}}/release-policy"): Access.admin,
    ("DELETE", f"{A}/models/{{name}}/release-policy"): Access.admin,
    # the browser dashboard (controlplane/dashboard): a bearer token or the sign-in cookie, same roles
    ("GET", "/"): Access.viewer,
    ("GET", "/rollouts"): Access.viewer,
    ("GET", "/rollouts/{rollout_id}"): Access.viewer,
    ("GET", "/devices"): Access.viewer,
    ("GET", "/devices/{device_id}"): Access.viewer,
    ("GET", "/models"): Access.viewer,
    ("GET", "/models/{name}"): Access.viewer,
    ("POST", "/rollouts/{rollout_id}/pause"): Access.operator,
    ("POST", "/rollouts/{rollout_id}/resume"): Access.operator,
    ("POST", "/rollouts/{rollout_id}/abort"): Access.operator,
    ("POST", "/rollouts/{rollout_id}/rollback"): Access.operator,
    ("GET", "/login"): Access.public,
    ("POST", "/login"): Access.public,
    ("POST", "/logout"): Access.public,
    ("GET", "/static/{name}"): Access.public,
}


def bearer(request: Request) -> str | None:
    h = request.headers.get("authorization")
    if not h:
        return None
    scheme, _, token = h.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def effective_routes(routes: Sequence[BaseRoute]) -> Iterator[tuple[BaseRoute, str, set[str] | None]]:
    """Every route as served: (the route object a request's scope names, its full path, its methods).

    FastAPI 0.16x keeps included routers as nested objects whose routes carry the path *without* the prefix;
    ``iter_route_contexts`` gives the effective path."""
    for ctx in iter_route_contexts(routes):
        yield ctx.original_route, str(ctx.path), ctx.methods


def route_keys(route: BaseRoute, path: str | None = None, methods: set[str] | None = None) -> list[tuple[str, str]]:
    """The matrix keys of one route (HEAD is answered as GET by Starlette and needs no entry of its own)."""
    path = path if path is not None else str(getattr(route, "path", repr(route)))
    if isinstance(route, Mount):
        return [("MOUNT", path)]
    if isinstance(route, Route) or methods:
        ms = methods if methods is not None else getattr(route, "methods", None) or set()
        return [(m, path) for m in sorted(ms) if m != "HEAD"]
    return [("?", path)]


def app_route_keys(routes: Sequence[BaseRoute]) -> list[tuple[str, str]]:
    return [k for route, path, methods in effective_routes(routes) for k in route_keys(route, path, methods)]


def check_routes(routes: Sequence[BaseRoute], matrix: dict[tuple[str, str], Access]) -> None:
    missing = [k for k in app_route_keys(routes) if k not in matrix]
    if missing:
        raise ConfigError(f"routes without an authorization entry (deny by default): {missing}")


@dataclass(frozen=True)
class Principal:
    kind: str  # "anonymous" | "device" | "token"
    name: str
    role: str | None = None
    token_id: int | None = None

    @property
    def actor(self) -> str:
        return f"{self.kind}:{self.name}"


ANONYMOUS = Principal("anonymous", "-")


def token_refusal(row: ApiToken | None, now: datetime | None = None) -> str | None:
    """Why a token row may not act now, or None when it may."""
    if row is None or row.revoked_at is not None:
        return "invalid or revoked API token: create one with `edgefleet tokens create --role R`"
    if row.expires_at is not None and row.expires_at <= (now or utcnow()):
        how = (
            f"it was rotated: use the token that replaced it (id {row.replaced_by})"
            if row.replaced_by is not None
            else f"ask an admin for a new one (`edgefleet tokens rotate {row.id}`)"
        )
        return f"token expired: API token {row.id} ({row.name}) expired at {row.expires_at.isoformat()}; {how}"
    return None


def token_principal(row: ApiToken) -> Principal:
    return Principal("token", row.name, row.role, row.id)


def operator_principal(s: Session, token: str) -> Principal:
    row = s.scalar(select(ApiToken).where(ApiToken.token_hash == hash_secret(token)))
    why = token_refusal(row)
    if why is not None or row is None:
        raise AuthError(why or "invalid API token")
    return token_principal(row)


def device_matches(stored_hash: str, credential: str) -> bool:
    return hmac.compare_digest(stored_hash, hash_secret(credential))


async def authorize(request: Request) -> Principal:
    """FastAPI dependency for operator routes: the route's matrix entry, then the bearer token's role."""
    from starlette.concurrency import run_in_threadpool

    route = request.scope.get("route")
    path = request.app.state.route_paths.get(id(route), getattr(route, "path", None))
    matrix: dict[tuple[str, str], Access] = request.app.state.matrix
    access = matrix.get((request.method if request.method != "HEAD" else "GET", str(path)))
    if access is None:
        raise ForbiddenError("this route has no authorization entry: denied by default")
    if access is Access.public:
        return ANONYMOUS
    if access is Access.device:
        raise ForbiddenError("device routes authenticate in their handlers")
    token = bearer(request)
    if token is None:
        raise AuthError("missing API token: pass --api-token or set EDGEFLEET_API_TOKEN")
    store = context_of(request).store

    def lookup() -> Principal:
        with store.db.session() as s:
            return operator_principal(s, token)

    p = await run_in_threadpool(lookup)
    if ROLE_ACCESS.get(p.role or "", Access.public) < access:
        raise ForbiddenError(f"role {p.role} may not {request.method} {path} (needs {access.name})")
    request.state.principal = p
    return p
