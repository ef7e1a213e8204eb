"""Hold a large simulated fleet against a real `edgefleet server` and measure it.

    .venv/bin/python benchmarks/simulate.py [--devices 500] [--full 20] [--duration 10m] [--checkin-interval 5]

Starts a server in a temp dir, enrolls the fleet (lightweight agents in this process sharing one model; --full of
them as `edgefleet agent` processes), rolls the digits MLP out to every device, then holds the fleet for
--duration and prints: agents held, check-ins/s, check-in success rate, memory per simulated agent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from edgefleet.data import CallData
from edgefleet.examples import train_digits_mlp
from edgefleet.package import build_package
from edgefleet.sim import Fleet, FleetOptions, ServerProcess, parse_duration, parse_tiers, plan_fleet


async def main(a: argparse.Namespace) -> dict[str, object]:
    logging.getLogger("edgefleet.agent").setLevel(logging.CRITICAL)
    work = Path(tempfile.mkdtemp(prefix="edgefleet-simbench-"))
    (work / "mlp.onnx").write_bytes(train_digits_mlp())
    pkg = build_package(
        work / "mlp.onnx",
        work / "digits-1.0.0.efpkg",
        name="digits",
        version="1.0.0",
        sample_inputs=CallData({"X": np.zeros((4, 1, 64), np.float32)}),
    )
    server = ServerProcess(work / "server", reconcile_interval_s=1.0)
    server.start()
    me = psutil.Process()
    rss0 = me.memory_info().rss
    plans = plan_fleet(parse_tiers(None, a.devices), full=a.full)
    fleet = Fleet(
        server.url,
        server.admin_token,
        plans,
        work,
        FleetOptions(
            checkin_s=a.checkin_interval, telemetry_s=a.telemetry_interval, requests_per_s=a.rps, start_stagger_s=0.0
        ),
    )
    try:
        t = time.monotonic()
        await fleet.start()
        await fleet.wait_enrolled(max(120.0, len(plans) * 0.5))
        print(f"enrolled {len(plans)} agents in {time.monotonic() - t:.1f} s", flush=True)
        await fleet.api(
            "POST", "/api/v1/packages", content=pkg.read_bytes(), headers={"Content-Type": "application/octet-stream"}
        )
        await fleet.api(
            "POST",
            "/api/v1/rollouts",
            json={
                "model": "digits",
                "version": "1.0.0",
                "policy": {"waves": [100], "bake_s": 0, "min_devices": 1, "min_requests": 0},
            },
        )
        # measure from here: the fleet is up, the rollout runs during the hold like any other day
        s0 = fleet.summary()
        fleet.stats.latencies.clear()
        t0 = time.monotonic()
        secs = parse_duration(a.duration)
        while time.monotonic() - t0 < secs:
            await asyncio.sleep(min(30.0, secs - (time.monotonic() - t0)))
            s = fleet.summary()
            n = s["checkins"] - s0["checkins"]
            ok = s["checkins_ok"] - s0["checkins_ok"]
            print(
                f"  {time.monotonic() - t0:6.0f} s  check-ins {ok}/{n}  rss {me.memory_info().rss / 2**20:.0f} MB",
                flush=True,
            )
        s = fleet.summary()
        el = time.monotonic() - t0
        n, ok = s["checkins"] - s0["checkins"], s["checkins_ok"] - s0["checkins_ok"]
        devs = await fleet.api("GET", "/api/v1/devices")
        lat = sorted(fleet.stats.latencies)
        return {
            "agents_held": len(fleet.lite) + s["full_agents_alive"],
            "full_agents": s["full_agents"],
            "duration_s": round(el, 1),
            "checkins": n,
            "checkins_per_s": round(n / el, 1),
            "checkin_success_rate": round(ok / n, 5) if n else None,
            "reports": s["reports"] - s0["reports"],
            "report_success_rate": round(
                (s["reports_ok"] - s0["reports_ok"]) / max(1, s["reports"] - s0["reports"]), 5
            ),
            "checkin_p95_ms": round(lat[int(0.95 * (len(lat) - 1))] * 1000, 2) if lat else None,
            "devices_serving_1.0.0": sum(1 for d in devs if d["served"]["version"] == "1.0.0"),
            "memory_per_lightweight_agent_mb": round(
                (me.memory_info().rss - rss0) / max(1, len(fleet.lite)) / 2**20, 3
            ),
            "inference_ok": s["inference_ok"],
        }
    finally:
        await fleet.stop()
        server.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=500)
    p.add_argument("--full", type=int, default=20)
    p.add_argument("--duration", default="10m")
    p.add_argument("--checkin-interval", type=float, default=5.0)
    p.add_argument("--telemetry-interval", type=float, default=30.0)
    p.add_argument("--rps", type=float, default=0.2)
    print(json.dumps(asyncio.run(main(p.parse_args())), indent=1))
