"""Release gates as policy-as-code: a pydantic policy, pure checks over bench/optimize/package evidence, and a
verdict as a table, JSON and JUnit XML (exit 0 pass, 1 fail, 2 usage error)."""

from edgefleet.gate.checks import CheckResult, PackageFacts, run_checks
from edgefleet.gate.junit import to_junit, write_junit
from edgefleet.gate.policy import GatePolicy, ResolvedPolicy, load_policy, parse_policy
from edgefleet.gate.verdict import Verdict, decide, evaluate, gate

__all__ = [
    "CheckResult",
    "GatePolicy",
    "PackageFacts",
    "ResolvedPolicy",
    "Verdict",
    "decide",
    "evaluate",
    "gate",
    "load_policy",
    "parse_policy",
    "run_checks",
    "to_junit",
    "write_junit",
]
