"""Authorization: the matrix covers every route of the running app (deny by default), every forbidden
(role, endpoint) and (device A, device B's resource) pair is refused, revoked credentials are refused at once, and
the 304 check-in path issues no SQL. API tokens expire and rotate (API and CLI)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi import APIRouter
from sqlalchemy import select, update

from _cp_support import CP, sql_statements
from edgefleet.config import ServerSettings
from edgefleet.controlplane.app import create_app
from edgefleet.controlplane.auth import MATRIX, ROLE_ACCESS, Access, app_route_keys
from edgefleet.controlplane.db import ApiToken, utcnow
from edgefleet.errors import ConfigError


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CP]:
    d = tmp_path_factory.mktemp("auth")
    c = CP(d, f"sqlite:///{d / 'cp.db'}")
    yield c
    c.close()


def test_every_route_has_a_matrix_entry_and_no_stale_entries(cp: CP) -> None:
    keys = set(app_route_keys(cp.app.routes))
    assert keys, "no routes found"
    assert not keys - set(MATRIX), f"routes missing from the authorization matrix: {keys - set(MATRIX)}"
    assert not set(MATRIX) - keys, f"matrix entries for routes that do not exist: {set(MATRIX) - keys}"


def test_a_route_without_entry_refuses_to_build(tmp_path: Path) -> None:
    r = APIRouter()

    @r.get("/api/v1/sneaky")
    def sneaky() -> dict[str, str]:
        return {}

    app = create_app(ServerSettings(db=f"sqlite:///{tmp_path / 'a.db'}", repo=tmp_path / "repo"))
    app.include_router(r)  # added behind the factory's back
    from edgefleet.controlplane.auth import check_routes

    with pytest.raises(ConfigError, match="sneaky"):
        check_routes(app.routes, app.state.matrix)
    # and routers handed to the factory get the access they are given
    ok = create_app(
        ServerSettings(db=f"sqlite:///{tmp_path / 'b.db'}", repo=tmp_path / "repo2"), routers=[(r, Access.viewer)]
    )
    assert ok.state.matrix[("GET", "/api/v1/sneaky")] is Access.viewer
    app.state.context.db.dispose()
    ok.state.context.db.dispose()


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", path)


def _operator_routes() -> list[tuple[str, str, Access]]:
    return [(m, p, a) for (m, p), a in MATRIX.items() if a >= Access.viewer]


@pytest.mark.parametrize("role", ["viewer", "operator", "admin", None, "bogus"])
def test_every_forbidden_role_endpoint_pair_is_refused(cp: CP, role: str | None) -> None:
    token = cp.token(role) if role in ROLE_ACCESS else ("efa_not_a_token" if role else None)
    level = ROLE_ACCESS.get(role or "", Access.public)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for method, path, needs in _operator_routes():
        r = cp.http.request(method, _concrete(path), headers=headers, json={})
        if level < needs:
            want = 401 if level is Access.public else 403
            assert r.status_code == want, (role, method, path, r.status_code, r.text)
        else:
            assert r.status_code not in (401, 403), (role, method, path, r.status_code, r.text)


def test_device_a_cannot_touch_device_b(cp: CP) -> None:
    a, b = cp.device("rpi4"), cp.device("rpi4")
    ha = {"Authorization": f"Bearer {a.credential}"}
    assert cp.http.get(f"/api/v1/devices/{a.id}/desired", headers=ha).status_code == 200
    assert cp.http.get(f"/api/v1/devices/{b.id}/desired", headers=ha).status_code == 403
    body = {"batch_id": "x", "state": "idle"}
    assert cp.http.post(f"/api/v1/devices/{b.id}/report", headers=ha, json=body).status_code == 403
    assert cp.http.post(f"/api/v1/devices/{a.id}/report", headers=ha, json=body).status_code == 200
    # a device credential is no operator token, and no device credential opens nothing
    assert cp.http.get("/api/v1/devices", headers=ha).status_code == 401
    assert cp.http.get(f"/api/v1/devices/{a.id}/desired").status_code == 401
    assert cp.http.get(f"/api/v1/devices/{a.id}/desired", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_revoked_device_and_token_are_refused_at_once(cp: CP) -> None:
    d = cp.device("rpi4")
    h = {"Authorization": f"Bearer {d.credential}"}
    etag = cp.http.get(f"/api/v1/devices/{d.id}/desired", headers=h).headers["etag"]
    cp.api("POST", f"/api/v1/devices/{d.id}/revoke")
    assert cp.http.get(f"/api/v1/devices/{d.id}/desired", headers={**h, "If-None-Match": etag}).status_code == 401
    assert (
        cp.http.post(f"/api/v1/devices/{d.id}/report", headers=h, json={"batch_id": "y", "state": "idle"}).status_code
        == 401
    )
    t = cp.api("POST", "/api/v1/tokens", json={"role": "operator"})
    assert cp.http.get("/api/v1/devices", headers=cp.h(t["token"])).status_code == 200
    cp.api("DELETE", f"/api/v1/tokens/{t['id']}")
    assert cp.http.get("/api/v1/devices", headers=cp.h(t["token"])).status_code == 401
    assert any(a["action"] == "device.revoke" for a in cp.api("GET", "/api/v1/audit"))


def test_304_path_issues_no_sql(cp: CP) -> None:
    d = cp.device("rpi4")
    h = {"Authorization": f"Bearer {d.credential}"}
    etag = cp.http.get(f"/api/v1/devices/{d.id}/desired", headers=h).headers["etag"]
    cp.store.flush_and_sync()
    before = cp.api("GET", f"/api/v1/devices/{d.id}")["last_seen"]
    with sql_statements(cp) as statements:
        for _ in range(20):
            r = cp.http.get(f"/api/v1/devices/{d.id}/desired", headers={**h, "If-None-Match": etag})
            assert r.status_code == 304 and r.headers["etag"] == etag
    assert statements == []
    metrics = cp.http.get("/metrics", headers=cp.h()).text
    assert 'edgefleet_checkins_total{answer="304"} 20.0' in metrics, metrics
    assert d.id in cp.store.cache.seen  # last-seen waits in memory for the batch flush
    cp.store.flush_and_sync()
    after = cp.api("GET", f"/api/v1/devices/{d.id}")["last_seen"]
    assert after is not None and (before is None or after > before)  # the batch wrote the newest time
    assert d.id not in cp.store.cache.seen


# ------------------------------------------------------------------------------------------------ token lifecycle


def _expire(cp: CP, token_id: int) -> None:
    """Move a token's expiry into the past, as time would."""
    with cp.store.db.session() as s:
        s.execute(update(ApiToken).where(ApiToken.id == token_id).values(expires_at=utcnow() - timedelta(seconds=1)))


def test_tokens_expire_by_default_and_an_expired_token_is_refused(cp: CP) -> None:
    t = cp.api("POST", "/api/v1/tokens", json={"role": "viewer", "name": "wall"})
    left = datetime.fromisoformat(t["expires_at"]) - utcnow()
    assert timedelta(days=89, hours=23) < left <= timedelta(days=90)  # the server's token_expires_s
    short = cp.api("POST", "/api/v1/tokens", json={"role": "viewer", "expires_s": 3600})
    assert datetime.fromisoformat(short["expires_at"]) - utcnow() <= timedelta(hours=1)
    for bad in (0, -5, "soon", 10 * 366 * 86400):
        r = cp.http.post("/api/v1/tokens", headers=cp.h(), json={"role": "viewer", "expires_s": bad})
        assert r.status_code == 422, (bad, r.text)
    assert cp.http.get("/api/v1/whoami", headers=cp.h(t["token"])).status_code == 200
    _expire(cp, t["id"])
    r = cp.http.get("/api/v1/whoami", headers=cp.h(t["token"]))
    assert r.status_code == 401 and r.json()["detail"].startswith("token expired")
    rows = {x["id"]: x for x in cp.api("GET", "/api/v1/tokens")}
    assert rows[t["id"]]["status"] == "expired" and not rows[t["id"]]["never_expires"]
    boot = rows[1]
    assert boot["name"] == "admin (bootstrap)" and boot["never_expires"] and boot["expires_at"] is None


def test_rotation_issues_a_new_secret_and_retires_the_old_after_its_grace(cp: CP) -> None:
    t = cp.api("POST", "/api/v1/tokens", json={"role": "operator", "name": "ci"})
    new = cp.api("POST", f"/api/v1/tokens/{t['id']}/rotate", json={})
    assert (new["name"], new["role"], new["replaces"]) == ("ci", "operator", t["id"]) and new["token"] != t["token"]
    assert cp.http.get("/api/v1/whoami", headers=cp.h(new["token"])).json() == {"name": "ci", "role": "operator"}
    old = cp.http.get("/api/v1/whoami", headers=cp.h(t["token"]))  # grace 0: refused at once, naming its successor
    assert (
        old.status_code == 401 and "token expired" in old.json()["detail"] and f"id {new['id']}" in old.json()["detail"]
    )
    again = cp.http.post(f"/api/v1/tokens/{t['id']}/rotate", headers=cp.h(), json={})
    assert again.status_code == 409
    # with a grace period both work until it ends
    graced = cp.api("POST", f"/api/v1/tokens/{new['id']}/rotate", json={"grace_s": 600})
    until = datetime.fromisoformat(graced["old_valid_until"])
    assert timedelta(seconds=590) < until - utcnow() <= timedelta(seconds=600)
    assert cp.http.get("/api/v1/whoami", headers=cp.h(new["token"])).status_code == 200
    assert cp.http.get("/api/v1/whoami", headers=cp.h(graced["token"])).status_code == 200
    _expire(cp, new["id"])
    assert cp.http.get("/api/v1/whoami", headers=cp.h(new["token"])).status_code == 401
    assert cp.http.post("/api/v1/tokens/999999/rotate", headers=cp.h(), json={}).status_code == 404
    audit = [a for a in cp.api("GET", "/api/v1/audit") if a["action"] == "token.rotate"]
    assert {a["target"] for a in audit} >= {str(t["id"]), str(new["id"])}


def test_rotating_a_never_expiring_token_keeps_it_never_expiring(cp: CP, tmp_path: Path) -> None:
    app = create_app(ServerSettings(db=f"sqlite:///{tmp_path / 'n.db'}", repo=tmp_path / "repo", admin_token="efa_cfg"))
    try:
        with app.state.context.db.session() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.name == "admin (settings)"))
            assert row is not None and row.expires_at is None
    finally:
        app.state.context.db.dispose()
    t = cp.api("POST", "/api/v1/tokens", json={"role": "admin", "name": "spare"})
    with cp.store.db.session() as s:  # as an admin token made before tokens expired
        s.execute(update(ApiToken).where(ApiToken.id == t["id"]).values(expires_at=None))
    new = cp.api("POST", f"/api/v1/tokens/{t['id']}/rotate", json={"grace_s": 60})
    assert new["never_expires"] and new["expires_at"] is None
    capped = cp.api("POST", f"/api/v1/tokens/{new['id']}/rotate", json={"expires_s": 86400})
    assert not capped["never_expires"]


def test_tokens_cli_create_rotate_list(cp: CP, capsys: pytest.CaptureFixture[str]) -> None:
    from _package_helpers import run_cli

    base = ["--server", cp.url, "--api-token", cp.admin]
    code, out, err = run_cli(capsys, "tokens", "create", "--role", "viewer", "--name", "cli", "--expires", "2d", *base)
    assert code == 0, err
    secret = out.strip()
    assert cp.http.get("/api/v1/whoami", headers=cp.h(secret)).json()["name"] == "cli"
    code, out, err = run_cli(capsys, "tokens", "list", "--json", *base)
    rows = json.loads(out)
    (row,) = [r for r in rows if r["name"] == "cli"]
    assert timedelta(days=1, hours=23) < datetime.fromisoformat(row["expires_at"]) - utcnow() <= timedelta(days=2)
    code, out, err = run_cli(capsys, "tokens", "rotate", str(row["id"]), "--grace", "5m", *base)
    assert code == 0, err
    rotated = out.splitlines()[0].strip()
    assert f"replaces token {row['id']}" in out
    assert cp.http.get("/api/v1/whoami", headers=cp.h(rotated)).status_code == 200
    code, out, err = run_cli(capsys, "tokens", "list", *base)
    assert code == 0 and "never" in out and "expires" in out and "active" in out
    code, out, err = run_cli(capsys, "tokens", "create", "--role", "viewer", "--expires", "soon", *base)
    assert code == 2 and "--expires 'soon' is not a duration" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, "tokens", "rotate", "999999", *base)
    assert code != 0 and "no API token 999999" in err and "Traceback" not in err


def test_migrations_build_exactly_the_models(db_url: str) -> None:
    """The Alembic chain (0005 adds sessions and token expiry) and ``db.py`` describe the same schema."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from edgefleet.controlplane.db import Base, Database

    db = Database(db_url)
    try:
        db.migrate()
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        db.dispose()
