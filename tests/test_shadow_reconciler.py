"""The reconciler's shadow phase on the real control plane, its devices speaking the check-in protocol (no agents:
tests/test_shadow_e2e.py runs real ones). Receive times are set in storage, so the halves are deterministic."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from _cp_support import CP, SimDevice, build_pkg
from edgefleet.controlplane import reconciler
from edgefleet.controlplane.db import Rollout, TelemetryRow
from edgefleet.controlplane.schemas import RolloutDetail
from edgefleet.protocol import Report

SHADOW = {"percent": 1, "min_samples": 100, "min_agreement": 0.9, "duration_s": 60, "max_wait_s": 600}


@pytest.fixture
def setup(cp: CP, tmp_path: Path, mlp_path: Path) -> tuple[CP, dict[str, list[SimDevice]]]:
    for v in ("1.0.0", "2.0.0"):
        cp.upload(build_pkg(mlp_path, tmp_path / "pkgs", v))
    fleet = {tier: [cp.device(tier) for _ in range(3)] for tier in ("arm", "x86")}
    return cp, fleet


def start(cp: CP, **shadow: Any) -> str:
    policy = {"waves": [100], "bake_s": 0, "min_devices": 1, "min_requests": 0, "shadow": SHADOW | shadow}
    body = {"model": "digits", "version": "2.0.0", "policy": policy}
    return str(cp.api("POST", "/api/v1/rollouts", json=body)["rollout_id"])


def step_at(cp: CP, rid: str, now: datetime) -> None:
    with cp.store.db.session() as s:
        r = s.get(Rollout, rid)
        assert r is not None
        res = reconciler.step(s, r, "test", now)
    cp.store.refresh(res.touched)


def started_at(cp: CP, rid: str) -> datetime:
    with cp.store.db.session() as s:
        r = s.get(Rollout, rid)
        assert r is not None and r.shadow_started_at is not None
        return r.shadow_started_at.astimezone(UTC)


def shadow_report(dev: SimDevice, rid: str, compared: int, agreed: int, at: datetime) -> None:
    """One window of v1 with the candidate's shadow counts, received (as stored) at ``at``."""
    wid = secrets.token_hex(6)
    now = datetime.now(UTC)
    shadow = {"rollout_id": rid, "model": "digits", "version": "2.0.0", "compared": compared, "agreed": agreed}
    window = {"window_id": wid, "start": now - timedelta(seconds=5), "end": now, "model": "digits"}
    body = Report(
        batch_id=secrets.token_hex(6),
        state="committed",
        served={"model": "digits", "version": "1.0.0"},
        telemetry=[window | {"version": "1.0.0", "requests": compared, "shadow": shadow}],
    )
    r = dev.cp.http.post(
        f"/api/v1/devices/{dev.id}/report",
        content=body.model_dump_json(),
        headers={"Authorization": f"Bearer {dev.credential}", "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    with dev.cp.store.db.session() as s:
        s.execute(update(TelemetryRow).where(TelemetryRow.window_id == wid).values(received_at=at))


def holders(fleet: dict[str, list[SimDevice]], rid: str) -> dict[str, list[SimDevice]]:
    return {
        tier: [d for d in devs if (d.desired().get("shadow") or {}).get("rollout_id") == rid]
        for tier, devs in fleet.items()
    }


def test_the_phase_orders_a_few_devices_of_each_tier_and_moves_nobody(
    setup: tuple[CP, dict[str, list[SimDevice]]],
) -> None:
    cp, fleet = setup
    rid = start(cp)
    step_at(cp, rid, datetime.now(UTC))
    held = holders(fleet, rid)
    assert {t: len(d) for t, d in held.items()} == {"arm": 1, "x86": 1}  # at least one per tier
    order = held["arm"][0].desired()
    assert order["shadow"]["target"] == "digits-2.0.0.efpkg" and order["shadow"]["rate_per_s"] == 20
    assert order["version"] != "2.0.0"  # the order is not a move
    r = cp.api("GET", f"/api/v1/rollouts/{rid}")
    assert r["devices"] == [] and r["reason"] == "shadow phase: 2 device(s) evaluate 2.0.0 on mirrored requests"
    assert r["shadow"]["state"] == "running"
    assert [(t["tier"], t["devices"], t["compared"]) for t in r["shadow"]["tiers"]] == [("arm", 1, 0), ("x86", 1, 0)]
    # no window yet: the phase waits, and reports what it waits for
    step_at(cp, rid, started_at(cp, rid) + timedelta(seconds=10))
    assert "tier arm: 0 of 100 mirrored requests compared" in cp.api("GET", f"/api/v1/rollouts/{rid}")["reason"]
    assert not [d for d in fleet["arm"] if d.desired().get("version") == "2.0.0"]


def test_disagreement_in_both_halves_halts_before_any_device_moves(
    setup: tuple[CP, dict[str, list[SimDevice]]],
) -> None:
    cp, fleet = setup
    rid = start(cp)
    step_at(cp, rid, datetime.now(UTC))
    t0 = started_at(cp, rid)
    held = holders(fleet, rid)
    shadow_report(held["arm"][0], rid, 60, 59, t0 + timedelta(seconds=2))
    shadow_report(held["x86"][0], rid, 60, 20, t0 + timedelta(seconds=2))
    step_at(cp, rid, t0 + timedelta(seconds=10))  # only the earlier half has its sample: not yet
    r = cp.api("GET", f"/api/v1/rollouts/{rid}")
    assert r["state"] == "running" and "confirming in both halves (50 each)" in r["reason"], r["reason"]
    shadow_report(held["arm"][0], rid, 60, 60, t0 + timedelta(seconds=18))
    shadow_report(held["x86"][0], rid, 60, 15, t0 + timedelta(seconds=18))
    step_at(cp, rid, t0 + timedelta(seconds=20))  # halves split at 10 s: 60 compared in each
    r = cp.api("GET", f"/api/v1/rollouts/{rid}")
    assert r["state"] == "paused" and r["shadow"]["state"] == "failed"
    assert r["reason"] == (
        "shadow phase failed: tier x86: agreement 29.2% (35/120, 0 errors; halves 33.3% of 60, 25.0% of 60) "
        "< 90.0% in both halves"
    )
    assert r["devices"] == [] and r["transitions"][-1]["to"] == "paused"
    assert holders(fleet, rid) == {"arm": [], "x86": []}  # the orders are withdrawn
    tiers = {t["tier"]: t for t in r["shadow"]["tiers"]}
    assert tiers["arm"]["agreement"] == pytest.approx(119 / 120) and tiers["x86"]["halves"][1] == {
        "compared": 60,
        "agreed": 15,
    }
    page = cp.http.get(f"/rollouts/{rid}", headers=cp.h()).text
    assert "29.2 %" in page and "33.3 % of 60" in page
    # resuming is the operator's override: the canary starts
    cp.api("POST", f"/api/v1/rollouts/{rid}/resume", json={"reason": "agreement is not accuracy here"})
    step_at(cp, rid, t0 + timedelta(seconds=30))
    assert len(cp.api("GET", f"/api/v1/rollouts/{rid}")["devices"]) == 6


def test_an_agreeing_phase_starts_the_canary_after_its_duration(setup: tuple[CP, dict[str, list[SimDevice]]]) -> None:
    cp, fleet = setup
    rid = start(cp)
    step_at(cp, rid, datetime.now(UTC))
    t0 = started_at(cp, rid)
    held = holders(fleet, rid)
    for dev in (held["arm"][0], held["x86"][0]):
        shadow_report(dev, rid, 60, 60, t0 + timedelta(seconds=5))
        shadow_report(dev, rid, 60, 58, t0 + timedelta(seconds=25))
    step_at(cp, rid, t0 + timedelta(seconds=30))  # passed, but the phase lasts 60 s
    r = cp.api("GET", f"/api/v1/rollouts/{rid}")
    assert r["state"] == "running" and r["reason"].startswith("shadow phase running (30/60 s): tier arm: agreement")
    step_at(cp, rid, t0 + timedelta(seconds=60))
    r = cp.api("GET", f"/api/v1/rollouts/{rid}")
    assert r["shadow"]["state"] == "passed" and r["devices"] == []
    assert r["reason"].startswith("shadow phase passed: tier arm: agreement 98.3% (118/120")
    assert holders(fleet, rid) == {"arm": [], "x86": []}
    step_at(cp, rid, t0 + timedelta(seconds=61))  # the canary (one wave of 100 % here) moves
    r = cp.api("GET", f"/api/v1/rollouts/{rid}")
    assert len(r["devices"]) == 6 and all(d.desired()["version"] == "2.0.0" for t in fleet.values() for d in t)
    assert r["shadow"]["tiers"][0]["compared"] == 120  # the figures of the phase stay on the rollout
    typed = RolloutDetail.model_validate(r)  # what the SDK's client.rollouts.get answers
    assert typed.shadow is not None and typed.shadow.state == "passed"
    assert [(t.tier, t.agreement) for t in typed.shadow.tiers] == [("arm", 118 / 120), ("x86", 118 / 120)]


def test_a_short_phase_pauses_at_its_deadline_and_abort_withdraws_the_orders(
    setup: tuple[CP, dict[str, list[SimDevice]]],
) -> None:
    cp, fleet = setup
    rid = start(cp)
    step_at(cp, rid, datetime.now(UTC))
    t0 = started_at(cp, rid)
    step_at(cp, rid, t0 + timedelta(seconds=660))
    r = cp.api("GET", f"/api/v1/rollouts/{rid}")
    assert r["state"] == "paused" and r["reason"].startswith("shadow phase inconclusive at its deadline: ")
    other = start_second(cp)
    step_at(cp, other, datetime.now(UTC))
    assert sum(len(d) for d in holders(fleet, other).values()) == 2
    cp.api("POST", f"/api/v1/rollouts/{other}/abort", json={})
    assert holders(fleet, other) == {"arm": [], "x86": []}
    with cp.store.db.session() as s:
        assert s.scalar(select(Rollout.shadow_state).where(Rollout.id == other)) == "failed"


def start_second(cp: CP) -> str:
    for r in cp.api("GET", "/api/v1/rollouts"):
        if r["state"] in ("running", "paused"):
            cp.api("POST", f"/api/v1/rollouts/{r['rollout_id']}/abort", json={})
    return start(cp)


def test_the_cli_starts_a_shadow_phase_and_shows_it(
    setup: tuple[CP, dict[str, list[SimDevice]]], capsys: pytest.CaptureFixture[str]
) -> None:
    from _package_helpers import run_cli

    cp, fleet = setup
    remote = ("--server", cp.url, "--api-token", cp.admin)
    args = ["rollout", "start", "digits", "2.0.0", "--waves", "100", "--bake", "0s", "--min-devices", "1"]
    shadow = ["--shadow", "1%", "--shadow-for", "1m", "--shadow-agreement", "90%", "--shadow-samples", "100"]
    code, out, err = run_cli(capsys, *args, *shadow, *remote)
    assert code == 0, err
    rid = cp.api("GET", "/api/v1/rollouts")[0]["rollout_id"]
    policy = cp.api("GET", f"/api/v1/rollouts/{rid}")["policy"]["shadow"]
    assert {k: policy[k] for k in SHADOW if k != "max_wait_s"} == {k: v for k, v in SHADOW.items() if k != "max_wait_s"}
    step_at(cp, rid, datetime.now(UTC))
    t0 = started_at(cp, rid)
    held = holders(fleet, rid)
    for at in (2, 18):
        shadow_report(held["arm"][0], rid, 60, 60, t0 + timedelta(seconds=at))
        shadow_report(held["x86"][0], rid, 60, 15, t0 + timedelta(seconds=at))
    step_at(cp, rid, t0 + timedelta(seconds=20))
    code, out, err = run_cli(capsys, "rollout", "status", rid, *remote)
    assert code == 0, err
    assert "shadow phase: failed" in out and "25.0%" in out and "15/60 / 15/60" in out, out
    # a share that is not a number is one line, before anything is sent
    code, _, err = run_cli(capsys, *args, "--shadow", "some", *remote)
    assert code == 2 and "--shadow 'some': give a percentage" in err, err
