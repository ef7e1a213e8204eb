"""A small populated fleet for the dashboard tests, built only through the control plane's public HTTP API.

The devices here are *protocol-level clients*: they enroll, poll their desired state and post reports exactly as
``edgefleet.protocol`` says, and report what a real agent would have done (commit the version they are sent, with
telemetry windows holding real DDSketches). The real agent and the fleet simulator are tested elsewhere
(test_cp_e2e.py, the simulator's tests); what the dashboard needs is a fleet in known states whose figures the
test can compute and compare with what the pages show.

Fleet: 6 ``rpi4`` + 4 ``jetson`` devices; digits 1.0.0, with a passing gate verdict for its package, rolled out to
all and completed; one rpi4 device reported a worker crash, another a drifting feature and a model
sha256 the registry does not know; digits 2.0.0, with no gate verdict, forced past the release policy by the admin
(``FORCE_REASON``) and rolling out in waves [50, 100] with a long bake, so it stays running in its canary wave for
the pause/resume buttons.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from edgefleet.protocol import Report
from edgefleet.telemetry.sketch import LatencySketch

TIERS = {"rpi4": 6, "jetson": 4}
LATENCY_S = {
    ("1.0.0", "rpi4"): 0.004,
    ("1.0.0", "jetson"): 0.002,
    ("2.0.0", "rpi4"): 0.005,
    ("2.0.0", "jetson"): 0.0025,
}
FAKE_SHA = {"1.0.0": "a" * 64, "2.0.0": "b" * 64}
FORCE_REASON = "dashboard fixture: 2.0.0 ships without a gate verdict on purpose"


@dataclass
class Dev:
    id: str
    credential: str
    tier: str
    served: str | None = None
    n: int = 0


@dataclass
class Fleet:
    admin: str
    operator: str
    viewer: str
    devices: list[Dev] = field(default_factory=list)
    done_rollout: str = ""
    live_rollout: str = ""
    odd_device: str = ""  # reports a model sha256 that differs from the registry's
    model_sha: dict[str, str] = field(default_factory=dict)


def _ok(r: httpx.Response) -> Any:
    assert r.status_code < 400, (r.request.method, r.request.url, r.status_code, r.text)
    return r.json()


def build_packages(mlp_path: Path, out: Path) -> dict[str, Path]:
    from edgefleet.data import CallData
    from edgefleet.package import build_package

    x = np.random.default_rng(0).random((4, 1, 64), dtype=np.float32)
    out.mkdir(parents=True, exist_ok=True)
    return {
        v: build_package(
            mlp_path, out / f"digits-{v}.efpkg", name="digits", version=v, sample_inputs=CallData({"X": x})
        )
        for v in ("1.0.0", "2.0.0")
    }


def _passing_verdict() -> dict[str, Any]:
    """A verdict as ``edgefleet gate --json`` prints it, decided by the gate's own ``decide``."""
    from edgefleet.gate.checks import CheckResult
    from edgefleet.gate.verdict import decide

    return decide([CheckResult(name="package.valid", status="pass", reason="fixture")]).model_dump(mode="json")


def report(
    http: httpx.Client,
    d: Dev,
    *,
    version: str | None,
    committed: str | None = None,
    requests: int = 200,
    crashes: int = 0,
    psi: float | None = None,
    sha: str | None = None,
    rollout_id: str | None = None,
) -> None:
    d.n += 1
    now = datetime.now(UTC)
    sk = LatencySketch()
    if version is not None:
        base = LATENCY_S[(version, d.tier)]
        # a spread, so p95 is a real quantile and not the only value
        sk.extend(np.linspace(base * 0.5, base * 1.5, requests).tolist())
    body = Report(
        batch_id=f"{d.id}-{d.n}",
        state="committed" if version else "idle",
        served={"model": "digits" if version else None, "version": version, "model_sha256": sha},
        events=[
            {
                "event_id": secrets.token_hex(6),
                "at": now,
                "kind": "committed",
                "model": "digits",
                "version": committed,
                "rollout_id": rollout_id,  # as an agent reports it: compatibility evidence counts for assigned work
            }
        ]
        if committed
        else [],
        telemetry=[
            {
                "window_id": secrets.token_hex(6),
                "start": now - timedelta(seconds=5),
                "end": now,
                "model": "digits",
                "version": version,
                "requests": requests,
                "latency": sk.to_data(),
                "worker_crashes": crashes,
                "drift": [{"feature": "X.mean", "psi": psi, "n": requests}] if psi is not None else [],
            }
        ]
        if version
        else [],
    )
    _ok(
        http.post(
            f"/api/v1/devices/{d.id}/report",
            content=body.model_dump_json(),
            headers={"Authorization": f"Bearer {d.credential}", "Content-Type": "application/json"},
        )
    )


def _desired(http: httpx.Client, d: Dev) -> dict[str, Any]:
    return dict(_ok(http.get(f"/api/v1/devices/{d.id}/desired", headers={"Authorization": f"Bearer {d.credential}"})))


def _wait(cond: Callable[[], bool], tick: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        tick()


def populate(http: httpx.Client, admin: str, pkgs: dict[str, Path], tick: Callable[[], object]) -> Fleet:
    """Build the fleet; ``tick`` lets the reconciler run (a call to it, or a short sleep for a server's own loop)."""
    h = {"Authorization": f"Bearer {admin}"}

    def api(method: str, path: str, **kw: Any) -> Any:
        return _ok(http.request(method, path, headers={**h, **kw.pop("headers", {})}, **kw))

    fleet = Fleet(
        admin=admin,
        operator=api("POST", "/api/v1/tokens", json={"role": "operator", "name": "ops"})["token"],
        viewer=api("POST", "/api/v1/tokens", json={"role": "viewer", "name": "look"})["token"],
    )
    for v, p in pkgs.items():
        out = api(
            "POST", "/api/v1/packages", content=p.read_bytes(), headers={"Content-Type": "application/octet-stream"}
        )
        fleet.model_sha[v] = out["model_sha256"]
        if v == "1.0.0":
            api(
                "PUT",
                f"/api/v1/models/digits/versions/{v}/gate",
                params={"package_sha256": out["package_sha256"]},
                json=_passing_verdict(),
            )
    for tier, n in TIERS.items():
        for _ in range(n):
            tok = api("POST", "/api/v1/enrollment-tokens", json={"tier": tier})["token"]
            e = _ok(
                http.post(
                    "/api/v1/enroll",
                    json={
                        "token": tok,
                        "hardware": {"arch": "aarch64", "cpu_count": 4, "memory_mb": 2048, "chipset": f"{tier}-soc"},
                        "runtime_version": "1.32.0",
                        "agent_version": "0.1.0",
                        "public_key": secrets.token_hex(32),
                    },
                )
            )
            fleet.devices.append(Dev(e["device_id"], e["credential"], tier))

    def step_devices() -> None:
        for d in fleet.devices:
            desired = _desired(http, d)
            want = desired.get("version")
            if want and want != d.served:
                d.served = want
                report(
                    http,
                    d,
                    version=want,
                    committed=want,
                    sha=fleet.model_sha[want],
                    rollout_id=desired.get("rollout_id"),
                )

    # 1.0.0 to everyone, judged on absolute budgets (no control group); one crash is tolerated by this policy
    policy1 = {"waves": [100], "bake_s": 0, "min_devices": 1, "min_requests": 1, "min_crash_free": 0.5}
    fleet.done_rollout = api(
        "POST", "/api/v1/rollouts", json={"model": "digits", "version": "1.0.0", "policy": policy1}
    )["rollout_id"]

    def r1_done() -> bool:
        step_devices()
        return bool(api("GET", f"/api/v1/rollouts/{fleet.done_rollout}")["state"] == "completed")

    _wait(r1_done, tick, "rollout of 1.0.0 to complete")
    rpi = [d for d in fleet.devices if d.tier == "rpi4"]
    report(http, rpi[0], version="1.0.0", crashes=1, sha=fleet.model_sha["1.0.0"])
    report(http, rpi[1], version="1.0.0", psi=0.4, sha=fleet.model_sha["1.0.0"])
    fleet.odd_device = rpi[1].id

    # 2.0.0 in waves; the long bake keeps it running in the canary wave
    policy2 = {
        "waves": [60, 100],
        "bake_s": 3600,
        "min_devices": 1,
        "min_requests": 1,
        "min_crash_free": 0.5,
        "max_p95_ratio": 5.0,  # the canary may hold more devices of the slower tier than the control
    }
    body2 = {"model": "digits", "version": "2.0.0", "policy": policy2, "force": True, "reason": FORCE_REASON}
    fleet.live_rollout = api("POST", "/api/v1/rollouts", json=body2)["rollout_id"]

    def canary_moved() -> bool:
        tick()
        return bool(api("GET", f"/api/v1/rollouts/{fleet.live_rollout}")["devices"])

    _wait(canary_moved, lambda: None, "the canary wave of 2.0.0 to be moved")
    step_devices()
    # a second telemetry window from the whole fleet, so the latency chart has a line over time
    for d in fleet.devices:
        odd = d.id == fleet.odd_device
        sha = FAKE_SHA if odd else fleet.model_sha
        report(http, d, version=d.served, sha=sha[d.served or "1.0.0"])
    tick()
    return fleet
