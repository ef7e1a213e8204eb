"""The control plane tells the truth: waves and KPIs on the server's clock, compatibility evidence only from
assigned work and from several devices, blocked (never "completed") rollouts that reach no device, a dry run,
an operator's clear, one rollout's failing step isolated from the others, update outcomes kept apart, and
``/metrics`` counting every transition without ``_created`` series — on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from _cp_support import CP, SimDevice, build_pkg
from _package_helpers import run_cli
from edgefleet import __version__
from edgefleet.controlplane import compat, reconciler
from edgefleet.controlplane.compat import add_evidence, cell_status
from edgefleet.controlplane.db import Device, Rollout, RolloutTransition, UpdateEventRow
from edgefleet.controlplane.reconciler import reconcile_once
from edgefleet.controlplane.rollout import RolloutState

MOVED_ON = "update failed: AgentError: the desired state changed during the download"


@pytest.fixture(scope="module")
def pkgs(mlp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pkgs")
    return {
        "1.0.0": build_pkg(mlp_path, d, "1.0.0"),
        "2.0.0": build_pkg(mlp_path, d, "2.0.0"),
        "3.0.0": build_pkg(mlp_path, d, "3.0.0", tiers=["big"]),
        "other": build_pkg(mlp_path, d, "1.0.0", name="other"),
    }


def _start(cp: CP, version: str, *, model: str = "digits", tier: str | None = None, **policy: Any) -> dict[str, Any]:
    body = {
        "model": model,
        "version": version,
        "tier": tier,
        "policy": {"waves": [100], "bake_s": 0, "min_devices": 1, "min_requests": 1, **policy},
    }
    return dict(cp.api("POST", "/api/v1/rollouts", json=body))


def _state(cp: CP, rid: str) -> dict[str, Any]:
    return dict(cp.api("GET", f"/api/v1/rollouts/{rid}"))


def _cli(capsys: pytest.CaptureFixture[str], cp: CP, *args: str) -> tuple[int, str, str]:
    return run_cli(capsys, *args, "--server", cp.url, "--api-token", cp.admin)


# ------------------------------------------------------------------------------------------------ server time


def test_canaries_with_lagging_clocks_fail_the_wave(cp: CP, pkgs: dict[str, Path]) -> None:
    cp.upload(pkgs["2.0.0"])
    devs = [cp.device("t") for _ in range(4)]
    rid = _start(cp, "2.0.0", waves=[50, 100], bake_s=3600, min_devices=3)["rollout_id"]
    reconcile_once(cp.store)
    canaries = [d for d in devs if d.desired()["version"] == "2.0.0"]
    assert len(canaries) == 2
    for d in canaries:  # their clocks run 5 minutes behind: every event is "before" the rollout started
        d.report(
            model="digits",
            version=None,
            requests=0,
            state="rolled_back",
            event_version="2.0.0",
            events=[("health_check_failed", "golden mismatch"), ("rolled_back", "golden mismatch")],
            rollout_id=rid,
            clock_offset_s=-300,
        )
    with cp.store.db.session() as s:
        created = s.get(Rollout, rid).created_at
        ats = list(s.scalars(select(UpdateEventRow.at).where(UpdateEventRow.rollout_id == rid)))
    assert ats and all(at < created for at in ats)  # judged on device time, they would not count
    reconcile_once(cp.store)
    r = _state(cp, rid)
    assert r["state"] == "paused", r["reason"]
    assert r["reason"].startswith("wave 0 failed: update failures 2/2"), r["reason"]


def test_kpis_count_reports_by_when_the_server_received_them(cp: CP, pkgs: dict[str, Path]) -> None:
    cp.upload(pkgs["1.0.0"])
    d = cp.device("t")
    d.report(model="digits", version="1.0.0", requests=80, clock_offset_s=-2 * 86400)  # a clock two days behind
    k = cp.api("GET", "/api/v1/fleet")
    assert [(x["version"], x["requests"]) for x in k["latency"]] == [("1.0.0", 80)]
    assert k["crash_free_rate"] == 1.0


# ------------------------------------------------------------------------------------------------ compatibility


def test_compat_cell_status_is_pure() -> None:
    def dev(i: str, ok: bool) -> dict[str, Any]:
        return {"source": "device", "device_id": i, "event": "committed" if ok else "rolled_back", "ok": ok}

    assert cell_status([]) == "untested"
    assert cell_status([dev("a", True)]) == "verified"
    assert cell_status([dev("a", True), dev("b", False)]) == "suspect"
    assert cell_status([dev("b", False), dev("b", False)]) == "suspect"  # one device twice is one device
    assert cell_status([dev("b", False), dev("c", False)]) == "failed"
    assert cell_status([dev("b", False), dev("c", False)], min_devices=3) == "suspect"
    assert cell_status([dev("b", False)], min_devices=1) == "failed"
    assert cell_status([{"source": "bench", "result": "failed"}]) == "failed"  # the operator's own measurement
    assert cell_status([{"source": "bench", "result": "verified"}]) == "verified"
    cleared = [dev("b", False), dev("c", False), {"source": "operator", "event": "cleared"}]
    assert cell_status(cleared) == "untested"
    assert cell_status([*cleared, dev("a", True)]) == "verified"
    assert cell_status([*cleared, dev("b", False)]) == "suspect"  # only what came after the clear counts


def test_evidence_keeps_failures_and_clears_past_any_run_of_successes() -> None:
    ev: list[Any] = []
    for x in (
        {"source": "device", "device_id": "b", "ok": False},
        {"source": "device", "device_id": "b", "ok": False, "reason": "again"},
        {"source": "device", "device_id": "c", "ok": False},
    ):
        ev = add_evidence(ev, x)
    for i in range(50):
        ev = add_evidence(ev, {"source": "device", "device_id": f"ok{i}", "ok": True}, cap=10)
    assert len(ev) == 10 and cell_status(ev) == "failed"
    failing = [e for e in ev if e["ok"] is False]
    assert [e["device_id"] for e in failing] == ["b", "c"] and failing[0]["reason"] == "again"  # the latest per device


def _cell(cp: CP, tier: str, version: str) -> dict[str, Any]:
    return next(
        c
        for c in cp.api("GET", "/api/v1/compat", params={"model": "digits"})
        if c["tier"] == tier and c["version"] == version
    )


def _fail(d: SimDevice, rollout_id: str | None) -> None:
    d.report(
        model="digits",
        version=None,
        requests=0,
        state="rolled_back",
        event_version="2.0.0",
        events=[("health_check_failed", "golden mismatch")],
        rollout_id=rollout_id,
    )


def test_compat_needs_assigned_work_from_two_devices_and_an_operator_can_clear_it(
    cp: CP, pkgs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cp.upload(pkgs["2.0.0"])
    devs = [cp.device("arm-a72") for _ in range(3)]
    _fail(devs[0], None)  # never sent 2.0.0: no evidence at all
    assert _cell(cp, "arm-a72", "2.0.0")["status"] == "untested" and _cell(cp, "arm-a72", "2.0.0")["evidence"] == []
    rid = _start(cp, "2.0.0", tier="arm-a72", bake_s=3600, min_devices=50)["rollout_id"]
    reconcile_once(cp.store)
    assert all(d.desired()["version"] == "2.0.0" for d in devs)
    with cp.store.db.session() as s:  # an event of another rollout, or of none, is no evidence for this work

        def event(rollout_id: str | None) -> dict[str, Any]:
            return {"source": "device", "device_id": devs[0].id, "event": "rolled_back", "rollout_id": rollout_id}

        cell = {"tier": "arm-a72", "runtime_version": "1.32.0", "model": "digits", "version": "2.0.0"}
        assert not compat.record(s, **cell, ok=False, evidence=event("ro-elsewhere"))
        assert not compat.record(s, **cell, ok=False, evidence=event(None))  # not pinned to it either
        assert not compat.record(s, **cell, ok=False, evidence={**event(rid), "device_id": "dev-stranger"})
        assert compat.assigned(s, devs[0].id, "digits", "2.0.0", rid)
        assert not compat.assigned(s, devs[0].id, "digits", "1.0.0", rid)
    assert _cell(cp, "arm-a72", "2.0.0")["status"] == "untested"
    _fail(devs[0], rid)
    _fail(devs[0], rid)
    cell = _cell(cp, "arm-a72", "2.0.0")
    assert cell["status"] == "suspect" and cell["failing_devices"] == [devs[0].id]
    plan = {"model": "digits", "version": "2.0.0", "tier": "arm-a72"}
    p = cp.api("POST", "/api/v1/rollouts/plan", json=plan)
    assert p["blocked"] is None and p["excluded"] == {}  # suspect is shown, never blocking
    _fail(devs[1], rid)
    assert _cell(cp, "arm-a72", "2.0.0")["status"] == "failed"
    p = cp.api("POST", "/api/v1/rollouts/plan", json=plan)
    assert p["blocked"] == "no eligible device on tier arm-a72: 3 enrolled, 3 incompatible"
    # a rollout whose own policy asks for three distinct devices is not blocked by two
    strict = cp.api("POST", "/api/v1/rollouts/plan", json={**plan, "policy": {"compat_fail_devices": 3}})
    assert strict["blocked"] is None

    viewer = cp.token("viewer")
    body = {"tier": "arm-a72", "runtime_version": "1.32.0", "model": "digits", "version": "2.0.0"}
    assert cp.http.post("/api/v1/compat/clear", json=body, headers=cp.h(viewer)).status_code == 403
    missing = cp.http.post("/api/v1/compat/clear", json={**body, "tier": "nope"}, headers=cp.h())
    assert missing.status_code == 404
    code, out, err = _cli(
        capsys,
        cp,
        "fleet",
        "compat-clear",
        "--tier",
        "arm-a72",
        "--runtime-version",
        "1.32.0",
        "--model",
        "digits",
        "--version",
        "2.0.0",
        "--reason",
        "bad batch of SD cards",
    )
    assert code == 0, err
    assert "failed -> untested" in out
    cell = _cell(cp, "arm-a72", "2.0.0")
    assert cell["status"] == "untested" and cell["failing_devices"] == []
    assert len(cell["evidence"]) == 3  # kept: each device's latest failure, and the clear marker
    assert cp.api("POST", "/api/v1/rollouts/plan", json=plan)["blocked"] is None
    entry = next(a for a in cp.api("GET", "/api/v1/audit", params={"action": "compat.clear"}))
    assert entry["target"] == "digits:2.0.0" and entry["detail"]["previous_status"] == "failed"
    assert entry["detail"]["reason"] == "bad batch of SD cards" and entry["actor"].startswith("token:")
    _fail(devs[2], rid)  # evidence after the clear counts afresh
    assert _cell(cp, "arm-a72", "2.0.0")["status"] == "suspect"


def test_abandoned_updates_are_no_evidence_against_the_version(cp: CP, pkgs: dict[str, Path]) -> None:
    cp.upload(pkgs["2.0.0"])
    devs = [cp.device("t") for _ in range(2)]
    rid = _start(cp, "2.0.0", bake_s=3600, min_devices=50)["rollout_id"]
    reconcile_once(cp.store)
    for d in devs:
        d.report(
            model="digits",
            version=None,
            requests=0,
            event_version="2.0.0",
            events=[("refused", MOVED_ON), ("rolled_back", MOVED_ON)],
            rollout_id=rid,
        )
    assert _cell(cp, "t", "2.0.0")["status"] == "untested"
    reconcile_once(cp.store)  # nor are they update failures of the wave
    r = _state(cp, rid)
    assert r["state"] == "running" and "update failures" not in r["reason"], r["reason"]


# ------------------------------------------------------------------------------------------------ blocked, dry run


def test_a_rollout_reaching_no_device_is_blocked_until_one_appears(
    cp: CP, pkgs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cp.upload(pkgs["2.0.0"])
    cp.device("rpi4")
    args = ["rollout", "start", "digits", "2.0.0", "--tier", "arm-a72", "--waves", "100", "--bake", "0s"]
    code, out, err = _cli(capsys, cp, *args, "--min-devices", "1", "--min-requests", "1")
    assert code == 0, err
    assert ": blocked" in out and "warning: no eligible device on tier arm-a72: 0 enrolled" in out
    rid = cp.api("GET", "/api/v1/rollouts")[0]["rollout_id"]
    for _ in range(3):  # re-evaluated every step; never "completed" on an empty cohort
        reconcile_once(cp.store)
        r = _state(cp, rid)
        assert r["state"] == "blocked" and r["blocked"] == "no eligible device on tier arm-a72: 0 enrolled"
    assert [t["to"] for t in r["transitions"]] == ["running", "blocked"]
    # blocked is active: a second rollout of the model must wait for it
    assert (
        cp.http.post("/api/v1/rollouts", json={"model": "digits", "version": "2.0.0"}, headers=cp.h()).status_code
        == 409
    )
    page = cp.http.get(f"/rollouts/{rid}", headers=cp.h()).text
    assert "no eligible device on tier arm-a72: 0 enrolled" in page and 'data-testid="rollout-blocked"' in page
    late = cp.device("arm-a72")
    reconcile_once(cp.store)
    r = _state(cp, rid)
    assert r["state"] == "running" and r["blocked"] is None
    assert [t["to"] for t in r["transitions"]] == ["running", "blocked", "running"]
    assert late.desired()["version"] == "2.0.0"
    late.report(model="digits", version="2.0.0", events=[("committed", None)], rollout_id=rid)
    reconcile_once(cp.store)
    assert _state(cp, rid)["state"] == "completed"


def test_dry_run_shows_each_wave_and_starts_nothing(
    cp: CP, pkgs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cp.upload(pkgs["3.0.0"])  # allows tier "big" only
    big = [cp.device("big") for _ in range(4)]
    small = [cp.device("small") for _ in range(3)]
    code, out, err = _cli(capsys, cp, "rollout", "start", "digits", "3.0.0", "--waves", "50,100", "--dry-run")
    assert code == 0, err
    assert "dry run" in out and "nothing was started" in out
    assert all(d.id in out for d in big + small)
    code, out, _ = _cli(capsys, cp, "rollout", "start", "digits", "3.0.0", "--waves", "50,100", "--dry-run", "--json")
    p = json.loads(out)
    assert [len(w["devices"]) for w in p["waves"]] == [2, 2]
    assert sorted(i for w in p["waves"] for i in w["devices"]) == sorted(d.id for d in big)
    assert set(p["excluded"]) == {d.id for d in small} and all("incompatible" in v for v in p["excluded"].values())
    assert p["blocked"] is None
    tiny = cp.api("POST", "/api/v1/rollouts/plan", json={"model": "digits", "version": "3.0.0", "tier": "small"})
    assert tiny["devices"] == 0 and tiny["blocked"] == "no eligible device on tier small: 3 enrolled, 3 incompatible"
    assert cp.api("GET", "/api/v1/rollouts") == []
    assert not cp.api("GET", "/api/v1/audit", params={"action": "rollout.start"})
    assert all(d.desired()["version"] is None for d in big + small)
    viewer = cp.token("viewer")
    body = {"model": "digits", "version": "3.0.0"}
    assert cp.http.post("/api/v1/rollouts/plan", json=body, headers=cp.h(viewer)).status_code == 403
    started = _start(cp, "3.0.0", tier="small")
    assert started["state"] == "blocked"
    assert started["warning"] == "no eligible device on tier small: 3 enrolled, 3 incompatible"


# ------------------------------------------------------------------------------------------------ step isolation


def test_one_rollout_failing_its_step_does_not_stall_the_others(cp: CP, pkgs: dict[str, Path]) -> None:
    cp.upload(pkgs["2.0.0"])
    cp.upload(pkgs["other"])
    a = [cp.device("a") for _ in range(2)]
    b = [cp.device("b") for _ in range(2)]
    bad = _start(cp, "2.0.0", tier="a")["rollout_id"]
    good = _start(cp, "1.0.0", model="other", tier="b")["rollout_id"]
    with cp.store.db.session() as s:  # data the step cannot read: its policy no longer parses
        s.get(Rollout, bad).policy = {"waves": "every other tuesday"}
    committed: set[str] = set()
    for _ in range(6):
        reconcile_once(cp.store)
        for d in b:
            want = d.desired()
            if want["version"] == "1.0.0" and d.id not in committed:
                committed.add(d.id)
                d.report(model="other", version="1.0.0", events=[("committed", None)], rollout_id=want["rollout_id"])
        if _state(cp, good)["state"] == "completed":
            break
    assert _state(cp, good)["state"] == "completed"
    r = _state(cp, bad)
    assert r["state"] == "running" and "ValidationError" in r["step_error"] and "waves" in r["step_error"]
    assert all(d.desired()["version"] is None for d in a)  # its step was rolled back whole
    assert next(x for x in cp.api("GET", "/api/v1/rollouts") if x["rollout_id"] == bad)["step_error"]
    page = cp.http.get(f"/rollouts/{bad}", headers=cp.h()).text
    assert 'data-testid="rollout-step-error"' in page and "ValidationError" in page
    with cp.store.db.session() as s:
        s.get(Rollout, bad).policy = {"waves": [100], "bake_s": 0, "min_devices": 1, "min_requests": 1}
    reconcile_once(cp.store)
    assert _state(cp, bad)["step_error"] is None and all(d.desired()["version"] == "2.0.0" for d in a)


# ------------------------------------------------------------------------------------------------ update outcomes


def test_update_success_counts_each_update_once_and_decisions_apart(cp: CP, pkgs: dict[str, Path]) -> None:
    cp.upload(pkgs["1.0.0"])
    cp.upload(pkgs["2.0.0"])
    devs = [cp.device("t") for _ in range(4)]
    rid = _start(cp, "2.0.0", bake_s=3600, min_devices=50)["rollout_id"]  # stays open: too few devices to judge
    reconcile_once(cp.store)

    def events(d: SimDevice, *evs: tuple[str, str | None], version: str = "2.0.0", rollout: str | None = rid) -> None:
        d.report(model="digits", version=None, requests=0, event_version=version, events=list(evs), rollout_id=rollout)

    events(devs[0], ("download_started", None), ("committed", None))
    # a real failure: two events, one update
    events(devs[1], ("health_check_failed", "golden mismatch"), ("rolled_back", "golden mismatch"))
    events(devs[2], ("download_started", None))  # in flight when the rollout is rolled back
    events(devs[3], ("download_started", None))
    cp.api("POST", f"/api/v1/rollouts/{rid}/rollback", json={"reason": "by hand"})
    events(devs[2], ("refused", MOVED_ON), ("rolled_back", MOVED_ON))
    events(devs[3], ("cancelled", "the desired state names another version now"))
    # abandoned for another reason than a rollback: cancelled
    loner = cp.device("t")
    events(loner, ("download_started", None), ("cancelled", "unpinned"), version="1.0.0", rollout=None)
    k = cp.api("GET", "/api/v1/fleet")
    assert k["updates"] == {"committed": 1, "failed": 1, "rolled_back": 0, "reverted": 2, "cancelled": 1}
    assert k["update_success_rate"] == 0.5
    text = cp.http.get("/metrics", headers=cp.h()).text
    assert 'edgefleet_updates{outcome="reverted"} 2.0' in text and "edgefleet_update_success_ratio 0.5" in text
    page = cp.http.get("/", headers=cp.h()).text
    m = re.search(r'data-testid="kpi-updates">([^<]*)<', page)
    assert m and " ".join(m.group(1).split()) == ("1 committed · 1 failed · 0 rolled back · 2 reverted · 1 cancelled")


# ------------------------------------------------------------------------------------------------ /metrics


def test_metrics_count_every_transition_without_created_series(cp: CP, pkgs: dict[str, Path]) -> None:
    cp.upload(pkgs["2.0.0"])
    devs = [cp.device("t") for _ in range(3)]
    rid = _start(cp, "2.0.0", bake_s=3600, min_devices=50)["rollout_id"]
    reconcile_once(cp.store)
    for action in ("pause", "resume", "abort"):
        cp.api("POST", f"/api/v1/rollouts/{rid}/{action}")
    other = _start(cp, "2.0.0", tier="nowhere")["rollout_id"]  # running, then blocked at once
    with cp.store.db.session() as s:
        n = s.scalar(select(func.count()).select_from(RolloutTransition))
    assert n == 6 and _state(cp, other)["state"] == "blocked"
    # a transition whose transaction rolls back was never recorded, and is not counted
    with pytest.raises(RuntimeError), cp.store.db.session() as s:
        reconciler.transition(s, s.get(Rollout, other), RolloutState.paused, "never", "test")
        s.flush()
        raise RuntimeError("rolled back")
    with cp.store.db.session() as s:
        s.get(Device, devs[0].id).invalid_reports = 3
        s.get(Device, devs[1].id).invalid_reports = 2
        s.get(Device, devs[0].id).clock_offset_s = 120.0
        s.get(Device, devs[1].id).clock_offset_s = -30.0
    text = cp.http.get("/metrics", headers=cp.h()).text
    assert "edgefleet_rollout_transitions_total 6.0" in text
    assert "_created" not in text
    assert f'edgefleet_build_info{{version="{__version__}"}} 1.0' in text
    assert "process_cpu_seconds_total" in text and "python_info" in text
    assert "edgefleet_reports_invalid_total 5.0" in text
    assert "edgefleet_devices_clock_skewed 1.0" in text
    assert 'edgefleet_rollouts{state="blocked"} 1.0' in text


# ------------------------------------------------------------------------------------------------ device page


def test_device_page_shows_clock_offset_and_invalid_reports(cp: CP) -> None:
    d = cp.device("t")
    bad = cp.http.post(
        f"/api/v1/devices/{d.id}/report",
        content=b'{"batch_id": "b1", "state": "idle", "telemetry": [{"window_id": "w"}]}',
        headers={"Authorization": f"Bearer {d.credential}", "Content-Type": "application/json"},
    )
    assert bad.status_code == 422
    with cp.store.db.session() as s:
        s.get(Device, d.id).clock_offset_s = -95.5
    page = cp.http.get(f"/devices/{d.id}", headers=cp.h()).text
    clock = re.search(r'data-testid="device-clock">([^<]*)<', page)
    assert clock and clock.group(1).strip() == "-95.5 s" and 'data-testid="device-clock-skewed"' in page
    invalid = re.search(r'data-testid="device-invalid">([^<]*)<', page)
    assert invalid and invalid.group(1).strip() == "1"
    reason = re.search(r'data-testid="device-invalid-reason">([^<]*)<', page)
    assert reason and "invalid report" in reason.group(1) and "telemetry" in reason.group(1)
    with cp.store.db.session() as s:
        s.get(Device, d.id).clock_offset_s = 12.0
    page = cp.http.get(f"/devices/{d.id}", headers=cp.h()).text
    assert "+12.0 s" in page and 'data-testid="device-clock-skewed"' not in page
