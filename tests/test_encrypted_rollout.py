"""An encrypted model rolled out to a device group, with REAL processes: `edgefleet server`, three `edgefleet agent`s
(each serving through its own inference worker), and `edgefleet package --encrypt-for-group`, which takes the
group's keys from the control plane. The group's devices decrypt and serve the model (their answers are the plain
model's); the device outside the group refuses it, says why through the API, and keeps serving its old model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from _cp_support import build_pkg, gate_verdict
from conftest import free_port, starts_processes
from edgefleet import examples
from edgefleet.package import open_package
from edgefleet.sim import ServerProcess

EDGEFLEET = str(Path(sys.executable).with_name("edgefleet"))
# short loops and probation, so a wave's devices commit well within its bake
CONFIG = {"checkin_interval_s": 0.5, "telemetry_interval_s": 1, "probation_seconds": 1.5, "probation_requests": 20}


def _wait(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        last = pred()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last}")


@pytest.fixture
@starts_processes
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(tmp_path / "server", reconcile_interval_s=0.5)
    s.start()
    yield s
    s.stop()


class Agent:
    def __init__(self, url: str, token: str, data_dir: Path) -> None:
        self.data_dir, self.port = data_dir, free_port()
        self.proc = subprocess.Popen(
            [
                EDGEFLEET,
                "agent",
                "--server",
                url,
                "--token",
                token,
                "--data-dir",
                str(data_dir),
                "--port",
                str(self.port),
                "--checkin-interval",
                "0.5",
                "--telemetry-interval",
                "1",
            ],
            stdin=subprocess.DEVNULL,
        )

    def device_id(self) -> str | None:
        p = self.data_dir / "identity.json"
        return str(json.loads(p.read_text())["device_id"]) if p.exists() else None

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        body = {"inputs": [{"name": "X", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        r = httpx.post(f"http://127.0.0.1:{self.port}/v2/models/digits/infer", json=body, timeout=30)
        assert r.status_code == 200, r.text
        return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}

    def version(self) -> str | None:
        try:
            r = httpx.get(f"http://127.0.0.1:{self.port}/v2/models/digits", timeout=5)
        except httpx.HTTPError:
            return None
        return str(r.json()["versions"][0]) if r.status_code == 200 else None

    def reap(self) -> None:
        """Wait for the terminated agent (killed after 15 s)."""
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.timeout(600)
def test_a_model_encrypted_for_a_group_serves_there_and_is_refused_elsewhere(
    server: ServerProcess, tmp_path: Path, mlp_path: Path, digits: examples.Digits
) -> None:
    api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"}, timeout=60)

    def call(method: str, path: str, **kw: Any) -> Any:
        r = api.request(method, path, **kw)
        assert r.status_code < 400, (method, path, r.status_code, r.text)
        return r.json()

    def release(pkg: Path) -> str:
        up = call(
            "POST", "/api/v1/packages", content=pkg.read_bytes(), headers={"Content-Type": "application/octet-stream"}
        )
        # as a release pipeline does: a passing gate verdict for this very package admits it (the release policy)
        call(
            "PUT",
            f"/api/v1/models/digits/versions/{up['version']}/gate",
            params={"package_sha256": up["package_sha256"]},
            json=gate_verdict(),
        )
        return str(up["version"])

    def rollout(version: str) -> dict[str, Any]:
        # the device outside the group refuses the encrypted version: that failure is expected, not a reason to halt;
        # the bake only has to outlast the updates on a loaded machine (an inconclusive wave pauses at its deadline)
        policy = {
            "waves": [100],
            "bake_s": 40,
            "max_sample_wait_s": 120,
            "min_devices": 2,
            "min_requests": 0,
            "max_failure": 1.0,
        }
        rid = call("POST", "/api/v1/rollouts", json={"model": "digits", "version": version, "policy": policy})[
            "rollout_id"
        ]
        return dict(
            _wait(
                lambda: (r := call("GET", f"/api/v1/rollouts/{rid}"))["state"] not in ("running", "draft") and r,
                240,
                f"the rollout of {version} to end",
            )
        )

    def device(device_id: str) -> dict[str, Any]:
        return dict(call("GET", f"/api/v1/devices/{device_id}"))

    # every device serves a plain 1.0.0 first: pinned by its group, which needs no rollout
    assert release(build_pkg(mlp_path, tmp_path / "pkgs", "1.0.0")) == "1.0.0"
    pin = {"config": CONFIG, "pinned_model": "digits", "pinned_version": "1.0.0"}
    for g in ("enc", "other"):
        call("PUT", f"/api/v1/groups/{g}", json=pin)
    agents: dict[str, Agent] = {}
    try:
        for name, group in (("a", "enc"), ("b", "enc"), ("outside", "other")):
            tok = call("POST", "/api/v1/enrollment-tokens", json={"tier": "lab", "group": group})["token"]
            agents[name] = Agent(server.url, tok, tmp_path / f"agent-{name}")
        ids = {n: _wait(a.device_id, 120, f"agent {n} to enroll") for n, a in agents.items()}

        for n, a in agents.items():

            def serves_v1(a: Agent = a) -> bool:
                return a.version() == "1.0.0"

            _wait(serves_v1, 120, f"agent {n} to serve 1.0.0")
        for g in ("enc", "other"):  # unpinned: rollouts move them again
            call("PUT", f"/api/v1/groups/{g}", json={"unpin": True})

        # 2.0.0 encrypted for group enc, with the keys the control plane holds
        enc = tmp_path / "pkgs" / "digits-2.0.0.efpkg"
        cli = subprocess.run(
            [
                EDGEFLEET,
                "package",
                str(mlp_path),
                "-o",
                str(enc),
                "--name",
                "digits",
                "--version",
                "2.0.0",
                "--encrypt-for-group",
                "enc",
                "--server",
                server.url,
                "--api-token",
                server.admin_token,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert cli.returncode == 0, cli.stderr
        assert "encrypted for 2 device(s) of group enc" in cli.stdout, cli.stdout
        info = open_package(enc).manifest.encryption
        assert info is not None and len(info.recipients) == 2
        assert release(enc) == "2.0.0"
        r2 = rollout("2.0.0")
        assert r2["state"] == "completed", r2["reason"]
        assert {d["device_id"] for d in r2["devices"]} == set(ids.values())  # the outside device was targeted too

        x = digits.x_test[:8].astype(np.float32)
        plain = dict(
            zip(
                ["label", "probabilities"],
                ort.InferenceSession(str(mlp_path)).run(["label", "probabilities"], {"X": x}),
                strict=True,
            )
        )
        for n in ("a", "b"):

            def reports_v2(n: str = n) -> bool:
                return bool(device(ids[n])["served"]["version"] == "2.0.0")

            _wait(reports_v2, 120, f"device {n} to report 2.0.0")
            assert agents[n].version() == "2.0.0"
            got = agents[n].infer(x)
            np.testing.assert_array_equal(got["label"], plain["label"])
            np.testing.assert_allclose(got["probabilities"], plain["probabilities"], rtol=1e-5, atol=1e-6)

        out = _wait(
            lambda: (d := device(ids["outside"]))["state"] == "rolled_back" and d,
            120,
            "the outside device to report its refusal",
        )
        assert "not for this device's key" in (out["state_reason"] or ""), out["state_reason"]
        assert out["served"]["version"] == "1.0.0"
        assert agents["outside"].version() == "1.0.0"
        np.testing.assert_array_equal(agents["outside"].infer(x)["label"], plain["label"])
    finally:
        for a in agents.values():  # all at once, then each waited for
            if a.proc.poll() is None:
                a.proc.terminate()
        for a in agents.values():
            a.reap()
        api.close()
