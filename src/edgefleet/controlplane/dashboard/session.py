"""Browser sign-in for the dashboard: server-side sessions bound to an operator API token.

The dashboard has no accounts of its own: a person signs in with the same API token the CLI uses (the login form
posts it), the server checks it exactly as it checks a bearer token and creates a session — a random 256-bit id
whose SHA-256 is stored (``DashboardSession``) with the API token it acts as, an absolute expiry and an idle
expiry. The browser holds only the id, in the ``edgefleet_session`` cookie (HttpOnly, SameSite=Strict, Path=/,
Secure when the request is https — also behind a proxy uvicorn trusts — or when ``cookie_secure`` is set). Signing
out, expiry, and revoking or expiry of the token end the session on the server: an old cookie opens nothing.
``?token=`` in a URL signs nobody in (it would land in history and proxy logs). A bearer header works too, so
scripts and the authorization-matrix tests reach the pages like any other route.

Which role a page needs comes from the one authorization matrix (``auth.MATRIX``), looked up by the route that
matched, exactly as :func:`auth.authorize` does: a dashboard route without an entry is refused.

Posts are checked twice (docs/adr/0102-sessions-and-token-expiry.md): ``Origin`` (or ``Referer``) must be this
server — a missing pair is let through only for a bearer-token client, never for a cookie — and forms that change
state carry a CSRF token derived from the session id (an HMAC of a fixed label under it).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import parse_qsl, urlencode, urlsplit

from fastapi import Request
from sqlalchemy import delete, or_, select
from starlette.responses import Response

from edgefleet.config import ServerSettings
from edgefleet.controlplane import audit
from edgefleet.controlplane.auth import (
    ROLE_ACCESS,
    Access,
    Principal,
    bearer,
    hash_secret,
    operator_principal,
    token_principal,
    token_refusal,
)
from edgefleet.controlplane.context import context_of
from edgefleet.controlplane.db import ApiToken, DashboardSession, Database, utcnow
from edgefleet.errors import AuthError, ForbiddenError

__all__ = [
    "COOKIE",
    "Viewer",
    "clear_cookie",
    "csrf_token",
    "current",
    "end_session",
    "new_session",
    "origin_refusal",
    "safe_next",
    "set_cookie",
    "strip_token",
]

COOKIE = "edgefleet_session"
# The idle clock moves at most this often (and at least ten times per idle period): a page view is not a write.
TOUCH_S = 60.0


@dataclass(frozen=True)
class Viewer:
    """Who is looking at a page, and how they proved it: a session (cookie) or a bearer token (``session_id``
    None)."""

    principal: Principal
    session_id: str | None

    @property
    def via_cookie(self) -> bool:
        return self.session_id is not None

    @property
    def can_operate(self) -> bool:
        return ROLE_ACCESS.get(self.principal.role or "", Access.public) >= Access.operator

    @property
    def csrf(self) -> str:
        return csrf_token(self.session_id) if self.session_id else ""


def csrf_token(session_id: str) -> str:
    return hmac.new(session_id.encode(), b"edgefleet-dashboard-csrf", hashlib.sha256).hexdigest()[:32]


def _settings(request: Request) -> ServerSettings:
    st: ServerSettings = context_of(request).settings
    return st


def _db(request: Request) -> Database:
    db: Database = context_of(request).db
    return db


def required_access(request: Request) -> Access | None:
    route = request.scope.get("route")
    path = request.app.state.route_paths.get(id(route), getattr(route, "path", None))
    matrix: dict[tuple[str, str], Access] = request.app.state.matrix
    return matrix.get((request.method if request.method != "HEAD" else "GET", str(path)))


def lookup(request: Request, token: str) -> Principal:
    with _db(request).session() as s:
        return operator_principal(s, token)


# ------------------------------------------------------------------------------------------------ sessions


def new_session(request: Request, token: str) -> str:
    """Check ``token`` and open a session for it; returns the session id (the cookie's value, never stored)."""
    st = _settings(request)
    with _db(request).session() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.token_hash == hash_secret(token)))
        why = token_refusal(row)
        if why is not None or row is None:
            raise AuthError(why or "invalid API token")
        now = utcnow()
        # dead sessions are of no use to anyone: signing in sweeps them, so the table stays as small as the live set
        s.execute(
            delete(DashboardSession).where(
                or_(
                    DashboardSession.expires_at <= now,
                    DashboardSession.last_seen_at <= now - timedelta(seconds=st.session_idle_s),
                    DashboardSession.revoked_at.is_not(None),
                )
            )
        )
        expires = now + timedelta(seconds=st.session_max_age_s)
        if row.expires_at is not None:
            expires = min(expires, row.expires_at)
        sid = secrets.token_urlsafe(32)
        s.add(
            DashboardSession(
                id_hash=hash_secret(sid), token_id=row.id, created_at=now, expires_at=expires, last_seen_at=now
            )
        )
        audit.record(s, token_principal(row).actor, "dashboard.sign_in", str(row.id))
        return sid


def session_principal(request: Request, session_id: str) -> Principal:
    """The principal a live session acts as; AuthError when it is unknown, signed out or expired, or its token is
    revoked or expired."""
    st = _settings(request)
    with _db(request).session() as s:
        hit = s.execute(
            select(DashboardSession, ApiToken)
            .join(ApiToken, ApiToken.id == DashboardSession.token_id)
            .where(DashboardSession.id_hash == hash_secret(session_id))
        ).first()
        if hit is None:
            raise AuthError("not signed in (unknown or ended session): sign in again")
        sess, tok = hit
        now = utcnow()
        if sess.revoked_at is not None:
            raise AuthError("signed out: sign in again")
        if sess.expires_at <= now:
            raise AuthError("session expired: sign in again")
        if sess.last_seen_at + timedelta(seconds=st.session_idle_s) <= now:
            raise AuthError(f"session expired after {st.session_idle_s / 60:g} minutes unused: sign in again")
        why = token_refusal(tok, now)
        if why is not None:
            raise AuthError(why)
        if (now - sess.last_seen_at).total_seconds() >= min(TOUCH_S, st.session_idle_s / 10):
            sess.last_seen_at = now
        return token_principal(tok)


def end_session(request: Request, session_id: str) -> bool:
    """Sign out on the server: the session's cookie opens nothing afterwards. False when it was not live."""
    with _db(request).session() as s:
        sess = s.get(DashboardSession, hash_secret(session_id))
        if sess is None or sess.revoked_at is not None:
            return False
        sess.revoked_at = utcnow()
        tok = s.get(ApiToken, sess.token_id)
        if tok is not None:
            audit.record(s, token_principal(tok).actor, "dashboard.sign_out", str(tok.id))
        return True


def current(request: Request) -> Viewer:
    """The signed-in person, checked against the route's matrix entry. Raises AuthError (not signed in, or a
    bad token or session) or ForbiddenError (role too low, or a route with no entry)."""
    need = required_access(request)
    if need is None:
        raise ForbiddenError("this route has no authorization entry: denied by default")
    token = bearer(request)
    session_id: str | None = None
    if token is not None:
        p = lookup(request, token)  # raises AuthError for an unknown, revoked or expired token
    else:
        session_id = request.cookies.get(COOKIE) or None
        if session_id is None:
            raise AuthError("sign in with an API token")
        p = session_principal(request, session_id)
    if ROLE_ACCESS.get(p.role or "", Access.public) < need:
        raise ForbiddenError(f"role {p.role} may not {request.method} {request.url.path} (needs {need.name})")
    request.state.principal = p
    return Viewer(p, session_id)


def set_cookie(response: Response, request: Request, session_id: str) -> None:
    st = _settings(request)
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=int(st.session_max_age_s),
        path="/",
        httponly=True,
        samesite="strict",
        # request.url.scheme is https behind a TLS-terminating proxy when uvicorn trusts its forwarded headers
        secure=request.url.scheme == "https" or st.cookie_secure,
    )


def clear_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")


# ------------------------------------------------------------------------------------------------ cross-site checks


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a URL or an Origin header value; None for ``null`` or anything unreadable."""
    try:
        u = urlsplit(url.strip())
        port = u.port
    except ValueError:
        return None
    if u.scheme not in ("http", "https") or not u.hostname:
        return None
    return u.scheme, u.hostname.lower(), port or (443 if u.scheme == "https" else 80)


def origin_refusal(request: Request, *, bearer_auth: bool) -> str | None:
    """Why a state-changing post must be refused as cross-site, or None. The server's own origin is the one the
    request reached (scheme as uvicorn derived it, Host) or ``public_url``."""
    sent = request.headers.get("origin")
    what = "Origin"
    if sent is None:
        sent, what = request.headers.get("referer"), "Referer"
    if sent is None:
        if bearer_auth:
            return None  # not a browser: another site's page cannot attach a bearer header
        return "refused: a browser form must come from this server (no Origin or Referer header was sent)"
    own = {_origin(f"{request.url.scheme}://{request.url.netloc}")}
    public_url = _settings(request).public_url
    if public_url:
        own.add(_origin(public_url))
    got = _origin(sent)
    if got is None or got not in own:
        return f"refused: cross-origin post ({what} {sent[:200]} is not this server)"
    return None


def safe_next(target: str | None) -> str:
    """Only a path on this server: never an absolute URL (an open redirect) or a scheme-relative ``//host``."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def strip_token(request: Request) -> str:
    """The request's path and query without ``token=``: a secret someone put in a URL is never carried on (into
    the sign-in form's ``next``, a redirect, a page)."""
    q = [(k, v) for k, v in parse_qsl(request.url.query, keep_blank_values=True) if k != "token"]
    return request.url.path + (f"?{urlencode(q)}" if q else "")
