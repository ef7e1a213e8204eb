"""The agent on aarch64 for real: Debian's arm64 Python under qemu-user-static, edgefleet and its dependencies
installed from the aarch64 wheels PyPI ships (tests/_aarch64_support.py), enrolled with the control plane on this
host, updated by two real rollouts, serving OIP. The first run builds the arm64 root and downloads the wheels
(minutes); later runs reuse them (docs/install.md, "A Raspberry Pi (64-bit OS)")."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

import _aarch64_support as arm
from _fleet_support import Fleet, committed_version, make_packages, state_of, wait_for
from conftest import free_port, starts_processes

# qemu runs the interpreter 10-30x slower than the host: every wait is generous, and the first run also builds
# the root (mmdebstrap) and downloads the wheels.
pytestmark = [pytest.mark.slow, pytest.mark.process, pytest.mark.timeout(3600)]
STEP_S = 900.0


@pytest.fixture(scope="module")
@starts_processes
def arm64_root() -> Path:
    why = arm.why_not()
    if why:
        pytest.skip(why)
    return arm.prepare()


@pytest.fixture
@starts_processes
def fleet(tmp_path: Path, mlp_path: Path, digits: Any) -> Iterator[Fleet]:
    pkgs = make_packages(mlp_path, digits.x_test, tmp_path / "pkgs", ["1.0.0", "2.0.0"])
    f = Fleet(tmp_path / "cp")
    f.publish(*pkgs.values())
    # Slower loops than the other agent tests: each check-in costs an emulated device far more CPU.
    f.configure_group(checkin_interval_s=1.0, telemetry_interval_s=2.0)
    yield f
    f.close()


class Arm64Agent:
    """``edgefleet agent`` in the arm64 root; its data folder is ``host_dir / "dev"`` on this side."""

    def __init__(self, root: Path, host_dir: Path, server: str, token: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = host_dir / "dev"
        self.log = host_dir / "agent.log"
        host_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            f"{arm.VENV}/bin/edgefleet",
            "agent",
            "--server",
            server,
            "--token",
            token,
            "--data-dir",
            f"{arm.HOST_MOUNT}/dev",
            "--port",
            str(self.port),
        ]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                arm.chroot_argv(root, argv, host_dir), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def wait(self, pred: Any, what: str, timeout: float = STEP_S) -> Any:
        def ready() -> Any:
            if self.proc.poll() is not None:
                raise AssertionError(f"the arm64 agent exited with {self.proc.returncode} waiting for {what}:\n"
                                     f"{self.tail()}")  # fmt: skip
            return pred()

        try:
            return wait_for(ready, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- agent log ---\n{self.tail()}") from None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def _infer(url: str, x: np.ndarray) -> dict[str, np.ndarray]:
    body = {"inputs": [{"name": "X", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = httpx.post(f"{url}/v2/models/digits/infer", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}


def _served(url: str) -> str | None:
    try:
        r = httpx.get(f"{url}/v2/models/digits", timeout=30)
    except httpx.HTTPError:
        return None
    return str(r.json()["versions"][0]) if r.status_code == 200 else None


def test_an_aarch64_agent_enrolls_takes_two_rollouts_and_serves(
    arm64_root: Path, fleet: Fleet, tmp_path: Path, mlp_path: Path, digits: Any
) -> None:
    agent = Arm64Agent(arm64_root, tmp_path / "device", fleet.url, fleet.enrollment_token())
    try:
        agent.wait(fleet.device_ids, "enrollment")
        hardware = fleet.record()["hardware"]
        assert hardware["arch"] == "aarch64", hardware  # platform.machine() of the emulated interpreter

        for version in ("1.0.0", "2.0.0"):
            rid = fleet.rollout(version, probation_seconds=2, probation_requests=1000)
            agent.wait(lambda v=version: committed_version(agent.data_dir) == v, f"{version} committed")
            agent.wait(lambda v=version: any(k == "committed" and e == v for k, e, _ in fleet.events()), "report")
            mine = [k for k, v, _ in fleet.events() if v == version]
            # the staged package's golden vectors were reproduced on aarch64 before the switch
            for kind in ("verified", "health_check_passed", "switched", "committed"):
                assert kind in mine, (version, mine)
            assert state_of(agent.data_dir)["committed"]["rollout_id"] == rid
            assert agent.wait(lambda v=version: _served(agent.url) == v, f"{version} served")

        # Live OIP requests answer as onnxruntime does on the host (aarch64 kernels: equal up to rounding).
        x = digits.x_test[:8].astype(np.float32)
        got = _infer(agent.url, x)
        want_label, want_prob = ort.InferenceSession(str(mlp_path)).run(["label", "probabilities"], {"X": x})
        np.testing.assert_array_equal(got["label"], want_label)
        np.testing.assert_allclose(got["probabilities"], want_prob, rtol=1e-4, atol=1e-6)
        agent.wait(lambda: fleet.record()["served"]["version"] == "2.0.0", "2.0.0 reported as served")
    finally:
        agent.stop()
    assert agent.proc.returncode == 0, agent.tail()
