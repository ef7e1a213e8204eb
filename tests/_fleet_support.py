"""The agent tests' world: the REAL control plane (``_cp_support.CP``, served on loopback and reachable in-process)
behind a faulty edge, and the agent as a process or in this process.

The edge (:class:`FaultyEdge`, an ASGI middleware around the real app) does what a bad link or a dying server
does and nothing else: it answers 503 while ``offline``, cuts a target download after ``drop_after`` bytes, flips
a byte in the next ``corrupt`` target downloads, sends targets slowly (``throttle`` seconds per 4 KiB), turns the
next reports away with the statuses in ``reject_reports`` before the app sees them, and with ``die_after_store``
lets the app store the next report, then cuts the connection before the answer. It also counts what crossed it
(:class:`Faults`: target GETs and bytes, turned-away reports, every report that reached the app). What the
control plane *stored* is read from its database (:meth:`Fleet.events`, :meth:`Fleet.windows`).

A server that dies is :meth:`CP.stop_serving` then :meth:`CP.serve` on the same port, on the same database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from _cp_support import CP
from edgefleet.protocol import Report

TIER = "test-tier"  # a tier this repository does not ship: the device's hardware is not checked against it
GROUP = "agents"
# Fast loops for tests: the group's configuration document overrides the agent's command-line intervals.
FAST_CONFIG: dict[str, Any] = {"checkin_interval_s": 0.2, "telemetry_interval_s": 0.5}
STEP = 4096


class LinkCut(Exception):
    """The edge cut the connection (in-process, :class:`EdgeTransport` turns it into the ``httpx`` error a
    device sees)."""


@dataclass
class Faults:
    offline: bool = False
    drop_after: int | None = None
    corrupt: int = 0
    throttle: float = 0.0
    reject_reports: list[int] = field(default_factory=list)
    die_after_store: bool = False
    # what crossed the edge
    gets: Counter[str] = field(default_factory=Counter)  # target name -> GETs
    bytes: Counter[str] = field(default_factory=Counter)  # target name -> bytes sent
    rejected: list[dict[str, Any]] = field(default_factory=list)
    reports: list[Report] = field(default_factory=list)  # every report that reached the app, in order


class FaultyEdge:
    def __init__(self, app: ASGIApp, faults: Faults) -> None:
        self.app, self.faults = app, faults

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        f, path = self.faults, str(scope["path"])
        if f.offline:
            await _answer(send, 503, b'{"error": "offline (test edge)"}')
            return
        if scope["method"] == "POST" and path.startswith("/api/v1/devices/") and path.endswith("/report"):
            await self._report(scope, receive, send)
        elif path.startswith("/tuf/targets/"):
            await self._target(scope, receive, send, path.rsplit("/", 1)[1])
        else:
            await self.app(scope, receive, send)

    async def _report(self, scope: Scope, receive: Receive, send: Send) -> None:
        f = self.faults
        body = await _body(receive)
        if f.reject_reports:
            status = f.reject_reports.pop(0)
            f.rejected.append({"status": status, "batch_id": json.loads(body)["batch_id"], "bytes": len(body)})
            await _answer(send, status, json.dumps({"error": f"rejected (test edge): {status}"}).encode())
            return
        with contextlib.suppress(ValueError):
            f.reports.append(Report.model_validate_json(body))
        if not f.die_after_store:
            await self.app(scope, _replay(body), send)
            return
        f.die_after_store = False
        await self.app(scope, _replay(body), _swallow)  # stored by the real app ...
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
        raise LinkCut("the server died before it answered (test edge)")  # ... never answered

    async def _target(self, scope: Scope, receive: Receive, send: Send, name: str) -> None:
        f = self.faults
        start: Message = {}
        chunks: list[bytes] = []

        async def keep(m: Message) -> None:
            nonlocal start
            if m["type"] == "http.response.start":
                start = m
            elif m.get("body"):
                chunks.append(m["body"])

        await self.app(scope, receive, keep)
        body = b"".join(chunks)
        if start.get("status", 500) >= 300:
            await send(start)
            await send({"type": "http.response.body", "body": body})
            return
        f.gets[name] += 1
        cut, f.drop_after = f.drop_after, None
        if f.corrupt and body:
            f.corrupt -= 1
            flipped = bytearray(body)
            flipped[len(flipped) // 2] ^= 0xFF
            body = bytes(flipped)
        await send(start)
        for i in range(0, len(body), STEP):
            if cut is not None and i >= cut:
                raise LinkCut(f"link cut after {i} bytes of {name} (test edge)")
            piece = body[i : i + STEP]
            f.bytes[name] += len(piece)
            if f.throttle:
                await asyncio.sleep(f.throttle)
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


async def _answer(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _body(receive: Receive) -> bytes:
    parts = []
    while True:
        m = await receive()
        parts.append(m.get("body", b""))
        if not m.get("more_body"):
            return b"".join(parts)


def _replay(body: bytes) -> Callable[[], Awaitable[Message]]:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # as a client that sent everything and waits: no disconnect
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _swallow(m: Message) -> None:
    return None


class EdgeTransport(httpx.AsyncBaseTransport):
    """The app behind the edge, in this process: what a cut link does to a device's client, a transport error."""

    def __init__(self, app: ASGIApp) -> None:
        self.inner = httpx.ASGITransport(app=app)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self.inner.handle_async_request(request)
        except LinkCut as exc:
            raise httpx.ReadError(str(exc), request=request) from exc


class Fleet(CP):
    """The real control plane behind a :class:`FaultyEdge`, on SQLite in ``tmp``. Devices enroll into one group
    whose configuration document keeps the loops fast; :meth:`pin` and :meth:`rollout` say what they run."""

    def __init__(self, tmp: Path, *, tier: str = TIER) -> None:
        self.faults = Faults()
        super().__init__(tmp, f"sqlite:///{tmp / 'cp.db'}", edge=lambda app: FaultyEdge(app, self.faults))
        self.tier = tier
        self.configure_group()

    def transport(self) -> httpx.AsyncBaseTransport:
        """For an ``Agent`` in this process: the app behind the same edge, no sockets."""
        return EdgeTransport(self.served)

    def enrollment_token(self, tier: str | None = None) -> str:
        body = {"tier": tier or self.tier, "group": GROUP}
        return str(self.api("POST", "/api/v1/enrollment-tokens", json=body)["token"])

    def configure_group(self, **config: Any) -> None:
        """The group's configuration document: the fast loops plus ``config`` (probation, budgets, ...)."""
        self.api("PUT", f"/api/v1/groups/{GROUP}", json={"config": FAST_CONFIG | config})

    def publish(self, *packages: Path) -> None:
        for p in packages:
            self.upload(p)

    def device_ids(self) -> list[str]:
        return [d["device_id"] for d in self.api("GET", "/api/v1/devices")]

    def record(self, device_id: str | None = None) -> dict[str, Any]:
        """The one enrolled device's record (or ``device_id``'s)."""
        ids = self.device_ids()
        assert device_id or len(ids) == 1, ids
        return dict(self.api("GET", f"/api/v1/devices/{device_id or ids[0]}"))

    def pin(self, version: str | None, *, model: str = "digits", device_id: str | None = None, **config: Any) -> None:
        """Every enrolled device (or ``device_id``) is told to run ``version`` (``None``: unpinned); ``config``
        goes into the group's document first. A pin carries no rollout id."""
        if config:
            self.configure_group(**config)
        for d in [device_id] if device_id else self.device_ids():
            if version is None:
                self.api("POST", f"/api/v1/devices/{d}/unpin")
            else:
                self.api("POST", f"/api/v1/devices/{d}/pin", json={"model": model, "version": version})

    def rollout(self, version: str, *, model: str = "digits", **config: Any) -> str:
        """A rollout of ``version`` to every enrolled device in one wave (pins lifted first), its wave started;
        ``config`` goes into the group's document first. Returns its id (the desired state's ``rollout_id``)."""
        from edgefleet.controlplane.reconciler import reconcile_once

        if config:
            self.configure_group(**config)
        self.pin(None)
        for r in self.api("GET", "/api/v1/rollouts"):
            if r["state"] in ("running", "paused"):  # one active rollout per model: the old one is rolled back
                self.api("POST", f"/api/v1/rollouts/{r['rollout_id']}/rollback", json={"reason": "a new one (test)"})
        policy = {"waves": [100], "bake_s": 3600, "min_devices": 1, "min_requests": 0}
        rid = str(
            self.api("POST", "/api/v1/rollouts", json={"model": model, "version": version, "policy": policy})[
                "rollout_id"
            ]
        )
        reconcile_once(self.store)
        for d in self.device_ids():
            desired = self.record(d)["desired_state"]
            assert (desired["version"], desired["rollout_id"]) == (version, rid), desired
        return rid

    def events(self, device_id: str | None = None) -> list[tuple[str, str | None, str | None]]:
        """(kind, version, reason) of the update events the control plane stored, in arrival order."""
        from edgefleet.controlplane.db import UpdateEventRow

        q = select(UpdateEventRow).order_by(UpdateEventRow.id)
        if device_id:
            q = q.where(UpdateEventRow.device_id == device_id)
        with self.store.db.session() as s:
            return [(e.kind, e.version, e.reason) for e in s.scalars(q)]

    def windows(self, device_id: str | None = None) -> list[dict[str, Any]]:
        """The telemetry windows the control plane stored, in arrival order."""
        from edgefleet.controlplane.db import TelemetryRow

        q = select(TelemetryRow).order_by(TelemetryRow.id)
        if device_id:
            q = q.where(TelemetryRow.device_id == device_id)
        cols = [c.name for c in TelemetryRow.__table__.columns]
        with self.store.db.session() as s:
            return [{c: getattr(w, c) for c in cols} for w in s.scalars(q)]


def make_packages(mlp: Path, digits_x: Any, out: Path, versions: list[str], **kw: Any) -> dict[str, Path]:
    """Packages ``digits-<v>.efpkg`` of the digits MLP with golden vectors and a drift reference."""
    from edgefleet.data import CallData
    from edgefleet.package import build_package

    calls = CallData({"X": digits_x[:16, None, :]})
    ref = CallData({"X": digits_x[:200, None, :]})
    return {
        v: build_package(
            mlp, out / f"digits-{v}.efpkg", name="digits", version=v, sample_inputs=calls, reference_data=ref, **kw
        )
        for v in versions
    }


class AgentProc:
    """``edgefleet agent`` as a real process."""

    def __init__(self, server: str, token: str, data_dir: Path, port: int, **opts: Any) -> None:
        self.server, self.token, self.data_dir, self.port, self.opts = server, token, data_dir, port, opts
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self, env: dict[str, str] | None = None) -> None:
        exe = str(Path(sys.executable).with_name("edgefleet"))
        args = [
            exe,
            "agent",
            "--server",
            self.server,
            "--token",
            self.token,
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.port),
            "--checkin-interval",
            str(self.opts.get("checkin", 0.2)),
            "--telemetry-interval",
            str(self.opts.get("telemetry", 0.5)),
        ]
        for k in ("memory_mb", "buffer_max_records"):
            if k in self.opts:
                args += [f"--{k.replace('_', '-')}", str(self.opts[k])]
        self.proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def serving(self) -> str | None:
        """The version the agent serves now, None (503: nothing serving) or "down" (no answer)."""
        try:
            r = httpx.get(f"{self.url}/v2/models/digits", timeout=2)
        except httpx.HTTPError:
            return "down"
        return str(r.json()["versions"][0]) if r.status_code == 200 else None

    def wait_until(self, pred: Callable[[], Any], timeout: float = 60, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode} waiting for {what}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")


def state_of(data_dir: Path) -> dict[str, Any]:
    """The agent's persisted state (``{}`` before its first save)."""
    try:
        return dict(json.loads((data_dir / "state.json").read_text()))
    except FileNotFoundError:
        return {}


def committed_version(data_dir: Path) -> str | None:
    return (state_of(data_dir).get("committed") or {}).get("version")


def wait_for(pred: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := pred():
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------- the agent in this process


def install(data_dir: Path, package: Path, *, slot: str = "A", rollout: str | None = "r1") -> Any:
    """A device that has ``package`` committed in ``slot``, as a finished update leaves it. Returns its SlotInfo."""
    from edgefleet.agent.state import PersistedState, SlotInfo, StateStore
    from edgefleet.package import open_package
    from edgefleet.protocol import AgentState, target_name

    m = open_package(package).manifest
    (data_dir / "slots").mkdir(parents=True, exist_ok=True)
    (data_dir / "slots" / f"{slot}.efpkg").write_bytes(package.read_bytes())
    info = SlotInfo(
        slot=slot, model=m.name, version=m.version, target=target_name(m.name, m.version), rollout_id=rollout
    )
    StateStore(data_dir).save(PersistedState(state=AgentState.committed, committed=info, active=info))
    return info


def settings(data_dir: Path, server: str | None = None, token: str | None = None, **kw: Any) -> Any:
    """Fast loops, as the process tests use."""
    from edgefleet.config import AgentSettings

    opts: dict[str, Any] = {"checkin_interval_s": 0.2, "telemetry_interval_s": 0.5, **kw}
    return AgentSettings(server=server, token=token, data_dir=data_dir, **opts)


@contextlib.asynccontextmanager
async def running(agent_settings: Any, **kw: Any) -> AsyncIterator[Any]:
    """An ``edgefleet.agent.Agent`` in this process, without its HTTP server; stopped on the way out."""
    from edgefleet.agent import Agent

    a = Agent(agent_settings, serve_http=False, **kw)
    await a.start()
    try:
        yield a
    finally:
        await a.stop()


async def until(pred: Callable[[], Any], timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def buffered(data_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The records of ``kind`` ("window" or "event") waiting in an agent's telemetry buffer, oldest first."""
    import sqlite3

    db = sqlite3.connect(data_dir / "telemetry.db")
    try:
        rows = db.execute("SELECT body FROM records WHERE kind = ? ORDER BY id", (kind,)).fetchall()
    finally:
        db.close()
    return [json.loads(r[0]) for r in rows]
