"""Browser sign-in for the dashboard: the operator's API token, kept in an HttpOnly cookie.

The dashboard has no accounts of its own: a person signs in with the same API token the CLI uses (login form,
or ``?token=`` once), the server checks it exactly as it checks a bearer token, and from then on the browser
sends it as the ``edgefleet_token`` cookie (HttpOnly, SameSite=Strict, Secure under https). A bearer header works
too, so scripts and the authorization-matrix tests reach the pages like any other route.

Which role a page needs comes from the one authorization matrix (``auth.MATRIX``), looked up by the route that
matched, exactly as :func:`auth.authorize` does: a dashboard route without an entry is refused.

Forms that change state carry a CSRF token derived from the cookie (an HMAC of a fixed label under the token), so
another site can neither read it nor forge a post; SameSite=Strict already keeps the cookie off cross-site posts.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from fastapi import Request
from starlette.responses import Response

from edgefleet.controlplane.auth import ROLE_ACCESS, Access, Principal, bearer, operator_principal
from edgefleet.errors import AuthError, ForbiddenError

__all__ = [
    "COOKIE",
    "Viewer",
    "clear_cookie",
    "csrf_token",
    "current",
    "safe_next",
    "set_cookie",
    "strip_token",
]

COOKIE = "edgefleet_token"
COOKIE_MAX_AGE_S = 12 * 3600


@dataclass(frozen=True)
class Viewer:
    """Who is looking at a page, and how they proved it."""

    principal: Principal
    token: str
    via_cookie: bool

    @property
    def can_operate(self) -> bool:
        return ROLE_ACCESS.get(self.principal.role or "", Access.public) >= Access.operator

    @property
    def csrf(self) -> str:
        return csrf_token(self.token)


def csrf_token(token: str) -> str:
    return hmac.new(token.encode(), b"edgefleet-dashboard-csrf", hashlib.sha256).hexdigest()[:32]


def required_access(request: Request) -> Access | None:
    route = request.scope.get("route")
    path = request.app.state.route_paths.get(id(route), getattr(route, "path", None))
    matrix: dict[tuple[str, str], Access] = request.app.state.matrix
    return matrix.get((request.method if request.method != "HEAD" else "GET", str(path)))


def lookup(request: Request, token: str) -> Principal:
    with request.app.state.store.db.session() as s:
        return operator_principal(s, token)


def current(request: Request) -> Viewer:
    """The signed-in person, checked against the route's matrix entry. Raises AuthError (not signed in, or a
    bad token) or ForbiddenError (role too low, or a route with no entry)."""
    need = required_access(request)
    if need is None:
        raise ForbiddenError("this route has no authorization entry: denied by default")
    token = bearer(request)
    via_cookie = False
    if token is None:
        token = request.cookies.get(COOKIE) or None
        via_cookie = token is not None
    if token is None:
        raise AuthError("sign in with an API token")
    p = lookup(request, token)  # raises AuthError for an unknown or revoked token
    if ROLE_ACCESS.get(p.role or "", Access.public) < need:
        raise ForbiddenError(f"role {p.role} may not {request.method} {request.url.path} (needs {need.name})")
    request.state.principal = p
    return Viewer(p, token, via_cookie)


def set_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=COOKIE_MAX_AGE_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")


def safe_next(target: str | None) -> str:
    """Only a path on this server: never an absolute URL (an open redirect) or a scheme-relative ``//host``."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def strip_token(request: Request) -> str:
    """The request's path and query without ``token=`` (so the secret does not stay in the address bar)."""
    q = [(k, v) for k, v in parse_qsl(request.url.query, keep_blank_values=True) if k != "token"]
    return request.url.path + (f"?{urlencode(q)}" if q else "")
