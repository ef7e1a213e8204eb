"""``edgefleet demo``: the whole path in one command, in a fresh workspace, on free ports.

train (digits) → optimize → bench → gate → package → publish v1 → start ``edgefleet server`` → enroll a fleet of
mixed tiers → roll out v1 → publish v2 and roll it out in waves → publish v3, whose manifest understates its
memory (a 200 MB table the model reads on every call), so the inference worker really dies on the 256 MB
arm-a53-small devices (all full agents, real processes) → the reconciler halts the canary and rolls it back on its
own → KPIs, timeline, dashboard URL. Each stage reports what it did and how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from edgefleet.controlplane.rollout import wave_bucket
from edgefleet.errors import EdgefleetError
from edgefleet.sim.fleet import Fleet, FleetOptions
from edgefleet.sim.server import ServerProcess, edgefleet_command
from edgefleet.sim.spec import plan_fleet

__all__ = ["DemoOptions", "big_table_model", "canary_percent", "run_demo"]

FAILING_TIER = "arm-a53-small"
POLICY = """\
tiers: [x86-avx2]
accuracy: {max_drop: 0.02}
latency: {p95_ms: {x86-avx2: 50}}
regression: {max_slowdown: 0.5}
cold_start: {max_ms: 60000}
size: {max_model_mb: 5}
compatibility: {}
package: {}
allow_inconclusive: true
"""


@dataclass
class DemoOptions:
    workdir: Path | None = None
    devices: int = 24
    full: int | None = None  # default: exactly the failing tier's devices
    table_mb: int = 200
    keep_running: bool = False
    timeout_s: float = 600.0


Say = Callable[[str], None]


@dataclass
class _Stages:
    say: Say
    times: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], str]) -> None:
        t = time.monotonic()
        what = fn()
        self.times[name] = round(time.monotonic() - t, 2)
        self.say(f"[bold green]✓[/] {name:<10} {escape(what)}  [dim]({self.times[name]:.1f} s)[/]")


def big_table_model(model: bytes, mb: int) -> bytes:
    """``model`` plus an ``mb`` MiB lookup table it really reads on every call (a ``Gather`` at an index computed
    from the input, folded into the output as 0·value), so a serving worker holds the whole table in memory; the
    outputs do not change. An input-independent use (say ``ReduceSum`` of the table) would be constant-folded by
    onnxruntime at load and the table dropped, and the model would fit any device."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load_from_string(model)
    g = m.graph
    x = g.input[0].name
    out = next(o for o in g.output if o.name == "probabilities")
    for n in g.node:
        n.output[:] = ["probabilities_raw" if o == out.name else o for o in n.output]
    g.initializer.extend(
        [
            numpy_helper.from_array(np.ones((mb * 1024 * 256,), dtype=np.float32), "TABLE"),
            numpy_helper.from_array(np.zeros((), dtype=np.float32), "ZERO"),
        ]
    )
    g.node.extend(
        [
            helper.make_node("ArgMax", [x], ["table_index"], axis=1, keepdims=0),
            helper.make_node("Gather", ["TABLE", "table_index"], ["table_value"], axis=0),
            helper.make_node("Mul", ["table_value", "ZERO"], ["table_zero"]),
            helper.make_node("Unsqueeze", ["table_zero", "table_axes"], ["table_zero_col"]),
            helper.make_node("Add", ["probabilities_raw", "table_zero_col"], ["probabilities"]),
        ]
    )
    g.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "table_axes"))
    return bytes(m.SerializeToString())


def canary_percent(device_tiers: dict[str, str], floor: float = 5.0) -> float:
    """The smallest canary (percent) that holds at least one device of every tier: a canary that leaves a tier
    out cannot catch what fails only there. The control plane fills a wave with the first ``ceil(pct × N)``
    devices in stable-hash order, so the canary must reach the rank of each tier's first device."""
    order = sorted(device_tiers, key=lambda d: (wave_bucket(d), d))
    n = len(order)
    first_rank: dict[str, int] = {}
    for rank, dev in enumerate(order):
        first_rank.setdefault(device_tiers[dev], rank)
    pct = max([floor, *((r + 1) / n * 100.0 for r in first_rank.values())]) if n else floor
    return float(min(99.0, np.ceil(pct)))


def _cli(args: list[str], log: Path, what: str = "", out: Path | None = None) -> str:
    """Run ``edgefleet ARGS`` with its output in ``log``; ``out`` takes its stdout instead (a ``--json``
    document)."""
    with log.open("ab") as f:
        f.write(f"$ edgefleet {' '.join(args)}\n".encode())
        f.flush()
        with out.open("wb") if out is not None else contextlib.nullcontext(f) as stdout:
            r = subprocess.run([*edgefleet_command(), *args], stdout=stdout, stderr=f if out else subprocess.STDOUT)
    if r.returncode != 0:
        raise EdgefleetError(f"`edgefleet {args[0]}` failed (exit {r.returncode}); see {log}")
    return what


def _ts(s: str) -> float:
    return datetime.fromisoformat(s).timestamp()


# 3.0.0 is never gated (its gate would fail on size): the demo forces it past the release policy to show what the
# rollout itself catches
FORCE_V3 = "demo: 3.0.0 understates its memory on purpose, to show the canary halting it"


async def _rollout(fleet: Fleet, version: str, policy: dict[str, Any], say: Say, timeout_s: float) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    body: dict[str, Any] = {"model": "digits", "version": version, "policy": policy}
    if version == "3.0.0":
        body.update(force=True, reason=FORCE_V3)
    r = await fleet.api("POST", "/api/v1/rollouts", json=body)
    rid = r["rollout_id"]
    waves = policy["waves"]
    first_bad: float | None = None
    before = {d["device_id"] for d in await fleet.api("GET", "/api/v1/devices") if d["state"] == "rolled_back"}
    end = time.monotonic() + timeout_s
    with Progress(TextColumn("  {task.description}"), BarColumn(), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(f"rollout {version}", total=len(waves))
        while True:
            ro = await fleet.api("GET", f"/api/v1/rollouts/{rid}")
            if first_bad is None:
                devs = await fleet.api("GET", "/api/v1/devices")
                if any(d["state"] == "rolled_back" and d["device_id"] not in before for d in devs):
                    first_bad = time.time()
            bar.update(
                task,
                completed=ro["wave"] + (ro["state"] == "completed"),
                description=f"rollout {version}: {ro['state']} wave {ro['wave']} ({waves[ro['wave']]:g} %)",
            )
            if ro["state"] not in ("running", "draft"):
                ro["first_bad_report_at"] = first_bad
                return dict(ro)
            if time.monotonic() > end:
                raise EdgefleetError(f"rollout {version} still {ro['state']} after {timeout_s:.0f} s: {ro['reason']}")
            await asyncio.sleep(0.2)


async def _wait_served(
    fleet: Fleet, ids: set[str], not_version: str | None, version: str | None, timeout_s: float
) -> float:
    t = time.monotonic()
    while time.monotonic() - t < timeout_s:
        devs = {d["device_id"]: d for d in await fleet.api("GET", "/api/v1/devices")}
        served = [devs[i]["served"]["version"] for i in ids if i in devs]
        if len(served) == len(ids) and all(
            (version is None or v == version) and (not_version is None or v != not_version) for v in served
        ):
            return time.time()
        await asyncio.sleep(0.5)
    raise EdgefleetError(f"devices did not reach version {version or 'not ' + str(not_version)} in {timeout_s:.0f} s")


_BUSY = {"downloading", "verifying", "staged", "health_check", "probation"}


async def _wait_settled(fleet: Fleet, ids: set[str], timeout_s: float) -> None:
    """Until none of ``ids`` is mid-update: a device still health-checking v3 when the rollback came finishes
    that attempt (and rolls it back) before the summary describes it."""
    t = time.monotonic()
    while time.monotonic() - t < timeout_s:
        devs = {d["device_id"]: d for d in await fleet.api("GET", "/api/v1/devices")}
        if all(devs.get(i, {}).get("state") not in _BUSY for i in ids):
            return
        await asyncio.sleep(0.5)
    raise EdgefleetError(f"devices still mid-update after {timeout_s:.0f} s")


def _by_version_tier(devs: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for d in devs:
        v = d["served"]["version"] or "none"
        out.setdefault(v, {}).setdefault(d["tier"], 0)
        out[v][d["tier"]] += 1
    return out


async def _fleet_part(o: DemoOptions, work: Path, st: _Stages, pkgs: dict[str, Path], say: Say) -> dict[str, Any]:
    from rich.progress import Progress

    server = ServerProcess(work / "server", reconcile_interval_s=0.5)
    st.run("server", lambda: f"edgefleet server on {server.start()} (SQLite, repository in {work / 'server'})")
    counts = {"x86-avx2": 1, "arm-a72": 1, FAILING_TIER: 1, "x86-vnni": 1}
    from edgefleet.sim.spec import parse_tiers

    per_tier = parse_tiers(",".join(counts), o.devices)
    # By default only the failing tier runs full agents, so every tier is homogeneous (all real processes or all
    # lightweight) and latency compares like for like between a wave and its control group.
    full = o.full if o.full is not None else per_tier[FAILING_TIER]
    plans = plan_fleet(per_tier, full=full, full_tiers=(FAILING_TIER,))
    # Enough traffic that a wave's per-tier p95 rests on hundreds of requests, not a dozen (a p95 of 12 calls is
    # their maximum, i.e. a fresh worker's first call).
    # Traffic is the training images: the drift reference is the held-out test set, so the fleet's inputs follow
    # the model's own distribution and drift stays low unless something really shifts.
    from edgefleet.examples import digits

    traffic = {"X": digits().x_train[:, None, :]}
    fleet = Fleet(
        server.url, server.admin_token, plans, work / "fleet", FleetOptions(requests_per_s=10.0, traffic=traffic)
    )
    summary: dict[str, Any] = {"dashboard": server.url + "/", "workdir": str(work)}
    try:
        t = time.monotonic()
        with Progress(transient=True) as bar:
            task = bar.add_task("enrolling", total=len(plans))
            await fleet.start(lambda d, n: bar.update(task, completed=d / 2))
            devs = await fleet.wait_enrolled(120, lambda d, n: bar.update(task, completed=(n + d) / 2))
        bench = json.loads((work / "bench.json").read_text())
        for v, p in pkgs.items():
            # the release policy admits a version with a passing verdict for its package; the bench report it was
            # judged on goes with it, so the model page shows the whole evidence chain (3.0.0 is forced instead)
            verdict = work / f"gate-{v}.json"
            if verdict.is_file():
                await fleet.publish(p, gate=json.loads(verdict.read_text()), bench=bench)
            else:
                await fleet.publish(p)
        st.times["enroll"] = round(time.monotonic() - t, 2)
        tiers = {d["device_id"]: d["tier"] for d in devs}
        n_full = sum(p.full for p in plans)
        say(
            f"[bold green]✓[/] enroll     {len(devs)} devices ({n_full} full agents incl. every {FAILING_TIER}, "
            f"{len(plans) - n_full} lightweight); v1, v2, v3 uploaded  [dim]({st.times['enroll']:.1f} s)[/]"
        )
        canary = canary_percent(tiers)
        # The simulated fleet shares two cores among 24 devices, the server and the traffic generator, so a device's
        # sub-millisecond p95 reflects the host's contention as much as the model: one device's 2 s windows run at
        # a p95 of 0.5 ms and jump to 1-3.3 ms when a neighbour's install or the server takes the cores, and on a
        # busier CI host a one-device canary of the same model stayed at 2.8 ms against its tier's 0.9 ms for a
        # whole bake. The demo's latency SLO is therefore looser than the product default (x1.25 and +0.5 ms): a
        # regression must exceed x2 and +5 ms, which contention alone has not reached. Crashes and update failures
        # are judged as always.
        # The bake must outlast a wave's installs and then its 200 requests: on 2 shared cores, waves took 5-8 s to
        # commit, and a 10 s bake left the canary 166 requests (paused as inconclusive: honest, but no demo).
        base = {
            "bake_s": 20,
            # under load the sample can come in after the bake: the wave waits for it (bounded) instead of pausing
            "max_sample_wait_s": 60,
            "min_devices": 2,
            "min_requests": 200,
            "auto_rollback": True,
            "max_p95_ratio": 2.0,
            "min_p95_increase_ms": 5.0,
        }
        rollouts: dict[str, dict[str, Any]] = {}
        for version, waves in (
            ("1.0.0", [50.0, 100.0]),
            ("2.0.0", sorted({canary, 50.0, 100.0})),
            ("3.0.0", sorted({canary, 50.0, 100.0})),
        ):
            t = time.monotonic()
            # v3's bake is long enough for the slowest canary device to download, try and report: a failure halts
            # at once whatever the bake, and an inconclusive canary must not pause before the evidence is in.
            bake = {"bake_s": 45} if version == "3.0.0" else {}
            ro = await _rollout(fleet, version, {**base, **bake, "waves": waves}, say, o.timeout_s / 3)
            if version != "3.0.0" and ro["state"] == "completed":
                moved = {d["device_id"] for d in ro["devices"]}
                await _wait_served(fleet, moved, None, version, 120)
            rollouts[version] = ro
            if version != "3.0.0" and ro["state"] != "completed":
                raise EdgefleetError(f"rollout {version} ended {ro['state']}: {ro['reason']}")
            st.times[f"rollout {version}"] = round(time.monotonic() - t, 2)
            say(
                f"[bold {'green' if ro['state'] == 'completed' else 'yellow'}]✓[/] rollout {version}: "
                f"{ro['state']} in wave {ro['wave']} of {escape(str(waves))} — {escape(str(ro['reason']))}  "
                f"[dim]({st.times[f'rollout {version}']:.1f} s)[/]"
            )
        bad = rollouts["3.0.0"]
        received = {d["device_id"] for d in bad["devices"]}
        back_at = await _wait_served(fleet, received, "3.0.0", None, 120) if received else None
        await _wait_settled(fleet, received, 120)
        await _wait_served(fleet, received, "3.0.0", None, 120)
        summary.update(await _summarize(fleet, rollouts, received, back_at, tiers, canary))
        if o.keep_running:
            token_file = escape(str(work / "server" / "admin-token"))
            say(f"[bold]dashboard:[/] {escape(server.url)}/  (admin token in {token_file}); Ctrl-C ends")
            with __import__("contextlib").suppress(asyncio.CancelledError, KeyboardInterrupt):
                await asyncio.Event().wait()
        return summary
    finally:
        try:
            # bounded: whatever an agent is in the middle of, the demo ends and its children with it
            await asyncio.wait_for(fleet.stop(), 60)
        except TimeoutError:
            say("[yellow]the simulated fleet did not stop within 60 s; its processes are terminated with the demo[/]")
        finally:
            server.stop()


async def _summarize(
    fleet: Fleet,
    rollouts: dict[str, dict[str, Any]],
    received: set[str],
    back_at: float | None,
    tiers: dict[str, str],
    canary: float,
) -> dict[str, Any]:
    devs = await fleet.api("GET", "/api/v1/devices")
    kpis = await fleet.api("GET", "/api/v1/fleet")
    audit = await fleet.api("GET", "/api/v1/audit", params={"limit": 1000})
    bad = rollouts["3.0.0"]
    halt = next((t for t in bad["transitions"] if t["to"] in ("rolled_back", "paused")), None)
    halt_at = _ts(halt["at"]) if halt else None
    first_bad = bad.get("first_bad_report_at")
    by_id = {d["device_id"]: d for d in devs}
    v2_moved = {d["device_id"] for d in rollouts["2.0.0"]["devices"]}
    out_rollouts = {
        v: {
            "rollout_id": r["rollout_id"],
            "state": r["state"],
            "wave": r["wave"],
            "waves": r["waves"],
            "reason": r["reason"],
            "devices_moved": len(r["devices"]),
            "timeline": [{k: t[k] for k in ("at", "from", "to", "wave", "actor", "reason")} for t in r["transitions"]],
        }
        for v, r in rollouts.items()
    }
    operator_pauses = [
        a
        for a in audit
        if a.get("action") == "rollout.pause"
        or (
            a.get("action") == "rollout.transition"
            and a.get("target") == bad["rollout_id"]
            and (a.get("detail") or {}).get("to_state") == "paused"
        )
    ]
    return {
        "rollouts": out_rollouts,
        "canary_percent": canary,
        "devices_by_version_tier": _by_version_tier(devs),
        "v2": {
            "compatible_devices": len(v2_moved),
            "devices": len(devs),
            "completed_on_every_compatible_device": rollouts["2.0.0"]["state"] == "completed"
            and all(by_id[i]["served"]["version"] in ("2.0.0",) or i in received for i in v2_moved),
        },
        "v3": {
            "state": bad["state"],
            "halted_in_wave": halt["wave"] if halt else None,
            "halt_actor": halt["actor"] if halt else None,
            "halt_reason": halt["reason"] if halt else None,
            "operator_pauses": len(operator_pauses),
            "received": sorted(received),
            "received_by_tier": {t: sum(1 for i in received if tiers.get(i) == t) for t in sorted(set(tiers.values()))},
            "rolled_back_on_every_device": bool(received)
            and all(by_id[i]["served"]["version"] != "3.0.0" for i in received),
            "failing_tier_devices": [
                {
                    "device_id": i,
                    "state": by_id[i]["state"],
                    "served": by_id[i]["served"]["version"],
                    "reason": by_id[i]["state_reason"],
                }
                for i in sorted(received)
                if tiers.get(i) == FAILING_TIER
            ],
            "seconds_first_bad_report_to_halt": None
            if first_bad is None or halt_at is None
            else round(max(0.0, halt_at - first_bad), 2),
            "seconds_halt_to_rolled_back_everywhere": None
            if back_at is None or halt_at is None
            else round(max(0.0, back_at - halt_at), 2),
        },
        "kpis": kpis,
    }


def run_demo(o: DemoOptions, say: Say) -> dict[str, Any]:
    """Run the whole demo; returns the summary (what ``--json`` prints)."""
    t0 = time.monotonic()
    work = o.workdir or Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "pipeline.log"
    st = _Stages(say)
    say(f"[bold]edgefleet demo[/] in {escape(str(work))}  (tool output: {escape(str(log))})")
    from edgefleet.data import save_calls
    from edgefleet.examples import digits, train_digits_mlp

    def train() -> str:
        d = digits()
        (work / "model.onnx").write_bytes(train_digits_mlp((64,), seed=0))
        (work / "model-v2.onnx").write_bytes(train_digits_mlp((64,), seed=1))
        save_calls(work / "calib.npz", {"X": d.x_train[:200, None, :]})
        save_calls(work / "eval.npz", {"X": d.x_test[:, None, :]}, labels=d.y_test)
        return f"MLP on scikit-learn digits ({len(d.x_train)} train / {len(d.x_test)} test images)"

    st.run("train", train)
    st.run(
        "optimize",
        lambda: _cli(
            [
                "optimize",
                str(work / "model.onnx"),
                "--calib",
                str(work / "calib.npz"),
                "--eval",
                str(work / "eval.npz"),
                "--labels",
                "labels",
                "-o",
                str(work / "candidate.onnx"),
                "--report",
                str(work / "optimize.json"),
                "--time-budget",
                "20",
            ],
            log,
            "candidate.onnx + optimize.json",
        ),
    )
    st.run(
        "bench",
        lambda: _cli(
            [
                "bench",
                str(work / "candidate.onnx"),
                str(work / "model-v2.onnx"),
                "--tier",
                "x86-avx2",
                "--baseline",
                str(work / "model.onnx"),
                "-o",
                str(work / "bench.json"),
                "--time-budget",
                "1",
                "--paired-time-budget",
                "2",
                "--min-samples",
                "200",
                "--batch-sizes",
                "1",
            ],
            log,
            "candidate and v2 on x86-avx2: latency, cold start, RSS, paired vs float → bench.json",
        ),
    )
    pk = work / "packages"
    pk.mkdir(exist_ok=True)

    def package() -> str:
        common = ["--name", "digits", "--samples", str(work / "calib.npz"), "--reference", str(work / "eval.npz")]
        _cli(
            [
                "package",
                str(work / "candidate.onnx"),
                "-o",
                str(pk / "digits-1.0.0.efpkg"),
                "--version",
                "1.0.0",
                *common,
            ],
            log,
        )
        _cli(
            [
                "package",
                str(work / "model-v2.onnx"),
                "-o",
                str(pk / "digits-2.0.0.efpkg"),
                "--version",
                "2.0.0",
                *common,
            ],
            log,
        )
        (work / "model-v3.onnx").write_bytes(big_table_model((work / "model-v2.onnx").read_bytes(), o.table_mb))
        _cli(
            [
                "package",
                str(work / "model-v3.onnx"),
                "-o",
                str(pk / "digits-3.0.0.efpkg"),
                "--version",
                "3.0.0",
                "--min-memory-mb",
                "64",
                *common,
            ],
            log,
        )
        return f"digits 1.0.0, 2.0.0, 3.0.0 (3.0.0 holds a {o.table_mb} MB table but declares 64 MB)"

    st.run("package", package)
    (work / "policy.yaml").write_text(POLICY)

    def gate() -> str:
        for v, opt in (("1.0.0", ["--optimize-report", str(work / "optimize.json")]), ("2.0.0", [])):
            _cli(
                [
                    "gate",
                    "--policy",
                    str(work / "policy.yaml"),
                    "--bench",
                    str(work / "bench.json"),
                    *opt,
                    "--package",
                    str(pk / f"digits-{v}.efpkg"),
                    "--junit",
                    str(work / f"gate-{v}.xml"),
                    "--json",
                ],
                log,
                out=work / f"gate-{v}.json",
            )
        return "1.0.0 and 2.0.0 pass the release policy (gate-*.json, gate-*.xml); 3.0.0 is not gated"

    st.run("gate", gate)
    pkgs = {v: pk / f"digits-{v}.efpkg" for v in ("1.0.0", "2.0.0", "3.0.0")}
    # the lightweight agents log through this process; their events reach the server, the console stays readable
    # (the level is put back afterwards: the demo may run inside a longer-lived process, a test session say)
    agent_log = logging.getLogger("edgefleet.agent")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)
    try:
        summary = asyncio.run(_fleet_part(o, work, st, pkgs, say))
    finally:
        agent_log.setLevel(level)
    summary["stage_seconds"] = st.times
    summary["total_seconds"] = round(time.monotonic() - t0, 1)
    return summary
