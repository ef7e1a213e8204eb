"""End to end on loopback with REAL processes: `edgefleet server` and `edgefleet agent`s as subprocesses.

canary → waves → completed; a bad version (a model with a big initializer that the agent's `--memory-mb` limit
kills on the small tier) is paused and rolled back automatically with the reason in the audit log; a pinned
device stays where it is; a tier the package does not allow is skipped.

The agent (docs/agent.md: `edgefleet agent --server URL --token T --data-dir DIR [--port P]
[--checkin-interval S] [--telemetry-interval S] [--memory-mb N]`) is built in parallel; until its command exists
this test skips and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _cp_support import build_pkg, gate_verdict
from conftest import free_port, starts_processes

EDGEFLEET = [str(Path(sys.executable).parent / "edgefleet")]


def _agent_missing() -> str | None:
    r = subprocess.run([*EDGEFLEET, "agent", "--help"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0 or "--memory-mb" not in r.stdout:
        return (
            "the device agent command `edgefleet agent` (with --server/--token/--data-dir/--memory-mb, "
            "docs/agent.md) is not available yet: src/edgefleet/cli/agent.py registers no command"
        )
    return None


def big_initializer_model(path: Path, mb: int) -> Path:
    """Same I/O as the digits MLP (X float32[N,64] → label, probabilities), plus an unused-looking but loaded
    initializer of ``mb`` MiB that the worker must hold in memory."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 64])
    probs = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])
    label = helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])
    w = numpy_helper.from_array(np.random.default_rng(0).random((64, 10), dtype=np.float32), "W")
    big = numpy_helper.from_array(np.ones((mb * 1024 * 256,), dtype=np.float32), "BIG")
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["logits0"]),
        helper.make_node("ReduceSum", ["BIG"], ["bigsum"], keepdims=0),
        helper.make_node("Mul", ["bigsum", "zero"], ["z"]),
        helper.make_node("Add", ["logits0", "z"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    zero = numpy_helper.from_array(np.zeros((), dtype=np.float32), "zero")
    g = helper.make_graph(nodes, "big", [x], [label, probs], [w, big, zero])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, path)
    return path


def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
@starts_processes
def server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    why = _agent_missing()
    if why:
        pytest.skip(why)
    port = free_port()
    p = subprocess.Popen(
        [
            *EDGEFLEET,
            "server",
            "--db",
            f"sqlite:///{tmp_path / 'cp.db'}",
            "--repo",
            str(tmp_path / "repo"),
            "--port",
            str(port),
            "--reconcile-interval",
            "0.5",
        ]
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _ok(url + "/healthz"), 60, "the server")
    yield url, (tmp_path / "admin-token").read_text().strip()
    p.terminate()
    p.wait(10)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_rollouts_with_real_agents(server: tuple[str, str], tmp_path: Path, mlp_path: Path) -> None:
    url, admin = server
    h = {"Authorization": f"Bearer {admin}"}
    api = httpx.Client(base_url=url, headers=h, timeout=60)
    env = {**os.environ, "EDGEFLEET_SERVER": url, "EDGEFLEET_API_TOKEN": admin}
    pk = tmp_path / "pkgs"
    v1 = build_pkg(mlp_path, pk, "1.0.0")
    v2 = build_pkg(mlp_path, pk, "2.0.0")
    bad_model = big_initializer_model(tmp_path / "big.onnx", 150)
    v3 = build_pkg(bad_model, pk, "3.0.0")
    v4 = build_pkg(mlp_path, pk, "4.0.0", tiers=["big"])
    for v in (v1, v2, v3, v4):
        up = api.post("/api/v1/packages", content=v.read_bytes(), headers={"Content-Type": "application/octet-stream"})
        assert up.status_code == 201, up.text
        # as a release pipeline does: the release policy admits a version with a passing verdict for its package
        sha = up.json()["package_sha256"]
        gate = api.put(
            f"/api/v1/models/digits/versions/{up.json()['version']}/gate",
            params={"package_sha256": sha},
            json=gate_verdict(),
        )
        assert gate.status_code == 200, gate.text

    # The group's configuration document sets a short probation, so a wave's devices commit well
    # within its bake time; the default (60 s) would leave every wave inconclusive at its deadline.
    lab = {"checkin_interval_s": 0.5, "telemetry_interval_s": 1, "probation_seconds": 1.5, "probation_requests": 20}
    assert api.put("/api/v1/groups/lab", json={"config": lab}).status_code == 200
    agents = []
    specs = [("small", 180)] * 3 + [("big", 4096)] * 3
    for i, (tier, mem) in enumerate(specs):
        tok = api.post("/api/v1/enrollment-tokens", json={"tier": tier, "group": "lab"}).json()["token"]
        agents.append(
            subprocess.Popen(
                [
                    *EDGEFLEET,
                    "agent",
                    "--server",
                    url,
                    "--token",
                    tok,
                    "--data-dir",
                    str(tmp_path / f"agent{i}"),
                    "--port",
                    str(free_port()),
                    "--checkin-interval",
                    "0.5",
                    "--telemetry-interval",
                    "1",
                    "--memory-mb",
                    str(mem),
                ],
                env=env,
            )
        )
    try:

        def enrolled() -> list[dict[str, Any]] | None:
            d = api.get("/api/v1/devices").json()
            return d if len(d) == 6 else None

        devs = wait_for(enrolled, 60, "enrollment")
        ids = {d["device_id"]: d["tier"] for d in devs}
        pinned = next(i for i, t in ids.items() if t == "big")

        def rollout(version: str, **policy: Any) -> dict[str, Any]:
            body = {
                "model": "digits",
                "version": version,
                # a wave still waiting for its first commit at the bake deadline (a loaded host) waits for it, bounded
                "policy": {
                    "waves": [34, 100],
                    "bake_s": 10,
                    "max_sample_wait_s": 120,
                    "min_devices": 1,
                    "min_requests": 0,
                    **policy,
                },
            }
            rid = api.post("/api/v1/rollouts", json=body).json()["rollout_id"]
            return dict(
                wait_for(
                    lambda: (r := api.get(f"/api/v1/rollouts/{rid}").json())["state"] != "running" and r,
                    180,
                    f"rollout of {version}",
                )
            )

        r1 = rollout("1.0.0")
        assert r1["state"] == "completed", r1["reason"]
        assert [t["to"] for t in r1["transitions"]][-1] == "completed"
        wait_for(
            lambda: all(d["served"]["version"] == "1.0.0" for d in api.get("/api/v1/devices").json()),
            60,
            "every agent serving 1.0.0",
        )
        # pin one big device, then roll 2.0.0: it must stay on 1.0.0
        assert api.post(f"/api/v1/devices/{pinned}/pin", json={"version": "1.0.0"}).status_code == 200
        r2 = rollout("2.0.0")
        assert r2["state"] == "completed", r2["reason"]
        served = {d["device_id"]: d["served"]["version"] for d in api.get("/api/v1/devices").json()}
        assert served[pinned] == "1.0.0"
        # 3.0.0 holds a 150 MB initializer: the small tier's 180 MB limit kills its worker → rollback
        # a failure halts at once whatever the bake; the bake only has to outlast the canaries' 150 MB download and
        # health check on a loaded machine, or an inconclusive canary pauses before its evidence is in
        r3 = rollout("3.0.0", auto_rollback=True, bake_s=60)
        assert r3["state"] == "rolled_back", r3["reason"]
        audit = api.get("/api/v1/audit", params={"target": r3["rollout_id"]}).json()
        assert any(a["detail"].get("to_state") == "rolled_back" and a["detail"].get("reason") for a in audit)
        wait_for(
            lambda: all(d["served"]["version"] in ("2.0.0", "1.0.0") for d in api.get("/api/v1/devices").json()),
            120,
            "agents back on their previous version",
        )
        # 4.0.0 allows tier big only: small devices are never targeted
        r4 = rollout("4.0.0")
        assert r4["state"] == "completed", r4["reason"]
        moved = {x["device_id"] for x in r4["devices"]}
        assert moved and all(ids[i] == "big" for i in moved) and pinned not in moved
        print(json.dumps(api.get("/api/v1/fleet").json(), indent=1)[:2000])
    finally:
        for a in agents:
            a.terminate()
        for a in agents:
            a.wait(15)
