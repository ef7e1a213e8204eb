"""Delivery controls of a group's configuration document: a bandwidth cap on package downloads (held by the agent,
on every connection) and a staggered download start (spread over the fleet by device).

The decisions are pure (``pace_delay``, ``stagger_delay``) and tested exhaustively. Against the real control plane
(``tests/_fleet_support.py``): a real ``edgefleet agent`` process holds the cap over a 1.5 MB download — watched
as the bytes land on the device's disk — and an agent in this process, whose clock and link write down what it
does, sleeps its own share of the stagger period before it asks for the package."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _fleet_support import AgentProc, Fleet, committed_version, make_packages, running, settings, state_of, until
from conftest import free_port
from edgefleet.agent.updater import pace_delay, stagger_delay
from edgefleet.controlplane.devices import render
from edgefleet.protocol import DesiredState, DeviceConfig

CAP = 500_000  # bytes per second


def test_pace_delay_keeps_the_average_at_the_cap() -> None:
    assert pace_delay(0, 0.0, 1000) == 0.0
    assert pace_delay(500, 0.0, 1000) == pytest.approx(0.5)  # ahead of the cap: wait until it is the average
    assert pace_delay(500, 0.5, 1000) == 0.0
    assert pace_delay(500, 2.0, 1000) == 0.0  # behind (a slow link): never a wait
    total, t = 0, 0.0
    for chunk in [4096] * 100:  # a reader that waits what it is told reads at the cap, not above
        total += chunk
        t += pace_delay(total, t, 100_000)
    assert total / t == pytest.approx(100_000)


def test_stagger_spreads_devices_evenly_and_is_stable() -> None:
    delays = [stagger_delay(f"dev-{i}", "digits-2.0.0.efpkg", 600.0) for i in range(2000)]
    assert all(0 <= d < 600 for d in delays)
    counts = np.histogram(delays, bins=10, range=(0, 600))[0]
    assert counts.min() > 140 and counts.max() < 260, counts  # about 200 per tenth of the period
    assert stagger_delay("dev-1", "t", 600.0) == stagger_delay("dev-1", "t", 600.0)  # the same after a restart
    assert stagger_delay("dev-1", "a", 600.0) != stagger_delay("dev-1", "b", 600.0)  # and per target
    assert stagger_delay("dev-1", "t", 0.0) == 0.0


def test_unset_delivery_controls_stay_out_of_the_document_older_agents_read() -> None:
    plain = render(DesiredState(device_id="d1"))
    assert b"download_rate_bps" not in plain and b"download_stagger_s" not in plain
    capped = render(DesiredState(device_id="d1", config=DeviceConfig(download_rate_bps=CAP, download_stagger_s=5)))
    back = DesiredState.model_validate_json(capped)
    assert back.config.download_rate_bps == CAP and back.config.download_stagger_s == 5


def _big_model(path: Path, mb: float) -> Path:
    """The digits MLP's inputs and outputs around an initializer of ``mb`` MB of random (incompressible) floats."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 64])
    probs = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.random((64, 10), dtype=np.float32), "W")
    big = numpy_helper.from_array(rng.random((int(mb * 1e6 / 4),), dtype=np.float32), "BIG")
    zero = numpy_helper.from_array(np.zeros((), dtype=np.float32), "zero")
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["logits0"]),
        helper.make_node("ReduceSum", ["BIG"], ["bigsum"], keepdims=0),
        helper.make_node("Mul", ["bigsum", "zero"], ["z"]),
        helper.make_node("Add", ["logits0", "z"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    g = helper.make_graph(nodes, "big", [x], [probs], [w, big, zero])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, path)
    return path


def test_a_capped_download_holds_the_cap(fleet: Fleet, tmp_path: Path, digits: Any) -> None:
    model = _big_model(tmp_path / "big.onnx", 1.5)
    pkg = make_packages(model, digits.x_test, tmp_path / "pkgs", ["1.0.0"])["1.0.0"]
    fleet.publish(pkg)
    agent = AgentProc(fleet.url, fleet.enrollment_token(), tmp_path / "dev", free_port())
    agent.start()
    try:
        agent.wait_until(lambda: fleet.device_ids(), what="enrollment")
        fleet.pin("1.0.0", download_rate_bps=CAP, probation_seconds=0.2, probation_requests=1000)
        downloads = tmp_path / "dev" / "downloads"
        seen: list[tuple[float, int]] = []  # (time, bytes on disk) while the download runs
        deadline = time.monotonic() + 60
        while committed_version(agent.data_dir) != "1.0.0":
            assert time.monotonic() < deadline and agent.proc is not None and agent.proc.poll() is None
            files = list(downloads.glob("*.partial")) if downloads.is_dir() else []
            if files:
                try:
                    seen.append((time.monotonic(), files[0].stat().st_size))
                except FileNotFoundError:
                    pass  # renamed into its slot between the listing and the stat
            time.sleep(0.02)
    finally:
        agent.stop()
    size = pkg.stat().st_size
    assert size > 1_400_000 and seen, (size, seen)
    # the achieved rate over what was watched: from the first bytes seen to the last growth
    first = seen[0]
    last = max(seen, key=lambda s: (s[1], -s[0]))
    last = min((s for s in seen if s[1] == last[1]), key=lambda s: s[0])
    rate = (last[1] - first[1]) / (last[0] - first[0])
    assert last[1] - first[1] > size * 0.6, (first, last, size)  # most of the download was watched
    assert rate <= CAP * 1.1, f"{rate:.0f} bytes/s over a cap of {CAP}"
    assert rate >= CAP * 0.7, f"{rate:.0f} bytes/s: far below the cap of {CAP} with nothing else to slow it"
    assert state_of(agent.data_dir)["committed"]["version"] == "1.0.0"


class _Recorder(httpx.AsyncBaseTransport):
    """The agent's clock and its link, writing down in one list when it sleeps and when it asks for a target."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.log: list[tuple[str, Any]] = []

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        self.log.append(("sleep", seconds))
        await asyncio.sleep(seconds)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/tuf/targets/"):
            self.log.append(("target", request.url.path))
        return await self.inner.handle_async_request(request)


def test_a_staggered_download_waits_its_share_of_the_period(
    fleet: Fleet, tmp_path: Path, mlp_path: Path, digits: Any
) -> None:
    from edgefleet.agent import InProcessBackend

    fleet.publish(*make_packages(mlp_path, digits.x_test, tmp_path / "pkgs", ["1.0.0"]).values())
    rec = _Recorder(fleet.transport())
    stagger = 2.0
    conf = settings(tmp_path / "dev", "http://control-plane.test", fleet.enrollment_token())

    async def go() -> str:
        async with running(conf, transport=rec, clock=rec, backend_factory=InProcessBackend) as a:
            await until(lambda: fleet.device_ids(), 30, "enrollment")
            await asyncio.to_thread(
                fleet.pin, "1.0.0", download_stagger_s=stagger, probation_seconds=0.2, probation_requests=1000
            )
            await until(lambda: a.state.committed is not None, 60, "v1 committed")
            return str(a.identity["device_id"])

    device_id = asyncio.run(go())
    delay = stagger_delay(device_id, "digits-1.0.0.efpkg", stagger)
    first_get = next(i for i, (what, _) in enumerate(rec.log) if what == "target")
    # it slept exactly its own share of the period, before it asked for the package
    assert ("sleep", delay) in rec.log[:first_get], (delay, rec.log[:first_get][-5:])
