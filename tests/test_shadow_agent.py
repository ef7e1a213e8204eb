"""Shadow evaluation on the device: agreement, the CPU share, the worker's mirror, the candidate's evaluator."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.frames import encode, take
from edgefleet.agent.shadow import CpuBudget, ShadowEvaluator, agrees, metric_for
from edgefleet.agent.worker.mirror import SHIP_BATCH, WorkerMirror
from edgefleet.agent.worker.spec import WorkerSpec
from edgefleet.protocol import DesiredState, ShadowOrder, ShadowStats, TelemetryWindow

ORDER = ShadowOrder(rollout_id="r1", model="digits", version="2.0.0", target="digits-2.0.0.efpkg", cpu_share=1.0)


# ------------------------------------------------------------------------------------------------ agreement


def test_top1_agreement_compares_the_top_class_of_every_row() -> None:
    p = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], np.float32)
    same_top = np.array([[0.0, 0.6, 0.4], [0.9, 0.05, 0.05]], np.float32)
    other_top = np.array([[0.0, 0.6, 0.4], [0.1, 0.8, 0.1]], np.float32)
    assert agrees({"probabilities": p}, {"probabilities": same_top})
    assert not agrees({"probabilities": p}, {"probabilities": other_top})  # one row differs
    assert not agrees({"probabilities": p}, {"probabilities": p[:1]})  # another shape
    # no class scores: the first integer output (labels) must be equal
    assert agrees({"label": np.array([3])}, {"label": np.array([3])})
    assert not agrees({"label": np.array([3])}, {"label": np.array([4])})
    # the class scores win over the labels, whatever the order of the outputs
    assert agrees({"label": np.array([1]), "p": p[:1]}, {"label": np.array([9]), "p": same_top[:1]})
    assert not agrees({"y": p}, {"z": p})  # nothing in common: cannot agree


def test_cosine_agreement_and_the_declared_metric() -> None:
    a = np.array([1.0, 2.0, 3.0], np.float32)
    assert agrees({"e": a}, {"e": a * 1.01}, "cosine")
    assert not agrees({"e": a}, {"e": a[::-1].copy()}, "cosine")
    assert agrees({"e": np.zeros(3)}, {"e": np.zeros(3)}, "cosine")
    assert not agrees({"e": np.zeros(3)}, {"e": a}, "cosine")
    assert [metric_for(m) for m in (None, "top1", "agreement", "cosine", "cosine-min", "sqnr", "ctc")] == [
        "top1",
        "top1",
        "top1",
        "cosine",
        "cosine",
        "cosine",
        "top1",
    ]


def test_the_cpu_budget_holds_the_candidate_to_its_share() -> None:
    b = CpuBudget(0.25, burst_s=0.5, now=0.0)
    assert b.allow(0.0)
    b.spend(0.6, 0.0)  # one long run may overdraw ...
    assert not b.allow(0.0) and not b.allow(0.3)  # ... and the refill (0.25 s a second) must repay it
    assert b.allow(0.5)
    b.spend(10.0, 0.5)
    assert not b.allow(30.0) and b.allow(41.0)
    assert CpuBudget(0.25, now=0.0).tokens == 0.5  # never more than the burst
    c = CpuBudget(1.0, burst_s=0.5, now=0.0)
    assert c.allow(1000.0) and c.tokens == 0.5


# ------------------------------------------------------------------------------------------------ the worker's side


def test_the_mirror_copies_at_the_rate_and_ships_in_batches() -> None:
    sent: list[bytes] = []
    now = [0.0]
    m = WorkerMirror(sent.append, 8.0, clock=lambda: now[0])
    x = np.zeros((1, 4), np.float32)
    for i in range(100):  # 64 requests a second (times exact in binary), mirrored at 8 a second
        now[0] = i / 64
        x[0, 0] = i
        m.observe({"X": x}, {"y": np.array([i])})
    m.ship()
    batches = [take(bytearray(b))[0] for b in sent]
    kept = [item for b in batches for item in b[1]]
    assert all(b[0] == "mirror" for b in batches)
    assert [int(f["X"][0, 0]) for f, _ in kept] == list(range(0, 100, 8))  # evenly, one in every 0.125 s
    assert [int(o["y"][0]) for _, o in kept] == list(range(0, 100, 8))  # with the served outputs
    assert len(batches) > 1 and all(len(b[1]) <= SHIP_BATCH for b in batches)  # shipped every 0.1 s
    big = WorkerMirror(sent.append, 1000.0, max_bytes=8)
    big.observe({"X": x}, {})
    assert big.pending == []  # a request over the size cap is not mirrored


@pytest.mark.process
def test_the_worker_mirrors_after_answering_and_ships_before_the_drift_answer() -> None:
    from edgefleet.agent.worker.main import serve_loop

    ours, theirs = socket.socketpair()
    ours.settimeout(30)

    def handle(msg: tuple[Any, ...]) -> tuple[Any, ...] | None:
        return None if msg[0] == "stop" else ("ok", [], 0.0)

    t = threading.Thread(target=serve_loop, args=(theirs, lambda f, o: {"y": f["X"] * 2}, handle, ()), daemon=True)
    t.start()
    buf = bytearray()

    def ask(*msgs: tuple[Any, ...], n: int) -> list[tuple[Any, ...]]:
        ours.sendall(b"".join(encode(m) for m in msgs))
        got: list[tuple[Any, ...]] = []
        while sum(m[0] != "mirror" for m in got) < n:
            buf.extend(ours.recv(1 << 20))
            got += take(buf)
        return got

    x = [np.full((1, 3), i, np.float32) for i in range(3)]
    assert [m[0] for m in ask(("infer", {"X": x[0]}, None), ("drift",), n=2)] == ["ok", "ok"]  # off by default
    assert ask(("shadow", 10.0), n=1) == [("ok", None, 0.0)]
    answers = ask(*[("infer", {"X": v}, None) for v in x], n=3) + ask(("drift",), n=1)
    assert [m[0] for m in answers] == ["ok", "ok", "ok", "mirror", "ok"]  # after the answers, before the drift's
    mirrored = answers[3][1]
    assert len(mirrored) == 1  # one in 0.1 s at 10 a second
    feeds, outputs = mirrored[0]
    assert feeds["X"].tolist() == x[0].tolist() and outputs["y"].tolist() == (x[0] * 2).tolist()
    off = ask(("shadow", 0), ("infer", {"X": x[1]}, None), ("drift",), n=3)
    assert [m[0] for m in off] == ["ok", "ok", "ok"]
    ours.sendall(encode(("stop",)))
    t.join(10)
    ours.close()


# ------------------------------------------------------------------------------------------------ the candidate


@pytest.mark.process
@pytest.mark.timeout(120)
def test_the_evaluator_runs_the_candidate_compares_and_counts(mlp_path: Path, digits: Any) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]

    def served(x: np.ndarray, *, flip: bool = False) -> dict[str, Any]:
        out = dict(zip(names, sess.run(names, {"X": x}), strict=True))
        if flip:  # another model's answer: the classes shifted by one
            out = {k: np.roll(v, 1, axis=-1) if v.ndim == 2 else (v + 1) % 10 for k, v in out.items()}
        return out

    xs = [digits.x_test[i : i + 1].astype(np.float32) for i in range(30)]

    async def go() -> list[ShadowStats]:
        ev = ShadowEvaluator(ORDER, WorkerSpec(mlp_path, role="shadow"), "top1", queue_max=4)
        info = await ev.start()
        assert info.name == "digits_mlp"
        windows = []
        try:
            for x in xs[:10]:  # one at a time: each is run
                ev.offer([({"X": x}, served(x))])
                await _drained(ev)
            windows.append(ev.take())
            for x in xs[10:20]:
                ev.offer([({"X": x}, served(x, flip=True))])
                await _drained(ev)
            ev.offer([({"X": x}, served(x)) for x in xs[20:30]])  # ten at once: four fit the queue
            ev.offer([("not", "a pair"), 7])  # malformed copies are ignored
            await _drained(ev)
            windows.append(ev.take())
            assert ev.worker is not None
            ev.worker.kill()  # the candidate dies: what it is offered from then on counts as its errors
            await asyncio.wait_for(ev.worker.closed.wait(), 10)
            ev.offer([({"X": xs[0]}, served(xs[0]))])
            await _drained(ev)
            windows.append(ev.take())
        finally:
            await ev.stop()
        return windows

    first, second, third = asyncio.run(go())
    assert (first.compared, first.agreed, first.errors, first.dropped) == (10, 10, 0, 0)
    assert first.latency.count == 10 and first.rollout_id == "r1" and first.version == "2.0.0"
    assert (second.compared, second.agreed, second.errors, second.dropped) == (14, 4, 0, 6)
    assert third.compared >= 1 and third.errors == third.compared and third.agreed == 0
    TelemetryWindow(window_id="w", start="2026-01-01T00:00:00Z", end="2026-01-01T00:01:00Z", shadow=second)


async def _drained(ev: ShadowEvaluator) -> None:
    for _ in range(2000):
        if not ev.queue and (ev.worker is None or not ev.worker.in_flight):
            await asyncio.sleep(0)
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the candidate did not drain its queue")


# ------------------------------------------------------------------------------------------------ the wire


def test_shadow_stats_are_bounded_by_what_was_compared() -> None:
    with pytest.raises(ValueError, match="more than the 3 compared"):
        ShadowStats(rollout_id="r", compared=3, agreed=4)
    with pytest.raises(ValueError, match="more than the 3 compared"):
        ShadowStats(rollout_id="r", compared=3, errors=4)
    with pytest.raises(ValueError, match="cpu_share"):
        ShadowOrder(rollout_id="r", model="m", version="1", target="m-1.efpkg", cpu_share=2)


def test_the_desired_state_carries_the_order_only_when_there_is_one() -> None:
    from edgefleet.controlplane.devices import render

    plain = render(DesiredState(device_id="d"))
    assert b"shadow" not in plain  # agents that predate the field keep reading desired states
    doc = render(DesiredState(device_id="d", shadow=ORDER))
    assert DesiredState.model_validate_json(doc).shadow == ORDER
