"""A rollout's shadow phase with real agents: each serves v1 on its own port (its worker answers HTTP), mirrors live
requests to the candidate running in shadow beside it, and reports agreement; the real control plane judges it.
A disagreeing candidate halts the rollout before any device serves it; an agreeing one passes and the canary starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from _fleet_support import Fleet, install, make_packages, settings, until
from edgefleet import examples

pytestmark = [pytest.mark.process, pytest.mark.timeout(240)]

SHADOW = {"percent": 100, "min_samples": 40, "min_agreement": 0.9, "duration_s": 2, "rate_per_s": 50, "cpu_share": 1}


@pytest.fixture(scope="module")
def weak_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A barely trained MLP (two hidden units, three iterations): its top class seldom matches the real one's."""
    p = tmp_path_factory.mktemp("models") / "weak.onnx"
    p.write_bytes(examples.train_digits_mlp(hidden=(2,), seed=3, max_iter=3))
    return p


@contextlib.asynccontextmanager
async def agents(fleet: Fleet, tmp: Path, pkg: Path, n: int) -> AsyncIterator[list[Any]]:
    from conftest import free_port
    from edgefleet.agent import Agent

    started = []
    try:
        for i in range(n):
            data_dir = tmp / f"dev{i}"
            install(data_dir, pkg)
            conf = settings(data_dir, "http://control-plane.test", fleet.enrollment_token(), port=free_port())
            a = Agent(conf, transport=fleet.transport())
            await a.start()
            started.append(a)
        await until(lambda: len(fleet.device_ids()) == n, 60, "enrollment")
        yield started
    finally:
        for a in started:
            await a.stop()


async def traffic(ports: list[int], x: np.ndarray, stop: asyncio.Event) -> int:
    """Requests to every agent in turn until ``stop``; every answer must be the served model's (200)."""
    sent = 0
    async with httpx.AsyncClient(timeout=30) as http:
        while not stop.is_set():
            for port in ports:
                row = x[sent % len(x)]
                body = {"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}]}
                r = await http.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=body)
                assert r.status_code == 200, r.text
                sent += 1
            await asyncio.sleep(0.005)
    return sent


async def shadow_run(fleet: Fleet, started: list[Any], x: np.ndarray, version: str) -> dict[str, Any]:
    """Start a rollout of ``version`` with a shadow phase and reconcile, under live traffic, until it leaves the
    phase; returns the rollout as the API shows it then."""
    from edgefleet.controlplane.reconciler import reconcile_once

    policy = {"waves": [100], "bake_s": 3600, "min_devices": 1, "min_requests": 0, "shadow": SHADOW}
    body = {"model": "digits", "version": version, "policy": policy}
    rid = str((await asyncio.to_thread(fleet.api, "POST", "/api/v1/rollouts", json=body))["rollout_id"])
    stop = asyncio.Event()
    load = asyncio.create_task(traffic([a.port for a in started], x, stop))
    try:
        for _ in range(600):
            await asyncio.to_thread(reconcile_once, fleet.store)
            r = await asyncio.to_thread(fleet.api, "GET", f"/api/v1/rollouts/{rid}")
            if r["shadow"] is not None and r["shadow"]["state"] != "running":
                return dict(r)
            assert load.done() is False or load.exception() is None
            await asyncio.sleep(0.2)
        raise AssertionError(f"the shadow phase never ended: {r['reason']}")
    finally:
        stop.set()
        await load


def never_served(fleet: Fleet, version: str) -> None:
    """No device was moved to ``version``, none started to install it, and each still serves 1.0.0."""
    assert not [e for e in fleet.events() if e[1] == version], fleet.events()
    for d in fleet.device_ids():
        rec = fleet.record(d)
        assert rec["served"]["version"] == "1.0.0", rec
        assert rec["desired_state"]["version"] != version and "shadow" not in rec["desired_state"], rec


def test_a_disagreeing_candidate_stops_the_rollout_before_any_device_serves_it(
    fleet: Fleet, tmp_path: Path, mlp_path: Path, weak_mlp: Path, digits: Any
) -> None:
    v1 = make_packages(mlp_path, digits.x_test, tmp_path, ["1.0.0"])["1.0.0"]
    bad = make_packages(weak_mlp, digits.x_test, tmp_path / "bad", ["2.0.0"])["2.0.0"]
    fleet.publish(v1, bad)
    x = digits.x_test.astype(np.float32)

    async def go() -> dict[str, Any]:
        async with agents(fleet, tmp_path, v1, 2) as started:
            await until(lambda: all(fleet.record(d)["served"]["version"] == "1.0.0" for d in fleet.device_ids()), 60)
            r = await shadow_run(fleet, started, x, "2.0.0")
            await until(lambda: all(a.shadow is None for a in started), 30, "the shadow workers to stop")
            return r

    r = asyncio.run(go())
    assert r["state"] == "paused" and r["shadow"]["state"] == "failed", r
    assert re.match(
        r"shadow phase failed: tier test-tier: agreement \d+\.\d% \(\d+/\d+, 0 errors; halves ", r["reason"]
    )
    assert r["devices"] == [] and r["wave"] == 0  # the canary never started
    [t] = r["shadow"]["tiers"]
    assert t["tier"] == "test-tier" and t["devices"] == 2
    assert t["compared"] >= SHADOW["min_samples"] and t["agreement"] < SHADOW["min_agreement"]
    assert all(h["compared"] >= SHADOW["min_samples"] / 2 for h in t["halves"])
    assert t["p95_ms"] is not None and t["p95_ms"] > 0
    assert r["transitions"][-1]["to"] == "paused" and r["transitions"][-1]["reason"] == r["reason"]
    never_served(fleet, "2.0.0")
    page = fleet.http.get(f"/rollouts/{r['rollout_id']}", headers=fleet.h()).text
    assert 'data-testid="shadow"' in page and f"{t['agreement'] * 100:.1f} %" in page


def test_an_agreeing_candidate_passes_its_shadow_phase_and_the_canary_starts(
    fleet: Fleet, tmp_path: Path, mlp_path: Path, digits: Any
) -> None:
    from edgefleet.controlplane.reconciler import reconcile_once

    pkgs = make_packages(mlp_path, digits.x_test, tmp_path, ["1.0.0", "2.0.0"])  # the same model, retrained never
    fleet.publish(*pkgs.values())
    x = digits.x_test.astype(np.float32)

    async def go() -> dict[str, Any]:
        async with agents(fleet, tmp_path, pkgs["1.0.0"], 2) as started:
            await until(lambda: all(fleet.record(d)["served"]["version"] == "1.0.0" for d in fleet.device_ids()), 60)
            r = await shadow_run(fleet, started, x, "2.0.0")
            assert r["state"] == "running" and r["shadow"]["state"] == "passed", r
            assert r["devices"] == []  # the phase moved nobody; the next step moves the canary
            await asyncio.to_thread(reconcile_once, fleet.store)
            await until(
                lambda: all(fleet.record(d)["served"]["version"] == "2.0.0" for d in fleet.device_ids()), 120, "canary"
            )
            return r

    r = asyncio.run(go())
    assert r["reason"].startswith("shadow phase passed: tier test-tier: agreement 100.0% (")
    [t] = r["shadow"]["tiers"]
    assert t["agreement"] == 1.0 and t["compared"] >= SHADOW["min_samples"] and t["errors"] == 0
    after = fleet.api("GET", f"/api/v1/rollouts/{r['rollout_id']}")
    assert {d["wave"] for d in after["devices"]} == {0} and len(after["devices"]) == 2
    assert [x["to"] for x in after["transitions"]][-1] == "running"
