"""The gate's verdict: gather the evidence (the only I/O of the gate), run the pure checks, decide."""

from __future__ import annotations

import hashlib
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
from edgefleet.gate.production import AccuracyComparison, accuracy_summary, evaluation_of, production_checks

__all__ = ["Verdict", "decide", "evaluate", "gate", "package_facts", "read_optimize_report", "read_production_report"]


class Verdict(BaseModel):
    status: Literal["pass", "fail", "inconclusive"]
    passed: bool
    allow_inconclusive: bool
    reason: str
    counts: dict[str, int] = Field(default_factory=dict)
    checks: list[CheckResult]
    # The candidate's scores against its float parent ("vs_parent") and production ("vs_production"), for each
    # reference the evidence had, whether or not the policy checks it.
    accuracy: dict[str, AccuracyComparison] = Field(default_factory=dict)
    inputs: dict[str, str | None] = Field(default_factory=dict)
    # The package this verdict judged: the control plane accepts the verdict only for the version whose package
    # has this SHA-256, and only such a verdict lets a version be promoted or rolled out.
    package_sha256: str | None = None


def decide(checks: Sequence[CheckResult], allow_inconclusive: bool = False) -> Verdict:
    """Any failed check fails the gate; an inconclusive one fails it too unless the policy allows it. A skipped
    check counts neither way, but a gate whose every check was skipped judged nothing and fails."""
    counts = {s: sum(1 for c in checks if c.status == s) for s in ("pass", "fail", "inconclusive", "skipped")}
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
    skipped = [c.name for c in checks if c.status == "skipped"]
    if len(skipped) == len(checks):
        status: Literal["pass", "fail", "inconclusive"] = "fail"
        passed, reason = False, f"every check was skipped, so nothing was judged: {', '.join(skipped)}"
    elif failed:
        status = "fail"
        passed, reason = False, f"{len(failed)} check(s) failed: {', '.join(failed)}"
    elif unsure:
        status = "inconclusive"
        passed = allow_inconclusive
        allowed = "allowed by the policy" if allow_inconclusive else "not allowed by the policy"
        reason = f"{len(unsure)} check(s) inconclusive ({allowed}): {', '.join(unsure)}"
    else:
        status, passed, reason = "pass", True, f"all {len(checks) - len(skipped)} checks passed"
        if skipped:
            reason += f" ({len(skipped)} skipped: {', '.join(skipped)})"
    return Verdict(
        status=status,
        passed=passed,
        allow_inconclusive=allow_inconclusive,
        reason=reason,
        counts=counts,
        checks=list(checks),
    )


def read_optimize_report(path: Path, what: str = "optimize report") -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise UsageError(f"{what} {path} is not JSON: {err}")
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path} is not a JSON object")
    return data


def read_production_report(path: Path) -> dict[str, Any]:
    """The optimize report that built the version devices run today. Unlike the candidate's, a file without its
    scores is refused: it is the wrong file (a bench report, another tool's JSON), not thin evidence."""
    data = read_optimize_report(path, "production report")
    if evaluation_of(data, "chosen", "metrics") is None:
        raise UsageError(
            f"production report {path} has no chosen.metrics.overall score; give the REPORT.json that "
            "`edgefleet optimize --report` wrote for the production version"
        )
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
            max_opset=max_opset(t.runtimes["onnxruntime"]) if "onnxruntime" in t.runtimes else None,
            runtimes=t.runtimes,
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
    production_report: Mapping[str, Any] | None = None,
) -> Verdict:
    """Pure: the verdict of ``resolved`` on the evidence."""
    tiers = dict(resolved.tiers) or {r.tier: r.tier_profile for r in bench.results}
    checks = run_checks(resolved.policy, tiers, bench, optimize_report, package)
    # Right after the checks against the float parent, so the two accuracy judgements read together.
    at = max(
        (i + 1 for i, c in enumerate(checks) if c.name.startswith("accuracy.") or c.name == "bench.package_model"),
        default=0,
    )
    checks[at:at] = production_checks(resolved.policy, optimize_report, production_report)
    verdict = decide(checks, resolved.policy.allow_inconclusive)
    verdict.accuracy = accuracy_summary(optimize_report, production_report)
    return verdict


def gate(
    policy: Path,
    bench: Path,
    optimize_report: Path | None = None,
    package: Path | None = None,
    production_report: Path | None = None,
) -> Verdict:
    """Load every input (usage errors raise), judge, and return the verdict."""
    resolved = load_policy(policy)
    report = load_report(bench)
    opt = read_optimize_report(optimize_report) if optimize_report is not None else None
    prod = read_production_report(production_report) if production_report is not None else None
    tiers = dict(resolved.tiers) or {r.tier: r.tier_profile for r in report.results}
    pol = resolved.policy
    facts = (
        package_facts(package, tiers, check_golden=pol.package is None or pol.package.golden)
        if package is not None
        else None
    )
    verdict = evaluate(resolved, report, opt, facts, prod)
    if package is not None:
        verdict.package_sha256 = hashlib.sha256(package.read_bytes()).hexdigest()
    verdict.inputs = {
        "policy": str(policy),
        "bench": str(bench),
        "optimize_report": None if optimize_report is None else str(optimize_report),
        "package": None if package is None else str(package),
        "production_report": None if production_report is None else str(production_report),
    }
    return verdict
