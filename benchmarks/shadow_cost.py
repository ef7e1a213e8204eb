"""What a shadow phase costs the served requests, side by side in one run (docs/adr/0107-shadow-evaluation.md).

A device agent serves the digits MLP (its worker answers HTTP itself) at a steady request rate — an open-loop
schedule, request *i* sent at ``start + i / rate``, one keep-alive connection — in blocks of ``--block`` requests
with the shadow phase off and on in turn (on: the candidate, another package of the same model, in its
low-priority worker, fed the mirrored requests at the order's ``rate_per_s`` and ``cpu_share``; off: mirroring
turned off, the candidate's worker idle), ``--rounds`` agent processes, each starting with the other mode: a
machine whose load drifts weighs on both modes alike.
Prints p50 and p99 of the served latency (as the client sees it) for each, and the ratio on/off; the target is a
p99 at most 10 % higher with the shadow on. Also prints how many requests the candidate compared and dropped, so
a run where the shadow did nothing cannot pass for a cheap one.

    .venv/bin/python benchmarks/shadow_cost.py [--rate 200] [--requests 3000] [--block 250] [--rounds 2]
        [--shadow-rate 20] [--cpu-share 0.25]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _agent(data_dir: Path, port: int, candidate: Path, shadow_rate: float, cpu_share: float) -> None:
    """The agent process of one round: serves slot A, with ``candidate`` ready in shadow; ``on`` and ``off`` lines
    on stdin turn mirroring on and off (each answered ``ok``); at EOF it prints the candidate's counts."""
    from edgefleet.agent import Agent, Supervisor
    from edgefleet.agent.shadow import ShadowEvaluator
    from edgefleet.agent.worker.spec import WorkerSpec
    from edgefleet.config import AgentSettings
    from edgefleet.protocol import ShadowOrder

    async def run() -> None:
        a = Agent(AgentSettings(data_dir=data_dir, port=port, telemetry_interval_s=3600))
        await a.start()
        order = ShadowOrder(
            rollout_id="bench",
            model="digits",
            version="2.0.0",
            target="digits-2.0.0.efpkg",
            rate_per_s=shadow_rate,
            cpu_share=cpu_share,
        )
        ev = ShadowEvaluator(order, WorkerSpec(candidate, role="shadow"), "top1")
        await ev.start()
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            a.shadow = ev if line == "on" else None
            a._sync_mirror()
            assert isinstance(a.backend, Supervisor) and a.backend.worker is not None
            await a.backend.worker.call(("flush",))  # answered after the shadow frame: the worker has it
            print("ok", flush=True)
        stats = ev.take().model_dump(mode="json")
        a.shadow = None
        await ev.stop()
        await a.stop()
        print(json.dumps({"shadow": stats}), flush=True)

    asyncio.run(run())


def _packages(folder: Path) -> tuple[Path, Path]:
    from edgefleet import examples
    from edgefleet.data import CallData
    from edgefleet.package import build_package

    mlp = folder / "digits_mlp.onnx"
    mlp.write_bytes(examples.train_digits_mlp(hidden=(64,)))
    x = examples.digits().x_test.astype(np.float32)
    calls = CallData({"X": x[:16, None, :]})
    ref = CallData({"X": x[:200, None, :]})
    out = []
    for v in ("1.0.0", "2.0.0"):
        out.append(
            build_package(
                mlp, folder / f"digits-{v}.efpkg", name="digits", version=v, sample_inputs=calls, reference_data=ref
            )
        )
    return out[0], out[1]


def _install(data_dir: Path, package: Path) -> None:
    from edgefleet.agent.state import PersistedState, SlotInfo, StateStore
    from edgefleet.protocol import AgentState

    (data_dir / "slots").mkdir(parents=True, exist_ok=True)
    (data_dir / "slots" / "A.efpkg").write_bytes(package.read_bytes())
    info = SlotInfo(slot="A", model="digits", version="1.0.0", target="digits-1.0.0.efpkg", rollout_id=None)
    StateStore(data_dir).save(PersistedState(state=AgentState.committed, committed=info, active=info))


def _round(
    tmp: Path, v1: Path, candidate: Path, args: argparse.Namespace, x: np.ndarray, first: str
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    import httpx

    from edgefleet.sim.server import free_port

    data_dir = Path(tempfile.mkdtemp(dir=tmp))
    _install(data_dir, v1)
    port = free_port()
    cmd = [sys.executable, __file__, "--agent", str(data_dir), str(port), str(candidate)]
    cmd += ["--shadow-rate", str(args.shadow_rate), "--cpu-share", str(args.cpu_share)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit("the agent did not start")
    url = f"http://127.0.0.1:{port}/v2/models/digits/infer"
    bodies = [
        json.dumps({"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": r.tolist()}]}).encode()
        for r in x[:256]
    ]
    lat: dict[str, list[float]] = {"off": [], "on": []}

    def mode(m: str) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(m + "\n")
        proc.stdin.flush()
        if proc.stdout.readline().strip() != "ok":
            raise SystemExit(f"the agent did not turn the shadow {m}")

    with httpx.Client(timeout=30, headers={"content-type": "application/json"}) as http:
        mode("on")
        for i in range(200):  # warm-up: the worker's first calls, the connection, the candidate's first runs
            http.post(url, content=bodies[i % len(bodies)])
        order = [first, "on" if first == "off" else "off"]
        for b in range(-(-args.requests // args.block) * 2):
            m = order[b % 2]
            mode(m)
            start = time.perf_counter() + 0.02
            interval = 1.0 / args.rate
            for i in range(args.block):
                wait = start + i * interval - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                t0 = time.perf_counter()
                r = http.post(url, content=bodies[i % len(bodies)])
                lat[m].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise SystemExit(f"answer {r.status_code}: {r.text}")
    proc.stdin.close()
    out = proc.stdout.read()
    proc.wait(60)
    stats = json.loads(out.strip().splitlines()[-1])["shadow"]
    return lat, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200.0, help="served requests a second (steady)")
    ap.add_argument("--requests", type=int, default=3000, help="requests per mode and round")
    ap.add_argument("--block", type=int, default=250, help="requests in a row in one mode")
    ap.add_argument("--rounds", type=int, default=2, help="agent processes, each alternating off and on")
    ap.add_argument("--shadow-rate", type=float, default=20.0, help="the order's rate_per_s")
    ap.add_argument("--cpu-share", type=float, default=0.25, help="the order's cpu_share")
    ap.add_argument("--agent", nargs=3, metavar=("DATA_DIR", "PORT", "CANDIDATE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.agent:
        data_dir, port, candidate = args.agent
        _agent(Path(data_dir), int(port), Path(candidate), args.shadow_rate, args.cpu_share)
        return
    from edgefleet import examples

    x = examples.digits().x_test.astype(np.float32)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        v1, v2 = _packages(tmp)
        lat: dict[str, list[float]] = {"off": [], "on": []}
        compared = dropped = 0
        for k in range(args.rounds):
            got, stats = _round(tmp, v1, v2, args, x, "off" if k % 2 == 0 else "on")
            for m in ("off", "on"):
                lat[m] += got[m]
            compared += stats["compared"]
            dropped += stats["dropped"]
    print(
        f"shadow cost: {args.rate:g} req/s steady, {args.requests} requests per mode in blocks of {args.block} x "
        f"{args.rounds} rounds, "
        f"shadow at <= {args.shadow_rate:g}/s and {args.cpu_share:g} of a core; {os.cpu_count()} CPUs"
    )
    print(f"{'':8}{'p50 ms':>10}{'p99 ms':>10}")
    q = {m: (float(np.percentile(v, 50)) * 1e3, float(np.percentile(v, 99)) * 1e3) for m, v in lat.items()}
    for m in ("off", "on"):
        print(f"{'shadow ' + m:8}{q[m][0]:>10.3f}{q[m][1]:>10.3f}")
    print(
        f"ratio on/off: p50 x{q['on'][0] / q['off'][0]:.3f}, p99 x{q['on'][1] / q['off'][1]:.3f} (target p99 <= x1.10)"
    )
    print(f"the candidate compared {compared} mirrored requests and dropped {dropped} (busy or over its CPU share)")


if __name__ == "__main__":
    main()
