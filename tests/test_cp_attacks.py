"""Attacks on a running control plane (a real uvicorn server): what a stolen cookie, an old cookie, a link with
``?token=``, another site's form, a proxy, a stream of unknown device ids, an oversize upload and random requests
can get out of it. Sessions and cross-site checks: docs/dashboard.md; limits: docs/controlplane.md; the reasons:
docs/adr/0102-sessions-and-token-expiry.md."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from _cp_support import CP, build_pkg, sql_statements
from conftest import free_port
from edgefleet.config import ServerSettings
from edgefleet.controlplane.app import create_app
from edgefleet.controlplane.auth import MATRIX, hash_secret
from edgefleet.controlplane.dashboard.session import COOKIE, csrf_token
from edgefleet.controlplane.db import ApiToken, DashboardSession, utcnow


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CP]:
    d = tmp_path_factory.mktemp("attacks")
    c = CP(d, f"sqlite:///{d / 'cp.db'}")
    yield c
    c.close()


@contextlib.contextmanager
def _serve(app: FastAPI, **config: Any) -> Iterator[str]:
    """One more real uvicorn server for ``app`` (e.g. one that trusts no proxy)."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning", **config)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _login(url: str, token: str, **headers: str) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=30) as c:
        return c.post("/login", data={"token": token, "next": "/devices"}, headers={"Origin": url, **headers})


def _sid(r: httpx.Response) -> str:
    assert r.status_code == 303, r.text
    sid = r.cookies.get(COOKIE)
    assert sid
    return sid


def _page(url: str, sid: str, path: str = "/devices") -> httpx.Response:
    with httpx.Client(base_url=url, timeout=30, cookies={COOKIE: sid}) as c:
        return c.get(path)


def _sessions(cp: CP) -> list[DashboardSession]:
    with cp.store.db.session() as s:
        return list(s.scalars(select(DashboardSession)))


# ------------------------------------------------------------------------------------------------ sessions


def test_the_cookie_holds_a_random_session_id_never_the_token(srv: CP) -> None:
    viewer = srv.token("viewer")
    r = _login(srv.url, viewer)
    sid = _sid(r)
    cookie = r.headers["set-cookie"]
    assert viewer not in cookie and sid != viewer
    assert len(sid) >= 43  # token_urlsafe(32): 256 random bits
    for attr in ("HttpOnly", "SameSite=strict", "Path=/", "Max-Age=43200"):
        assert attr in cookie, cookie
    assert "Secure" not in cookie  # plain http, no trusted proxy, cookie_secure off
    rows = [x for x in _sessions(srv) if x.id_hash == hash_secret(sid)]
    assert len(rows) == 1 and all(x.id_hash != sid for x in _sessions(srv))  # only its SHA-256 is stored
    assert _page(srv.url, sid).status_code == 200
    # a second sign-in is another session, with another id
    assert _sid(_login(srv.url, viewer)) != sid


def test_sign_out_ends_the_session_on_the_server(cp: CP) -> None:
    """On SQLite and on PostgreSQL: the old cookie opens nothing after sign-out, even replayed elsewhere."""
    op = cp.token("operator")
    sid = _sid(_login(cp.url, op))
    assert _page(cp.url, sid).status_code == 200
    with httpx.Client(base_url=cp.url, timeout=30, cookies={COOKIE: sid}, headers={"Origin": cp.url}) as c:
        assert c.post("/logout").status_code == 303
    replay = _page(cp.url, sid)
    assert replay.status_code == 401 and "signed out" in replay.text
    assert COOKIE in replay.headers.get("set-cookie", "")  # the dead cookie is cleared
    with httpx.Client(base_url=cp.url, timeout=30, cookies={COOKIE: sid}, headers={"Origin": cp.url}) as c:
        r = c.post("/rollouts/ro-x/pause", data={"csrf": csrf_token(sid)})
        assert r.status_code == 401
    actions = [a["action"] for a in cp.api("GET", "/api/v1/audit")]
    assert "dashboard.sign_in" in actions and "dashboard.sign_out" in actions


def test_expired_and_idle_sessions_are_refused(srv: CP) -> None:
    viewer = srv.token("viewer")
    sid = _sid(_login(srv.url, viewer))
    with srv.store.db.session() as s:
        s.execute(
            update(DashboardSession)
            .where(DashboardSession.id_hash == hash_secret(sid))
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    r = _page(srv.url, sid)
    assert r.status_code == 401 and "session expired" in r.text
    sid = _sid(_login(srv.url, viewer))
    idle = srv.settings.session_idle_s
    with srv.store.db.session() as s:
        s.execute(
            update(DashboardSession)
            .where(DashboardSession.id_hash == hash_secret(sid))
            .values(last_seen_at=utcnow() - timedelta(seconds=idle + 1))
        )
    r = _page(srv.url, sid)
    assert r.status_code == 401 and "unused" in r.text
    # the session is capped by its token's own expiry
    short = srv.api("POST", "/api/v1/tokens", json={"role": "viewer", "expires_s": 600})
    sid = _sid(_login(srv.url, short["token"]))
    (row,) = [x for x in _sessions(srv) if x.id_hash == hash_secret(sid)]
    assert row.expires_at <= utcnow() + timedelta(seconds=601)


def test_revoking_or_expiring_the_token_ends_its_sessions(srv: CP) -> None:
    t = srv.api("POST", "/api/v1/tokens", json={"role": "viewer"})
    sid = _sid(_login(srv.url, t["token"]))
    assert _page(srv.url, sid).status_code == 200
    srv.api("DELETE", f"/api/v1/tokens/{t['id']}")
    assert _page(srv.url, sid).status_code == 401
    t = srv.api("POST", "/api/v1/tokens", json={"role": "viewer"})
    sid = _sid(_login(srv.url, t["token"]))
    with srv.store.db.session() as s:
        s.execute(update(ApiToken).where(ApiToken.id == t["id"]).values(expires_at=utcnow() - timedelta(seconds=1)))
    r = _page(srv.url, sid)
    assert r.status_code == 401 and "token expired" in r.text
    api = srv.http.get("/api/v1/whoami", headers=srv.h(t["token"]))
    assert api.status_code == 401 and "token expired" in api.json()["detail"]
    assert _login(srv.url, t["token"]).status_code == 401  # and no new session for it


def test_token_in_the_query_signs_nobody_in_and_is_never_echoed(srv: CP) -> None:
    viewer, admin = srv.token("viewer"), srv.admin
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        for path in (f"/devices?token={viewer}&x=1", f"/?token={viewer}", f"/login?token={viewer}"):
            r = c.get(path)
            assert COOKIE not in r.cookies and "set-cookie" not in r.headers, path
            assert viewer not in r.text and viewer not in r.headers.get("location", ""), path
        assert c.get(f"/devices?token={viewer}").status_code == 401
        assert c.get(f"/api/v1/whoami?token={admin}").status_code == 401
    sid = _sid(_login(srv.url, viewer))
    with httpx.Client(base_url=srv.url, timeout=30, cookies={COOKIE: sid}) as c:
        r = c.get(f"/devices?token={admin}")  # signed in as a viewer: the admin token in the URL changes nothing
        assert r.status_code == 200 and 'data-role="viewer"' in r.text and "set-cookie" not in r.headers
        assert admin not in r.text


def test_cross_origin_posts_are_refused(srv: CP) -> None:
    op = srv.token("operator")
    evil = "https://evil.example"
    for headers in ({"Origin": evil}, {"Origin": "null"}, {"Origin": srv.url.replace("http:", "https:")}):
        r = _login(srv.url, op, **headers)
        assert r.status_code == 403 and "cross-origin" in r.text and "set-cookie" not in r.headers, headers
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/login", data={"token": op}, headers={"Referer": f"{evil}/page"})
        assert r.status_code == 403 and "cross-origin" in r.text
        r = c.post("/login", data={"token": op})  # a browser always sends one of the two on a form post
        assert r.status_code == 403 and "no Origin or Referer" in r.text
        r = c.post("/login", data={"token": op}, headers={"Referer": f"{srv.url}/login?next=/"})
        assert r.status_code == 303
    sid = _sid(_login(srv.url, op))
    form = {"csrf": csrf_token(sid)}
    # a missing rollout answers 404 once past the cross-site checks: 403 means refused before anything ran
    with httpx.Client(base_url=srv.url, timeout=30, cookies={COOKIE: sid}) as c:
        assert c.post("/rollouts/ro-x/pause", data=form, headers={"Origin": evil}).status_code == 403
        assert c.post("/rollouts/ro-x/pause", data=form).status_code == 403  # cookie without Origin/Referer
        assert c.post("/rollouts/ro-x/pause", data=form, headers={"Origin": srv.url}).status_code == 404
        assert c.post("/logout", headers={"Origin": evil}).status_code == 403
    assert _page(srv.url, sid).status_code == 200  # that sign-out was refused
    bearer = {"Authorization": f"Bearer {op}"}
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.post("/rollouts/ro-x/pause", headers=bearer).status_code == 404  # a script: no Origin needed
        assert c.post("/rollouts/ro-x/pause", headers={**bearer, "Origin": evil}).status_code == 403


def test_secure_cookie_behind_a_trusted_proxy_only(srv: CP) -> None:
    viewer = srv.token("viewer")
    https_origin = srv.url.replace("http:", "https:")
    # uvicorn trusts X-Forwarded-Proto from 127.0.0.1 by default (--forwarded-allow-ips): the request is https
    r = _login(srv.url, viewer, **{"X-Forwarded-Proto": "https", "Origin": https_origin})
    _sid(r)
    assert "Secure" in r.headers["set-cookie"]
    with _serve(srv.app, forwarded_allow_ips="10.9.9.9") as url:  # a server that trusts no proxy here
        r = _login(url, viewer, **{"X-Forwarded-Proto": "https"})
        _sid(r)
        assert "Secure" not in r.headers["set-cookie"]
        srv.store.settings.cookie_secure = True
        try:
            r = _login(url, viewer)
            _sid(r)
            assert "Secure" in r.headers["set-cookie"]
        finally:
            srv.store.settings.cookie_secure = False


# ------------------------------------------------------------------------------------------------ cheap refusals


def test_unknown_device_ids_do_not_reach_the_database_each_time(srv: CP) -> None:
    unknown = "dev-" + secrets.token_hex(8)
    h = {"Authorization": f"Bearer {secrets.token_urlsafe(32)}"}
    with sql_statements(srv) as statements:
        for _ in range(100):
            assert srv.http.get(f"/api/v1/devices/{unknown}/desired", headers=h).status_code == 401
        for _ in range(100):
            r = srv.http.post(f"/api/v1/devices/{unknown}/report", headers=h, json={"batch_id": "b", "state": "idle"})
            assert r.status_code == 401
    assert len(statements) <= 2, statements  # one look for the id, then refused from memory


def test_wrong_credentials_for_a_known_device_do_not_reach_the_database_each_time(srv: CP) -> None:
    d = srv.device("rpi4")
    with sql_statements(srv) as statements:
        for _ in range(100):
            h = {"Authorization": f"Bearer {secrets.token_urlsafe(32)}"}
            assert srv.http.get(f"/api/v1/devices/{d.id}/desired", headers=h).status_code == 401
    # one reload per STALE_RELOAD_S at most (a credential rotated on another replica is still found), not one each
    assert len(statements) <= 20, len(statements)
    ok = srv.http.get(f"/api/v1/devices/{d.id}/desired", headers={"Authorization": f"Bearer {d.credential}"})
    assert ok.status_code == 200


def test_an_unknown_id_remembered_as_missing_is_forgotten_when_its_device_arrives(srv: CP, tmp_path: Path) -> None:
    """A replica on the same database learns of a device enrolled elsewhere by its sync, which drops the miss."""
    other = create_app(ServerSettings(db=srv.settings.db, repo=tmp_path / "repo"))
    try:
        d = srv.device("rpi4")
        other.state.context.cache.miss(d.id)  # as if someone had asked for this id there before it was enrolled
        h = {"Authorization": f"Bearer {d.credential}"}
        with _serve(other) as url, httpx.Client(base_url=url, timeout=30) as c:
            assert c.get(f"/api/v1/devices/{d.id}/desired", headers=h).status_code == 401
            other.state.context.store.sync()
            assert not other.state.context.cache.missed(d.id)
            assert c.get(f"/api/v1/devices/{d.id}/desired", headers=h).status_code == 200
            # and a device enrolled elsewhere that this replica never heard of is looked up, not refused
            e = srv.device("rpi4")
            r = c.get(f"/api/v1/devices/{e.id}/desired", headers={"Authorization": f"Bearer {e.credential}"})
            assert r.status_code == 200
    finally:
        other.state.context.db.dispose()


def _uploads(cp: CP) -> list[Path]:
    d = cp.store.repo.path / "uploads"
    return sorted(d.rglob("*")) if d.exists() else []


def test_oversize_uploads_are_refused_and_leave_nothing_behind(srv: CP, mlp_path: Path, tmp_path: Path) -> None:
    pkg = build_pkg(mlp_path, tmp_path, "9.0.0", name="attack")
    data = pkg.read_bytes()
    headers = {**srv.h(), "Content-Type": "application/octet-stream"}
    srv.store.settings.max_package_mb = len(data) / 2 / 1024 / 1024
    try:
        r = srv.http.post("/api/v1/packages", content=data, headers=headers)  # declared length over the cap
        assert r.status_code == 413 and "max_package_mb" in r.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: refused once the stream passes the cap
            for i in range(0, len(data), 4096):
                yield data[i : i + 4096]

        r = srv.http.post("/api/v1/packages", content=chunks(), headers=headers)
        assert r.status_code == 413 and "max_package_mb" in r.json()["detail"]
        assert _uploads(srv) == []
    finally:
        srv.store.settings.max_package_mb = 2048.0
    out = srv.api("POST", "/api/v1/packages", content=data, headers=headers)
    assert out["model"] == "attack" and out["version"] == "9.0.0"
    assert (srv.store.repo.path / "targets").is_dir() and _uploads(srv) == []
    (published,) = [f for f in (srv.store.repo.path / "targets").iterdir() if f.name.endswith(out["target"])]
    assert srv.http.get(f"/tuf/targets/{published.name}").content == data  # signed in straight from the spool


def test_an_upload_is_written_to_disk_as_it_arrives(srv: CP) -> None:
    """The server spools the body: while the client is still sending, the bytes so far are already on disk."""
    chunk = b"\0" * (256 * 1024)
    total = 24  # 6 MiB
    seen: list[int] = []

    def body() -> Iterator[bytes]:
        for i in range(total):
            if i >= 12:  # 3 MiB sent: at least 2 MiB must be in the spool file (writes are of about 1 MiB)
                deadline = time.monotonic() + 60
                while True:
                    size = sum(p.stat().st_size for p in _uploads(srv) if p.is_file())
                    if size >= (i - 4) * len(chunk):
                        seen.append(size)
                        break
                    assert time.monotonic() < deadline, f"only {size} bytes on disk after {i} chunks sent"
                    time.sleep(0.05)
            yield chunk

    r = srv.http.post(
        "/api/v1/packages", content=body(), headers={**srv.h(), "Content-Type": "application/octet-stream"}
    )
    assert r.status_code == 422 and "not a valid .efpkg" in r.json()["detail"]  # zeros are no package
    assert len(seen) == total - 12 and _uploads(srv) == []


# ------------------------------------------------------------------------------------------------ fuzzing

_TEMPLATES = sorted({p for (m, p) in MATRIX if m != "MOUNT"} | {"/tuf/metadata/{x}", "/tuf/targets/{x}", "/{x}"})
_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
_SEGMENT = st.one_of(_TEXT, st.sampled_from(["..", "%2e%2e", "0", "-1", "x" * 300, "rpi4", "digits", "1.0.0"]))


@st.composite
def _requests(draw: st.DrawFn) -> dict[str, Any]:
    template = draw(st.sampled_from(_TEMPLATES))
    parts = template.split("/")
    path = "/".join(quote(draw(_SEGMENT), safe="") if p.startswith("{") else p for p in parts) or "/"
    if draw(st.booleans()):
        path += "/" + quote(draw(_TEXT), safe="/")
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]))
    headers: dict[str, str] = {}
    auth = draw(st.sampled_from(["none", "viewer", "operator", "junk", "basic", "session"]))
    ctype = draw(st.sampled_from([None, "application/json", "application/octet-stream", "text/plain", "x/y;;"]))
    if ctype:
        headers["Content-Type"] = ctype
    if draw(st.booleans()):
        headers["Origin"] = draw(st.sampled_from(["null", "https://evil.example", "http://127.0.0.1", "::"]))
    for name in draw(st.lists(st.sampled_from(["If-None-Match", "Referer", "X-Forwarded-Proto", "Accept"]))):
        headers[name] = draw(_TEXT).strip()  # HTTP allows no whitespace around a header value
    body = draw(
        st.one_of(
            st.none(),
            st.binary(max_size=3000),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
                lambda x: st.lists(x, max_size=4) | st.dictionaries(_TEXT, x, max_size=4),
                max_leaves=12,
            ).map(lambda v: __import__("json").dumps(v).encode()),
        )
    )
    return {"method": method, "path": path, "auth": auth, "headers": headers, "body": body}


def test_a_json_body_that_is_not_utf8_is_a_422_that_names_the_part_not_a_500(srv: CP) -> None:
    # found by the fuzzer below: FastAPI's own 422 handler echoed the input by decoding it as UTF-8
    # (without a JSON content type FastAPI hands the raw bytes to the body's validation)
    h = {"Authorization": f"Bearer {srv.token('admin')}"}
    for path in ("/api/v1/models/m/versions/1.0.0/gate", "/api/v1/release-policy"):
        r = srv.http.put(path, headers=h, content=b"\x84l")
        assert r.status_code == 422, (path, r.status_code, r.text[:300])
        detail = r.json()["detail"]
        assert detail and all(d["msg"] and "input" not in d for d in detail), detail


def test_fuzzed_requests_never_crash_the_api(cp: CP) -> None:
    """Random paths (every route template, filled with junk), methods, headers and bodies, on SQLite and
    PostgreSQL: never a 5xx, and every 4xx of the API is JSON with a message. Admin tokens stay out, so the fuzzer
    cannot revoke the tokens it uses."""
    tokens = {"viewer": cp.token("viewer"), "operator": cp.token("operator")}
    session = _sid(_login(cp.url, tokens["viewer"]))
    auth_headers: dict[str, dict[str, str]] = {
        "none": {},
        "junk": {"Authorization": "Bearer efa_" + "x" * 43},
        "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
        "session": {"Cookie": f"{COOKIE}={session}"},
        **{k: {"Authorization": f"Bearer {v}"} for k, v in tokens.items()},
    }
    seen: list[int] = []

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_requests())
    def run(req: dict[str, Any]) -> None:
        headers = {**req["headers"], **auth_headers[req["auth"]]}
        r = cp.http.request(req["method"], req["path"], headers=headers, content=req["body"])
        seen.append(r.status_code)
        assert r.status_code < 500, (req, r.status_code, r.text[:500])
        if req["path"].startswith("/api/") and 400 <= r.status_code < 500 and req["method"] != "HEAD":
            assert r.headers["content-type"].startswith("application/json"), (req, r.status_code, r.text[:300])
            detail = r.json()["detail"]
            assert detail and (isinstance(detail, str) or all(d.get("msg") for d in detail)), (req, detail)

    run()
    assert any(400 <= c < 500 for c in seen) and len(seen) >= 250
