"""`edgefleet demo --json` end to end, as a user runs it (a subprocess, its own temp workspace, free ports):
v2 completes everywhere; v3 kills the real worker processes of the 256 MB arm-a53-small devices and the
reconciler — not an operator — halts its canary and rolls it back on every device that received it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

EDGEFLEET = Path(sys.executable).parent / "edgefleet"


@pytest.mark.process
@pytest.mark.timeout(420)
def test_demo_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [str(EDGEFLEET), "demo", "--json", "--workdir", str(tmp_path / "w")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        # a hang: every thread's stack (SIGUSR1, see cli/main.py) goes into the failure before the kill
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"edgefleet demo hung; its stacks:\n{err[-12000:]}")
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    # with --json the error itself is on stdout ({"error": ...}); the stages are on stderr
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    s = json.loads(r.stdout)
    assert s["rollouts"]["1.0.0"]["state"] == "completed"
    assert s["rollouts"]["2.0.0"]["state"] == "completed"
    assert s["v2"]["completed_on_every_compatible_device"] and s["v2"]["compatible_devices"] == s["v2"]["devices"]
    v3 = s["v3"]
    why = json.dumps(v3, indent=1)
    assert v3["state"] == "rolled_back", why
    assert v3["halted_in_wave"] == 0 and v3["halt_actor"].startswith("reconciler")
    assert "wave 0" in v3["halt_reason"] and "fail" in v3["halt_reason"]  # the wave and the metric
    assert v3["operator_pauses"] == 0
    assert v3["rolled_back_on_every_device"] and v3["received_by_tier"]["arm-a53-small"] >= 1, why
    # A device the wave moved may not have checked in before the halt reverted its desired state, or may have been
    # still downloading when it did: it never tried v3 and stays committed to what it served, with no reason or a
    # cancellation (the first seen in a fresh-clone run under load). Every device of the tier that did try failed,
    # and at least one did.
    tried = [
        d
        for d in v3["failing_tier_devices"]
        if d["state"] != "committed" or not (d["reason"] is None or d["reason"].startswith("cancelled"))
    ]
    assert tried, why
    for d in v3["failing_tier_devices"]:
        assert d["served"] != "3.0.0", d
    for d in tried:  # the worker process really died: out of memory loading the model
        # Where it dies is a race between the model's load and the memory limit: in the health check's fresh worker
        # (refused there: the device stays committed to what it served) or in the serving worker on probation
        # (a crash loop, rolled back), or its requests fail under the limit before any crash is seen (probation's
        # error rate, rolled back; seen in a fresh-clone run). Either way v3 never serves; where the worker died, the
        # reason says it died of memory.
        if d["state"] == "rolled_back" and d["reason"].startswith("error rate"):
            assert "exceeds" in d["reason"], d
            continue
        if d["state"] == "rolled_back":
            assert "crash" in d["reason"], d
        else:
            assert d["state"] == "committed" and d["reason"].startswith("health check failed"), d
        assert any(w in d["reason"] for w in ("RSS", "bad_alloc", "exit", "memory", "Memory")), d
    assert v3["seconds_first_bad_report_to_halt"] is not None
    # Update success counts only what the devices themselves failed: the small tier's crashes. Downloads the halt
    # cancelled and desired states the reconciler reverted are the control plane's decisions, kept apart.
    k = s["kpis"]
    real_failures = k["updates"]["failed"] + k["updates"]["rolled_back"]
    assert real_failures == len(tried) >= 1, k["updates"]  # the devices that tried v3, not every one moved
    assert k["update_success_rate"] == pytest.approx(
        k["updates"]["committed"] / (k["updates"]["committed"] + real_failures), abs=1e-4
    )
    # drift flows from every agent, and the fleet's traffic follows the reference: no feature alarms
    assert k["drift"] and not k["drift_alerts"], k["drift_alerts"]
    assert "3.0.0" not in s["devices_by_version_tier"]
    # a second run right after (fresh workspace, free ports) works too: covered by running the test file twice in
    # CI; here the workspace must be the one given
    assert s["workdir"] == str(tmp_path / "w")
