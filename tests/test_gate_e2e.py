"""End to end through the real CLI and examples/ci/pipeline.sh: bench (real subprocesses) → package → gate →
publish. A model ≥ 5x slower than its baseline fails the gate and is not published; an A/A pair passes and is.
Margins are large (the regression threshold is 25 %, the slow model is several times slower), so this is not a
timing test."""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from edgefleet.bench.synthetic import add_work

ROOT = Path(__file__).resolve().parents[1]
EDGEFLEET = ROOT / ".venv" / "bin" / "edgefleet"
POLICY = """\
tiers: [x86-avx2]
latency: {p95_ms: {x86-avx2: 1000}}
regression: {max_slowdown: 0.25}
memory: {}
cold_start: {max_ms: 60000}
size: {max_model_mb: 50}
compatibility: {}
package: {}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path) -> Path:
    w = tmp_path_factory.mktemp("pipeline")
    (w / "policy.yaml").write_text(POLICY)
    (w / "slow.onnx").write_bytes(add_work(mlp_path.read_bytes(), matmuls=24))
    (w / "same.onnx").write_bytes(mlp_path.read_bytes())
    return w


def _pipeline(work: Path, candidate: Path, baseline: Path, name: str) -> subprocess.CompletedProcess[str]:
    if not EDGEFLEET.exists():
        pytest.skip(f"{EDGEFLEET} is not installed (make test builds .venv)")
    env = {
        **os.environ,
        "MODEL": str(candidate),
        "BASELINE": str(baseline),
        "POLICY": str(work / "policy.yaml"),
        "REPO": str(work / "repo"),
        "NAME": name,
        "WORK": str(work / name),
        "EDGEFLEET": str(EDGEFLEET),
        # optimize is exercised by its own tests; here the candidate must keep its known speed.
        "EDGEFLEET_SKIP_OPTIMIZE": "1",
        "BENCH_ARGS": "--time-budget 1 --paired-time-budget 2 --min-samples 200 --batch-sizes 1",
    }
    return subprocess.run(
        ["sh", str(ROOT / "examples" / "ci" / "pipeline.sh")], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.process
def test_slower_model_fails_the_gate_and_aa_passes(work: Path, mlp_path: Path) -> None:
    slow = _pipeline(work, work / "slow.onnx", mlp_path, "slow")
    assert slow.returncode == 1, slow.stdout + slow.stderr
    assert "not publishing" in slow.stderr
    bench = json.loads((work / "slow" / "bench.json").read_text())
    cmp = bench["results"][0]["comparison"]
    assert cmp["verdict"] == "slower" and cmp["median_ratio"] > 2, cmp
    junit = ET.parse(work / "slow" / "gate.xml").getroot()
    failed = [c.attrib["name"] for c in junit.iter("testcase") if c.find("failure") is not None]
    assert failed == ["regression[x86-avx2]"]
    assert not (work / "repo" / "targets").exists() or not any((work / "repo" / "targets").glob("*slow*"))

    same = _pipeline(work, work / "same.onnx", mlp_path, "same")
    assert same.returncode == 0, same.stdout + same.stderr
    assert any((work / "repo" / "targets").glob("*same-0.1.0.efpkg"))
    junit = ET.parse(work / "same" / "gate.xml").getroot()
    names = [c.attrib["name"] for c in junit.iter("testcase")]
    assert "regression[x86-avx2]" in names and "package.golden" in names and "compat[x86-avx2]" in names
    assert all(c.find("failure") is None for c in junit.iter("testcase"))

    # The same verdict as JSON, and usage errors exit 2 with the field named.
    gate = [str(EDGEFLEET), "gate", "--policy", str(work / "policy.yaml"), "--bench", str(work / "same" / "bench.json")]
    res = subprocess.run([*gate, "--json"], capture_output=True, text=True)
    verdict = json.loads(res.stdout)
    assert verdict["status"] == "fail" and "package.valid" in verdict["reason"]  # the policy wants --package
    assert all(c["reason"] for c in verdict["checks"])
    (work / "bad.yaml").write_text("latency: {p95_ms: {x86-avx2: fast}}\n")
    res = subprocess.run([*gate[:2], "--policy", str(work / "bad.yaml"), *gate[4:]], capture_output=True, text=True)
    assert res.returncode == 2 and "latency.p95_ms.x86-avx2" in res.stderr and "Traceback" not in res.stderr


def test_github_actions_template_gates_before_publishing() -> None:
    import yaml

    # The workflow runs the pipeline script (which tests/test_tutorial.py runs for real, failing gate included); the
    # script gates, and stops on a failed gate, before anything is published.
    wf = yaml.safe_load((ROOT / "examples" / "ci" / "github-actions.yml").read_text())
    runs = [str(s.get("run", "")) for s in wf["jobs"]["release"]["steps"]]
    assert any("examples/ci/pipeline.sh" in r for r in runs)
    script = (ROOT / "examples" / "ci" / "pipeline.sh").read_text()
    lines = [ln.strip() for ln in script.splitlines() if not ln.strip().startswith("#")]
    first = {cmd: next(i for i, ln in enumerate(lines) if f"$EF {cmd}" in ln) for cmd in ("bench", "package", "gate")}
    publish = next(i for i, ln in enumerate(lines) if "$EF publish" in ln or "$EF repo" in ln)
    assert first["bench"] < first["package"] < first["gate"] < publish
    gate = lines[first["gate"]]
    assert "--package" in gate or "--package" in lines[first["gate"] + 1]
