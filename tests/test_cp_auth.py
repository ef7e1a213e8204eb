"""Authorization: the matrix covers every route of the running app (deny by default), every forbidden
(role, endpoint) and (device A, device B's resource) pair is refused, revoked credentials are refused at once, and
the 304 check-in path issues no SQL."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter
from sqlalchemy import event

from _cp_support import CP
from edgefleet.config import ServerSettings
from edgefleet.controlplane.app import create_app
from edgefleet.controlplane.auth import MATRIX, ROLE_ACCESS, Access, app_route_keys
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
    app.state.store.db.dispose()
    ok.state.store.db.dispose()


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
    statements: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    engine = cp.store.db.engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        for _ in range(20):
            r = cp.http.get(f"/api/v1/devices/{d.id}/desired", headers={**h, "If-None-Match": etag})
            assert r.status_code == 304 and r.headers["etag"] == etag
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert statements == []
    metrics = cp.http.get("/metrics", headers=cp.h()).text
    assert 'edgefleet_checkins_total{answer="304"} 20.0' in metrics, metrics
    assert d.id in cp.store.cache.seen  # last-seen waits in memory for the batch flush
    cp.store.flush_and_sync()
    after = cp.api("GET", f"/api/v1/devices/{d.id}")["last_seen"]
    assert after is not None and (before is None or after > before)  # the batch wrote the newest time
    assert d.id not in cp.store.cache.seen
