"""Consented input sampling: a group that consents (``input_sampling`` with the operator's X25519 public key) has
its devices' workers keep a copy of served inputs after answering, at most ``sample_rate_per_min`` a minute; the
agent seals each for the key and uploads it; ``edgefleet samples pull`` with the private key yields exactly the
served tensor, another key fails in one line. Without consent the worker samples nothing, the agent sends nothing
and the control plane refuses an upload (409); the API and the device page say whether sampling is on.

Pure parts first (``agent/sampling.py``, the frames); then the worker's loop on a socket pair; the control plane
on both databases; then a real agent with its worker serving HTTP against the real control plane."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import socket
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from _fleet_support import Fleet, install, make_packages, settings, until
from _package_helpers import run_cli
from edgefleet.agent.frames import encode, take
from edgefleet.agent.sampling import (
    ArrivalCap,
    SampleSpool,
    keep_samples,
    open_sample,
    pack,
    seal,
    unpack,
)
from edgefleet.agent.worker.sampler import SHIP_BATCH, RateLimiter, WorkerSampler
from edgefleet.errors import DecryptionError
from edgefleet.package import generate_device_keypair
from edgefleet.package.keys import load_device_private_key
from edgefleet.protocol import MAX_SAMPLE_UPLOAD_BYTES, DeviceConfig, InputSample


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Any, Any]:
    """Two operator key pairs: the group's, and another."""
    return generate_device_keypair(tmp_path / "k", name="op"), generate_device_keypair(tmp_path / "k", name="other")


def _sealed(pub: str, sample_id: str = "s1", at: datetime | None = None, **tensors: np.ndarray) -> InputSample:
    t = tensors or {"X": np.arange(64, dtype=np.float32).reshape(1, 64)}
    return seal(
        t, pub, at=at or datetime.now(UTC), device_id="d1", model="digits", version="1.0.0", sample_id=sample_id
    )


# ------------------------------------------------------------------------------------------------ pure parts


def test_the_rate_limiter_admits_at_most_the_rate_in_any_minute() -> None:
    lim = RateLimiter(60)
    assert lim.allow(0.0) and not lim.allow(0.5) and lim.allow(1.0) and not lim.allow(1.999) and lim.allow(2.0)
    assert not any(RateLimiter(0).allow(t) for t in (0.0, 1.0, 1e9))
    # a request every 10 ms for 5 minutes at 7 a minute: evenly spaced, never more than 7 in any 60 s
    lim = RateLimiter(7)
    times = [i / 100 for i in range(30_000) if lim.allow(i / 100)]
    assert len(times) == 35 and all(b - a >= 60 / 7 - 1e-9 for a, b in itertools.pairwise(times))
    assert max(sum(1 for t in times if s <= t < s + 60) for s in times) == 7


def test_the_agent_holds_a_worker_to_the_rate() -> None:
    cap = ArrivalCap(2)
    assert cap.limit == 2 + SHIP_BATCH
    assert cap.admit(0.0, 4) == 4 and cap.admit(1.0, 100) == cap.limit - 4 and cap.admit(59.9, 1) == 0
    assert cap.admit(60.0, 3) == 3  # the first four left the window
    cap.set_rate(0)
    assert cap.admit(500.0, 5) == 0


def test_the_worker_keeps_copies_at_the_rate_and_ships_them_in_batches() -> None:
    now = [0.0]
    frames: list[bytes] = []
    s = WorkerSampler(frames.append, 60, clock=lambda: now[0], wall=lambda: 1000.0 + now[0], max_bytes=1024)
    x = np.ones((1, 4), np.float32)
    s.observe({"X": x})
    x[:] = 7  # the caller reuses its buffer: the sample is a copy
    now[0] = 0.5
    s.observe({"X": x})  # not admitted (one a second)
    s.observe({"X": np.zeros(1000, np.float32)})  # 4000 bytes: never sampled
    assert frames == []
    now[0] = 1.2  # the first has waited a second: it ships before anything else happens
    s.observe({"X": np.full((1, 4), 2, np.float32)})
    (msg,) = take(bytearray(frames.pop()))
    assert msg[0] == "samples" and [(at, d["X"].tolist()) for at, d in msg[1]] == [(1000.0, [[1.0] * 4])]
    fast = WorkerSampler(frames.append, 600, clock=lambda: now[0])  # one every 0.1 s
    for i in range(SHIP_BATCH):
        now[0] = 16 + i / 8
        fast.observe({"X": np.full((1, 4), i, np.float32)})
    (msg,) = take(bytearray(frames.pop()))  # the batch filled before the first had waited a second
    assert [d["X"][0, 0] for _, d in msg[1]] == list(range(SHIP_BATCH)) and fast.pending == []
    fast.ship()
    assert frames == []


def test_frames_carry_samples_and_refuse_malformed_ones() -> None:
    batch: list[tuple[float, dict[str, np.ndarray]]] = [
        (1.5, {"X": np.arange(4, dtype=np.float32)}),
        (2.0, {"a": np.zeros((2, 2)), "b": np.ones(3, np.uint8)}),
    ]
    (msg, rate) = take(bytearray(encode(("samples", batch)) + encode(("sample", 6))))
    assert rate == ("sample", 6.0)
    assert [(at, {k: v.tolist() for k, v in d.items()}) for at, d in msg[1]] == [
        (at, {k: v.tolist() for k, v in d.items()}) for at, d in batch
    ]
    from edgefleet.agent.frames import FrameError, _frame

    with pytest.raises(FrameError, match="out of bounds"):
        take(bytearray(_frame("samples", {"s": [[1.0, 99, [["X", "float32", [1]]]]]}, [b"\0" * 4], 4)))


def test_a_sealed_sample_opens_with_its_key_only(keys: tuple[Any, Any]) -> None:
    mine, other = keys
    x = np.random.default_rng(0).normal(size=(1, 64)).astype(np.float32)
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    s = _sealed(mine.public_key_hex, "abc", at, X=x, ids=np.array([[3, 1]], np.int64), file=np.ones(1, np.uint8))
    assert s.key_id == mine.key_id and InputSample.model_validate_json(s.model_dump_json()) == s
    assert x.tobytes() not in base64.b64decode(s.ciphertext)  # sealed, not encoded
    opened = open_sample(s, load_device_private_key(mine.private_key_path))
    assert opened.tensors["X"].dtype == np.float32 and np.array_equal(opened.tensors["X"], x)
    assert opened.tensors["ids"].tolist() == [[3, 1]] and opened.tensors["file"].tolist() == [1]
    assert opened.meta == {
        "sample_id": "abc",
        "device_id": "d1",
        "model": "digits",
        "version": "1.0.0",
        "at": at.isoformat(),
    }
    with pytest.raises(DecryptionError, match=f"encrypted to key {mine.key_id}, not to this key") as err:
        open_sample(s, load_device_private_key(other.private_key_path))
    assert "\n" not in str(err.value)
    key = load_device_private_key(mine.private_key_path)
    raw = bytearray(base64.b64decode(s.ciphertext))
    raw[10] ^= 1
    with pytest.raises(DecryptionError, match="altered"):
        open_sample(s.model_copy(update={"ciphertext": base64.b64encode(bytes(raw)).decode()}), key)
    with pytest.raises(DecryptionError, match="altered"):  # the AAD binds it to its id: no swapping envelopes
        open_sample(s.model_copy(update={"sample_id": "other"}), key)
    # a decrypted plaintext that would unpack without bound is refused, not allocated
    buf = pack({"X": np.zeros(10, np.uint8)}, {"sample_id": "z"})
    with pytest.raises(ValueError, match="over 4"):
        unpack(buf, max_bytes=4)
    with pytest.raises(ValueError, match="not a sealed"):
        unpack(b"nope")


def test_the_spool_is_bounded_oldest_first_and_durable(tmp_path: Path, keys: tuple[Any, Any]) -> None:
    pub = keys[0].public_key_hex
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    spool = SampleSpool(tmp_path / "s", max_files=3)
    made = [_sealed(pub, f"s{i}", t0 + timedelta(seconds=i)) for i in range(5)]
    assert [spool.add(s) for s in made] == [0, 0, 0, 1, 1]
    assert [s.sample_id for s in spool.pending(10, 1 << 30)] == ["s2", "s3", "s4"] and spool.dropped == 2
    again = SampleSpool(tmp_path / "s", max_files=3)
    assert again.dropped == 2 and len(again) == 3  # across restarts
    assert [s.sample_id for s in again.pending(2, 1 << 30)] == ["s2", "s3"]
    size = len(made[0].model_dump_json())
    assert [s.sample_id for s in again.pending(10, size)] == ["s2"]  # a byte budget, the first always fits
    assert again.forget(["s3", "unknown"]) == 1 and len(again) == 2
    (tmp_path / "s" / "00000000000000000001-bad.sample.json").write_text("{not json")
    assert [s.sample_id for s in again.pending(10, 1 << 30)] == ["s2", "s4"] and again.dropped == 3
    by_bytes = SampleSpool(tmp_path / "b", max_bytes=2 * size + size // 2)
    for s in made[:4]:
        by_bytes.add(s)
    assert len(by_bytes) == 2 and by_bytes.dropped == 2
    assert again.purge() == 2 and len(again) == 0


def test_keep_samples_seals_what_fits_and_counts_the_rest(tmp_path: Path, keys: tuple[Any, Any]) -> None:
    spool = SampleSpool(tmp_path / "s")
    now = datetime.now(UTC).timestamp()
    batch: list[tuple[float, dict[str, np.ndarray]]] = [
        (now, {"X": np.ones((1, 64), np.float32)}),
        (now, {"X": np.zeros(300_000, np.float32)}),  # over MAX_SAMPLE_BYTES
        (now + 10 * 86400, {"X": np.ones(2, np.float32)}),  # a clock far ahead: the protocol refuses it
    ]
    assert keep_samples(spool, batch, keys[0].public_key_hex, device_id="d", model="m", version="1") == 1
    assert len(spool) == 1 and spool.dropped == 2


def test_sampling_needs_the_operators_key() -> None:
    with pytest.raises(ValueError, match="input_sampling needs sample_public_key"):
        DeviceConfig(input_sampling=True)
    with pytest.raises(ValueError, match="sample_rate_per_min"):
        DeviceConfig(input_sampling=True, sample_public_key="ab" * 32, sample_rate_per_min=601)
    assert not DeviceConfig().input_sampling  # off by default


# ------------------------------------------------------------------------------------------------ the worker's loop


@pytest.mark.process
def test_the_worker_samples_after_answering_and_ships_before_the_drift_answer() -> None:
    """The frame path (an agent not serving HTTP): serve_loop on a socket pair, a stand-in model."""
    from edgefleet.agent.worker.main import serve_loop

    ours, theirs = socket.socketpair()
    ours.settimeout(30)

    def handle(msg: tuple[Any, ...]) -> tuple[Any, ...] | None:
        return None if msg[0] == "stop" else ("ok", [], 0.0)

    t = threading.Thread(target=serve_loop, args=(theirs, lambda f, o: {"y": f["X"] * 2}, handle, ()), daemon=True)
    t.start()
    buf = bytearray()

    def ask(*msgs: tuple[Any, ...], n: int) -> list[tuple[Any, ...]]:
        """Send ``msgs``, read until ``n`` answers came (the unasked ``samples`` frames on the way included)."""
        ours.sendall(b"".join(encode(m) for m in msgs))
        got: list[tuple[Any, ...]] = []
        while sum(m[0] != "samples" for m in got) < n:
            buf.extend(ours.recv(1 << 20))
            got += take(buf)
        return got

    x = [np.full((1, 3), i, np.float32) for i in range(3)]
    assert [m[0] for m in ask(("infer", {"X": x[0]}, None), n=1)] == ["ok"]  # off by default: nothing sampled
    assert ask(("sample", 600.0), n=1) == [("ok", None, 0.0)]
    # (a second between two requests would ship the first sample at the second: this machine may be that slow)
    answers = ask(*[("infer", {"X": v}, None) for v in x], n=3) + ask(("drift",), n=1)
    assert answers[-1] == ("ok", [], 0.0)  # what was sampled precedes the drift answer
    shipped = [d["X"].tolist() for m in answers if m[0] == "samples" for _, d in m[1]]
    assert shipped == [x[0].tolist()]  # one in 0.1 s at 600 a minute, after its answer
    off = ask(("sample", 0.0), ("infer", {"X": x[1]}, None), ("drift",), n=3)  # off again: nothing more ships
    assert [m[0] for m in off] == ["ok", "ok", "ok"]
    ours.sendall(encode(("stop",)))
    t.join(10)
    ours.close()


# ------------------------------------------------------------------------------------------------ the control plane


def test_the_server_stores_sealed_samples_once_with_consent_only(
    cp: Any, keys: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On both databases: 409 without consent, idempotent by sample_id, the newest kept per device, hostile
    uploads refused whole, listing and download for operators (audited), none of it readable without the key."""
    from edgefleet.controlplane import samples as server_samples

    monkeypatch.setattr(server_samples, "KEEP_PER_DEVICE", 3)
    pub = keys[0].public_key_hex
    cp.api("PUT", "/api/v1/groups/lab", json={"config": {"crash_reports": True}})
    a, b = cp.device("t", group="lab"), cp.device("t", group="lab")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def send(dev: Any, *ids: str, dropped: int = 0) -> httpx.Response:
        body = {
            "samples": [_sealed(pub, i, t0 + timedelta(seconds=int(i[1:]))).model_dump(mode="json") for i in ids],
            "dropped": dropped,
        }
        return cp.http.post(f"/api/v1/devices/{dev.id}/samples", json=body, headers=cp.h(dev.credential))

    r = send(a, "s1")
    assert r.status_code == 409 and "has not consented to input sampling" in r.json()["detail"], r.text
    listed = cp.api("GET", f"/api/v1/devices/{a.id}/samples")
    assert listed["sampling"] == {
        "consent": False,
        "rate_per_min": None,
        "key_id": None,
        "stored": 0,
        "newest_received_at": None,
        "dropped_on_device": None,
    }
    # consent needs the key
    r = cp.http.put("/api/v1/groups/lab", json={"config": {"input_sampling": True}}, headers=cp.h())
    assert r.status_code == 422 and "sample_public_key" in r.text
    cfg = {"input_sampling": True, "sample_rate_per_min": 6, "sample_public_key": pub}
    cp.api("PUT", "/api/v1/groups/lab", json={"config": cfg})
    assert a.desired()["config"]["sample_rate_per_min"] == 6.0

    ok = lambda r: r.status_code == 200 and r.json()["accepted_sample_ids"]  # noqa: E731
    assert ok(send(a, "s1", "s2", "s1")) == ["s1", "s2"]
    assert ok(send(a, "s2", "s3", dropped=4)) == ["s2", "s3"]  # s2's answer was lost: sent again, stored once
    assert ok(send(b, "s1")) == ["s1"]
    assert ok(send(a, "s4", "s5", dropped=5)) == ["s4", "s5"]
    got = cp.api("GET", f"/api/v1/devices/{a.id}/samples")
    assert [x["sample_id"] for x in got["samples"]] == ["s5", "s4", "s3"]
    assert got["sampling"]["consent"] and got["sampling"]["rate_per_min"] == 6.0
    assert got["sampling"]["key_id"] == keys[0].key_id and got["sampling"]["dropped_on_device"] == 5
    assert got["sampling"]["stored"] == 3 and all(x["key_id"] == keys[0].key_id for x in got["samples"])
    down = cp.api("GET", f"/api/v1/devices/{a.id}/samples/s4")
    sealed = InputSample.model_validate(down["sample"])
    x = open_sample(sealed, load_device_private_key(keys[0].private_key_path)).tensors["X"]
    assert x.tolist() == np.arange(64, dtype=np.float32).reshape(1, 64).tolist()
    assert cp.http.get(f"/api/v1/devices/{a.id}/samples/s1", headers=cp.h()).status_code == 404  # pruned
    viewer = cp.token("viewer")
    assert cp.http.get(f"/api/v1/devices/{a.id}/samples", headers=cp.h(viewer)).status_code == 403
    audit = cp.api("GET", "/api/v1/audit")
    uploads = [e for e in audit if e["action"] == "device.samples_uploaded"]
    assert sorted(len(e["detail"]["sample_ids"]) for e in uploads) == [1, 1, 2, 2]  # only what was new
    assert [e["detail"] for e in audit if e["action"] == "device.sample_download"] == [{"sample_id": "s4"}]
    consent = [e["detail"] for e in audit if e["action"] == "group.consent"]
    want = {"input_sampling": True, "sample_rate_per_min": 6.0, "sample_public_key": pub}
    assert any(c.items() >= want.items() for c in consent), consent  # who let which inputs leave, and to whom

    # hostile uploads are refused whole, naming what is wrong, and store nothing
    post = lambda body: cp.http.post(  # noqa: E731
        f"/api/v1/devices/{a.id}/samples",
        content=body,
        headers={**cp.h(a.credential), "content-type": "application/json"},
    )
    good = _sealed(pub, "s9", t0).model_dump(mode="json")
    bad = {
        "samples.0.ciphertext": good | {"ciphertext": "not base64!"},
        "samples.0.key_id": good | {"key_id": "zz"},
        "samples.0.at": good | {"at": "2999-01-01T00:00:00+00:00"},
        "samples.0.sample_id": good | {"sample_id": "nul\x00"},
        "samples.0.evil": good | {"evil": 1},
    }
    for field, sample in bad.items():
        r = post(json.dumps({"samples": [sample]}).encode())
        assert r.status_code == 422 and field in r.json()["detail"], (field, r.text)
    r = post(json.dumps({"samples": [good] * 17}).encode())
    assert r.status_code == 422 and "samples" in r.json()["detail"]
    assert post(b"{" + b" " * MAX_SAMPLE_UPLOAD_BYTES + b"}").status_code == 413
    assert cp.http.post(f"/api/v1/devices/{a.id}/samples", json={"samples": [good]}).status_code == 401
    assert cp.api("GET", f"/api/v1/devices/{a.id}/samples")["sampling"]["stored"] == 3


# ------------------------------------------------------------------------------------------------ end to end


class _Counting(httpx.AsyncBaseTransport):
    """The agent's link, counting what it sends where."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.sent: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path))
        return await self.inner.handle_async_request(request)


RATE = 20  # a minute: one every 3 s


def test_input_sampling_end_to_end(
    fleet: Fleet,
    tmp_path: Path,
    mlp_path: Path,
    digits: Any,
    keys: tuple[Any, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from conftest import free_port
    from edgefleet.agent import Agent, Supervisor

    pkg = make_packages(mlp_path, digits.x_test, tmp_path, ["1.0.0"])["1.0.0"]
    data_dir = tmp_path / "dev"
    install(data_dir, pkg)
    conf = settings(data_dir, "http://control-plane.test", fleet.enrollment_token(), port=free_port())
    link = _Counting(fleet.transport())
    rng = np.random.default_rng(7)
    served: list[np.ndarray] = []

    def page(dev: str) -> str:
        text = fleet.http.get(f"/devices/{dev}", headers=fleet.h()).text
        cell = re.findall(r'data-testid="device-sampling">(.*?)</td>', text, re.S)[0]
        return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", cell))

    async def infer(http: httpx.AsyncClient, port: int) -> None:
        x = rng.random((1, 64), dtype=np.float32) * 16
        body = {"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
        r = await http.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=body)
        assert r.status_code == 200, r.text
        served.append(x)

    def stored(dev: str) -> dict[str, Any]:
        return dict(fleet.api("GET", f"/api/v1/devices/{dev}/samples"))

    private = load_device_private_key(keys[0].private_key_path)

    def uploaded(dev: str, x: np.ndarray) -> bool:
        for s in stored(dev)["samples"]:
            down = fleet.api("GET", f"/api/v1/devices/{dev}/samples/{s['sample_id']}")
            if np.array_equal(open_sample(InputSample.model_validate(down["sample"]), private).tensors["X"], x):
                return True
        return False

    async def go() -> tuple[str, float]:
        a = Agent(conf, transport=link)
        await a.start()
        try:
            sup = a.backend
            assert isinstance(sup, Supervisor) and a.port is not None
            await until(lambda: fleet.device_ids() and a.identity.get("credential"), 30, "enrollment")
            dev = fleet.device_ids()[0]
            async with httpx.AsyncClient(timeout=30) as http:
                # no consent: the worker is never told to sample, the agent sends nothing, the server refuses
                for _ in range(5):
                    await infer(http, a.port)
                await until(lambda: sum(w["requests"] for w in fleet.windows(dev)) >= 5, 30, "the requests counted")
                assert sup.worker is not None and sup.worker.sample_rate == 0.0
                assert len(a.samples) == 0 and not [p for _, p in link.sent if p.endswith("/samples")]
                sealed = _sealed(keys[0].public_key_hex, "forged")
                r = await asyncio.to_thread(
                    fleet.http.post,
                    f"/api/v1/devices/{dev}/samples",
                    json={"samples": [sealed.model_dump(mode="json")]},
                    headers={"Authorization": f"Bearer {a.identity['credential']}"},
                )
                assert r.status_code == 409 and "has not consented to input sampling" in r.json()["detail"], r.text
                off_page = await asyncio.to_thread(page, dev)
                assert off_page.startswith("off: the group has not consented (input_sampling)"), off_page

                # consent: one input every 3 s at most, sealed for the group's key
                cfg = {"input_sampling": True, "sample_rate_per_min": RATE, "sample_public_key": keys[0].public_key_hex}
                await asyncio.to_thread(fleet.configure_group, **cfg)
                await until(lambda: sup.worker is not None and sup.worker.sample_rate == RATE, 30, "sampling on")
                assert sup.worker is not None
                await sup.worker.call(("flush",))  # answered after the sample frame: the worker samples from here
                first = len(served)
                t0 = asyncio.get_running_loop().time()
                for _ in range(40):
                    await infer(http, a.port)
                elapsed = asyncio.get_running_loop().time() - t0
                x0 = served[first]
                await until(lambda: uploaded(dev, x0), 30, "the first input sampled to arrive, sealed")
            got = stored(dev)
            assert got["sampling"]["consent"] and got["sampling"]["rate_per_min"] == RATE
            assert [p for _, p in link.sent if p.endswith("/samples")]  # and uploaded through the check-in link
            on_page = await asyncio.to_thread(page, dev)
            assert on_page.startswith(f"on: at most {RATE} a minute, encrypted to key {keys[0].key_id}"), on_page
            del served[:first]  # what was served while sampling was on

            # consent withdrawn: the worker stops sampling
            await asyncio.to_thread(fleet.configure_group)
            await until(lambda: sup.worker is not None and sup.worker.sample_rate == 0, 30, "sampling off")
            return dev, elapsed
        finally:
            await a.stop()

    dev, elapsed = asyncio.run(go())

    # the operator pulls them with the private key: exactly what was served, first the first input
    out = tmp_path / "pulled"
    code, text, err = run_cli(
        capsys, "samples", "pull", dev, "--key", keys[0].private_key_path, "--out", out,
        "--server", fleet.url, "--api-token", fleet.admin,
    )  # fmt: skip
    assert code == 0, err
    files = sorted((out / dev).glob("*.npz"))
    assert files and f"pulled {len(files)} sample(s) of device {dev}" in text
    pulled = []
    for f in files:
        meta = json.loads(f.with_suffix(".json").read_text())
        assert (meta["model"], meta["version"], meta["device_id"]) == ("digits", "1.0.0", dev)
        with np.load(f) as npz:
            assert npz.files == ["X"]
            pulled.append((meta["at"], npz["X"]))
    pulled.sort(key=lambda p: p[0])
    assert np.array_equal(pulled[0][1], served[0]) and pulled[0][1].dtype == np.float32
    assert all(any(np.array_equal(x, s) for s in served) for _, x in pulled)
    assert len(pulled) <= 1 + int(elapsed // (60 / RATE)), (len(pulled), elapsed)  # the rate cap held

    # another key: one line, a failed exit, nothing written
    code, text, err = run_cli(
        capsys, "samples", "pull", dev, "--key", keys[1].private_key_path, "--out", tmp_path / "wrong",
        "--server", fleet.url, "--api-token", fleet.admin,
    )  # fmt: skip
    assert code != 0 and len(err.strip().splitlines()) == 1, (code, err)
    assert f"encrypted to {keys[1].private_key_path} (key id {keys[1].key_id}) but to key {keys[0].key_id}" in err
    assert not (tmp_path / "wrong" / dev).exists() or not list((tmp_path / "wrong" / dev).iterdir())
