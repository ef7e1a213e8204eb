"""``edgefleet gate``: judge a candidate against a release policy; exit 0 pass, 1 fail, 2 usage error."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.table import Table

from edgefleet.cli._output import cell, console, escape, print_json
from edgefleet.errors import UsageError
from edgefleet.gate.junit import write_junit
from edgefleet.gate.verdict import Verdict, gate

_STYLE = {
    "pass": "[green]pass[/]",
    "fail": "[red]fail[/]",
    "inconclusive": "[yellow]inconclusive[/]",
    "skipped": "[dim]skipped[/]",
}
_AGAINST = {"vs_parent": "accuracy vs float parent", "vs_production": "accuracy vs production"}


def _table(v: Verdict) -> Table:
    t = Table(title=f"edgefleet gate: {_STYLE[v.status]}", title_justify="left")
    t.add_column("check")
    t.add_column("result")
    t.add_column("reason", overflow="fold")
    for c in v.checks:
        t.add_row(cell(c.name), _STYLE[c.status], cell(c.reason))
    return t


def _check_writable(path: Path) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"--junit {path} is a folder: give a file name, e.g. {path / 'gate.xml'}")
    if not folder.is_dir():
        raise UsageError(f"--junit {path}: folder {folder} does not exist (create it first)")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--junit {path}: folder {folder} is not writable")


def gate_command(
    policy: Path = typer.Option(..., "--policy", "-p", help="release policy YAML (see docs/gate.md)"),
    bench: Path = typer.Option(..., "--bench", "-b", help="BENCH.json written by `edgefleet bench`"),
    optimize_report: Path | None = typer.Option(
        None, "--optimize-report", help="REPORT.json of `edgefleet optimize` (accuracy checks)"
    ),
    package: Path | None = typer.Option(None, "--package", help="the .efpkg about to be published"),
    production_report: Path | None = typer.Option(
        None,
        "--production-report",
        help="REPORT.json of `edgefleet optimize` for the version devices run today (policy section `production`)",
    ),
    junit: Path | None = typer.Option(None, "--junit", help="also write JUnit XML (one testcase per check)"),
    json_out: bool = typer.Option(False, "--json", help="print the verdict as JSON"),
) -> None:
    """Judge a release candidate against POLICY: accuracy drop (overall and worst slice) from its float parent and
    from the version in production, p95 per tier, regression vs the baseline, peak memory, cold start, size,
    compatibility with every target tier, package validity. Each check passes, fails, is inconclusive (fails unless
    the policy allows it) or is skipped (optional evidence not given). Exit code 0 pass, 1 fail, 2 usage error."""
    if junit is not None:
        # said before the gate runs: a report nobody can write is a usage error, not a failed gate
        _check_writable(junit)
    verdict = gate(policy, bench, optimize_report, package, production_report)
    if junit is not None:
        write_junit(verdict, junit)
    if json_out:
        print_json(verdict)
    else:
        console.print(_table(verdict))
        for key, cmp in verdict.accuracy.items():
            console.print(f"{_AGAINST.get(key, key)}: {cmp.describe()}", markup=False)
        console.print(f"{_STYLE[verdict.status]}: {escape(verdict.reason)}")
    if not verdict.passed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``gate`` to ``app``."""
    app.command("gate")(gate_command)
