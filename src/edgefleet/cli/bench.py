"""``edgefleet bench``: absolute figures per model and tier from fresh subprocesses, plus a paired comparison."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from edgefleet.bench.env import describe_host
from edgefleet.bench.report import BenchReport, BenchSettings, schema_json
from edgefleet.bench.runner import bench
from edgefleet.bench.tiers import get_tier, host_tier
from edgefleet.cli._output import cell, console, escape, print_json, progress
from edgefleet.errors import UsageError


def _batches(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes {text!r}: give comma-separated integers, e.g. 1,8,32")
    if not sizes or any(b < 1 for b in sizes):
        raise UsageError(f"--batch-sizes {text!r}: every batch size must be at least 1")
    return sizes


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _table(report: BenchReport) -> Table:
    t = Table(title="edgefleet bench", title_justify="left")
    for col in ("model", "tier", "status", "cold start ms", "peak RSS MB", "p50 ms", "p95 ms (CI)", "p99 ms", "n"):
        t.add_column(col, justify="right" if col not in ("model", "tier", "status") else "left")
    t.add_column("best throughput/s", justify="right")
    t.add_column("vs baseline")
    arch = escape(report.environment.arch)
    for r in report.results:
        status = "[green]ok[/]" if r.status == "ok" else f"[red]failed[/]: {escape(r.error)}"
        lat = r.latency
        p50 = lat.quantile(0.5) if lat else None
        p95 = lat.quantile(0.95) if lat else None
        p99 = lat.quantile(0.99) if lat else None
        p95s = "—"
        if p95 is not None and p95.value_ms is not None:
            ci = f" ({_ms(p95.ci_low_ms)}–{_ms(p95.ci_high_ms)})" if p95.ci_low_ms is not None else ""
            p95s = f"{p95.value_ms:.3f}{ci}"
        n = f"{lat.n} ({lat.stopped_by})" if lat else "—"
        thr = [x for x in r.throughput if x.inferences_per_s is not None]
        best = max(thr, key=lambda x: x.inferences_per_s or 0.0) if thr else None
        cmp = r.comparison
        vs = "—"
        if cmp is not None:
            vs = cmp.verdict if cmp.median_ratio is None else f"{cmp.verdict} ×{cmp.median_ratio:.3f}"
        t.add_row(
            cell(Path(r.model).name),
            f"{escape(r.tier)} [yellow](emulated on {arch})[/]" if r.emulated else cell(r.tier),
            status,
            _ms(r.cold_start_ms),
            "—" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}",
            _ms(p50.value_ms if p50 else None),
            p95s,
            _ms(p99.value_ms if p99 else None),
            n,
            f"{best.inferences_per_s:,.0f} @b{best.batch}" if best and best.inferences_per_s else "—",
            cell(vs),
        )
    return t


def bench_command(
    models: list[Path] = typer.Argument(None, help="models (.onnx) or packages (.efpkg) to benchmark"),
    tier: list[str] = typer.Option(
        [], "--tier", "-t", help="tier name (shipped) or tier YAML file; repeat for several (default: this host)"
    ),
    data: Path | None = typer.Option(None, "--data", help="per-call .npz inputs (default: generated from the schema)"),
    baseline: Path | None = typer.Option(None, "--baseline", help="model to compare against, interleaved"),
    output: Path = typer.Option(Path("bench.json"), "--output", "-o", help="where to write the JSON report"),
    time_budget: float = typer.Option(10.0, "--time-budget", help="seconds of latency sampling per model and tier"),
    paired_budget: float = typer.Option(10.0, "--paired-time-budget", help="seconds for the paired comparison"),
    precision: float = typer.Option(0.02, "--precision", help="stop once the p95 CI half-width is within ±this"),
    min_samples: int = typer.Option(1000, "--min-samples", help="latency samples before checking precision"),
    batch_sizes: str = typer.Option("1,8,32", "--batch-sizes", help="Offline throughput batch sizes"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON instead of a table"),
    schema: bool = typer.Option(False, "--schema", help="print the JSON Schema of the report and exit"),
) -> None:
    """Benchmark MODEL|PKG... on device tiers: cold start, peak RSS, latency percentiles with confidence
    intervals (sampling until the p95 interval is within ±2 % or the time budget ends), throughput, CPU-seconds
    per inference, and with --baseline a paired, interleaved comparison. Each model runs in a fresh subprocess
    that emulates the tier: its thread count, CPU affinity and memory budget."""
    if schema:
        typer.echo(schema_json(), nl=False)
        return
    if not models:
        raise UsageError("give at least one MODEL or PKG to benchmark (see --help)")
    if time_budget <= 0 or paired_budget <= 0 or not 0 < precision < 1 or min_samples < 1:
        raise UsageError("--time-budget, --paired-time-budget, --min-samples must be positive; --precision in (0, 1)")
    tiers = [get_tier(t) for t in tier] if tier else [host_tier()]
    settings = BenchSettings(
        time_budget_s=time_budget,
        paired_time_budget_s=paired_budget,
        target_relative_half_width=precision,
        min_samples=min_samples,
        batch_sizes=_batches(batch_sizes),
    )
    steps = len(models) * len(tiers) * (2 if baseline else 1)
    with progress("benchmarking", total=steps) as update:
        report = bench(models, tiers, data=data, baseline=baseline, settings=settings, progress=update)
    output.write_text(report.model_dump_json(indent=2) + "\n")
    if json_out:
        print_json(report)
    else:
        console.print(_table(report))
        emulated = sorted({f"{r.tier} ({r.emulated_because})" for r in report.results if r.emulated})
        if emulated:
            # said under every table: these figures must not be read as the tier's own
            console.print(
                f"[yellow]emulated on {escape(describe_host(report.environment))}[/]: {escape('; '.join(emulated))}. "
                "Latency and "
                "compatibility there are this host's, not the tier's; the gate calls them inconclusive unless the "
                "policy sets allow_emulated."
            )
        console.print(f"wrote {output}", markup=False)


def register(app: typer.Typer) -> None:
    """Add ``bench`` to ``app``."""
    app.command("bench")(bench_command)
