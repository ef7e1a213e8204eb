"""The README tutorial and the CI template run as written: examples/ci/pipeline.sh releases a small model to a real
control plane with its gate verdict bound to the package (and publishes nothing when the gate fails), and every
`edgefleet …` command in the tutorial's shell blocks names a command and flags the CLI has."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer

from conftest import starts_processes
from edgefleet.sim.server import ServerProcess, edgefleet_command

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "examples" / "ci" / "pipeline.sh"
FAST_BENCH = "--time-budget 1 --paired-time-budget 2 --min-samples 200 --batch-sizes 1"
PASSING = """\
tiers: [x86-avx2]
latency: {p95_ms: {x86-avx2: 50}}
regression: {max_slowdown: 0.5}
cold_start: {max_ms: 60000}
compatibility: {}
package: {}
allow_inconclusive: true
allow_emulated: true  # a host without AVX2 benches the tier emulated
"""
FAILING = "tiers: [x86-avx2]\nlatency: {p95_ms: {x86-avx2: 0.0001}}\n"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgefleet.data import save_calls
    from edgefleet.examples import digits, train_digits_mlp

    d = digits()
    work = tmp_path_factory.mktemp("tutorial")
    (work / "model.onnx").write_bytes(train_digits_mlp((16,), seed=0))
    save_calls(work / "calib.npz", {"X": d.x_train[:100, None, :]})
    save_calls(work / "eval.npz", {"X": d.x_test[:100, None, :]}, labels=d.y_test[:100])
    (work / "pass.yaml").write_text(PASSING)
    (work / "fail.yaml").write_text(FAILING)
    return work


@pytest.fixture(scope="module")
@starts_processes
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("server"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _pipeline(inputs: Path, server: ServerProcess, policy: str, version: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.update(
        MODEL=str(inputs / "model.onnx"),
        POLICY=str(inputs / policy),
        EVAL=str(inputs / "eval.npz"),
        CALIB=str(inputs / "calib.npz"),
        EDGEFLEET_SKIP_OPTIMIZE="1",
        NAME="digits",
        VERSION=version,
        WORK=str(inputs / f"ci-{version}"),
        BENCH_ARGS=FAST_BENCH,
        EDGEFLEET=" ".join(edgefleet_command()),
        EDGEFLEET_SERVER=server.url,
        EDGEFLEET_API_TOKEN=server.admin_token,
    )
    return subprocess.run(
        ["sh", str(PIPELINE)], env=env, cwd=inputs, capture_output=True, text=True, timeout=180, check=False
    )


def _version(server: ServerProcess, version: str) -> httpx.Response:
    return httpx.get(
        f"{server.url}/api/v1/models/digits/versions/{version}",
        headers={"Authorization": f"Bearer {server.admin_token}"},
        timeout=10,
    )


@pytest.mark.process
def test_pipeline_publishes_with_a_bound_passing_verdict(inputs: Path, server: ServerProcess) -> None:
    r = _pipeline(inputs, server, "pass.yaml", "1.0.0")
    assert r.returncode == 0, r.stdout + r.stderr
    pkg = inputs / "ci-1.0.0" / "digits-1.0.0.efpkg"
    sha = hashlib.sha256(pkg.read_bytes()).hexdigest()
    resp = _version(server, "1.0.0")
    assert resp.status_code == 200, resp.text
    v = resp.json()
    assert v["package_sha256"] == sha
    release = v["release"]
    assert release["allowed"], release["refusal"]
    assert release["gate_matches_package"]
    assert release["gate_bound"]["passed"] is True
    assert release["gate_bound"]["package_sha256"] == sha
    assert v["requirements"]["tiers"] == ["x86-avx2"]  # package --tier from TIERS


@pytest.mark.process
def test_pipeline_stops_on_a_failing_gate(inputs: Path, server: ServerProcess) -> None:
    r = _pipeline(inputs, server, "fail.yaml", "1.0.1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "not publishing" in r.stderr
    assert '"passed": false' in (inputs / "ci-1.0.1" / "gate.json").read_text()
    assert _version(server, "1.0.1").status_code == 404


# --- the README tutorial's commands parse -------------------------------------------------------------------------


def _tutorial_commands() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A real model in 15 minutes", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#\s.*$", "", line).strip()  # a trailing comment
            if line.startswith("edgefleet "):
                commands.append(shlex.split(line)[1:])
    return commands


# typer's click command objects (typer may vendor its own click): a group is what has ``commands``
def _resolve(root: Any, argv: list[str]) -> tuple[Any, list[str], list[str]]:
    cmd, path, rest = root, [], list(argv)
    while hasattr(cmd, "commands") and rest and rest[0] in cmd.commands:
        path.append(rest[0])
        cmd = cmd.commands[rest.pop(0)]
    return cmd, path, rest


def _options(cmd: Any) -> set[str]:
    opts = {"--help", "-h"}
    for p in cmd.params:
        opts.update(p.opts)
        opts.update(p.secondary_opts)
    return opts


@pytest.fixture(scope="module")
def cli() -> Any:
    from edgefleet.cli.main import app

    return typer.main.get_command(app)


def test_tutorial_commands_exist_with_their_flags(cli: Any) -> None:
    commands = _tutorial_commands()
    assert len(commands) >= 10, commands  # the extraction found the tutorial
    named = {tuple(_resolve(cli, argv)[1]) for argv in commands}
    for needed in [("optimize",), ("bench",), ("package",), ("gate",), ("publish",), ("agent",), ("rollout", "start")]:
        assert needed in named, f"the tutorial has no `edgefleet {' '.join(needed)}` step"
    for argv in commands:
        cmd, path, rest = _resolve(cli, argv)
        assert path and not hasattr(cmd, "commands"), f"`edgefleet {' '.join(argv)}`: no such command"
        flags = {a.split("=", 1)[0] for a in rest if a.startswith("-") and a != "-"}
        unknown = flags - _options(cmd)
        assert not unknown, f"`edgefleet {' '.join(path)}` has no {sorted(unknown)}"


def test_tutorial_tiers_match_the_example_policy() -> None:
    import yaml

    policy: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "policy.yaml").read_text())
    for argv in _tutorial_commands():
        tiers = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--tier"]
        assert set(tiers) <= set(policy["tiers"]), f"`edgefleet {' '.join(argv)}`: tier not in examples/policy.yaml"


def test_github_workflow_runs_the_pipeline_with_its_documented_inputs() -> None:
    import yaml

    workflow: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "ci" / "github-actions.yml").read_text())
    job = workflow["jobs"]["release"]
    runs = "\n".join(str(step.get("run", "")) for step in job["steps"])
    assert "examples/ci/pipeline.sh" in runs
    assert "pip install edgefleet" not in runs  # not on PyPI: installed from source
    header = PIPELINE.read_text().split("\nset -eu", 1)[0]
    for name in job["env"]:
        assert re.search(rf"\b{name}\b", header), f"the workflow sets {name}, which pipeline.sh does not document"
    secrets = {m for v in job["env"].values() for m in re.findall(r"secrets\.(\w+)", str(v))}
    assert secrets == {"EDGEFLEET_SERVER", "EDGEFLEET_API_TOKEN"}
