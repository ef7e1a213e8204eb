"""Storage, registry, devices, reports and rollouts through the real API, on SQLite AND on the real PostgreSQL
(fresh schema per test; skipped with the reason when no server answers). Devices here are protocol-exact drivers
(tests/_cp_support.SimDevice) so each case is deterministic; test_cp_e2e.py runs the real agent."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DatabaseError

from _cp_support import CP, build_pkg, pg_schema_url
from edgefleet.controlplane.db import AuditEntry, Database, RolloutTransition, TelemetryRow, UpdateEventRow
from edgefleet.controlplane.reconciler import reconcile_once


@pytest.fixture(scope="module")
def pkgs(mlp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pkgs")
    return {
        "1.0.0": build_pkg(mlp_path, d, "1.0.0"),
        "2.0.0": build_pkg(mlp_path, d, "2.0.0"),
        "3.0.0": build_pkg(mlp_path, d, "3.0.0", tiers=["big"]),
    }


def test_migrate_twice_and_audit_is_append_only(db_url: str) -> None:
    db = Database(db_url)
    db.migrate()
    db.migrate()
    with db.session() as s:
        s.add(AuditEntry(actor="t", action="x"))
    with pytest.raises(DatabaseError), db.session() as s:
        s.execute(text("UPDATE audit_log SET action = 'y'"))
    with pytest.raises(DatabaseError), db.session() as s:
        s.execute(text("DELETE FROM audit_log"))
    db.dispose()


def test_registry_publish_promote_gate_bench(cp: CP, pkgs: dict[str, Path]) -> None:
    v = cp.upload(pkgs["1.0.0"])
    assert v["model"] == "digits" and v["channel"] == "dev" and v["target"] == "digits-1.0.0.efpkg"
    assert cp.upload(pkgs["1.0.0"])["package_sha256"] == v["package_sha256"]  # idempotent
    # the TUF repository serves it
    assert cp.http.get("/tuf/metadata/timestamp.json").status_code == 200
    tgt = cp.http.get(f"/tuf/targets/{v['package_sha256']}.digits-1.0.0.efpkg")
    assert tgt.status_code == 200 and len(tgt.content) == pkgs["1.0.0"].stat().st_size
    assert cp.http.post("/api/v1/packages", content=b"not a tar", headers=cp.h()).status_code == 422
    cp.api("PUT", "/api/v1/models/digits/versions/1.0.0/gate", json={"passed": True, "checks": []})
    bench = {
        "compat": [
            {"tier": "rpi4", "runtime_version": "1.32.0", "model_sha256": v["model_sha256"], "result": "verified"},
            {"tier": "tiny", "runtime_version": "1.32.0", "result": "failed"},
        ]
    }
    cp.api("PUT", "/api/v1/models/digits/versions/1.0.0/bench", json=bench)
    assert cp.api("POST", "/api/v1/models/digits/versions/1.0.0/promote")["channel"] == "canary"
    assert cp.api("POST", "/api/v1/models/digits/versions/1.0.0/promote", json={"to": "stable"})["channel"] == "stable"
    assert cp.http.post("/api/v1/models/digits/versions/1.0.0/promote", headers=cp.h()).status_code == 409
    m = cp.api("GET", "/api/v1/models/digits")
    assert m["channels"] == {"stable": "1.0.0"}
    full = cp.api("GET", "/api/v1/models/digits/versions/1.0.0")
    assert full["gate"]["passed"] is True and full["bench"] == bench and full["lineage"] is not None
    cells = {(c["tier"], c["status"]) for c in cp.api("GET", "/api/v1/compat")}
    assert ("rpi4", "verified") in cells and ("tiny", "failed") in cells
    actions = [a["action"] for a in cp.api("GET", "/api/v1/audit")]
    for a in ("package.publish", "model.gate", "model.bench", "model.promote"):
        assert a in actions


def test_enrollment_token_is_one_time_and_expires(cp: CP) -> None:
    tok = cp.api("POST", "/api/v1/enrollment-tokens", json={"tier": "rpi4"})["token"]
    body = {
        "token": tok,
        "hardware": {"arch": "arm64", "cpu_count": 4, "memory_mb": 2048},
        "runtime_version": "1.32.0",
        "agent_version": "0.1.0",
        "public_key": "ab" * 32,
    }
    r = cp.http.post("/api/v1/enroll", json=body)
    assert r.status_code == 200 and r.json()["tier"] == "rpi4"
    assert json.loads(r.json()["root_json"])["signed"]["_type"] == "root"
    assert r.json()["repository_url"].endswith("/tuf")
    assert cp.http.post("/api/v1/enroll", json=body).status_code == 401  # spent
    short = cp.api("POST", "/api/v1/enrollment-tokens", json={"tier": "rpi4", "expires_s": 0.001})["token"]
    import time

    time.sleep(0.01)
    assert cp.http.post("/api/v1/enroll", json={**body, "token": short}).status_code == 401
    devs = cp.api("GET", "/api/v1/devices")
    assert len(devs) == 1 and devs[0]["hardware"]["cpu_count"] == 4 and devs[0]["overdue"] is False


def test_report_is_idempotent_by_batch_id(cp: CP) -> None:
    d = cp.device("rpi4")
    first = d.report(model="digits", version="1.0.0", events=[("committed", None)], batch_id="batch-1")
    again = d.report(model="digits", version="1.0.0", events=[("committed", None)], batch_id="batch-1")
    assert first == again == {"accepted_batch_ids": ["batch-1"]}
    with cp.store.db.session() as s:
        assert len(list(s.scalars(select(TelemetryRow)))) == 1
        assert len(list(s.scalars(select(UpdateEventRow)))) == 1
    dev = cp.api("GET", f"/api/v1/devices/{d.id}")
    assert dev["served"]["version"] == "1.0.0" and dev["state"] == "committed"


def _fleet(cp: CP, pkgs: dict[str, Path], n_small: int = 6, n_big: int = 6) -> list:
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        cp.upload(pkgs[v])
    devs = [cp.device("small") for _ in range(n_small)] + [cp.device("big") for _ in range(n_big)]
    for d in devs:  # everyone on 1.0.0 first: a pinned-then-unpinned baseline
        cp.api("POST", f"/api/v1/devices/{d.id}/pin", json={"model": "digits", "version": "1.0.0"})
    return devs


def _drive(
    cp: CP,
    devs: list,
    rollout_id: str,
    *,
    bad_tier: str | None = None,
    rounds: int = 30,
    latency: Callable[[str | None, int], float] = lambda version, nth: 0.002,
    pause_s: float = 0.0,
) -> str:
    """Reconcile; every device fetches its desired state and reports what a real agent would have done.
    ``latency(version, nth)`` is the latency of a device's ``nth`` report on ``version`` (0: the commit's)."""
    state = "running"
    nth: dict[str, int] = {}
    for _ in range(rounds):
        reconcile_once(cp.store)
        state = cp.api("GET", f"/api/v1/rollouts/{rollout_id}")["state"]
        if state != "running":
            return state
        time.sleep(pause_s)
        for d in devs:
            want = d.desired()
            v = want["version"]
            tier = cp.api("GET", f"/api/v1/devices/{d.id}")["tier"]
            if v == "2.0.0" and bad_tier == tier:
                d.report(
                    model="digits",
                    version="1.0.0",
                    crashes=3,
                    event_version="2.0.0",
                    state="rolled_back",
                    events=[("worker_crashed", "killed"), ("rolled_back", "3 worker crashes within 60 s")],
                    rollout_id=want["rollout_id"],
                )
            elif v is None or v == d.served:
                # nothing new: keeps serving what it committed
                nth[d.id] = nth.get(d.id, 0) + 1
                d.report(model="digits", version=d.served, latency_s=latency(d.served, nth[d.id]))
            else:
                d.served, nth[d.id] = v, 0
                d.report(
                    model="digits",
                    version=v,
                    events=[("committed", None)],
                    latency_s=latency(v, 0),
                    rollout_id=want["rollout_id"],
                )
    return state


def _start(cp: CP, version: str, **policy: object) -> str:
    body = {
        "model": "digits",
        "version": version,
        "policy": {"waves": [10, 50, 100], "bake_s": 0, "min_devices": 1, "min_requests": 10, **policy},
    }
    return str(cp.api("POST", "/api/v1/rollouts", json=body)["rollout_id"])


def _unpin_all(cp: CP, devs: list, keep: str | None = None) -> None:
    for d in devs:
        if d.id != keep:
            cp.api("POST", f"/api/v1/devices/{d.id}/unpin")
    for d in devs:  # the real baseline: every device ran 1.0.0
        d.report(model="digits", version="1.0.0", events=[("committed", None)])


def test_rollout_waves_complete_pinning_holds(cp: CP, pkgs: dict[str, Path]) -> None:
    devs = _fleet(cp, pkgs)
    # desired state keeps 1.0.0 through the unpin because the rollout-less desired is empty: move it via a rollout
    _unpin_all(cp, devs, keep=devs[0].id)
    rid = _start(cp, "2.0.0")
    assert _drive(cp, devs, rid) == "completed"
    r = cp.api("GET", f"/api/v1/rollouts/{rid}")
    assert [t["to"] for t in r["transitions"]] == ["running", "running", "running", "completed"]
    assert [t["wave"] for t in r["transitions"]][1:3] == [1, 2]
    moved = {x["device_id"] for x in r["devices"]}
    assert devs[0].id not in moved and len(moved) == len(devs) - 1  # the pinned device was never targeted
    assert devs[0].desired()["version"] == "1.0.0" and devs[0].desired()["pinned"] is True
    assert all(d.desired()["version"] == "2.0.0" for d in devs[1:])
    k = cp.api("GET", "/api/v1/fleet")
    assert k["update_success_rate"] == 1.0 and k["crash_free_rate"] == 1.0
    assert {row["version"] for row in k["latency"]} == {"1.0.0", "2.0.0"}


def test_incompatible_tier_is_skipped(cp: CP, pkgs: dict[str, Path]) -> None:
    devs = _fleet(cp, pkgs)
    _unpin_all(cp, devs)
    rid = _start(cp, "3.0.0")  # the package allows tier "big" only
    assert _drive(cp, devs, rid) == "completed"
    for d in devs:
        tier = cp.api("GET", f"/api/v1/devices/{d.id}")["tier"]
        assert d.desired()["version"] == ("3.0.0" if tier == "big" else None)


def test_bad_version_pauses_and_rolls_back_with_reason(cp: CP, pkgs: dict[str, Path]) -> None:
    # 10 of 12 devices on the bad tier: the first wave (6 devices) holds at least 4 of them whatever the hash
    # order, so the compatibility cell has failures from several distinct devices (one device is only "suspect")
    devs = _fleet(cp, pkgs, n_small=10, n_big=2)
    _unpin_all(cp, devs)
    first = _start(cp, "1.0.0", waves=[100])
    assert _drive(cp, devs, first) == "completed"
    rid = _start(cp, "2.0.0", auto_rollback=True, waves=[50, 100])
    assert _drive(cp, devs, rid, bad_tier="small") == "rolled_back"
    r = cp.api("GET", f"/api/v1/rollouts/{rid}")
    assert "update failures" in r["reason"] and r["reason"].startswith("automatic rollback")
    assert all(x["reverted"] for x in r["devices"])
    assert all(d.desired()["version"] == "1.0.0" for d in devs)
    audit = cp.api("GET", "/api/v1/audit", params={"target": rid})
    assert any(
        a["detail"].get("to_state") == "rolled_back" and "update failures" in a["detail"]["reason"] for a in audit
    )
    cells = {(c["tier"], c["version"]): c for c in cp.api("GET", "/api/v1/compat")}
    assert cells[("small", "2.0.0")]["status"] == "failed"
    assert len(cells[("small", "2.0.0")]["failing_devices"]) >= 4
    assert cells[("big", "2.0.0")]["status"] in ("verified", "untested")
    k = next(x for x in cp.api("GET", "/api/v1/fleet")["rollouts"] if x["rollout_id"] == rid)
    assert k["time_to_halt_s"] is not None and k["time_to_rollback_s"] is not None


def test_latency_regression_on_the_new_version_rolls_back(cp: CP, pkgs: dict[str, Path]) -> None:
    devs = _fleet(cp, pkgs)
    _unpin_all(cp, devs)
    # a failure halts whatever the bake; the long bake keeps the wave open while it is being confirmed
    rid = _start(cp, "2.0.0", auto_rollback=True, waves=[50, 100], min_tier_requests=50, bake_s=3600)
    state = _drive(cp, devs, rid, latency=lambda v, n: 0.02 if v == "2.0.0" else 0.002)
    r = cp.api("GET", f"/api/v1/rollouts/{rid}")
    assert state == "rolled_back" and "p95 20" in r["reason"] and r["wave"] == 0, r["reason"]
    # it waited for the later half of the wave's telemetry before calling it
    reasons = [a["detail"].get("reason", "") for a in cp.api("GET", "/api/v1/audit", params={"target": rid})]
    assert any("p95" in x for x in reasons)


def test_a_latency_burst_right_after_the_update_does_not_roll_back(cp: CP, pkgs: dict[str, Path]) -> None:
    # Each moved device's first report after its commit is 10x slower (the host was busy), later ones are not:
    # the whole window's p95 is 10x the control's, but the regression does not hold in its later half.
    devs = _fleet(cp, pkgs)
    _unpin_all(cp, devs)
    # the bake outlasts the few rounds the suspicion takes to clear (an inconclusive wave pauses at its deadline)
    rid = _start(cp, "2.0.0", auto_rollback=True, waves=[50, 100], min_tier_requests=50, bake_s=3)
    state = _drive(
        cp, devs, rid, rounds=200, pause_s=0.1, latency=lambda v, n: 0.02 if v == "2.0.0" and n == 0 else 0.002
    )
    assert state == "completed", cp.api("GET", f"/api/v1/rollouts/{rid}")["reason"]
    # the dashboard judges each past wave the way the reconciler did (same cohorts, same time), so it shows no
    # regression the reconciler cleared
    from edgefleet.controlplane.dashboard.views import wave_metrics
    from edgefleet.controlplane.db import Rollout

    with cp.store.db.session() as s:
        waves = wave_metrics(s, s.get(Rollout, rid))
    assert [w["judgement"] for w in waves] == ["pass", "pass"], [w["judgement_reason"] for w in waves]


def test_inconclusive_at_bake_deadline_pauses_then_operator_actions(cp: CP, pkgs: dict[str, Path]) -> None:
    devs = _fleet(cp, pkgs, n_small=2, n_big=1)
    _unpin_all(cp, devs)
    rid = _start(cp, "2.0.0", waves=[100], min_devices=50)
    assert _drive(cp, devs, rid) == "paused"
    assert "inconclusive at bake deadline" in cp.api("GET", f"/api/v1/rollouts/{rid}")["reason"]
    assert cp.http.post(f"/api/v1/rollouts/{rid}/pause", headers=cp.h()).status_code == 409
    assert cp.api("POST", f"/api/v1/rollouts/{rid}/resume")["state"] == "running"
    # another rollout of the same model while this one is active: refused
    assert (
        cp.http.post("/api/v1/rollouts", headers=cp.h(), json={"model": "digits", "version": "3.0.0"}).status_code
        == 409
    )
    assert cp.api("POST", f"/api/v1/rollouts/{rid}/rollback", json={"reason": "by hand"})["state"] == "rolled_back"
    assert all(d.desired()["version"] is None for d in devs)
    assert cp.http.post(f"/api/v1/rollouts/{rid}/abort", headers=cp.h()).status_code == 409


def test_group_config_and_pin_reach_desired_state(cp: CP, pkgs: dict[str, Path]) -> None:
    cp.upload(pkgs["1.0.0"])
    cp.api("PUT", "/api/v1/groups/lab", json={"channel": "canary", "config": {"checkin_interval_s": 5}})
    d = cp.device("rpi4", group="lab")
    first = d.desired()
    assert first["config"]["checkin_interval_s"] == 5 and first["config"]["version"] == 1
    cp.api("PUT", "/api/v1/groups/lab", json={"pinned_model": "digits", "pinned_version": "1.0.0"})
    second = d.desired()
    assert second["version"] == "1.0.0" and second["pinned"] is True and second["target"] == "digits-1.0.0.efpkg"


@pytest.mark.postgres
def test_two_reconciler_processes_never_record_a_transition_twice(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    gen = pg_schema_url()
    url = next(gen)
    try:
        cp = CP(tmp_path, url)
        devs = _fleet(cp, pkgs, n_small=4, n_big=4)
        _unpin_all(cp, devs)
        rid = _start(cp, "2.0.0", waves=[10, 25, 50, 75, 100], min_requests=0)
        for d in devs:  # every device will commit whatever wave it lands in
            d.report(model="digits", version="2.0.0", events=[("committed", None)], requests=0)
        script = textwrap.dedent(f"""
            import json, sys
            from pathlib import Path
            from edgefleet.config import ServerSettings
            from edgefleet.controlplane.db import Database
            from edgefleet.controlplane.repo_service import RepoService
            from edgefleet.controlplane.store import Store
            from edgefleet.controlplane.reconciler import reconcile_once
            st = Store(ServerSettings(db={url!r}), Database({url!r}), RepoService(Path({str(tmp_path / "repo")!r})))
            out = []
            for i in range(40):
                out += reconcile_once(st, actor="proc-" + sys.argv[1])
            print(json.dumps(out))
        """)
        procs = [
            subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE, text=True)
            for i in range(2)
        ]
        outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
        assert all(p.returncode == 0 for p in procs)
        recorded = outs[0] + outs[1]
        with cp.store.db.session() as s:
            rows = list(
                s.scalars(
                    select(RolloutTransition).where(RolloutTransition.rollout_id == rid).order_by(RolloutTransition.seq)
                )
            )
        assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
        keys = [(r.from_state, r.to_state, r.wave) for r in rows]
        assert len(keys) == len(set(keys)), keys
        assert rows[-1].to_state == "completed"
        assert len(recorded) == len(rows) - 1  # every transition after the start, each by exactly one process
        cp.close()
    finally:
        gen.close()
