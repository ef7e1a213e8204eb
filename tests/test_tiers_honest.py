"""Tiers labelled by the hardware they ran on: a bench or optimize run on a host that is not the tier's hardware is
``emulated`` wherever it is shown, the gate calls such p95 and compatibility evidence inconclusive unless the policy
allows emulation, the compatibility matrix never turns emulated evidence into ``verified``, enrollment refuses
hardware that contradicts the token's tier unless the agent declares it emulates it, and unknown tier names are
refused with the list of known ones."""

from __future__ import annotations

import json
import platform
import secrets
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from typer.testing import CliRunner

from _cp_support import CP, SimDevice, build_pkg
from conftest import starts_processes
from edgefleet import examples
from edgefleet.bench.env import fingerprint
from edgefleet.bench.report import BenchReport, load_report
from edgefleet.bench.tiers import (
    default_tiers,
    emulation_reason,
    get_tier,
    host_isa_features,
    known_tier,
    load_tiers,
    normalize_arch,
)
from edgefleet.cli.main import app
from edgefleet.controlplane.compat import add_evidence, cell_status
from edgefleet.data import save_calls
from edgefleet.errors import ConfigError, UsageError
from edgefleet.gate import evaluate, parse_policy
from edgefleet.protocol import Hardware

runner = CliRunner()
HOST = normalize_arch(platform.machine())
# A shipped tier of another architecture than this host's, and one this host is (where it is one).
FOREIGN = "arm-a72" if HOST == "x86_64" else "x86-avx2"
NATIVE = next(
    (n for n, t in default_tiers().items() if emulation_reason(t, HOST, host_isa_features()) is None and n != FOREIGN),
    None,
)


# ------------------------------------------------------------------------------------------------ pure decisions


def test_emulation_is_decided_by_architecture_and_isa() -> None:
    a72, vnni = get_tier("arm-a72"), get_tier("x86-vnni")
    assert emulation_reason(a72, "x86_64", ["sse4_2", "avx", "avx2"]) == "host is x86_64, tier arm-a72 is aarch64"
    # what a 64-bit Raspberry Pi 4 reports: arm64 is aarch64, and its kernel calls NEON "asimd"
    assert emulation_reason(a72, "arm64", ["asimd"]) is None
    assert emulation_reason(a72, "aarch64", []) == "host lacks neon of tier arm-a72"
    assert emulation_reason(vnni, "x86_64", ["sse4_2", "avx", "avx2", "fma"]) == (
        "host lacks avx512f, avx512_vnni, avx512_fp16 of tier x86-vnni"
    )
    # features unknown (an older agent): the architecture alone is judged
    assert emulation_reason(vnni, "AMD64", None) is None
    assert emulation_reason(vnni, "aarch64", None) is not None


def test_unknown_tier_names_list_the_known_ones(tmp_path: Path) -> None:
    known_tier("arm-a72")
    with pytest.raises(UsageError, match=r"unknown tier 'arm-a99'; known tiers: arm-a53-small, arm-a72, x86-avx2"):
        known_tier("arm-a99")
    extra = tmp_path / "fleet-tiers.yaml"
    extra.write_text("- {name: rpi4, arch: aarch64, cpu_threads: 4, memory_mb: 2048, runtime_version: '1.32.0'}\n")
    added = load_tiers(extra)
    known_tier("rpi4", extra=added)
    with pytest.raises(ConfigError, match=r"rpi4, x86-avx2, x86-vnni$"):
        known_tier("rpi5", extra=added)


def test_matrix_cells_verify_only_from_the_tiers_own_hardware() -> None:
    def dev(i: str, ok: bool, emulated: bool = False) -> dict[str, Any]:
        e = {"source": "device", "device_id": i, "event": "committed" if ok else "rolled_back", "ok": ok}
        return {**e, "emulated": True} if emulated else e

    emulated_bench = {"source": "bench", "result": "emulated"}
    assert cell_status([emulated_bench]) == "emulated"
    assert cell_status([{**emulated_bench, "ok": True}]) == "emulated"
    assert cell_status([dev("sim", True, emulated=True)]) == "emulated"
    assert cell_status([emulated_bench, dev("sim", True, emulated=True), dev("pi", True)]) == "verified"
    # what emulation shows to fail still counts
    assert cell_status([dev("a", False, emulated=True), dev("b", False, emulated=True)]) == "failed"
    assert cell_status([{"source": "bench", "result": "failed"}]) == "failed"
    # a run of emulated successes never pushes the one verification from real hardware out of the capped list
    ev: list[Any] = [dev("pi", True)]
    for i in range(30):
        ev = add_evidence(ev, dev(f"sim{i}", True, emulated=True), cap=5)
    assert len(ev) == 5 and ev[0]["device_id"] == "pi" and cell_status(ev) == "verified"


# ------------------------------------------------------------------------------------------------ bench and gate


@pytest.fixture(scope="module")
@starts_processes
def benched(mlp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[BenchReport, str]:
    out = tmp_path_factory.mktemp("honest") / "bench.json"
    tiers = [FOREIGN] + ([NATIVE] if NATIVE else [])
    args = ["bench", str(mlp_path), "-o", str(out), "--time-budget", "0.5", "--min-samples", "200"]
    res = runner.invoke(app, [*args, "--batch-sizes", "1", *(x for t in tiers for x in ("-t", t))])
    assert res.exit_code == 0, res.output
    return load_report(out), " ".join(res.output.split())


def test_bench_on_a_foreign_host_is_labelled_emulated(benched: tuple[BenchReport, str]) -> None:
    report, out = benched
    r = next(x for x in report.results if x.tier == FOREIGN)
    assert r.status == "ok" and r.emulated and r.compat.result == "emulated"
    assert r.emulated_because == f"host is {platform.machine()}, tier {FOREIGN} is {get_tier(FOREIGN).arch}"
    assert report.environment.arch == platform.machine() and report.environment.cpu_model
    assert report.environment.isa_features == host_isa_features()
    assert f"emulated on {platform.machine()}" in out and FOREIGN in out


def test_gate_calls_emulated_p95_and_compat_inconclusive(benched: tuple[BenchReport, str]) -> None:
    report, _ = benched
    policy: dict[str, Any] = {
        "tiers": [FOREIGN],
        "latency": {"p95_ms": {FOREIGN: 1000.0}, "min_samples": 50},
        "compatibility": {},
        "memory": {},
    }
    v = evaluate(parse_policy(policy), report)
    checks = {c.name: c for c in v.checks}
    for name in (f"latency.p95[{FOREIGN}]", f"compat[{FOREIGN}]"):
        assert checks[name].status == "inconclusive", checks[name]
        assert "emulated" in checks[name].reason and "allow_emulated" in checks[name].reason
    assert checks[f"memory.peak_rss[{FOREIGN}]"].status == "pass"
    assert v.status == "inconclusive" and not v.passed

    allowed = evaluate(parse_policy({**policy, "allow_emulated": True}), report)
    assert allowed.status == "pass", allowed.reason
    assert "emulated" in {c.name: c for c in allowed.checks}[f"compat[{FOREIGN}]"].reason


def test_gate_recomputes_emulation_a_report_does_not_state(benched: tuple[BenchReport, str]) -> None:
    """A report from before hosts were compared (or edited by hand) says ``verified``: the gate still sees the
    host is not the tier's."""
    report, _ = benched
    r = next(x for x in report.results if x.tier == FOREIGN)
    legacy = r.model_copy(
        update={
            "emulated": False,
            "emulated_because": None,
            "compat": r.compat.model_copy(update={"result": "verified"}),
        }
    )
    doctored = report.model_copy(update={"results": [legacy]})
    v = evaluate(
        parse_policy({"latency": {"p95_ms": {FOREIGN: 1000.0}, "min_samples": 50}, "compatibility": {}}), doctored
    )
    assert {c.status for c in v.checks} == {"inconclusive"}, v.checks


@pytest.mark.skipif(NATIVE is None, reason="no shipped tier matches this host's architecture and ISA")
def test_bench_on_the_tiers_own_hardware_stays_verified(benched: tuple[BenchReport, str]) -> None:
    report, _ = benched
    r = next(x for x in report.results if x.tier == NATIVE)
    assert r.status == "ok" and not r.emulated and r.emulated_because is None and r.compat.result == "verified"
    policy = {"tiers": [NATIVE], "latency": {"p95_ms": {NATIVE: 1000.0}, "min_samples": 50}, "compatibility": {}}
    v = evaluate(parse_policy(policy), report)
    assert v.status == "pass", v.reason
    assert "verified on onnxruntime" in {c.name: c for c in v.checks}[f"compat[{NATIVE}]"].reason


def test_unknown_tier_is_refused_by_bench_and_optimize(mlp_path: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["bench", str(mlp_path), "-t", "arm-a99"])
    assert isinstance(res.exception, UsageError) and "known tiers: arm-a53-small, arm-a72" in str(res.exception)
    calls = save_calls(tmp_path / "c.npz", {"X": examples.digits().x_test[:8, None, :]})
    args = ["optimize", str(mlp_path), "--calib", str(calls), "--eval", str(calls), "-o", str(tmp_path / "o.onnx")]
    res = runner.invoke(app, [*args, "--tier", "arm-a99"])
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "unknown tier 'arm-a99'; known tiers:" in lines[0], res.output


def test_optimize_report_records_the_host_and_emulation(
    mlp_path: Path, tmp_path: Path, digits: examples.Digits
) -> None:
    calib = save_calls(tmp_path / "calib.npz", {"X": digits.x_train[:16, None, :]})
    ev = save_calls(tmp_path / "eval.npz", {"X": digits.x_test[:24, None, :]})
    report = tmp_path / "r.json"
    args = ["optimize", str(mlp_path), "--calib", str(calib), "--eval", str(ev), "-o", str(tmp_path / "o.onnx")]
    res = runner.invoke(app, [*args, "--tier", FOREIGN, "--time-budget", "4", "--report", str(report)])
    assert res.exit_code == 0, res.output
    doc = json.loads(report.read_text())
    assert doc["tier"] == FOREIGN and doc["emulated"] is True and FOREIGN in doc["emulated_because"]
    host = doc["host"]
    assert host["arch"] == platform.machine() and host["cpu_count"] >= 1 and host["cpu_model"]
    assert host["isa_features"] == fingerprint().isa_features
    out = " ".join(res.output.split())
    assert f"tier {FOREIGN} is emulated on {platform.machine()}" in out and f"emulated on {platform.machine()}" in out


# ------------------------------------------------------------------------------------------------ enrollment


def _enroll(cp: CP, tier: str, **hardware: Any) -> Any:
    tok = cp.api("POST", "/api/v1/enrollment-tokens", json={"tier": tier})["token"]
    return tok, _enroll_with(cp, tok, **hardware)


def _enroll_with(cp: CP, token: str, **hardware: Any) -> Any:
    hw = {"arch": "x86_64", "cpu_count": 2, "memory_mb": 1024, **hardware}
    body = {
        "token": token,
        "hardware": hw,
        "runtime_version": "1.32.0",
        "agent_version": "0.1.0",
        "public_key": secrets.token_hex(32),
    }
    return cp.http.post("/api/v1/enroll", json=body)


def test_enrollment_refuses_hardware_that_contradicts_the_tier(cp: CP) -> None:
    tok, r = _enroll(cp, "arm-a72", isa_features=["sse4_2", "avx", "avx2"])
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert "\n" not in detail and "host is x86_64, tier arm-a72 is aarch64" in detail
    assert "--emulate-tier arm-a72" in detail
    # the refused token is not spent: an agent that says it emulates the tier enrolls with it, labelled so
    r = _enroll_with(cp, tok, emulates="arm-a72")
    assert r.status_code == 200, r.text
    dev = cp.api("GET", f"/api/v1/devices/{r.json()['device_id']}")
    assert dev["tier"] == "arm-a72" and dev["hardware"]["emulates"] == "arm-a72"
    assert dev["hardware"]["arch"] == "x86_64"

    _, r = _enroll(cp, "x86-avx2", emulates="arm-a72")
    assert r.status_code == 409 and "emulates tier arm-a72 but its token is for tier x86-avx2" in r.json()["detail"]
    _, r = _enroll(cp, "x86-vnni", isa_features=["sse4_2", "avx", "avx2", "fma"])
    assert r.status_code == 409 and "lacks avx512f" in r.json()["detail"]
    # the tier's own hardware, and an older agent that reports no features (the architecture decides)
    _, r = _enroll(cp, "arm-a72", arch="aarch64", isa_features=["asimd"], cpu_model="Cortex-A72")
    assert r.status_code == 200, r.text
    _, r = _enroll(cp, "x86-vnni")
    assert r.status_code == 200, r.text


def test_agent_reports_its_cpu_and_declared_emulation() -> None:
    from edgefleet.agent import Agent
    from edgefleet.config import AgentSettings

    def hardware(settings: AgentSettings) -> Hardware:
        # _hardware reads the settings only; a whole Agent would open its data folder and telemetry database
        return Agent._hardware(cast(Agent, SimpleNamespace(settings=settings)))

    hw = hardware(AgentSettings())
    assert hw.arch == platform.machine() and hw.cpu_count >= 1 and hw.emulates is None
    assert hw.cpu_model and hw.isa_features == (host_isa_features() or None)
    # what `edgefleet agent --emulate-tier` sets
    assert hardware(AgentSettings(tier=FOREIGN)).emulates == FOREIGN
    res = runner.invoke(app, ["agent", "--help"])
    assert res.exit_code == 0 and "--emulate-tier" in res.output


def test_emulated_devices_and_bench_never_verify_a_cell(cp: CP, mlp_path: Path, tmp_path: Path) -> None:
    cp.upload(build_pkg(mlp_path, tmp_path / "pkgs", "1.0.0"))

    def cell(tier: str) -> str:
        cells = cp.api("GET", "/api/v1/compat", params={"model": "digits"})
        return str(next(c["status"] for c in cells if c["tier"] == tier and c["version"] == "1.0.0"))

    def commit(r: Any) -> None:
        assert r.status_code == 200, r.text
        d = SimDevice(cp, r.json()["device_id"], r.json()["credential"])
        cp.api("POST", f"/api/v1/devices/{d.id}/pin", json={"model": "digits", "version": "1.0.0"})
        d.report(model="digits", version="1.0.0", events=[("committed", None)])

    commit(_enroll(cp, "arm-a72", emulates="arm-a72")[1])
    assert cell("arm-a72") == "emulated"
    commit(_enroll(cp, "arm-a72", arch="aarch64", isa_features=["asimd"])[1])
    assert cell("arm-a72") == "verified"

    sha = cp.api("GET", "/api/v1/models/digits/versions/1.0.0")["model_sha256"]
    entry = {"tier": "arm-a53-small", "runtime_version": "1.32.0", "model_sha256": sha, "result": "emulated"}
    cp.api("PUT", "/api/v1/models/digits/versions/1.0.0/bench", json={"compat": [entry]})
    assert cell("arm-a53-small") == "emulated"
