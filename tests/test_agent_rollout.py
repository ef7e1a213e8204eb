"""Agent rollouts (controlplane/agent_rollout.py): the agent bundle moved in waves and judged as a model version is.

The pure parts are tested here on their own; the end-to-end tests drive the real control plane API and reconciler
with devices that speak the check-in protocol exactly (the real ``Report``, the agent's own ``edgefleet-agent``
events), as tests/test_cp_rollout.py does for model rollouts. The real agent updating itself is
tests/test_agent_selfupdate.py's (slow) test."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _cp_support import CP, SimDevice, build_pkg
from _package_helpers import run_cli
from edgefleet.agent.selfupdate import AGENT_MODEL as AGENT_SIDE_MODEL
from edgefleet.controlplane import compat, devices
from edgefleet.controlplane.agent_rollout import (
    AGENT_MODEL,
    agent_problems,
    bundle_versions,
    normal_arch,
    platform_arch,
    single_served,
    stratum,
)
from edgefleet.controlplane.api.rollouts import RolloutCreate
from edgefleet.controlplane.db import Device, DeviceGroup
from edgefleet.controlplane.reconciler import reconcile_once
from edgefleet.controlplane.rollout import (
    CohortStats,
    Outcome,
    RolloutPolicy,
    UpdateOutcome,
    WindowFacts,
    cohort_stats,
    judge,
    update_outcome,
)
from edgefleet.protocol import Report
from edgefleet.repository import Repository
from edgefleet.telemetry.sketch import LatencySketch

PLATFORM = "manylinux_2_28_x86_64"

# ------------------------------------------------------------------------------------------------ pure parts


def test_the_control_plane_and_the_agent_name_the_agent_alike() -> None:
    assert AGENT_MODEL == AGENT_SIDE_MODEL


def test_platform_arch_and_normal_arch() -> None:
    assert platform_arch("manylinux_2_28_aarch64") == "aarch64"
    assert platform_arch("manylinux_2_17_x86_64") == "x86_64"
    assert platform_arch("manylinux2014_aarch64") == "aarch64"
    assert platform_arch("win_amd64") is None
    assert normal_arch("arm64") == "aarch64" and normal_arch("AMD64") == "x86_64" and normal_arch("armv7l") == "armv7l"


def test_bundle_versions_reads_what_agent_bundle_publish_signs() -> None:
    targets: list[tuple[str, dict[str, Any]]] = [
        ("digits-1.0.0.efpkg", {"name": "digits"}),
        (
            "edgefleet-agent-0.2.0-manylinux_2_28_x86_64.tar",
            {"agent_bundle": {"version": "0.2.0", "platform": PLATFORM}},
        ),
        (
            "edgefleet-agent-0.2.0-manylinux_2_28_aarch64.tar",
            {"agent_bundle": {"version": "0.2.0", "platform": "manylinux_2_28_aarch64"}},
        ),
        ("odd.tar", {"agent_bundle": {"version": "0.3.0"}}),  # no platform: not a bundle a device can take
    ]
    assert bundle_versions(targets) == {"0.2.0": frozenset({PLATFORM, "manylinux_2_28_aarch64"})}
    assert bundle_versions([]) == {}


def test_agent_problems() -> None:
    ok = agent_problems(arch="x86_64", agent_version="0.1.0", version="0.2.0", platforms=frozenset({PLATFORM}))
    assert ok == []
    assert agent_problems(arch="arm64", agent_version="0.1.0", version="0.2.0", platforms=None) == []
    (why,) = agent_problems(arch="aarch64", agent_version="0.1.0", version="0.2.0", platforms=frozenset({PLATFORM}))
    assert why == f"no agent bundle 0.2.0 for aarch64 (published: {PLATFORM})"
    (why,) = agent_problems(arch="x86_64", agent_version="", version="0.2.0", platforms=frozenset({PLATFORM}))
    assert "reports no agent version" in why
    assert len(agent_problems(arch="", agent_version="", version="0.2.0", platforms=frozenset())) == 2


def test_stratum_and_single_served() -> None:
    assert stratum("x86-avx2", "digits", "1.0.0") == "x86-avx2 · digits 1.0.0"
    assert stratum("x86-avx2", None, None) == "x86-avx2"
    assert single_served([("digits", "1.0.0"), ("digits", "1.0.0"), (None, None)]) == ("digits", "1.0.0")
    assert single_served([("digits", "1.0.0"), ("digits", "2.0.0")]) is None
    assert single_served([]) is None


def test_agent_update_events_judge_as_a_model_update() -> None:
    assert update_outcome([("verified", None), ("switched", None), ("committed", None)], reverted=False) == (
        UpdateOutcome.committed
    )
    assert update_outcome([("switched", None), ("rolled_back", "not healthy")], reverted=False) == (
        UpdateOutcome.rolled_back
    )
    assert update_outcome([("refused", "not started by agent-launch")], reverted=False) == UpdateOutcome.failed
    assert update_outcome([("download_started", None)], reverted=False) is None


def _window(dev: str, tier: str, model: str, version: str, seconds: float, n: int = 200) -> WindowFacts:
    sk = LatencySketch()
    sk.extend(np.full(n, seconds).tolist())
    return WindowFacts(dev, n, 0, 0, sk.to_data(), tier=stratum(tier, model, version))


def test_latency_is_compared_per_tier_and_served_model_version() -> None:
    """The canary's devices serve a slower model version than the control's: not the agent's regression, since no
    stratum holds both cohorts. The same agent slower on the model the control serves is one."""
    policy = RolloutPolicy(min_devices=1, min_requests=100, min_tier_requests=100)
    treatment = cohort_stats([_window("a", "t", "digits", "2.0.0", 0.050)], devices=1, committed=1)
    control = cohort_stats([_window("b", "t", "digits", "1.0.0", 0.002)], devices=1)
    assert judge(treatment, control, policy).outcome is Outcome.passed
    slower = cohort_stats([_window("a", "t", "digits", "1.0.0", 0.050)], devices=1, committed=1)
    j = judge(slower, control, policy)  # suspected, and confirmed as for a model once enough windows show it
    assert j.outcome is Outcome.inconclusive and j.confirming and "on tier t · digits 1.0.0" in j.reason, j


def test_agent_failures_fail_the_wave() -> None:
    policy = RolloutPolicy(min_devices=3, max_failure=0.05)
    t = CohortStats(devices=3, committed=2, failed=1, reporting=2, crash_free=2, requests=500)
    j = judge(t, None, policy)
    assert j.outcome is Outcome.failed and "update failures 1/3" in j.reason


def test_rollout_create_body() -> None:
    agent = RolloutCreate.model_validate({"kind": "agent", "version": "0.2.0"})
    assert agent.target == AGENT_MODEL
    model = RolloutCreate.model_validate({"model": "digits", "version": "2.0.0"})
    assert model.target == "digits" and model.kind == "model"
    for bad in (
        {"kind": "agent", "model": "digits", "version": "0.2.0"},
        {"version": "2.0.0"},
        {"model": AGENT_MODEL, "version": "0.2.0"},
        {"kind": "firmware", "version": "1"},
    ):
        with pytest.raises(ValueError):
            RolloutCreate.model_validate(bad)


def test_desired_state_carries_the_device_s_agent_version_over_its_group_s() -> None:
    g = DeviceGroup(name="g", channel="stable", config={"version": 3, "agent_version": "0.1.0"})
    d = Device(id="d1", tier="t", credential_hash="x", group="g")
    assert devices.desired_state(d, g, {}).config.agent_version == "0.1.0"
    d.desired_agent_version = "0.2.0"
    ds = devices.desired_state(d, g, {})
    assert ds.config.agent_version == "0.2.0" and ds.config.version == 3
    bare = Device(id="d2", tier="t", credential_hash="y")
    # unset: left out of what is sent, so agents that predate the field are not broken
    assert b"agent_version" not in devices.render(devices.desired_state(bare, None, {}))
    bare.desired_agent_version = "0.2.0"
    assert b'"agent_version":"0.2.0"' in devices.render(devices.desired_state(bare, None, {}))


def test_compat_cells_list_their_status_per_agent_version() -> None:
    ev: list[dict[str, Any]] = [
        {"source": "bench", "result": "verified"},
        {"source": "device", "device_id": "a", "event": "committed", "agent_version": "0.1.0", "ok": True},
        {"source": "device", "device_id": "b", "event": "committed", "agent_version": "0.1.0", "ok": True},
        {"source": "device", "device_id": "c", "event": "rolled_back", "agent_version": "0.2.0", "ok": False},
        {"source": "device", "device_id": "d", "event": "committed", "ok": True},  # recorded before the axis
    ]
    assert compat.agents_of(ev) == [
        {"agent_version": "", "status": "verified", "devices": 1},
        {"agent_version": "0.1.0", "status": "verified", "devices": 2},
        {"agent_version": "0.2.0", "status": "suspect", "devices": 1},
    ]
    cleared = [*ev, {"source": "operator", "event": "cleared"}]
    assert compat.agents_of(cleared) == []


# ------------------------------------------------------------------------------------------------ end to end


def publish_bundle(cp: CP, version: str, platform: str = PLATFORM) -> None:
    """What `edgefleet agent-bundle publish` signs in (the bundle's bytes do not matter to the control plane)."""
    custom = {"agent_bundle": {"version": version, "platform": platform, "python": "3.11"}}
    Repository(cp.settings.repo, None).add_target(f"edgefleet-agent-{version}-{platform}.tar", b"bundle", custom)


def report(
    dev: SimDevice,
    *,
    agent: str,
    events: Sequence[tuple[str, str | None]] = (),
    event_model: str = AGENT_MODEL,
    event_version: str | None = None,
    served: tuple[str, str] = ("digits", "1.0.0"),
    requests: int = 60,
) -> None:
    """One check-in report as the agent sends it: its agent version, its own update events, a telemetry window."""
    now = datetime.now(UTC)
    sk = LatencySketch()
    sk.extend(np.full(requests, 0.002).tolist())
    body = Report(
        batch_id=secrets.token_hex(6),
        state="committed",
        served={"model": served[0], "version": served[1]},
        agent_version=agent,
        events=[
            {
                "event_id": secrets.token_hex(6),
                "at": now,
                "kind": k,
                "model": event_model,
                "version": event_version or agent,
                "reason": why,
            }
            for k, why in events
        ],
        telemetry=[
            {
                "window_id": secrets.token_hex(6),
                "start": now - timedelta(seconds=10),
                "end": now,
                "model": served[0],
                "version": served[1],
                "requests": requests,
                "latency": sk.to_data(),
            }
        ],
    )
    r = dev.cp.http.post(
        f"/api/v1/devices/{dev.id}/report",
        content=body.model_dump_json(),
        headers={"Authorization": f"Bearer {dev.credential}", "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text


def wanted_agent(dev: SimDevice) -> str | None:
    return dev.desired()["config"].get("agent_version")


@pytest.mark.process
def test_an_agent_rollout_moves_judges_halts_and_rolls_back(cp: CP) -> None:
    fleet = [cp.device("x86-avx2") for _ in range(4)]
    for d in fleet:
        report(d, agent="0.1.0")

    # a version with no bundle in the repository is refused in one line
    r = cp.http.post("/api/v1/rollouts", headers=cp.h(), json={"kind": "agent", "version": "0.2.0"})
    assert r.status_code == 404 and "no agent bundle 0.2.0 in the repository" in r.text, r.text
    publish_bundle(cp, "0.2.0")

    policy = {"waves": [50, 100], "bake_s": 0, "min_devices": 1, "min_requests": 50, "device_timeout_s": 0}
    dry = cp.api("POST", "/api/v1/rollouts/plan", json={"kind": "agent", "version": "0.2.0", "policy": policy})
    assert dry["kind"] == "agent" and dry["devices"] == 4 and [len(w["devices"]) for w in dry["waves"]] == [2, 2]
    started = cp.api("POST", "/api/v1/rollouts", json={"kind": "agent", "version": "0.2.0", "policy": policy})
    rid = started["rollout_id"]
    assert started["kind"] == "agent" and started["model"] == AGENT_MODEL and started["state"] == "running"

    reconcile_once(cp.store)
    wave0 = set(dry["waves"][0]["devices"])
    by_id = {d.id: d for d in fleet}
    for d in fleet:
        assert wanted_agent(d) == ("0.2.0" if d.id in wave0 else None), d.id
    rec = cp.api("GET", f"/api/v1/devices/{next(iter(wave0))}")
    assert rec["desired_agent"] == {"version": "0.2.0", "rollout_id": rid}

    # the moved devices' agents install the bundle, come up healthy and report it; the others go on as before
    for d in fleet:
        if d.id in wave0:
            report(d, agent="0.2.0", events=[("verified", None), ("switched", None), ("committed", "healthy")])
        else:
            report(d, agent="0.1.0")
    reconcile_once(cp.store)
    r = cp.api("GET", f"/api/v1/rollouts/{rid}")
    assert r["wave"] == 1 and r["state"] == "running", r
    assert "wave 0 passed" in r["transitions"][-1]["reason"], r["transitions"]

    reconcile_once(cp.store)  # wave 1 moves the rest
    rest = [d for d in fleet if d.id not in wave0]
    assert all(wanted_agent(d) == "0.2.0" for d in rest)
    # one of them cannot keep the new agent up: its launcher falls back and the old agent says so
    fell_back = [("switched", None), ("rolled_back", "agent 0.2.0 is not healthy")]
    report(rest[0], agent="0.1.0", events=fell_back, event_version="0.2.0")
    report(rest[1], agent="0.2.0", events=[("committed", "healthy")])
    reconcile_once(cp.store)
    r = cp.api("GET", f"/api/v1/rollouts/{rid}")
    assert r["state"] == "paused" and "update failures 1/4 devices" in r["reason"], r["transitions"]

    # the rollout page and the list show it as an agent rollout
    assert any(x["rollout_id"] == rid and x["kind"] == "agent" for x in cp.api("GET", "/api/v1/rollouts"))
    from edgefleet.controlplane.dashboard.views import rollout_page

    with cp.store.db.session() as s:
        page = rollout_page(s, rid)
    assert page["kind"] == "agent" and page["wave_metrics_error"] is None
    assert page["wave_metrics"][1]["canary"]["failed"] == 1, page["wave_metrics"]

    # rollback: every moved device gets the agent version it reported when it was moved
    cp.api("POST", f"/api/v1/rollouts/{rid}/rollback", json={"reason": "test"})
    assert all(wanted_agent(d) == "0.1.0" for d in by_id.values())
    assert cp.api("GET", f"/api/v1/rollouts/{rid}")["state"] == "rolled_back"


@pytest.mark.process
def test_an_agent_rollout_leaves_out_devices_without_a_bundle_and_blocks_without_any(
    cp: CP, capsys: pytest.CaptureFixture[str]
) -> None:
    x86 = cp.device("x86-avx2")
    arm = cp.device("arm-a72")
    for d in (x86, arm):
        report(d, agent="0.1.0")
    publish_bundle(cp, "0.2.0", "manylinux_2_28_aarch64")
    remote = ["--server", cp.url, "--api-token", cp.admin]
    code, _, err = run_cli(capsys, "rollout", "start", "--agent", "0.3.0", *remote)
    assert code != 0 and "no agent bundle 0.3.0 in the repository (published: 0.2.0)" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    code, out, err = run_cli(
        capsys, "rollout", "start", "--agent", "0.2.0", "--tier", "x86-avx2", "--waves", "100", "--bake", "0s", *remote
    )
    assert code == 0 and "of agent 0.2.0: blocked" in out, (out, err)
    (started,) = cp.api("GET", "/api/v1/rollouts")
    started = cp.api("GET", f"/api/v1/rollouts/{started['rollout_id']}")
    assert started["kind"] == "agent" and "1 incompatible" in started["reason"], started
    body = {"kind": "agent", "version": "0.2.0", "tier": "x86-avx2", "policy": {"waves": [100], "bake_s": 0}}
    started["plan"] = cp.api("POST", "/api/v1/rollouts/plan", json=body)
    assert "no agent bundle 0.2.0 for x86_64" in started["plan"]["excluded"][x86.id]
    reconcile_once(cp.store)
    assert wanted_agent(x86) is None and wanted_agent(arm) is None
    # the x86 bundle appears: the rollout goes on by itself
    publish_bundle(cp, "0.2.0")
    reconcile_once(cp.store)
    assert wanted_agent(x86) == "0.2.0" and wanted_agent(arm) is None
    assert cp.api("GET", f"/api/v1/rollouts/{started['rollout_id']}")["state"] == "running"


@pytest.mark.process
def test_compat_cells_say_which_agent_the_evidence_came_under(cp: CP, mlp_path: Path, tmp_path: Path) -> None:
    cp.upload(build_pkg(mlp_path, tmp_path / "pkgs", "2.0.0"))
    d = cp.device("x86-avx2")
    report(d, agent="0.1.0")
    # one change judged at a time: a model rollout waits while an agent rollout is active, and the other way round
    publish_bundle(cp, "0.2.0")
    agent = cp.api("POST", "/api/v1/rollouts", json={"kind": "agent", "version": "0.2.0"})["rollout_id"]
    r = cp.http.post("/api/v1/rollouts", headers=cp.h(), json={"model": "digits", "version": "2.0.0"})
    assert r.status_code == 409 and f"an agent rollout ({agent}) is still active" in r.text, r.text
    cp.api("POST", f"/api/v1/rollouts/{agent}/abort", json={})
    model = cp.api("POST", "/api/v1/rollouts", json={"model": "digits", "version": "2.0.0"})["rollout_id"]
    r = cp.http.post("/api/v1/rollouts", headers=cp.h(), json={"kind": "agent", "version": "0.2.0"})
    assert r.status_code == 409 and f"a rollout of digits ({model}) is still active" in r.text, r.text
    cp.api("POST", f"/api/v1/rollouts/{model}/abort", json={})

    cp.api("POST", f"/api/v1/devices/{d.id}/pin", json={"model": "digits", "version": "2.0.0"})
    committed = [("committed", None)]
    report(d, agent="0.1.0", events=committed, event_model="digits", event_version="2.0.0", served=("digits", "2.0.0"))
    cells = cp.api("GET", "/api/v1/compat", params={"model": "digits", "agent_version": "0.1.0"})
    (cell,) = [c for c in cells if c["tier"] == "x86-avx2" and c["version"] == "2.0.0"]
    assert cell["status"] == "verified" and cell["runtime_version"] == "1.32.0"
    assert cell["agents"] == [{"agent_version": "0.1.0", "status": "verified", "devices": 1}]
    assert cp.api("GET", "/api/v1/compat", params={"agent_version": "9.9.9"}) == []
