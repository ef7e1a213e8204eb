"""Pure tests of the gate's checks and verdicts on synthetic bench reports (no models, no timing)."""

from __future__ import annotations

from typing import Any

import pytest

from edgefleet.bench.env import fingerprint
from edgefleet.bench.report import (
    BenchReport,
    BenchSettings,
    Comparison,
    CompatEntry,
    LatencyQuantile,
    LatencyStats,
    ModelResult,
)
from edgefleet.bench.tiers import get_tier
from edgefleet.gate import PackageFacts, Verdict, decide, evaluate, parse_policy
from edgefleet.gate.checks import CheckResult, max_opset

SHA = "a" * 64
# An x86-avx2 host wherever the tests run: the gate labels results emulated by the report's host, and these
# synthetic results are meant as measured on their tier.
ENV = fingerprint().model_copy(update={"arch": "x86_64", "isa_features": ["sse4_2", "avx", "avx2", "fma"]})


def _latency(p95: float, lo: float | None, hi: float | None, n: int = 2000) -> LatencyStats:
    qs = [
        LatencyQuantile(
            q=0.5, value_ms=p95 / 2, ci_low_ms=p95 / 2.1, ci_high_ms=p95 / 1.9, n=n, relative_half_width=0.05
        ),
        LatencyQuantile(q=0.95, value_ms=p95, ci_low_ms=lo, ci_high_ms=hi, n=n, relative_half_width=None),
    ]
    return LatencyStats(
        n=n, mean_ms=p95 / 2, quantiles=qs, stopped_by="precision", target_relative_half_width=0.02, duration_s=1
    )


def _cmp(ratio: float | None, lo: float | None, hi: float | None, n: int = 500) -> Comparison:
    verdict = "inconclusive" if ratio is None else "same"
    return Comparison(
        baseline="base.onnx",
        baseline_sha256=SHA,
        n_pairs=n,
        median_ratio=ratio,
        ci_low=lo,
        ci_high=hi,
        confidence=0.95,
        slower_threshold=0.05,
        faster_threshold=0.03,
        verdict=verdict,
        reason="synthetic" if ratio is not None else f"{n} pairs < minimum 30",
        stopped_by="precision",
    )


def _result(tier: str = "x86-avx2", **kw: Any) -> ModelResult:
    fields: dict[str, Any] = {
        "model": "cand.onnx",
        "model_sha256": SHA,
        "model_size_bytes": 2_000_000,
        "opset": {"": 17},
        "tier": tier,
        "tier_profile": kw.pop("tier_profile", None) or get_tier(tier),
        "status": "ok",
        "inputs": "generated",
        "cold_start_ms": 12.0,
        "baseline_rss_mb": 60.0,
        "peak_rss_mb": 90.0,
        "latency": _latency(1.0, 0.98, 1.02),
        "comparison": _cmp(1.0, 0.99, 1.01),
        "compat": CompatEntry(tier=tier, runtime_version="1.32.0", model_sha256=SHA, result="verified"),
    }
    fields.update(kw)
    return ModelResult(**fields)


def _report(*results: ModelResult) -> BenchReport:
    return BenchReport(environment=ENV, settings=BenchSettings(), results=list(results))


def _by_name(checks: list[CheckResult]) -> dict[str, CheckResult]:
    return {c.name: c for c in checks}


def _verdict(
    policy: dict[str, Any], *results: ModelResult, opt: dict[str, Any] | None = None, pkg: PackageFacts | None = None
) -> Verdict:
    return evaluate(parse_policy(policy), _report(*results), opt, pkg)


def test_everything_within_limits_passes() -> None:
    policy = {
        "tiers": ["x86-avx2"],
        "latency": {"p95_ms": {"x86-avx2": 2.0}},
        "regression": {},
        "memory": {},
        "cold_start": {"max_ms": 100},
        "size": {"max_model_mb": 5},
        "compatibility": {},
    }
    v = _verdict(policy, _result())
    assert v.status == "pass" and v.passed, v.reason
    assert [c.name for c in v.checks] == [
        "latency.p95[x86-avx2]",
        "regression[x86-avx2]",
        "memory.peak_rss[x86-avx2]",
        "cold_start[x86-avx2]",
        "size.model",
        "compat[x86-avx2]",
    ]
    assert all(c.reason for c in v.checks)


@pytest.mark.parametrize(
    ("lat", "status"),
    [
        (_latency(1.0, 0.98, 1.02), "pass"),
        (_latency(3.0, 2.9, 3.1), "fail"),
        (_latency(2.0, 1.9, 2.1), "inconclusive"),  # the CI straddles the 2 ms budget
        (_latency(1.0, 0.98, 1.02, n=50), "inconclusive"),  # too few samples
        (_latency(1.0, None, None), "inconclusive"),  # no interval
    ],
)
def test_p95_budget(lat: LatencyStats, status: str) -> None:
    v = _verdict({"latency": {"p95_ms": {"x86-avx2": 2.0}}}, _result(latency=lat))
    assert v.checks[0].status == status, v.checks[0].reason


def test_regression_uses_the_practical_threshold() -> None:
    policy = {"regression": {"max_slowdown": 0.05}}
    assert _verdict(policy, _result(comparison=_cmp(1.30, 1.27, 1.33))).status == "fail"
    assert _verdict(policy, _result(comparison=_cmp(1.04, 1.03, 1.05))).status == "pass"  # real but small
    assert _verdict({"regression": {"max_slowdown": 0.02}}, _result(comparison=_cmp(1.04, 1.03, 1.05))).status == "fail"
    assert _verdict(policy, _result(comparison=_cmp(None, None, None, n=10))).status == "inconclusive"
    v = _verdict(policy, _result(comparison=None))
    assert v.status == "inconclusive" and "--baseline" in v.checks[0].reason


def test_inconclusive_fails_unless_allowed() -> None:
    checks = [
        CheckResult(name="a", status="pass", reason="ok"),
        CheckResult(name="b", status="inconclusive", reason="?"),
    ]
    assert not decide(checks).passed
    assert decide(checks, allow_inconclusive=True).passed
    assert decide(checks, allow_inconclusive=True).status == "inconclusive"
    assert not decide([*checks, CheckResult(name="c", status="fail", reason="x")], allow_inconclusive=True).passed
    assert not decide([]).passed  # a policy that checks nothing does not pass anything


def test_memory_uses_the_tier_budget_and_failed_bench_results() -> None:
    assert _verdict({"memory": {}}, _result(peak_rss_mb=3000.0)).status == "fail"  # tier has 2048 MB
    assert _verdict({"memory": {"max_peak_rss_mb": 80}}, _result(peak_rss_mb=90.0)).status == "fail"
    failed = _result(
        tier="arm-a53-small",
        status="failed",
        error="peak RSS 300 MB exceeds tier memory 256 MB",
        peak_rss_mb=300.0,
        latency=None,
        cold_start_ms=None,
        compat=CompatEntry(tier="arm-a53-small", runtime_version="1.32.0", model_sha256=SHA, result="failed"),
    )
    v = _verdict(
        {"memory": {}, "latency": {"p95_ms": {"arm-a53-small": 5}}, "cold_start": {"max_ms": 10}, "compatibility": {}},
        failed,
    )
    assert v.status == "fail"
    assert all(c.status == "fail" for c in v.checks)
    assert "exceeds tier memory" in _by_name(v.checks)["latency.p95[arm-a53-small]"].reason


def test_missing_tier_result_fails() -> None:
    v = _verdict({"tiers": ["x86-avx2", "arm-a72"], "memory": {}}, _result())
    checks = _by_name(v.checks)
    assert checks["memory.peak_rss[x86-avx2]"].status == "pass"
    assert checks["memory.peak_rss[arm-a72]"].status == "fail"
    assert "--tier arm-a72" in checks["memory.peak_rss[arm-a72]"].reason


def test_compat_checks_opset_against_each_tier_runtime(tmp_path: Any) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("name: old-ort\narch: aarch64\ncpu_threads: 1\nmemory_mb: 512\nruntime_version: '1.16.0'\n")
    r = _result(tier="old-ort", tier_profile=get_tier(old), opset={"": 21})
    v = evaluate(parse_policy({"tiers": [str(old)], "compatibility": {}}), _report(r))
    assert v.status == "fail" and "opset 21 exceeds the 19" in v.checks[0].reason
    assert max_opset("1.32.0") >= 21 and max_opset("1.17.3") == 20


def test_accuracy_overall_and_hidden_slice_regression() -> None:
    policy = {"accuracy": {"max_drop": 0.01, "max_slice_drop": 0.03}}
    base = {"metric": "top1", "overall": 0.97, "per_slice": {"0": 0.99, "1": 0.95, "7": 0.97}}
    ok = {"metric": "top1", "overall": 0.965, "per_slice": {"0": 0.99, "1": 0.94, "7": 0.965}}
    hidden = {"metric": "top1", "overall": 0.962, "per_slice": {"0": 1.0, "1": 0.99, "7": 0.90}}
    v = _verdict(policy, _result(), opt={"baseline_metrics": base, "chosen": {"metrics": ok}})
    assert v.status == "pass", v.reason
    v = _verdict(policy, _result(), opt={"baseline_metrics": base, "chosen": {"metrics": hidden}})
    checks = _by_name(v.checks)
    assert checks["accuracy.drop"].status == "pass"  # the average barely moved ...
    assert checks["accuracy.worst_slice"].status == "fail"  # ... but slice 7 lost 7 points
    assert "'7'" in checks["accuracy.worst_slice"].reason
    v = _verdict(policy, _result())
    assert [c.status for c in v.checks] == ["inconclusive", "inconclusive"]
    v = _verdict(
        policy, _result(), opt={"baseline_metrics": {"overall": 0.9}, "chosen": {"metrics": {"overall": 0.85}}}
    )
    assert _by_name(v.checks)["accuracy.drop"].status == "fail"
    assert _by_name(v.checks)["accuracy.worst_slice"].status == "inconclusive"


def test_package_checks() -> None:
    policy = {"package": {}, "size": {"max_package_mb": 1}, "compatibility": {}}
    good = PackageFacts(
        path="p.efpkg",
        size_bytes=500_000,
        model_sha256=SHA,
        golden_checked=True,
        bom={"bomFormat": "CycloneDX", "specVersion": "1.6", "components": [{"name": "m"}]},
        requirement_reasons={"x86-avx2": []},
    )
    v = _verdict(policy, _result(), pkg=good)
    assert v.status == "pass", v.reason
    bad = PackageFacts(
        path="p.efpkg",
        size_bytes=5_000_000,
        model_sha256=SHA,
        golden_checked=True,
        golden_error="output 'label' differs",
        bom={},
        requirement_reasons={"x86-avx2": ["tier x86-avx2 is not among the package's tiers arm-a72"]},
    )
    checks = _by_name(_verdict(policy, _result(), pkg=bad).checks)
    assert {n: c.status for n, c in checks.items()} == {
        "size.package": "fail",
        "compat[x86-avx2]": "fail",
        "package.valid": "pass",
        "package.golden": "fail",
        "package.bom": "fail",
    }
    broken = PackageFacts(path="p.efpkg", size_bytes=10, open_error="p.efpkg is not a valid .efpkg")
    assert _verdict({"package": {}}, _result(), pkg=broken).checks[0].status == "fail"
    assert _verdict({"package": {}}, _result()).checks[0].status == "fail"  # no --package
    other = PackageFacts(path="p.efpkg", size_bytes=10, model_sha256="b" * 64, bom={})
    v = _verdict({"memory": {}}, _result(), pkg=other)
    assert v.checks[0].name == "bench.package_model" and v.checks[0].status == "fail"


def test_opset_table_matches_the_installed_onnxruntime() -> None:
    # The highest default-domain opset among the installed onnxruntime's CPU kernels is what it implements; the
    # table's row for that release must say the same (bumping the pin without the table fails here).
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state as C

    top = max(k.version_range[0] for k in C.get_all_opkernel_def() if k.domain in ("", "ai.onnx"))
    assert max_opset(ort.__version__) == top


def _tier_with(**runtimes: str) -> Any:
    return get_tier("x86-avx2").model_copy(update={"runtimes": {"onnxruntime": "1.32.0", **runtimes}})


@pytest.mark.parametrize(
    ("runtime", "version", "opset", "tier_runtimes", "status", "words"),
    [
        # the tier's profile lists the runtime the bench ran: judged on it, and named in the reason
        ("litert", "2.3.0", {}, {"litert": "2.3.0"}, "pass", "verified on litert 2.3.0; the tier has litert 2.3.0"),
        ("openvino", "2026.4.1", {"": 17}, {"openvino": "2026.4.1"}, "pass", "opset 17 not checked: openvino"),
        # ...or does not: the device could never load it, whatever the bench measured on this host
        ("litert", "2.3.0", {}, {}, "fail", "the model runs on litert, which tier x86-avx2's profile does not list"),
        # onnxruntime's opset table applies to onnxruntime only
        ("openvino", "2026.4.1", {"": 99}, {"openvino": "2026.4.1"}, "pass", "opset 99 not checked"),
        ("onnxruntime", "1.32.0", {"": 99}, {}, "fail", "opset 99 exceeds"),
    ],
)
def test_compat_judges_the_runtime_the_model_ran_on(
    runtime: str, version: str, opset: dict[str, int], tier_runtimes: dict[str, str], status: str, words: str
) -> None:
    r = _result(
        opset=opset,
        runtime=runtime,
        runtime_version=version,
        tier_profile=_tier_with(**tier_runtimes),
        compat=CompatEntry(
            tier="x86-avx2", runtime=runtime, runtime_version=version, model_sha256=SHA, result="verified"
        ),
    )
    (check,) = _verdict({"compatibility": {}}, r).checks
    assert check.status == status and words in (check.reason or ""), check.reason
    assert "ORT" not in (check.reason or "")


def test_a_tier_profile_lists_its_primary_runtime_among_its_runtimes(tmp_path: Any) -> None:
    from edgefleet.bench.tiers import TierProfile, load_tiers
    from edgefleet.errors import ConfigError

    base = {"name": "t", "arch": "x86_64", "cpu_threads": 1, "memory_mb": 64, "runtime_version": "1.32.0"}
    assert TierProfile(**base).runtimes == {"onnxruntime": "1.32.0"}
    both = TierProfile(**base, runtimes={"litert": "2.3.0"})
    assert both.runtimes == {"onnxruntime": "1.32.0", "litert": "2.3.0"}
    f = tmp_path / "tier.yaml"
    f.write_text(
        "name: t\narch: x86_64\ncpu_threads: 1\nmemory_mb: 64\nruntime_version: 1.32.0\n"
        "runtimes: {onnxruntime: 1.0.0}\n"
    )
    with pytest.raises(ConfigError, match=r"runtimes lists onnxruntime 1\.0\.0 but runtime_version is 1\.32\.0"):
        load_tiers(f)
