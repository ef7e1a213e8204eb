"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright) against a real
`edgefleet server` subprocess with a populated fleet.

The fleet's devices are protocol-level clients (tests/_dashboard_fleet.py): they enroll, poll and report through
the real check-in endpoints exactly as ``edgefleet.protocol`` says, and the server's own reconciler moves them
through two rollouts. The real agent and the fleet simulator are tested elsewhere; here the point is what a
person sees and clicks. A screenshot of every page goes to artifacts/screenshots/ (and the overview to
docs/img/dashboard.png for the README when EDGEFLEET_UPDATE_README_SHOT is set).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from _dashboard_fleet import Fleet, build_packages, populate
from conftest import free_port

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "artifacts" / "screenshots"
README_SHOT = ROOT / "docs" / "img" / "dashboard.png"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass
class Env:
    url: str
    http: httpx.Client
    fleet: Fleet

    def api(self, path: str) -> Any:
        r = self.http.get(path, headers={"Authorization": f"Bearer {self.fleet.admin}"})
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("browser")
    port = free_port()
    exe = Path(sys.executable).with_name("edgefleet")
    log = (d / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            str(exe),
            "server",
            "--db",
            f"sqlite:///{d / 'cp.db'}",
            "--repo",
            str(d / "repo"),
            "--port",
            str(port),
            "--reconcile-interval",
            "0.2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")},
    )
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, timeout=30)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (d / "server.log").read_text()
            assert time.monotonic() < deadline, "edgefleet server did not start"
            time.sleep(0.1)
        admin = (d / "admin-token").read_text().strip()
        pkgs = build_packages(mlp_path, d / "pkgs")
        fleet = populate(http, admin, pkgs, tick=lambda: time.sleep(0.1))
        yield Env(url, http, fleet)
    finally:
        http.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: `make browser-deps` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
    try:
        yield b
    finally:
        b.close()
        pw.stop()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(15_000)
    p = ctx.new_page()
    try:
        yield p
    finally:
        ctx.close()


def _shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _sign_in(page: Any, env: Env, token: str, path: str = "/") -> None:
    page.goto(env.url + path)
    page.fill("input[name=token]", token)
    page.click("form[action='/login'] button[type=submit]")
    page.wait_for_selector("[data-testid=whoami]")


def test_operator_signs_in_and_the_overview_matches_the_api(page: Any, env: Env) -> None:
    page.goto(env.url + "/")
    assert page.locator("form[action='/login']").count() == 1  # signed out: the sign-in form, nothing else
    _shot(page, "login")
    page.fill("input[name=token]", "efa_wrong")
    page.click("form[action='/login'] button[type=submit]")
    assert "invalid or revoked" in page.inner_text("[data-testid=login-error]")
    _sign_in(page, env, env.fleet.operator)
    assert page.get_attribute("[data-testid=whoami]", "data-role") == "operator"

    k = env.api("/api/v1/fleet")
    assert page.inner_text("[data-testid=kpi-crash-free]") == f"{k['crash_free_rate'] * 100:.1f} %"
    assert page.inner_text("[data-testid=kpi-update-success]") == f"{k['update_success_rate'] * 100:.1f} %"
    assert page.inner_text("[data-testid=kpi-active]") == str(k["devices"]["active"])
    assert page.inner_text("[data-testid=kpi-fragmentation]") == str(k["fragmentation_index"])
    for row in k["latency"]:
        sel = f"#latency tr[data-version='{row['version']}'][data-tier='{row['tier']}'] [data-p95]"
        assert page.inner_text(sel) == f"{row['p95_ms']:.2f} ms", row
    devices = env.api("/api/v1/devices")
    for tier in {d["tier"] for d in devices}:
        for version in ("1.0.0", "2.0.0"):
            want = sum(1 for d in devices if d["tier"] == tier and d["served"]["version"] == version)
            cell = page.locator(f"#tier-version tr[data-tier='{tier}'] td[data-version='digits:{version}']")
            assert (int(cell.inner_text()) if cell.count() else 0) == want, (tier, version)
        by_state = sum(
            int(page.inner_text(f"#tier-state tr[data-tier='{tier}'] td[data-state='{st}']"))
            for st in {d["state"] for d in devices if d["tier"] == tier}
        )
        assert by_state == sum(1 for d in devices if d["tier"] == tier)
    # p95 over time, drawn on the server: one point per 5-minute rollup bucket, so a fleet that reported within one
    # bucket is a dot, not yet a line
    assert page.locator("svg.chart polyline, svg.chart circle").count() >= 1
    _shot(page, "overview")
    # The README's picture is refreshed on request only, so a test run never dirties the work tree.
    if os.environ.get("EDGEFLEET_UPDATE_README_SHOT"):
        README_SHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(README_SHOT), full_page=False)
        assert README_SHOT.stat().st_size < 1_000_000


def test_each_page_loads_with_the_figures_of_the_api(page: Any, env: Env) -> None:
    _sign_in(page, env, env.fleet.viewer)
    rid = env.fleet.live_rollout
    page.click(f"#active-rollouts a[href='/rollouts/{rid}']")
    r = env.api(f"/api/v1/rollouts/{rid}")
    assert page.inner_text("[data-testid=rollout-state]") == r["state"]
    assert page.inner_text("[data-testid=rollout-moved]") == str(len(r["devices"]))
    assert page.locator("#waves tr[data-wave='0'] [data-canary-p95]").inner_text().endswith(" ms")
    assert page.locator("#transitions tbody tr").count() == len(r["transitions"])
    _shot(page, "rollout")

    dev = r["devices"][0]["device_id"]
    page.click(f"#rollout-devices a[href='/devices/{dev}']")
    d = env.api(f"/api/v1/devices/{dev}")
    assert page.inner_text("[data-testid=device-sha]") == d["served"]["model_sha256"]
    assert page.inner_text("[data-testid=device-state]") == d["state"]
    assert page.locator("#events tbody tr").count() >= 2  # committed 1.0.0, then 2.0.0
    _shot(page, "device")

    page.goto(env.url + "/models/digits")
    compat = env.api("/api/v1/compat?model=digits")
    for c in compat:
        row = f"#compat tr[data-tier='{c['tier']}'][data-runtime='{c['runtime_version']}']"
        cell = f"{row} td[data-version='{c['version']}']"
        assert page.inner_text(f"{cell} .badge") == c["status"], c
        # the agent axis: each agent version's status on this cell, as the API lists it
        for a in c["agents"]:
            said = f"{a['status']} under agent {a['agent_version'] or 'unknown'} ({a['devices']})"
            assert said in page.inner_text(f"{cell} [data-agents]"), c
    assert page.locator("#versions tbody tr").count() == 2
    _shot(page, "model")

    for path, name in (("/devices", "devices"), ("/rollouts", "rollouts"), ("/models", "models")):
        page.goto(env.url + path)
        assert page.locator("main h1").inner_text()
        _shot(page, name)


def test_operator_pauses_and_resumes_a_rollout(page: Any, env: Env) -> None:
    rid = env.fleet.live_rollout
    _sign_in(page, env, env.fleet.operator, f"/rollouts/{rid}")
    assert re.search(rf"/rollouts/{rid}$", page.url)
    assert env.api(f"/api/v1/rollouts/{rid}")["state"] == "running"
    page.click("button[data-action=pause]")
    page.wait_for_selector("[data-testid=flash]")
    assert page.inner_text("[data-testid=rollout-state]") == "paused"
    got = env.api(f"/api/v1/rollouts/{rid}")
    assert got["state"] == "paused" and got["transitions"][-1]["actor"] == "token:ops"
    assert page.locator("button[data-action=pause]").count() == 0  # only what the state allows
    _shot(page, "rollout-paused")
    page.click("button[data-action=resume]")
    page.wait_for_selector("button[data-action=pause]")
    assert page.inner_text("[data-testid=rollout-state]") == "running"
    assert env.api(f"/api/v1/rollouts/{rid}")["state"] == "running"


def test_a_viewer_sees_no_buttons(page: Any, env: Env) -> None:
    rid = env.fleet.live_rollout
    _sign_in(page, env, env.fleet.viewer, f"/rollouts/{rid}")
    assert page.url.endswith(f"/rollouts/{rid}")
    assert page.get_attribute("[data-testid=whoami]", "data-role") == "viewer"
    assert page.inner_text("[data-testid=rollout-state]") == "running"
    assert page.locator("button").count() == 1  # sign out, and nothing else
    assert page.locator("[data-testid=actions], form[action*='/pause'], form[action*='/rollback']").count() == 0
    _shot(page, "rollout-viewer")
