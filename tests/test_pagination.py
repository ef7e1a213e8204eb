"""Every list route pages (docs/api.md, "Pagination"): the body stays a JSON list, the next page's cursor comes in
``X-Next-Cursor`` and a ``Link: <...>; rel="next"`` header, walking the cursor visits every item once (ties in the
sort key included), a cursor the server never gave out is a one-line 400, the OpenAPI document declares the
parameters and headers, and the SDK and the CLI follow the cursor to the end."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from _cp_support import CP
from _package_helpers import run_cli
from edgefleet import sdk
from edgefleet.controlplane.db import ModelVersion, Rollout, utcnow

A = "/api/v1"


def _walk(cp: CP, path: str, limit: int, **params: Any) -> tuple[list[Any], int]:
    """Every item of a list route, a page of ``limit`` at a time along X-Next-Cursor; and the number of pages.
    Checks the Link header names the same next page."""
    items: list[Any] = []
    r = cp.http.get(A + path, params={**params, "limit": limit}, headers=cp.h())
    pages = 1
    while True:
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body, list) and len(body) <= limit
        items.extend(body)
        cursor = r.headers.get("x-next-cursor")
        if cursor is None:
            assert "link" not in r.headers
            return items, pages
        assert len(body) == limit
        link = r.headers["link"]
        assert link.startswith(f"<{A}{path}?") and link.endswith('>; rel="next"') and f"cursor={cursor}" in link
        r = cp.http.get(link[1 : link.index(">")], headers=cp.h())  # the Link URL itself
        pages += 1


@pytest.fixture
def filled(cp: CP) -> CP:
    """Five devices over two tiers, three groups, four tokens, three models, rollouts with a tied creation time
    and audit entries for all of it."""
    for i in range(3):
        cp.api("PUT", f"{A}/groups/g{i}", json={"channel": "stable"})
    for i in range(5):
        cp.device(("rpi4", "jetson")[i % 2], group=f"g{i % 3}")
    for _ in range(3):
        cp.token("viewer")
    same = utcnow() - timedelta(hours=1)
    with cp.store.db.session() as s:
        for name in ("a", "b", "c"):
            for v in ("1.0.0", "2.0.0"):
                s.add(
                    ModelVersion(
                        model=name, version=v, target=f"{name}-{v}", package_sha256="0" * 64, model_sha256="0" * 64
                    )
                )
        for i in range(4):
            s.add(Rollout(id=f"r{i}", model="a", version="2.0.0", created_at=same if i < 3 else utcnow()))
    return cp


@pytest.mark.parametrize(
    ("path", "ident"),
    [
        ("/devices", "device_id"),
        ("/devices/keys", "device_id"),
        ("/groups", "name"),
        ("/tokens", "id"),
        ("/models", "model"),
        ("/rollouts", "rollout_id"),
        ("/compat", None),
        ("/audit", "id"),
    ],
)
def test_walking_the_cursor_visits_every_item_once_in_order(filled: CP, path: str, ident: str | None) -> None:
    whole = filled.api("GET", A + path, params={"limit": 1000})
    assert len(whole) >= 3, whole
    for limit in (1, 2):
        got, pages = _walk(filled, path, limit)
        assert got == whole  # the same items, in the same order, none twice
        assert pages == -(-len(whole) // limit)
    if ident is not None:
        assert len({json.dumps(x[ident]) for x in whole}) == len(whole)


def test_the_default_page_is_100_and_the_largest_1000(filled: CP) -> None:
    for _ in range(100):
        filled.api("PUT", f"{A}/groups/g0", json={"channel": "stable"})  # 100 more audit entries
    r = filled.http.get(f"{A}/audit", headers=filled.h())
    assert len(r.json()) == 100 and "x-next-cursor" in r.headers
    for bad in (0, 1001, -1):
        r = filled.http.get(f"{A}/devices", params={"limit": bad}, headers=filled.h())
        assert r.status_code == 422, r.text


@pytest.mark.parametrize("cursor", ["nonsense!", "bm90IGpzb24", "WyJ4Il0", "W3sidCI6ICJ5ZXN0ZXJkYXkifV0", "e30"])
def test_a_cursor_the_server_never_gave_out_is_a_400(filled: CP, cursor: str) -> None:
    for path in ("/devices", "/rollouts", "/tokens", "/models"):
        r = filled.http.get(A + path, params={"cursor": cursor}, headers=filled.h())
        assert r.status_code == 400, (path, r.text)
        assert "cursor is not one this server gave out" in r.json()["detail"]


def test_a_page_goes_on_after_its_last_item_when_items_come_and_go(filled: CP) -> None:
    first = filled.http.get(f"{A}/groups", params={"limit": 2}, headers=filled.h())
    assert [g["name"] for g in first.json()] == ["g0", "g1"]
    filled.api("PUT", f"{A}/groups/a0", json={"channel": "stable"})  # sorts before the cursor: not seen, no repeat
    rest = filled.api("GET", f"{A}/groups", params={"cursor": first.headers["x-next-cursor"]})
    assert [g["name"] for g in rest] == ["g2"]


def test_openapi_declares_limit_cursor_and_the_next_page_headers_on_every_list_route(cp: CP) -> None:
    spec = cp.app.openapi()
    lists = []
    for path, ops in spec["paths"].items():
        get = ops.get("get")
        if not path.startswith(A) or get is None:
            continue
        ok = get["responses"].get("200", {})
        schema = ok.get("content", {}).get("application/json", {}).get("schema", {})
        if schema.get("type") != "array":
            continue
        lists.append(path)
        params = {p["name"]: p for p in get.get("parameters", [])}
        assert params["limit"]["schema"]["maximum"] == 1000 and params["limit"]["schema"]["default"] == 100, path
        assert "cursor" in params, path
        assert {"X-Next-Cursor", "Link"} <= set(ok.get("headers", {})), path
    assert len(lists) >= 8, lists


def test_sdk_and_cli_follow_the_cursor_to_the_end(filled: CP, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setattr(sdk, "PAGE_SIZE", 2)
    whole = filled.api("GET", f"{A}/devices", params={"limit": 1000})
    with sdk.Client(filled.url, filled.admin) as c:
        assert [d.device_id for d in c.devices.list()] == [d["device_id"] for d in whole]
        assert len(c.rollouts.list()) == 4 and len(c.tokens.list()) == 4 and len(c.models.list()) == 3
        assert len(c.audit.list(limit=3)) == 3  # stops at the number asked for
        assert len(c.audit.list()) == len(filled.api("GET", f"{A}/audit", params={"limit": 1000}))
    code, out, err = run_cli(capsys, "devices", "list", "--json", "--server", filled.url, "--api-token", filled.admin)
    assert code == 0, err
    # every page printed, not the first two devices
    assert [d["device_id"] for d in json.loads(out)] == [d["device_id"] for d in whole] and len(whole) == 5
