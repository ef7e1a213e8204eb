"""What a second model on the device costs the first model's requests (docs/adr/0108-several-models-per-device.md).

With one model the worker serves the inference port itself (ADR 0032); with an additional model assigned the agent
keeps the port and relays each request to the worker of the model it names. Each round starts an agent process per
mode — ``one`` (alpha only) and ``two`` (alpha, and beta beside it) — in alternating order, and sends ``--requests``
sequential requests for alpha over one keep-alive connection. Prints p50 and p99 as the client sees them per mode
and the ratios two/one.

    .venv/bin/python benchmarks/several_models.py [--requests 2000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

AGENT = """
import asyncio, sys
from edgefleet.agent import Agent
from edgefleet.config import AgentSettings

async def main():
    a = Agent(AgentSettings(data_dir=sys.argv[1], port=int(sys.argv[2]), host="127.0.0.1"))
    await a.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await a.stop()

asyncio.run(main())
"""


def _install(folder: Path, package: Path) -> None:
    from edgefleet.agent.state import PersistedState, SlotInfo, StateStore
    from edgefleet.package import open_package
    from edgefleet.protocol import AgentState, target_name

    m = open_package(package).manifest
    (folder / "slots").mkdir(parents=True, exist_ok=True)
    (folder / "slots" / "A.efpkg").write_bytes(package.read_bytes())
    info = SlotInfo(slot="A", model=m.name, version=m.version, target=target_name(m.name, m.version))
    StateStore(folder).save(PersistedState(state=AgentState.committed, committed=info, active=info))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(data_dir: Path, rows: np.ndarray, n: int) -> list[float]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(data_dir), str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        out: list[float] = []
        for i in range(n + 200):  # the first 200: warm-up (a fresh worker, the relay's first connections)
            body = json.dumps(
                {"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": rows[i % len(rows)].tolist()}]}
            )
            t0 = time.perf_counter()
            conn.request("POST", "/v2/models/alpha/infer", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            if r.status == 503:  # the first model's worker is being replaced (the agent takes the port back)
                time.sleep(0.05)
                continue
            assert r.status == 200, r.status
            if i >= 200:
                out.append(time.perf_counter() - t0)
        conn.close()
        return out
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from edgefleet import examples
    from edgefleet.data import CallData
    from edgefleet.package import build_package

    digits = examples.digits()
    rows = digits.x_test.astype(np.float32)
    lat: dict[str, list[float]] = {"one": [], "two": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mlp = root / "mlp.onnx"
        mlp.write_bytes(examples.train_digits_mlp(hidden=(64,)))
        calls = CallData({"X": rows[:16, None, :]})
        pkgs = {
            n: build_package(mlp, root / f"{n}.efpkg", name=n, version="1.0.0", sample_inputs=calls)
            for n in ("alpha", "beta")
        }
        for r in range(args.rounds):
            for mode in ("one", "two") if r % 2 == 0 else ("two", "one"):
                d = root / f"{mode}-{r}"
                _install(d, pkgs["alpha"])
                if mode == "two":
                    _install(d / "models" / "beta", pkgs["beta"])
                lat[mode] += _run(d, rows, args.requests)
    q = {m: np.percentile(np.array(v) * 1000, [50, 99]) for m, v in lat.items()}
    for m in ("one", "two"):
        print(f"{m} model(s): p50 {q[m][0]:.3f} ms, p99 {q[m][1]:.3f} ms ({len(lat[m])} requests)")
    print(f"two/one: p50 x{q['two'][0] / q['one'][0]:.2f}, p99 x{q['two'][1] / q['one'][1]:.2f}")


if __name__ == "__main__":
    main()
