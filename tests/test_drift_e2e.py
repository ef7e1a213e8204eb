"""Drift end to end with real agents: two `edgefleet agent` processes, each serving through its own inference worker,
answer inputs shifted away from the package's reference. The shift reaches the fleet API, `/metrics` and the
dashboard as PSI computed on the server from the merged histograms, and a rollout whose drift threshold is exceeded
is rolled back by the reconciler."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from _cp_support import gate_verdict
from edgefleet import examples
from edgefleet.data import CallData
from edgefleet.package import build_package
from edgefleet.sim import Fleet, FleetOptions, ServerProcess, plan_fleet
from edgefleet.telemetry.drift import PSI_ALERT


async def _until(pred: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    end = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while asyncio.get_running_loop().time() < end:
        last = await pred()
        if last:
            return last
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


def _drift_rows(fleet_doc: dict[str, Any], version: str) -> list[dict[str, Any]]:
    return [d for d in fleet_doc["drift"] if d["model"] == "digits" and d["version"] == version]


@pytest.mark.process
@pytest.mark.timeout(300)
def test_shifted_inputs_show_as_fleet_drift_and_halt_a_rollout(
    tmp_path: Path, mlp_path: Path, digits: examples.Digits, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="edgefleet.agent")  # quiet, and restored for the tests after this
    samples = CallData({"X": digits.x_train[:32, None, :]})
    reference = CallData({"X": digits.x_test[:, None, :]})
    pkgs = {
        v: build_package(
            mlp_path,
            tmp_path / f"digits-{v}.efpkg",
            name="digits",
            version=v,
            sample_inputs=samples,
            reference_data=reference,
        )
        for v in ("1.0.0", "2.0.0")
    }
    # inverted pixels: still valid images to the model, far from anything in the reference
    shifted = {"X": (16.0 - digits.x_train)[:, None, :].astype(np.float32)}
    plans = plan_fleet({"x86-avx2": 2}, full=2)
    server = ServerProcess(tmp_path / "server", reconcile_interval_s=0.5)
    server.start()

    async def run() -> None:
        opts = FleetOptions(requests_per_s=20.0, traffic=shifted)
        fleet = Fleet(server.url, server.admin_token, plans, tmp_path / "fleet", opts)
        web = httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"})
        try:
            await fleet.start()
            ids = {d["device_id"] for d in await fleet.wait_enrolled(120)}
            for p in pkgs.values():
                await fleet.publish(p, gate=gate_verdict())
            # v1's policy tolerates any drift, so it lands and the fleet drifts in the open (an inconclusive wave
            # pauses at its bake deadline: the bake outlasts the update and the first windows)
            lenient = {
                "waves": [100],
                "bake_s": 15,
                "max_sample_wait_s": 90,
                "min_devices": 2,
                "min_requests": 50,
                "max_psi": 1000,
            }
            r1 = await fleet.api(
                "POST", "/api/v1/rollouts", json={"model": "digits", "version": "1.0.0", "policy": lenient}
            )

            async def state(rid: str) -> dict[str, Any] | None:
                ro: dict[str, Any] = await fleet.api("GET", f"/api/v1/rollouts/{rid}")
                return ro if ro["state"] not in ("running", "draft") else None

            async def served(version: str) -> bool:
                devs = await fleet.api("GET", "/api/v1/devices")
                return all(d["served"]["version"] == version for d in devs if d["device_id"] in ids)

            ro1 = await _until(lambda: state(r1["rollout_id"]), 120, "the v1 rollout to end")
            assert ro1["state"] == "completed", ro1["reason"]
            await _until(lambda: served("1.0.0"), 120, "both devices to serve 1.0.0")

            async def drifting() -> list[dict[str, Any]]:
                rows = _drift_rows(await fleet.api("GET", "/api/v1/fleet"), "1.0.0")
                return [r for r in rows if r["psi"] is not None and r["psi"] > PSI_ALERT]

            alarms = await _until(drifting, 90, "fleet drift on 1.0.0 above the alert level")
            feature = alarms[0]["feature"]
            # the figure is the fleet's: computed on merged counts from both devices, with its sample size
            assert alarms[0]["n"] >= 200

            metrics = (await web.get("/metrics")).text
            psi_lines = [
                ln for ln in metrics.splitlines() if ln.startswith("edgefleet_drift_psi{") and 'version="1.0.0"' in ln
            ]
            assert psi_lines and max(float(ln.rsplit(" ", 1)[1]) for ln in psi_lines) > PSI_ALERT, psi_lines
            assert "_created" not in metrics

            page = (await web.get("/")).text
            assert re.search(re.escape(feature), page), "the dashboard names the drifting feature"

            # v2 under the default drift threshold: the reconciler halts it on the drift its canaries report
            strict = {
                "waves": [100],
                "bake_s": 60,
                "max_sample_wait_s": 120,
                "min_devices": 1,
                "min_requests": 50,
                "auto_rollback": True,
            }
            r = await fleet.api(
                "POST", "/api/v1/rollouts", json={"model": "digits", "version": "2.0.0", "policy": strict}
            )

            ro = await _until(lambda: state(r["rollout_id"]), 120, "the v2 rollout to end")
            assert ro["state"] == "rolled_back" and "drift" in ro["reason"], ro["reason"]
            await _until(lambda: served("1.0.0"), 120, "both devices back on 1.0.0")
        finally:
            await web.aclose()
            await fleet.stop()

    try:
        asyncio.run(run())
    finally:
        server.stop()
