"""The gate's verdict: gather the evidence (the only I/O of the gate), run the pure checks, decide."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from edgefleet.bench.report import BenchReport, load_report
from edgefleet.bench.tiers import TierProfile
from edgefleet.errors import EdgefleetError, UsageError
from edgefleet.gate.checks import CheckResult, PackageFacts, max_opset, run_checks
from edgefleet.gate.policy import ResolvedPolicy, load_policy

__all__ = ["Verdict", "decide", "evaluate", "gate", "package_facts", "read_optimize_report"]


class Verdict(BaseModel):
    status: Literal["pass", "fail", "inconclusive"]
    passed: bool
    allow_inconclusive: bool
    reason: str
    counts: dict[str, int] = Field(default_factory=dict)
    checks: list[CheckResult]
    inputs: dict[str, str | None] = Field(default_factory=dict)


def decide(checks: Sequence[CheckResult], allow_inconclusive: bool = False) -> Verdict:
    """Any failed check fails the gate; an inconclusive one fails it too unless the policy allows it."""
    counts = {s: sum(1 for c in checks if c.status == s) for s in ("pass", "fail", "inconclusive")}
    if not checks:
        return Verdict(
            status="fail",
            passed=False,
            allow_inconclusive=allow_inconclusive,
            reason="the policy enables no checks",
            counts=counts,
            checks=[],
        )
    failed = [c.name for c in checks if c.status == "fail"]
    unsure = [c.name for c in checks if c.status == "inconclusive"]
    if failed:
        status: Literal["pass", "fail", "inconclusive"] = "fail"
        passed, reason = False, f"{len(failed)} check(s) failed: {', '.join(failed)}"
    elif unsure:
        status = "inconclusive"
        passed = allow_inconclusive
        allowed = "allowed by the policy" if allow_inconclusive else "not allowed by the policy"
        reason = f"{len(unsure)} check(s) inconclusive ({allowed}): {', '.join(unsure)}"
    else:
        status, passed, reason = "pass", True, f"all {len(checks)} checks passed"
    return Verdict(
        status=status,
        passed=passed,
        allow_inconclusive=allow_inconclusive,
        reason=reason,
        counts=counts,
        checks=list(checks),
    )


def read_optimize_report(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"optimize report {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise UsageError(f"optimize report {path} is not JSON: {err}")
    if not isinstance(data, dict):
        raise UsageError(f"optimize report {path} is not a JSON object")
    return data


def package_facts(path: Path, tiers: Mapping[str, TierProfile], check_golden: bool = True) -> PackageFacts:
    """Open the package and record what the checks judge; a broken package is a fact, not an exception."""
    if not path.is_file():
        raise UsageError(f"package {path} does not exist")
    size = path.stat().st_size
    from edgefleet.package import check_requirements, open_package

    try:
        opened = open_package(path)
    except EdgefleetError as err:
        return PackageFacts(path=str(path), size_bytes=size, open_error=str(err))
    golden_error, golden_checked = None, False
    if check_golden:
        if opened.encrypted:
            golden_error = "the package is encrypted; golden vectors can only be reproduced on a device with its key"
        else:
            golden_checked = True
            try:
                opened.verify_golden()
            except EdgefleetError as err:
                golden_error = str(err)
    reasons = {
        name: check_requirements(
            opened.manifest,
            tier=name,
            runtime_version=t.runtime_version,
            memory_mb=t.memory_mb,
            max_opset=max_opset(t.runtime_version),
        )
        for name, t in tiers.items()
    }
    return PackageFacts(
        path=str(path),
        size_bytes=size,
        model_sha256=opened.model_sha256,
        manifest=opened.manifest,
        golden_error=golden_error,
        golden_checked=golden_checked,
        bom=opened.bom,
        requirement_reasons=reasons,
    )


def evaluate(
    resolved: ResolvedPolicy,
    bench: BenchReport,
    optimize_report: Mapping[str, Any] | None = None,
    package: PackageFacts | None = None,
) -> Verdict:
    """Pure: the verdict of ``resolved`` on the evidence."""
    tiers = dict(resolved.tiers) or {r.tier: r.tier_profile for r in bench.results}
    checks = run_checks(resolved.policy, tiers, bench, optimize_report, package)
    return decide(checks, resolved.policy.allow_inconclusive)


def gate(policy: Path, bench: Path, optimize_report: Path | None = None, package: Path | None = None) -> Verdict:
    """Load every input (usage errors raise), judge, and return the verdict."""
    resolved = load_policy(policy)
    report = load_report(bench)
    opt = read_optimize_report(optimize_report) if optimize_report is not None else None
    tiers = dict(resolved.tiers) or {r.tier: r.tier_profile for r in report.results}
    pol = resolved.policy
    facts = (
        package_facts(package, tiers, check_golden=pol.package is None or pol.package.golden)
        if package is not None
        else None
    )
    verdict = evaluate(resolved, report, opt, facts)
    verdict.inputs = {
        "policy": str(policy),
        "bench": str(bench),
        "optimize_report": None if optimize_report is None else str(optimize_report),
        "package": None if package is None else str(package),
    }
    return verdict
