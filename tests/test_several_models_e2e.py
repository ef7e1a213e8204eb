"""Several models per device with a real agent (its workers, its HTTP port) against the real control plane: a device
serving alpha is given beta beside it by a rollout of beta, answers both over OIP under their names, rolls a bad
version of beta back by itself while alpha keeps serving, and takes a rollout of alpha independently of beta."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from _fleet_support import Fleet, install, settings, until

pytestmark = [pytest.mark.process, pytest.mark.timeout(300)]

POLICY = {"waves": [100], "bake_s": 0, "min_devices": 1, "min_requests": 0, "max_sample_wait_s": 60}


def packages(mlp: Path, x: np.ndarray, out: Path) -> dict[tuple[str, str], Path]:
    from edgefleet.data import CallData
    from edgefleet.package import build_package

    calls = CallData({"X": x[:16, None, :]})
    return {
        (name, v): build_package(mlp, out / f"{name}-{v}.efpkg", name=name, version=v, sample_inputs=calls)
        for name, v in [("alpha", "1.0.0"), ("alpha", "3.0.0"), ("beta", "1.0.0"), ("beta", "2.0.0")]
    }


def rollout(fleet: Fleet, model: str, version: str, **policy: Any) -> str:
    body = {"model": model, "version": version, "policy": POLICY | policy}
    return str(fleet.api("POST", "/api/v1/rollouts", json=body)["rollout_id"])


async def settle(fleet: Fleet, rid: str, state: str, timeout: float = 90) -> dict[str, Any]:
    """Reconcile until the rollout reaches ``state``."""
    from edgefleet.controlplane.reconciler import reconcile_once

    for _ in range(int(timeout / 0.2)):
        await asyncio.to_thread(reconcile_once, fleet.store)
        r = await asyncio.to_thread(fleet.api, "GET", f"/api/v1/rollouts/{rid}")
        if r["state"] == state:
            return dict(r)
        await asyncio.sleep(0.2)
    raise AssertionError(f"rollout {rid} never reached {state}: {r['state']} ({r['reason']}); {fleet.events()}")


async def infer(http: httpx.AsyncClient, port: int, model: str, row: np.ndarray) -> httpx.Response:
    body = {"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}]}
    return await http.post(f"http://127.0.0.1:{port}/v2/models/{model}/infer", json=body)


def beta_of(fleet: Fleet) -> dict[str, Any]:
    models = fleet.record()["models"]
    return dict(models[0]) if models else {}


def test_two_models_are_served_and_rolled_out_independently(
    fleet: Fleet, tmp_path: Path, mlp_path: Path, digits: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import free_port
    from edgefleet.agent import Agent
    from edgefleet.agent.worker.main import FAULT_ENV

    x = digits.x_test.astype(np.float32)
    pkgs = packages(mlp_path, x, tmp_path / "pkgs")
    fleet.publish(*pkgs.values())
    # beta 2.0.0's serving worker aborts right after loading (its golden vectors pass): probation's crash-loop
    # rule rolls it back on the device
    monkeypatch.setenv(FAULT_ENV, "2.0.0:abort")
    fleet.configure_group(probation_seconds=0.3, probation_requests=1000, crash_loop_crashes=2)
    data_dir = tmp_path / "dev"
    install(data_dir, pkgs[("alpha", "1.0.0")], rollout=None)

    async def go() -> None:
        port = free_port()
        agent = Agent(
            settings(data_dir, "http://control-plane.test", fleet.enrollment_token(), port=port),
            transport=fleet.transport(),
        )
        await agent.start()
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                await until(lambda: fleet.device_ids(), 60, "enrollment")
                await until(lambda: fleet.record()["served"]["version"] == "1.0.0", 60, "alpha 1.0.0 reported")
                # the device's first model: alpha, which it serves already
                await settle(fleet, rollout(fleet, "alpha", "1.0.0"), "completed")
                await until(lambda: fleet.record()["several_models"], 30, "the agent to declare several models")

                # a rollout of beta adds beta beside alpha
                rid = rollout(fleet, "beta", "1.0.0")
                await settle(fleet, rid, "completed")
                ds = fleet.record()["desired_state"]
                assert (ds["model"], ds["version"]) == ("alpha", "1.0.0")
                assert [(m["model"], m["version"]) for m in ds["models"]] == [("beta", "1.0.0")]
                committed = ("1.0.0", "committed")
                await until(
                    lambda: (beta_of(fleet).get("served_version"), beta_of(fleet).get("state")) == committed,
                    30,
                    "beta 1.0.0 reported committed",
                )
                for model in ("alpha", "beta"):
                    r = await infer(http, port, model, x[0])
                    assert r.status_code == 200 and r.json()["model_name"] == model, r.text
                    meta = (await http.get(f"http://127.0.0.1:{port}/v2/models/{model}")).json()
                    assert meta["name"] == model and meta["versions"] == ["1.0.0"]
                # the fleet KPIs and the device page show each model
                await until(
                    lambda: {"alpha", "beta"} <= {x["model"] for x in fleet.api("GET", "/api/v1/fleet")["latency"]},
                    30,
                    "latency KPIs of both models",
                )
                page = fleet.http.get(f"/devices/{fleet.device_ids()[0]}", headers=fleet.h()).text
                assert 'data-model="beta"' in page
                r = await infer(http, port, "gamma", x[0])
                assert r.status_code == 404, r.text
                assert (await http.get(f"http://127.0.0.1:{port}/v2/health/ready")).status_code == 200
                assert (data_dir / "models" / "beta" / "state.json").exists()

                # a bad version of beta rolls back on the device; alpha serves throughout
                fleet.configure_group(probation_seconds=30, probation_requests=100000, crash_loop_crashes=2)
                # a long bake: only the failure ends it (a device in probation reports the candidate as served)
                bad = rollout(fleet, "beta", "2.0.0", auto_rollback=True, bake_s=3600)
                answered = 0

                def beta_rolled_back() -> bool:
                    return any(k == "rolled_back" and v == "2.0.0" for k, v, _ in fleet.events())

                while not beta_rolled_back():
                    r = await infer(http, port, "alpha", x[answered % len(x)])
                    assert r.status_code == 200, r.text
                    answered += 1
                    from edgefleet.controlplane.reconciler import reconcile_once

                    await asyncio.to_thread(reconcile_once, fleet.store)
                    await asyncio.sleep(0.05)
                halted = await settle(fleet, bad, "rolled_back")
                assert "automatic rollback" in halted["reason"]
                ds = fleet.record()["desired_state"]
                assert (ds["model"], ds["version"]) == ("alpha", "1.0.0")  # the first model untouched
                assert [(m["model"], m["version"]) for m in ds["models"]] == [("beta", "1.0.0")]
                await until(lambda: beta_of(fleet).get("served_version") == "1.0.0", 60, "beta back on 1.0.0")
                assert answered > 0
                alpha_windows = [w for w in fleet.windows() if w["model"] == "alpha"]
                assert alpha_windows and all(w["version"] == "1.0.0" for w in alpha_windows)
                assert {w["version"] for w in fleet.windows() if w["model"] == "beta"} >= {"1.0.0"}
                # beta answers again once its committed version's worker is up (503 meanwhile: its own rollback)
                for _ in range(300):
                    if (await infer(http, port, "beta", x[1])).status_code == 200:
                        break
                    await asyncio.sleep(0.1)
                r = await infer(http, port, "beta", x[1])
                assert r.status_code == 200 and r.json()["model_version"] == "1.0.0", r.text
                assert (await infer(http, port, "alpha", x[1])).status_code == 200

                # a rollout of alpha proceeds on its own: beta's assignment and serving stay as they are
                fleet.configure_group(probation_seconds=0.3, probation_requests=1000, crash_loop_crashes=3)
                await settle(fleet, rollout(fleet, "alpha", "3.0.0"), "completed")
                await until(lambda: fleet.record()["served"]["version"] == "3.0.0", 60, "alpha 3.0.0 reported")
                ds = fleet.record()["desired_state"]
                assert (ds["version"], [m["version"] for m in ds["models"]]) == ("3.0.0", ["1.0.0"])
                meta = (await http.get(f"http://127.0.0.1:{port}/v2/models/alpha")).json()
                assert meta["versions"] == ["3.0.0"]
                meta = (await http.get(f"http://127.0.0.1:{port}/v2/models/beta")).json()
                assert meta["versions"] == ["1.0.0"]
                assert beta_of(fleet)["served_version"] == "1.0.0"
        finally:
            await agent.stop()

    asyncio.run(go())


def test_a_model_no_longer_assigned_is_stopped_and_its_folder_deleted(
    fleet: Fleet, tmp_path: Path, mlp_path: Path, digits: Any
) -> None:
    """A device restarted with beta's folder serves beta at once; its first check-in, naming no beta, stops it,
    deletes its slots and hands the port back to alpha's worker."""
    from conftest import free_port
    from edgefleet.agent import Agent

    x = digits.x_test.astype(np.float32)
    pkgs = packages(mlp_path, x, tmp_path / "pkgs")
    fleet.publish(pkgs[("alpha", "1.0.0")])
    data_dir = tmp_path / "dev"
    install(data_dir, pkgs[("alpha", "1.0.0")], rollout=None)
    install(data_dir / "models" / "beta", pkgs[("beta", "1.0.0")], rollout=None)

    async def go() -> None:
        port = free_port()
        agent = Agent(settings(data_dir, port=port))  # no control plane yet: what it has on disk
        await agent.start()
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                assert list(agent.units) == ["beta"] and agent.service.held
                for model in ("alpha", "beta"):
                    r = await infer(http, port, model, x[0])
                    assert r.status_code == 200 and r.json()["model_name"] == model, r.text
        finally:
            await agent.stop()
        agent = Agent(
            settings(data_dir, "http://control-plane.test", fleet.enrollment_token(), port=port),
            transport=fleet.transport(),
        )
        await agent.start()
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                beta = data_dir / "models" / "beta"
                await until(lambda: not agent.service.held and not beta.exists(), 60, "beta to be dropped")
                assert not agent.units
                assert (await infer(http, port, "beta", x[0])).status_code == 404
                for _ in range(300):  # alpha's worker takes the port back (503 only while none serves)
                    if (await infer(http, port, "alpha", x[0])).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                assert (await infer(http, port, "alpha", x[0])).status_code == 200
        finally:
            await agent.stop()

    asyncio.run(go())
