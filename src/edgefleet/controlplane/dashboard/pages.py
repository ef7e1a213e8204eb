"""The dashboard's routes: server-rendered pages at ``/``, the sign-in form, and the operator's rollout buttons.

Every route is in ``auth.MATRIX`` (deny by default); :func:`session.current` enforces it for pages and forms. The
buttons post to small form endpoints here that call the same function as the API's rollout actions
(``reconciler.operator_action``), so a click and ``edgefleet rollout pause`` leave the same audit trail.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from edgefleet import __version__
from edgefleet.controlplane import reconciler
from edgefleet.controlplane.context import context_of
from edgefleet.controlplane.dashboard import session, views
from edgefleet.controlplane.dashboard.charts import bar_chart, line_chart
from edgefleet.controlplane.errors import status_for
from edgefleet.errors import AuthError, EdgefleetError, ForbiddenError, NotFoundError

__all__ = ["router"]

HERE = Path(__file__).parent
STATIC = {p.name: p for p in (HERE / "static").iterdir() if p.suffix in (".css", ".js")}
ACTIONS = ("pause", "resume", "abort", "rollback")
DONE = {"pause": "paused", "resume": "resumed", "abort": "aborted", "rollback": "rolled back"}

router = APIRouter(tags=["dashboard"], include_in_schema=False)


# ------------------------------------------------------------------------------------------------ rendering


def _pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v * 100:.{digits}f} %"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f} ms"


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ts(iso: str | None) -> str:
    return "–" if not iso else iso.replace("T", " ")[:19]


def _short(sha: str | None, n: int = 12) -> str:
    return "–" if not sha else sha[:n]


env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,  # a typo in a template is an error in the tests, not an empty cell
    trim_blocks=True,
    lstrip_blocks=True,
)
env.filters.update(pct=_pct, ms=_ms, num=_num, ts=_ts, short=_short)
env.globals.update(version=__version__, line_chart=line_chart, bar_chart=bar_chart, quote=quote)


def render(request: Request, template: str, viewer: session.Viewer | None, status: int = 200, **ctx: Any) -> Response:
    html = env.get_template(template).render(request_path=request.url.path, viewer=viewer, **ctx)
    # The pages hold fleet data and carry a CSRF token: never cache them, never frame them.
    headers = {
        "Cache-Control": "no-store",
        "X-Frame-Options": "DENY",
        "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'",
        "Referrer-Policy": "same-origin",
    }
    return HTMLResponse(html, status_code=status, headers=headers)


def _login_page(request: Request, status: int, error: str | None = None) -> Response:
    nxt = session.safe_next(session.strip_token(request))
    return render(request, "login.html", None, status, error=error, next=nxt)


def _guard(request: Request) -> session.Viewer | Response:
    """The signed-in viewer, or the page to answer instead: the sign-in form (401) or a refusal (403).

    A ``token=`` in the query signs nobody in: secrets in URLs end up in history and proxy logs."""
    try:
        return session.current(request)
    except AuthError as exc:
        cookie = request.cookies.get(session.COOKIE)
        resp = _login_page(request, 401, str(exc) if session.bearer(request) or cookie else None)
        if cookie:
            session.clear_cookie(resp)  # a dead session's cookie is of no further use
        return resp
    except ForbiddenError as exc:
        return render(request, "error.html", None, 403, title="Not allowed", message=str(exc))


def _cross_site(request: Request, viewer: session.Viewer | None, *, bearer_auth: bool) -> Response | None:
    why = session.origin_refusal(request, bearer_auth=bearer_auth)
    return None if why is None else render(request, "error.html", viewer, 403, title="Not allowed", message=why)


def _page(request: Request, template: str, gather: Any) -> Response:
    """Sign-in check, then ``gather(session)`` in one read transaction, then the template."""
    v = _guard(request)
    if isinstance(v, Response):
        return v
    store = context_of(request).store
    try:
        with store.db.session() as s:
            ctx = gather(s, store.settings)
    except EdgefleetError as exc:
        code = status_for(exc)
        return render(request, "error.html", v, code, title="Not found" if code == 404 else "Error", message=str(exc))
    return render(request, template, v, **ctx)


# ------------------------------------------------------------------------------------------------ pages


@router.get("/", response_class=HTMLResponse)
def overview(request: Request) -> Response:
    return _page(
        request,
        "overview.html",
        lambda s, st: {"o": views.overview_page(s, overdue_after_s=st.overdue_after_s)},
    )


@router.get("/rollouts", response_class=HTMLResponse)
def rollouts(request: Request) -> Response:
    return _page(request, "rollouts.html", lambda s, st: {"rollouts": views.rollouts_index(s)})


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
def rollout(rollout_id: str, request: Request) -> Response:
    done = request.query_params.get("done")
    return _page(
        request,
        "rollout.html",
        lambda s, st: {"r": views.rollout_page(s, rollout_id), "done": DONE.get(done or ""), "error": None},
    )


@router.get("/devices", response_class=HTMLResponse)
def devices(request: Request) -> Response:
    return _page(
        request,
        "devices.html",
        lambda s, st: {"devices": views.devices_index(s, overdue_after_s=st.overdue_after_s)},
    )


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device(device_id: str, request: Request) -> Response:
    return _page(
        request,
        "device.html",
        lambda s, st: {"d": views.device_page(s, device_id, overdue_after_s=st.overdue_after_s)},
    )


@router.get("/models", response_class=HTMLResponse)
def models(request: Request) -> Response:
    return _page(request, "models.html", lambda s, st: {"models": views.models_index(s)})


@router.get("/models/{name}", response_class=HTMLResponse)
def model(name: str, request: Request) -> Response:
    return _page(request, "model.html", lambda s, st: {"m": views.model_page(s, name)})


# ------------------------------------------------------------------------------------------------ operator buttons


def _form(body: bytes) -> dict[str, str]:
    """``application/x-www-form-urlencoded`` without python-multipart (the forms here have two short fields)."""
    try:
        return {k: v[-1] for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()}
    except UnicodeDecodeError:
        return {}


def _action(action: str) -> Any:
    async def handler(rollout_id: str, request: Request) -> Response:
        v = await run_in_threadpool(_guard, request)
        if isinstance(v, Response):
            return v
        refused = _cross_site(request, v, bearer_auth=not v.via_cookie)
        if refused is not None:
            return refused
        form = _form(await request.body())
        # A bearer header cannot be sent by another site's form; a cookie can (before SameSite): check the token.
        if v.via_cookie and not hmac.compare_digest(form.get("csrf", ""), v.csrf):
            return render(request, "error.html", v, 403, title="Not allowed", message="stale or missing form token")
        reason = (form.get("reason") or "").strip()[:2000] or f"{action} from the dashboard by {v.principal.actor}"
        store = context_of(request).store
        try:
            await run_in_threadpool(reconciler.operator_action, store, rollout_id, action, v.principal.actor, reason)
        except EdgefleetError as exc:
            code = status_for(exc)
            if isinstance(exc, NotFoundError):
                return render(request, "error.html", v, code, title="Not found", message=str(exc))

            def gather() -> dict[str, Any]:
                with store.db.session() as s:
                    return views.rollout_page(s, rollout_id)

            r = await run_in_threadpool(gather)
            return render(request, "rollout.html", v, code, r=r, done=None, error=str(exc))
        store.wake()
        return RedirectResponse(f"/rollouts/{quote(rollout_id)}?done={action}", status_code=303)

    handler.__name__ = f"dashboard_{action}_rollout"
    return handler


for _a in ACTIONS:
    router.add_api_route(
        f"/rollouts/{{rollout_id}}/{_a}",
        _action(_a),
        methods=["POST"],
        name=f"dashboard_{_a}_rollout",
        response_class=HTMLResponse,
    )


# ------------------------------------------------------------------------------------------------ sign-in


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> Response:
    return render(request, "login.html", None, error=None, next=session.safe_next(request.query_params.get("next")))


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    # before the body is read: another site's page may not sign a browser in (into the attacker's token)
    refused = _cross_site(request, None, bearer_auth=False)
    if refused is not None:
        return refused
    form = _form(await request.body())
    token = (form.get("token") or "").strip()
    nxt = session.safe_next(form.get("next"))
    try:
        if not token:
            raise AuthError("enter an API token: `edgefleet tokens create --role viewer` makes one")
        sid = await run_in_threadpool(session.new_session, request, token)
    except AuthError as exc:
        return render(request, "login.html", None, 401, error=str(exc), next=nxt)
    resp = RedirectResponse(nxt, status_code=303)
    session.set_cookie(resp, request, sid)
    return resp


@router.post("/logout")
def logout(request: Request) -> Response:
    sid = request.cookies.get(session.COOKIE)
    refused = _cross_site(request, None, bearer_auth=sid is None)
    if refused is not None:
        return refused
    if sid:
        session.end_session(request, sid)
    resp = RedirectResponse("/login", status_code=303)
    session.clear_cookie(resp)
    return resp


@router.get("/static/{name}")
def static(name: str) -> Response:
    path = STATIC.get(name)
    if path is None:
        raise NotFoundError(f"no static file {name}")
    return FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})
