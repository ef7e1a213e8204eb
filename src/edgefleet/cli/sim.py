"""``edgefleet simulate`` (a fleet of real agents against a control plane) and ``edgefleet demo`` (the whole path
in one command)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

from edgefleet.cli._output import cell, console, err_console, escape, print_json
from edgefleet.durations import parse_duration
from edgefleet.errors import UsageError


def _simulate(
    devices: int,
    tiers: str | None,
    duration: str,
    faults: str | None,
    server: str | None,
    api_token: str | None,
    full: int,
    checkin: float,
    telemetry: float,
    rps: float,
    workdir: Path | None,
    traffic: Path | None = None,
) -> dict[str, Any]:
    from edgefleet.sim import Fleet, FleetOptions, ServerProcess, parse_faults, parse_tiers, plan_fleet

    calls = None
    if traffic is not None:
        from edgefleet.data import load_calls

        calls = dict(load_calls(traffic).inputs)
    secs = parse_duration(duration, flag="--duration", allow_zero=False)
    plans = plan_fleet(parse_tiers(tiers, devices), full=full, faults=parse_faults(faults))
    work = workdir or Path(tempfile.mkdtemp(prefix="edgefleet-sim-"))
    own = None
    if server is None:
        own = ServerProcess(work / "server")
        server = own.start()
        api_token = own.admin_token
        console.print(f"started edgefleet server on {server} (workspace {work})", markup=False)
    elif not api_token:
        from edgefleet.cli.connection import resolve_token

        api_token = resolve_token(server, None)
        if not api_token:
            raise UsageError("--server needs --api-token (or EDGEFLEET_API_TOKEN) with the operator role")

    async def run() -> dict[str, Any]:
        fleet = Fleet(server, api_token or "", plans, work, FleetOptions(checkin, telemetry, rps, traffic=calls))
        try:
            await fleet.start()
            console.print(
                f"{len(fleet.full)} full + {len(fleet.lite)} lightweight agents running for {duration}", markup=False
            )
            end = time.monotonic() + secs
            while time.monotonic() < end:
                await asyncio.sleep(min(5.0, max(0.0, end - time.monotonic())))
                s = fleet.summary()
                console.print(
                    f"  check-ins {s['checkins_ok']}/{s['checkins']}  reports {s['reports_ok']}/{s['reports']}"
                    f"  inferences {s['inference_ok']} ok / {s['inference_failed']} failed"
                )
            return fleet.summary()
        finally:
            await fleet.stop()
            if own is not None:
                own.stop()

    return asyncio.run(run())


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""

    @app.command("simulate")
    def simulate(
        devices: int = typer.Option(50, "--devices", "-n", min=1, help="Simulated devices."),
        tiers: str = typer.Option(None, "--tiers", help="Tier mix as weights, e.g. x86-avx2=3,arm-a53-small=1."),
        duration: str = typer.Option("10m", "--duration", help="How long to run: 90s, 10m, 1h30m."),
        faults: str = typer.Option(
            None,
            "--faults",
            help="kind[=value][@who], comma-separated: flaky=0.2, cut=20s, slow=500ms, clock-skew=1h, "
            "memory=MB, crash=VERSION, disk-full, power-loss; who = N devices, P%, or a tier/chipset.",
        ),
        server: str = typer.Option(None, "--server", help="Control plane URL (default: start one in a temp dir)."),
        api_token: str = typer.Option(None, "--api-token", envvar="EDGEFLEET_API_TOKEN", help="Operator API token."),
        full: int = typer.Option(20, "--full", min=0, help="How many devices are full agents (own processes)."),
        checkin: float = typer.Option(1.0, "--checkin-interval", min=0.1, help="Seconds between check-ins."),
        telemetry: float = typer.Option(2.0, "--telemetry-interval", min=0.1, help="Seconds per telemetry window."),
        rps: float = typer.Option(1.0, "--rps", min=0.0, help="Inference requests per device per second."),
        workdir: Path = typer.Option(None, "--workdir", help="Agents' data folders (default: a new temp dir)."),
        traffic: Path = typer.Option(
            None,
            "--traffic",
            help="Inference inputs as a per-call .npz (the package's --samples layout), cycled across devices. "
            "Default: one fixed random input per model, which reads as drift against any real reference.",
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ) -> None:
        """Run N real agents against a real control plane: full agents as processes with their own inference
        worker (crashes and kills are real), the rest lightweight (same agent code, one shared model per package),
        across device tiers, with injected faults."""
        out = _simulate(
            devices, tiers, duration, faults, server, api_token, full, checkin, telemetry, rps, workdir, traffic
        )
        if json_out:
            print_json(out)
        else:
            for k, v in out.items():
                console.print(f"{k:>24}: {v}", markup=False)

    @app.command("demo")
    def demo(
        keep_running: bool = typer.Option(False, "--keep-running", help="Keep the server up to explore the dashboard."),
        json_out: bool = typer.Option(False, "--json", help="Print the final summary as JSON (stages go to stderr)."),
        workdir: Path = typer.Option(None, "--workdir", help="Workspace (default: a new temp dir each run)."),
        devices: int = typer.Option(24, "--devices", min=8, help="Fleet size."),
        full: int | None = typer.Option(
            None, "--full", min=1, help="Full agents (default: every arm-a53-small device, and only those)."
        ),
    ) -> None:
        """train → optimize → bench → gate → package → publish → roll out v1 and v2 in waves → v3 crashes the
        small tier's workers → automatic halt and rollback → KPIs, timeline and the dashboard URL."""
        from edgefleet.sim.demo import DemoOptions, run_demo

        if workdir is not None and workdir.exists() and any(workdir.iterdir()):
            raise UsageError(f"--workdir {workdir} is not empty: the demo needs a fresh workspace")
        say_to = err_console if json_out else console
        summary = run_demo(
            DemoOptions(workdir=workdir, devices=devices, full=full, keep_running=keep_running), say_to.print
        )
        if json_out:
            print_json(summary)
            return
        _print_summary(summary)


def _print_summary(s: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title="devices per version and tier")
    tiers = sorted({tier for by in s["devices_by_version_tier"].values() for tier in by})
    t.add_column("version")
    for tier in tiers:
        t.add_column(cell(tier))
    for v, by in sorted(s["devices_by_version_tier"].items()):
        t.add_row(cell(v), *[str(by.get(tier, 0)) for tier in tiers])
    console.print(t)
    tl = Table(title="rollout timeline")
    for c in ("version", "at", "transition", "wave", "actor", "reason"):
        tl.add_column(c)
    for v, r in s["rollouts"].items():
        for e in r["timeline"]:
            row = (v, e["at"][11:19], f"{e['from']} → {e['to']}", e["wave"], e["actor"], e["reason"])
            tl.add_row(*map(cell, row))
    console.print(tl)
    k = s["kpis"]
    console.print(
        f"[bold]fleet KPIs:[/] {escape(', '.join(f'{a}={b}' for a, b in k.items() if not isinstance(b, dict | list)))}"
    )
    v3 = s["v3"]
    console.print(
        "[bold]v3:[/] "
        + escape(
            f"{v3['state']} in wave {v3['halted_in_wave']} by {v3['halt_actor']}: {v3['halt_reason']}\n"
            f"     first bad report → halt {v3['seconds_first_bad_report_to_halt']} s; halt → back on the previous "
            f"version everywhere {v3['seconds_halt_to_rolled_back_everywhere']} s"
        )
    )
    console.print(f"[bold]dashboard:[/] {escape(s['dashboard'])}   total {s['total_seconds']} s")
