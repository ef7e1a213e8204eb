"""A device that takes an update and goes silent is a failure of its wave once it has been silent for
``device_timeout_s`` — not "in progress" for ever. A real ``edgefleet agent`` process against the real control plane
(``tests/_fleet_support.py``) checks in, gets the new desired state and dies for good in the middle of the update
(its own crash point, as a bricked device would); the reconciler judges the wave with it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from _fleet_support import AgentProc, Fleet, make_packages, state_of
from conftest import free_port, starts_processes
from edgefleet.agent.durable import CRASH_EXIT_CODE, CRASHPOINT_ENV
from edgefleet.controlplane.reconciler import reconcile_once

TIMEOUT_S = 5.0


@pytest.fixture
@starts_processes
def fleet(tmp_path: Path, mlp_path: Path, digits: Any) -> Any:
    f = Fleet(tmp_path / "cp")
    f.publish(*make_packages(mlp_path, digits.x_test, tmp_path / "pkgs", ["1.0.0", "2.0.0"]).values())
    yield f
    f.close()


def test_a_device_silent_with_the_update_fails_its_wave_at_the_timeout(fleet: Fleet, tmp_path: Path) -> None:
    agent = AgentProc(fleet.url, fleet.enrollment_token(), tmp_path / "dev", free_port())
    agent.start()
    try:
        agent.wait_until(lambda: fleet.device_ids(), what="enrollment")
        fleet.pin("1.0.0", probation_seconds=0.2, probation_requests=1000)
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "committed", what="v1 committed")
    finally:
        agent.stop()
    fleet.pin(None)
    policy = {"waves": [100], "bake_s": 3600, "min_devices": 1, "min_requests": 0, "device_timeout_s": TIMEOUT_S}
    rid = fleet.api("POST", "/api/v1/rollouts", json={"model": "digits", "version": "2.0.0", "policy": policy})[
        "rollout_id"
    ]
    reconcile_once(fleet.store)  # the wave moves the device
    # The device checks in, takes the update and dies in the middle of it, for good.
    agent.start(env={CRASHPOINT_ENV: "state.staged.after_rename"})
    assert agent.wait_exit(60) == CRASH_EXIT_CODE
    died = time.monotonic()  # its last sign of life was before this
    fleet.store.flush_and_sync()  # its last check-in, as the server's flush loop would write it
    assert fleet.record()["desired"]["version"] == "2.0.0"

    if time.monotonic() - died < 1.0:  # silent for far less than the timeout: no verdict yet
        reconcile_once(fleet.store)
        r = fleet.api("GET", f"/api/v1/rollouts/{rid}")
        assert r["state"] == "running", r
    time.sleep(max(0.0, TIMEOUT_S + 0.5 - (time.monotonic() - died)))
    reconcile_once(fleet.store)
    r = fleet.api("GET", f"/api/v1/rollouts/{rid}")
    assert r["state"] == "paused", r
    assert "update failures 1/1 devices" in r["reason"] and "silent past the 5 s device timeout" in r["reason"], r
