"""Bandwidth cap accuracy: the rate a real agent achieves downloading a package under its group's
``download_rate_bps``, against the cap, over a download of about ``--seconds`` at the cap.

A real control plane (``edgefleet server`` on loopback, SQLite) and a real agent (``edgefleet agent``, its own
process and data folder); the operator's side goes through the SDK (``edgefleet.sdk.Client``): publish the
package, put the cap into the group's configuration document, pin the device to the version. The package is a
digits MLP (``edgefleet.examples.train_digits_mlp``) with hidden layers wide enough that it weighs about
cap × seconds bytes; it is trained for only 2 epochs, as only its size matters here.

The rate is watched where it lands: the size of the agent's ``downloads/*.partial`` file, sampled every 20 ms,
from the first bytes seen to the last growth (the file is renamed into its slot once complete). With ``--resume``,
a second fresh device is killed (SIGKILL) halfway through the same download and started again; it resumes with a
Range request, and the rate of each part and of the two together (the restart's gap left out) is shown.

    .venv/bin/python benchmarks/delivery.py [--cap 500000] [--seconds 30] [--resume] [--json]

Target (as in tests/test_delivery_controls.py): achieved rate within 10 % of the cap. Loopback is far faster than
the cap, so the link never slows the download below it; the figure is the agent's pacing alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

EXE = str(Path(sys.executable).with_name("edgefleet"))
GROUP = "bench"
TIER = "bench-tier"  # a tier this repository does not ship: the device's hardware is not checked against it
SAMPLE_S = 0.02


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := pred():
            return got
        time.sleep(0.05)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def build(out: Path, target_bytes: int) -> Path:
    """A digits MLP package of about ``target_bytes``: two hidden layers of h units hold 64h + h² + 10h float32
    weights, so h is picked for 4 (64h + h² + 10h) ≈ target."""
    from edgefleet.data import CallData
    from edgefleet.examples import digits, train_digits_mlp
    from edgefleet.package import build_package

    h = max(8, int((-74 + math.sqrt(74**2 + target_bytes)) / 2))
    model = train_digits_mlp(hidden=(h, h), max_iter=2)
    x = digits().x_test
    return build_package(
        model,
        out / "digits-1.0.0.efpkg",
        name="digits",
        version="1.0.0",
        sample_inputs=CallData({"X": x[:16, None, :]}),
    )


def start_agent(server: str, token: str | None, data_dir: Path) -> subprocess.Popen[bytes]:
    """``token`` None: a device that enrolled already, started again."""
    args = [EXE, "agent", "--server", server, "--data-dir", str(data_dir)] + (["--token", token] if token else [])
    args += ["--port", str(free_port()), "--checkin-interval", "0.2", "--telemetry-interval", "1"]
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def partial_size(data_dir: Path) -> int | None:
    """Bytes of the download in progress, None when there is none (not started, or done and moved to its slot)."""
    for f in (data_dir / "downloads").glob("*.partial") if (data_dir / "downloads").is_dir() else []:
        try:
            return f.stat().st_size
        except FileNotFoundError:
            return None
    return None


def committed(data_dir: Path) -> str | None:
    try:
        state = json.loads((data_dir / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return (state.get("committed") or {}).get("version")


def watch(data_dir: Path, proc: subprocess.Popen[bytes], until: Any, timeout: float) -> list[tuple[float, int]]:
    """(time, bytes on disk) samples of the download until ``until(samples)`` holds."""
    seen: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout
    while not until(seen):
        if time.monotonic() > deadline:
            raise SystemExit(f"the download did not finish in {timeout:.0f} s")
        if proc.poll() is not None:
            raise SystemExit(f"the agent exited with {proc.returncode}")
        n = partial_size(data_dir)
        if n is not None:
            seen.append((time.monotonic(), n))
        time.sleep(SAMPLE_S)
    return seen


def span(seen: list[tuple[float, int]]) -> dict[str, float]:
    """Bytes and seconds from the first growth to the last: from the last sample at the starting size (a restarted
    agent's file sits there while it starts, checks in and refreshes its metadata) to the first at the final one."""
    start, top = seen[0][1], max(n for _, n in seen)
    first_t = max(t for t, n in seen if n == start)
    last_t = min(t for t, n in seen if n == top)
    return {"bytes": top - start, "seconds": last_t - first_t, "from_byte": start, "to_byte": top}


def rate_row(label: str, part: dict[str, float], cap: int) -> dict[str, Any]:
    rate = part["bytes"] / part["seconds"] if part["seconds"] > 0 else float("nan")
    return {"run": label, **part, "rate_bps": rate, "ratio": rate / cap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cap", type=int, default=500_000, help="download_rate_bps, bytes per second [500000]")
    ap.add_argument("--seconds", type=float, default=30.0, help="the download's length at the cap [30]")
    ap.add_argument("--resume", action="store_true", help="also a second device killed halfway and restarted")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.cap < 1024 or a.seconds < 2:
        ap.error("--cap must be at least 1024 bytes/s and --seconds at least 2")

    from edgefleet.sdk import Client

    tmp = Path(tempfile.mkdtemp(prefix="delivery-bench-"))
    pkg = build(tmp, int(a.cap * a.seconds))
    size = pkg.stat().st_size
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = (tmp / "server.log").open("wb")  # its first start writes where the root key went: not our figure
    server = subprocess.Popen(
        [
            EXE,
            "server",
            "--db",
            f"sqlite:///{tmp / 'cp.db'}",
            "--repo",
            str(tmp / "repo"),
            "--port",
            str(port),
            "--reconcile-interval",
            "1",
            "--log-level",
            "warning",
        ],
        stdin=subprocess.DEVNULL,
        stdout=server_log,
        stderr=subprocess.STDOUT,
    )
    agents: list[subprocess.Popen[bytes]] = []
    rows: list[dict[str, Any]] = []
    try:

        def up() -> bool:
            try:
                return httpx.get(f"{url}/health/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "the control plane")
        client = Client(url, (tmp / "admin-token").read_text().strip(), insecure_http=True, timeout=120)
        client.models.publish(pkg)
        probation = {"probation_seconds": 0.5, "probation_requests": 1000}
        client.groups.put(GROUP, config={"checkin_interval_s": 0.2, "download_rate_bps": a.cap, **probation})

        def device(name: str) -> tuple[subprocess.Popen[bytes], Path, str]:
            data = tmp / name
            known = {d.device_id for d in client.devices.list()}
            agents.append(start_agent(url, client.enrollment.create_token(TIER, group=GROUP).token, data))
            new = wait_for(lambda: {d.device_id for d in client.devices.list()} - known, 60, f"{name} to enroll")
            return agents[-1], data, new.pop()

        # one uninterrupted download
        proc, data, dev = device("dev-1")
        client.devices.pin(dev, "1.0.0", model="digits")
        seen = watch(data, proc, lambda s: committed(data) == "1.0.0", a.seconds * 3 + 60)
        rows.append(rate_row("uninterrupted", span(seen), a.cap))

        if a.resume:
            proc, data, dev = device("dev-2")
            client.devices.pin(dev, "1.0.0", model="digits")
            first = watch(data, proc, lambda s: bool(s) and s[-1][1] >= size // 2, a.seconds * 3 + 60)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = first[-1][1]
            agents[-1] = proc = start_agent(url, None, data)
            second = watch(data, proc, lambda s: committed(data) == "1.0.0", a.seconds * 3 + 60)
            if not second or second[0][1] < killed_at:
                raise SystemExit("the restarted agent did not resume: its partial file started over")
            p1, p2 = span(first), span(second)
            rows.append(rate_row("resumed: before the kill", p1, a.cap))
            rows.append(rate_row("resumed: after the restart", p2, a.cap))
            both = {
                "bytes": p1["bytes"] + p2["bytes"],
                "seconds": p1["seconds"] + p2["seconds"],
                "from_byte": p1["from_byte"],
                "to_byte": p2["to_byte"],
            }
            rows.append(rate_row("resumed: both parts", both, a.cap))
        client.close()
    finally:
        for p in agents:
            stop(p)
        stop(server)
        server_log.close()
        shutil.rmtree(tmp, ignore_errors=True)

    if a.json:
        print(json.dumps({"cap_bps": a.cap, "package_bytes": size, "host_cpus": os.cpu_count(), "runs": rows}))
        return
    print(
        f"cap {a.cap:,} bytes/s; package {size:,} bytes ({size / a.cap:.1f} s at the cap); "
        f"real agent and control plane on loopback, {os.cpu_count()} CPUs"
    )
    print(f"{'run':<28}{'bytes watched':>15}{'elapsed s':>11}{'achieved B/s':>14}{'achieved/cap':>14}")
    for r in rows:
        print(f"{r['run']:<28}{r['bytes']:>15,.0f}{r['seconds']:>11.2f}{r['rate_bps']:>14,.0f}{r['ratio']:>14.3f}")
    print(
        f"watched from the first bytes on disk (sampled every {SAMPLE_S * 1000:.0f} ms) to the last growth; "
        "target: achieved/cap within 10 %"
    )


if __name__ == "__main__":
    main()
