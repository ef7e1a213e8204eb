"""A device installs ``edgefleet`` without extras: the agent must run with no control-plane, tool or demo package.

Each process here (and every process it starts: the inference worker) runs with an import hook that refuses the
server-side and demo packages, as if they were not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import free_port
from edgefleet import examples

pytestmark = pytest.mark.process

# What `pip install edgefleet` (no extras) does not bring: the `server`, `tools`, `demo` and `s3` extras.
NOT_ON_A_DEVICE = (
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "jinja2",
    "cyclonedx",
    "sklearn",
    "skl2onnx",
    "boto3",  # the `s3` extra: a device reads a repository in a bucket over plain HTTP(S)
    "botocore",
)

_HOOK = f"""
import sys

_BLOCKED = {NOT_ON_A_DEVICE!r}


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not part of a device install)", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


@pytest.fixture(scope="module")
def device_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a device process: ``sitecustomize`` installs the hook in it and in its children."""
    site = tmp_path_factory.mktemp("slim-site")
    (site / "sitecustomize.py").write_text(_HOOK)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    return env


def _edgefleet() -> str:
    return str(Path(sys.executable).with_name("edgefleet"))


def test_the_hook_hides_the_server_packages(device_env: dict[str, str]) -> None:
    # Without this the other tests would prove nothing.
    r = subprocess.run(
        [sys.executable, "-c", "import fastapi"], env=device_env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "not part of a device install" in r.stderr, r.stderr


def test_agent_help_needs_no_server_package(device_env: dict[str, str]) -> None:
    r = subprocess.run([_edgefleet(), "agent", "--help"], env=device_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--server" in r.stdout and "--data-dir" in r.stdout


def test_a_server_command_on_a_device_install_names_the_extra_in_one_line(
    device_env: dict[str, str], tmp_path: Path
) -> None:
    # client commands (devices, rollout, ...) need only httpx; running the control plane needs the server extra
    db = f"sqlite:///{tmp_path / 'cp.db'}"
    r = subprocess.run(
        [_edgefleet(), "server", "--db", db, "--repo", str(tmp_path / "repo"), "--port", "8799"],
        env=device_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert "pip install 'edgefleet[server]'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_agents_modules_import_without_server_packages(device_env: dict[str, str]) -> None:
    # What `edgefleet agent` imports once it starts (enrollment, updates, package checks, the worker).
    modules = [
        "edgefleet.cli.main",
        "edgefleet.cli.agent",
        "edgefleet.agent.agent",
        "edgefleet.agent.loopfetch",
        "edgefleet.agent.workerproc",
        "edgefleet.agent.worker.packaged",
        "edgefleet.agent.worker.httpserve",
        "edgefleet.repository",
        "edgefleet.package",
        "edgefleet.runtime",
        "edgefleet.bench.env",
        "edgefleet.bench.tiers",
    ]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)"
    r = subprocess.run(
        [sys.executable, "-c", code, *modules], env=device_env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.fixture
def served(device_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    model = tmp_path / "digits.onnx"
    model.write_bytes(examples.train_digits_mlp(hidden=(16,)))
    port = free_port()
    proc = subprocess.Popen(
        [_edgefleet(), "serve", str(model), "--port", str(port)],
        env=device_env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            proc.kill()
            pytest.fail(f"edgefleet serve did not become ready: {proc.communicate(timeout=15)[1][-2000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(15)
        if proc.stderr is not None:
            proc.stderr.close()


def test_serve_answers_a_request_without_server_packages(served: str, digits: examples.Digits) -> None:
    x = digits.x_test[:2].astype(np.float32)
    body = {"inputs": [{"name": "X", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = httpx.post(f"{served}/v2/models/digits/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["label"]["shape"] == [2]
