"""The dashboard without a browser: SVG charts and latency series (pure), sign-in and cookies, role-dependent
buttons, CSRF, and the figures on each page against the API — over real HTTP to a real uvicorn server.

The fleet is made of protocol-level clients (tests/_dashboard_fleet.py): the real agent is tested elsewhere."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from markupsafe import escape

from _cp_support import CP
from _dashboard_fleet import FAKE_SHA, Fleet, build_packages, populate
from edgefleet.controlplane.dashboard.charts import Series, bar_chart, line_chart, nice_ticks
from edgefleet.controlplane.dashboard.session import COOKIE, csrf_token, safe_next
from edgefleet.controlplane.dashboard.views import LatencyPoint, latency_series
from edgefleet.controlplane.reconciler import reconcile_once
from edgefleet.telemetry.sketch import LatencySketch

# ------------------------------------------------------------------------------------------------ pure parts


def test_nice_ticks_cover_the_range_with_round_steps() -> None:
    assert nice_ticks(0, 9.3) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(0, 0.042)[-1] >= 0.042
    assert nice_ticks(5, 5) == nice_ticks(5, 10)  # a flat series still gets an axis
    assert nice_ticks(0, float("nan")) == [0.0]


def test_line_chart_draws_gaps_escapes_labels_and_says_when_empty() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    pts = [(t + timedelta(seconds=i), v) for i, v in enumerate([1.0, 2.0, None, 3.0, 4.0])]
    svg = str(line_chart([Series("<script>x</script>", pts)], title="p95 & more", unit="ms"))
    assert svg.count("<polyline") == 2  # the None splits the line
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "p95 &amp; more" in svg
    empty = str(line_chart([], title="nothing"))
    assert "no data yet" in empty and "<polyline" not in empty
    lone = str(line_chart([Series("one", [(t, 2.0)])], title="one point"))
    assert "<circle" in lone


def test_bar_chart_stacks_segments_and_totals() -> None:
    svg = str(bar_chart([("rpi4", {"committed": 5, "idle": 1}), ("jetson", {"committed": 4})], title="t"))
    assert svg.count("<rect") == 3 + 2  # three segments, two legend swatches
    assert ">6</text>" in svg and ">4</text>" in svg
    assert "no data yet" in str(bar_chart([], title="t"))


def _sketch(values: list[float]) -> Any:
    s = LatencySketch()
    s.extend(values)
    return s.to_data()


def test_latency_series_merges_sketches_per_bucket_never_averages_p95s() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    fast = [0.001] * 90
    slow = [0.100] * 10
    pts = [
        LatencyPoint(t, "a", _sketch(fast)),
        LatencyPoint(t, "a", _sketch(slow)),  # same bucket: merged, p95 falls in the slow tail
        LatencyPoint(t + timedelta(seconds=60), "a", _sketch([0.002] * 10)),
        LatencyPoint(t + timedelta(seconds=60), "b", _sketch([0.003] * 10)),
        LatencyPoint(t, "b", _sketch([])),  # an empty window adds nothing
    ]
    series = {s.label: s for s in latency_series(pts, buckets=2)}
    assert set(series) == {"a", "b"}
    a = [v for _, v in series["a"].points]
    merged = LatencySketch()
    merged.extend(fast + slow)
    assert a[0] == pytest.approx((merged.quantile(0.95) or 0) * 1000)
    assert a[0] == pytest.approx(100, rel=0.02)  # the average of the two p95s would be ~50
    assert a[1] == pytest.approx(2, rel=0.02)
    assert next(v for _, v in series["b"].points) is None  # a gap, not a zero
    assert latency_series([]) == []


def test_safe_next_refuses_other_hosts() -> None:
    assert safe_next("/rollouts/x?y=1") == "/rollouts/x?y=1"
    for bad in ("https://evil.example/", "//evil.example/x", "/\\evil", "", None, "javascript:alert(1)"):
        assert safe_next(bad) == "/"


# ------------------------------------------------------------------------------------------------ against a server


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path) -> Iterator[tuple[CP, Fleet]]:
    d = tmp_path_factory.mktemp("dash")
    cp = CP(d, f"sqlite:///{d / 'cp.db'}")
    try:
        pkgs = build_packages(mlp_path, d / "pkgs")
        fleet = populate(cp.http, cp.admin, pkgs, tick=lambda: reconcile_once(cp.store))
        yield cp, fleet
    finally:
        cp.close()


def _get(cp: CP, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return cp.http.get(path, headers=headers, **kw)


@contextlib.contextmanager
def _browser(cp: CP, token: str) -> Iterator[httpx.Client]:
    """A client signed in through the form, as a browser on the dashboard's own page is (it sends Origin)."""
    with httpx.Client(base_url=cp.url, timeout=30, headers={"Origin": cp.url}) as c:
        r = c.post("/login", data={"token": token, "next": "/"})
        assert r.status_code == 303, r.text
        yield c


def _text(html: str, testid: str) -> str:
    m = re.search(rf'data-testid="{testid}"[^>]*>([^<]*)<', html)
    assert m, f"no {testid} in the page"
    return m.group(1).strip()


def _pct(v: float) -> str:
    return f"{v * 100:.1f} %"


def test_signed_out_gets_the_sign_in_form_and_a_bad_token_is_refused(env: tuple[CP, Fleet]) -> None:
    cp, _ = env
    r = _get(cp, "/rollouts")
    assert r.status_code == 401 and 'action="/login"' in r.text and 'value="/rollouts"' in r.text
    r = cp.http.post("/login", data={"token": "efa_nope", "next": "/"}, headers={"Origin": cp.url})
    assert r.status_code == 401 and "invalid or revoked API token" in r.text
    assert COOKIE not in r.cookies
    assert _get(cp, "/", token="efa_nope").status_code == 401
    assert cp.http.get("/static/dashboard.css").status_code == 200  # public
    assert cp.http.get("/static/../app.py").status_code == 404


def test_login_sets_an_httponly_strict_session_cookie_and_token_query_signs_nobody_in(env: tuple[CP, Fleet]) -> None:
    cp, fleet = env
    with httpx.Client(base_url=cp.url, timeout=30, headers={"Origin": cp.url}) as c:
        r = c.post("/login", data={"token": fleet.viewer, "next": "//evil.example/"})
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert fleet.viewer not in cookie  # the cookie names a session, never the token
        page = c.get("/")
        assert page.status_code == 200 and 'data-testid="whoami" data-role="viewer"' in page.text
        assert (
            page.headers["cache-control"] == "no-store"
            and "frame-ancestors 'none'" in page.headers["content-security-policy"]
        )
        out = c.post("/logout")
        assert out.status_code == 303
        assert c.get("/").status_code == 401
    with httpx.Client(base_url=cp.url, timeout=30) as c:
        r = c.get(f"/devices?token={fleet.viewer}&x=1")
        assert r.status_code == 401 and COOKIE not in r.cookies and "set-cookie" not in r.headers
        assert fleet.viewer not in r.text and 'value="/devices?x=1"' in r.text  # not carried into `next`
        assert c.get("/devices").status_code == 401


def test_overview_figures_match_the_api(env: tuple[CP, Fleet]) -> None:
    cp, fleet = env
    k = cp.api("GET", "/api/v1/fleet")
    html = _get(cp, "/", fleet.viewer).text
    assert k["crash_free_rate"] == pytest.approx(0.9)  # one of ten reporting devices crashed
    assert _text(html, "kpi-crash-free") == _pct(k["crash_free_rate"])
    assert _text(html, "kpi-update-success") == _pct(k["update_success_rate"])
    assert _text(html, "kpi-active") == str(k["devices"]["active"]) == "10"
    assert _text(html, "kpi-fragmentation") == str(k["fragmentation_index"])
    # The fixture's drifting device reports only its own PSI (no per-bin counts) on a package without a drift
    # reference: that is no fleet evidence, so no alert (tests/test_cp_drift.py drives a real fleet figure).
    assert _text(html, "kpi-drift") == str(len(k["drift_alerts"])) == "0"
    assert k["drift"] == [] and "no drift data" in html
    u = k["updates"]
    assert (
        _text(html, "kpi-updates").split()
        == (
            f"{u['committed']} committed · {u['failed']} failed · {u['rolled_back']} rolled back · "
            f"{u['reverted']} reverted · {u['cancelled']} cancelled"
        ).split()
    )
    assert u["committed"] >= 10 and u["failed"] == u["rolled_back"] == 0
    for row in k["latency"]:
        m = re.search(
            rf'data-model="{row["model"]}" data-version="{row["version"]}" data-tier="{row["tier"]}">.*?'
            r"data-p95>([^<]*)<",
            html,
            re.S,
        )
        assert m and m.group(1) == f"{row['p95_ms']:.2f} ms", row
    devices = cp.api("GET", "/api/v1/devices")
    for tier in ("rpi4", "jetson"):
        for version in ("1.0.0", "2.0.0"):
            n = sum(1 for d in devices if d["tier"] == tier and d["served"]["version"] == version)
            m = re.search(rf'<tr data-tier="{tier}">(?:(?!</tr>).)*data-version="digits:{version}">(\d+)<', html, re.S)
            assert (int(m.group(1)) if m else 0) == n, (tier, version)
    # one point per 5-minute rollup bucket: a fleet that reported within one bucket is a dot, not yet a line
    assert ("<polyline" in html or "<circle" in html) and "p95 latency over time" in html
    assert fleet.live_rollout in html  # in progress


def test_viewer_sees_no_buttons_operator_does(env: tuple[CP, Fleet]) -> None:
    cp, fleet = env
    page = _get(cp, f"/rollouts/{fleet.live_rollout}", fleet.viewer).text
    assert "data-action" not in page and "/pause" not in page and 'name="csrf"' not in page
    assert _text(page, "rollout-state") == "running"
    op = _get(cp, f"/rollouts/{fleet.live_rollout}", fleet.operator).text
    assert 'data-action="pause"' in op and 'data-action="abort"' in op and 'data-action="rollback"' in op
    assert 'data-action="resume"' not in op  # only what the state allows
    done = _get(cp, f"/rollouts/{fleet.done_rollout}", fleet.operator).text
    assert 'data-action="rollback"' in done and 'data-action="pause"' not in done


def test_buttons_check_role_and_csrf_then_pause_and_resume(env: tuple[CP, Fleet]) -> None:
    cp, fleet = env
    rid = fleet.live_rollout
    with _browser(cp, fleet.viewer) as viewer:
        r = viewer.post(f"/rollouts/{rid}/pause", data={"csrf": csrf_token(viewer.cookies[COOKIE])})
        assert r.status_code == 403
    with _browser(cp, fleet.operator) as op:
        assert op.post(f"/rollouts/{rid}/pause", data={}).status_code == 403  # no form token
        assert op.post(f"/rollouts/{rid}/pause", data={"csrf": "0" * 32}).status_code == 403
        assert cp.api("GET", f"/api/v1/rollouts/{rid}")["state"] == "running"
        csrf = csrf_token(op.cookies[COOKIE])
        page = op.get(f"/rollouts/{rid}").text
        assert f'name="csrf" value="{csrf}"' in page
        r = op.post(f"/rollouts/{rid}/pause", data={"csrf": csrf, "reason": "<b>look</b> at wave 0"})
        assert r.status_code == 303 and r.headers["location"] == f"/rollouts/{rid}?done=pause"
        got = cp.api("GET", f"/api/v1/rollouts/{rid}")
        assert got["state"] == "paused" and got["reason"] == "<b>look</b> at wave 0"
        assert got["transitions"][-1]["actor"] == "token:ops"
        page = op.get(r.headers["location"]).text
        assert "Rollout paused." in page and "&lt;b&gt;look&lt;/b&gt;" in page and "<b>look</b>" not in page
        again = op.post(f"/rollouts/{rid}/pause", data={"csrf": csrf})
        assert again.status_code == 409 and "cannot pause" in again.text
        assert op.post(f"/rollouts/{rid}/resume", data={"csrf": csrf}).status_code == 303
        assert cp.api("GET", f"/api/v1/rollouts/{rid}")["state"] == "running"
        assert op.post("/rollouts/ro-missing/pause", data={"csrf": csrf}).status_code == 404
    audit = cp.api("GET", "/api/v1/audit", params={"target": rid})
    assert [a["detail"]["to_state"] for a in audit if a["action"] == "rollout.transition"][:2] == ["running", "paused"]


def test_rollout_page_shows_canary_against_control(env: tuple[CP, Fleet]) -> None:
    cp, fleet = env
    r = cp.api("GET", f"/api/v1/rollouts/{fleet.live_rollout}")
    page = _get(cp, f"/rollouts/{fleet.live_rollout}", fleet.viewer).text
    assert _text(page, "rollout-moved") == str(len(r["devices"]))
    wave0 = re.search(r'<tr data-wave="0".*?</tr>', page, re.S)
    assert wave0
    canary = re.search(r"data-canary-p95>([\d.]+) ms<", wave0.group(0))
    control = re.search(r"data-control-p95>([\d.]+) ms<", wave0.group(0))
    assert canary and control
    # canary devices serve 2.0.0 (slower per tier in the fixture), control devices 1.0.0
    tiers = {d.id: d.tier for d in fleet.devices}
    moved = {x["device_id"] for x in r["devices"]}
    assert {tiers[i] for i in moved}  # the canary is not empty
    assert float(canary.group(1)) > 0 and float(control.group(1)) > 0
    assert '<tr data-wave="1"' in page and "not started" in page
    for t in r["transitions"]:  # every decision with its reason, escaped
        assert str(escape(t["reason"])) in page


def test_device_page_shows_sha_check_events_and_history(env: tuple[CP, Fleet]) -> None:
    cp, fleet = env
    odd = _get(cp, f"/devices/{fleet.odd_device}", fleet.viewer).text
    served = cp.api("GET", f"/api/v1/devices/{fleet.odd_device}")["served"]["version"]
    assert _text(odd, "device-sha") == FAKE_SHA[served] and "differs from the registry" in odd
    good = next(d for d in fleet.devices if d.id != fleet.odd_device)
    api = cp.api("GET", f"/api/v1/devices/{good.id}")
    page = _get(cp, f"/devices/{good.id}", fleet.viewer).text
    assert _text(page, "device-sha") == api["served"]["model_sha256"] and "matches the registry" in page
    assert _text(page, "device-state") == api["state"]
    assert "device.enroll" in page and "committed" in page and fleet.done_rollout in page
    missing = _get(cp, "/devices/dev-nope", fleet.viewer)
    assert missing.status_code == 404 and "no device dev-nope" in missing.text


def test_model_page_shows_versions_compat_and_devices(env: tuple[CP, Fleet]) -> None:
    cp, fleet = env
    page = _get(cp, "/models/digits", fleet.viewer).text
    compat = cp.api("GET", "/api/v1/compat", params={"model": "digits"})
    for c in compat:
        m = re.search(
            rf'<tr data-tier="{c["tier"]}" data-runtime="{c["runtime_version"]}">(?:(?!</tr>).)*'
            rf'data-version="{c["version"]}"><span class="badge compat-(\w+)"',
            page,
            re.S,
        )
        assert m and m.group(1) == c["status"], c
    assert {c["status"] for c in compat} >= {"verified"}
    devices = cp.api("GET", "/api/v1/devices")
    for v in ("1.0.0", "2.0.0"):
        m = re.search(rf'<tr data-version="{v}">(?:(?!</tr>).)*data-devices>(\d+)<', page, re.S)
        assert m and int(m.group(1)) == sum(1 for d in devices if d["served"]["version"] == v)
        assert fleet.model_sha[v] in page
    assert "no gate verdict attached" in page
    assert _get(cp, "/models/nope", fleet.viewer).status_code == 404


def test_index_pages_list_everything(env: tuple[CP, Fleet]) -> None:
    cp, fleet = env
    devs = _get(cp, "/devices", fleet.viewer).text
    assert all(d.id in devs for d in fleet.devices)
    ros = _get(cp, "/rollouts", fleet.viewer).text
    assert fleet.live_rollout in ros and fleet.done_rollout in ros
    assert "digits" in _get(cp, "/models", fleet.viewer).text


# ------------------------------------------------------------------------------------------------ Grafana


def _exported(text: str) -> set[str]:
    """Sample names, plus families declared with no sample yet (a per-feature drift gauge before any feature has
    its minimum sample): ``# TYPE name gauge`` with nothing under it is still a series the server exports."""
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    for line in text.splitlines():
        if line.startswith("# TYPE ") and line.split()[3] == "gauge":
            names.add(line.split()[2])
    return names


def test_grafana_dashboard_queries_only_metrics_that_are_exported(env: tuple[CP, Fleet]) -> None:
    import json

    from edgefleet.agent.metrics import AgentMetrics

    cp, fleet = env
    dash = json.loads((Path(__file__).resolve().parent.parent / "deploy/grafana/edgefleet.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in dash["panels"])
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    used = {m for e in exprs for m in re.findall(r"\bedgefleet_[a-z0-9_]+", e)}

    server = _exported(_get(cp, "/metrics", fleet.viewer).text)
    agent = AgentMetrics()
    agent.observe("digits", "1.0.0", 0.002, 0.0005, 0.001)
    agent.count("digits", "1.0.0", "ok")
    agent.updates.labels("committed").inc()
    exported = server | _exported(agent.render().decode())
    assert not used - exported, f"Grafana panels query metrics nobody exports: {sorted(used - exported)}"
    # and every fleet KPI the control plane exports has a panel, with no _created series on either side
    assert {m for m in server if m.startswith("edgefleet_")} <= used
    assert not {m for m in exported if m.endswith("_created")}
    assert {"edgefleet_drift_psi", "edgefleet_updates", "edgefleet_reports_invalid_total"} <= used
