"""The simulated fleet against a real control plane: full agents (``edgefleet agent`` subprocesses, each with its
own worker process, so crashes and kills are real process deaths) and lightweight agents (the same
:class:`~edgefleet.agent.Agent` code, many in this process, sharing one model per package), inference traffic,
and the faults of the plan (:mod:`edgefleet.sim.spec`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from edgefleet.agent.worker.main import FAULT_ENV
from edgefleet.apierrors import error_of
from edgefleet.config import AgentSettings
from edgefleet.dtypes import OIP_TO_DTYPE
from edgefleet.errors import EdgefleetError, ServerUnreachable
from edgefleet.protocol import AgentState, DeviceConfig
from edgefleet.sim.link import LinkStats
from edgefleet.sim.lite import SharedModels, SimAgent
from edgefleet.sim.server import die_with_parent, edgefleet_command, free_port
from edgefleet.sim.spec import DevicePlan

__all__ = ["Fleet", "FleetOptions", "FullAgent"]

GROUP = "sim"
DISK_FULL_BYTES = 64 * 1024
_UPDATING = {
    AgentState.downloading.value,
    AgentState.verifying.value,
    AgentState.staged.value,
    AgentState.health_check.value,
}


@dataclass
class FleetOptions:
    checkin_s: float = 1.0
    telemetry_s: float = 2.0
    requests_per_s: float = 2.0  # per device
    probation_s: float = 3.0
    probation_requests: int = 5
    crash_loop_crashes: int = 2
    crash_loop_window_s: float = 30.0
    start_stagger_s: float = 0.01
    # Inference inputs, one call per row of the leading axis, keyed by input name (the ``.npz`` layout of
    # ``edgefleet.data``). Without it every request sends one fixed random input: drift against any real
    # reference, so a first rollout judged on absolute drift would fail.
    traffic: dict[str, np.ndarray] | None = None


@dataclass
class FullAgent:
    plan: DevicePlan
    data_dir: Path
    port: int
    cmd: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    kills: int = 0
    log: Path | None = None
    port_retries: int = 0
    enroll_cmd: list[str] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.data_dir / "state.json").read_text()))
        except (OSError, ValueError):
            return {}

    def device_id(self) -> str | None:
        try:
            return str(json.loads((self.data_dir / "identity.json").read_text())["device_id"])
        except (OSError, ValueError, KeyError):
            return None


def _tail(log: Path | None, n: int = 400) -> str:
    """The last ``n`` characters of a log file, on one line."""
    try:
        return " ".join((log.read_bytes()[-n:] if log is not None else b"").decode(errors="replace").split())
    except OSError:
        return ""


def _disk_full() -> None:
    # A device whose disk is full: any file write past DISK_FULL_BYTES fails (EFBIG, SQLite "disk full"),
    # instead of killing the process with SIGXFSZ.
    die_with_parent()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_FULL_BYTES, DISK_FULL_BYTES))


@dataclass
class Fleet:
    server: str
    admin_token: str
    plans: list[DevicePlan]
    workdir: Path
    options: FleetOptions = field(default_factory=FleetOptions)
    stats: LinkStats = field(default_factory=LinkStats)
    traffic_ok: int = 0
    traffic_failed: int = 0
    power_kills: int = 0

    def __post_init__(self) -> None:
        self.pool = SharedModels()
        self.lite: list[SimAgent] = []
        self.full: list[FullAgent] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._transport: httpx.AsyncHTTPTransport | None = None
        self._api: httpx.AsyncClient | None = None
        self._oip: httpx.AsyncClient | None = None
        self._feeds: dict[str, dict[str, np.ndarray]] = {}
        self._traffic_at = 0
        self.crash_reports: list[float] = []

    # ------------------------------------------------------------------ setup

    def device_config(self) -> DeviceConfig:
        o = self.options
        return DeviceConfig(
            checkin_interval_s=o.checkin_s,
            telemetry_interval_s=o.telemetry_s,
            probation_seconds=o.probation_s,
            probation_requests=o.probation_requests,
            crash_loop_crashes=o.crash_loop_crashes,
            crash_loop_window_s=o.crash_loop_window_s,
        )

    async def start(self, progress: Any = None) -> None:
        """Configure the device group, enroll every device and start it. ``progress(done, total)``."""
        self._api = httpx.AsyncClient(
            base_url=self.server, headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=60
        )
        self._oip = httpx.AsyncClient(timeout=10)
        self._transport = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)
        )
        cfg = self.device_config()
        r = await self._api.put(f"/api/v1/groups/{GROUP}", json={"config": cfg.model_dump(exclude={"version"})})
        r.raise_for_status()
        for p in self.plans:
            for f in p.faults:
                if f.kind == "crash" and f.value:
                    self.pool.crash_versions.setdefault(p.index, set()).add(f.value)
        for done, p in enumerate(self.plans, 1):
            tok = await self._api.post("/api/v1/enrollment-tokens", json={"tier": p.tier.name, "group": GROUP})
            tok.raise_for_status()
            token = tok.json()["token"]
            if p.full:
                self._start_full(p, token)
            else:
                await self._start_lite(p, token, cfg)
            if progress is not None:
                progress(done, len(self.plans))
            await asyncio.sleep(self.options.start_stagger_s)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._traffic_loop()), loop.create_task(self._power_loss_loop())]

    def _start_full(self, p: DevicePlan, token: str) -> None:
        d = self.workdir / "agents" / p.name
        d.mkdir(parents=True, exist_ok=True)
        port = free_port()
        cmd = [
            *edgefleet_command(),
            "agent",
            "--server",
            self.server,
            "--token",
            token,
            "--data-dir",
            str(d),
            "--port",
            str(port),
            "--checkin-interval",
            str(self.options.checkin_s),
            "--telemetry-interval",
            str(self.options.telemetry_s),
            "--memory-mb",
            str(p.memory_mb),
        ]
        if p.tier.chipset:
            cmd += ["--chipset", p.tier.chipset]
        # every simulated device runs on this host: it says which tier it emulates, so the control plane accepts
        # it and its evidence never makes a compatibility cell "verified"
        cmd += ["--emulate-tier", p.tier.name]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        crash = p.fault("crash")
        if crash and crash.value:
            env[FAULT_ENV] = f"{crash.value}:abort"
        a = FullAgent(p, d, port, cmd, env, log=self.workdir / "agents" / f"{p.name}.log")
        self._spawn(a)
        self.full.append(a)

    def _spawn(self, a: FullAgent) -> None:
        assert a.log is not None
        with a.log.open("ab") as log:
            a.proc = subprocess.Popen(
                a.cmd,
                env=a.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_disk_full if a.plan.fault("disk-full") else die_with_parent,
                start_new_session=True,  # a kill -9 of the agent's group takes its worker with it, as power loss would
            )
        # the token is one-time: a restart after a power loss must come back from the identity on disk; one that
        # never got as far as enrolling (it lost its port) starts again with it
        a.enroll_cmd = a.enroll_cmd or list(a.cmd)
        a.cmd = [c for i, c in enumerate(a.cmd) if c != "--token" and (i == 0 or a.cmd[i - 1] != "--token")]

    async def _start_lite(self, p: DevicePlan, token: str, cfg: DeviceConfig) -> None:
        assert self._transport is not None
        settings = AgentSettings(
            server=self.server,
            token=token,
            data_dir=self.workdir / "lite" / p.name,
            checkin_interval_s=self.options.checkin_s,
            telemetry_interval_s=self.options.telemetry_s,
            memory_mb=p.memory_mb,
            chipset=p.tier.chipset,
            buffer_max_records=2000,
        )
        a = SimAgent(p, settings, pool=self.pool, stats=self.stats, transport=self._transport, config=cfg)
        await a.start()
        self.lite.append(a)

    # ------------------------------------------------------------------ traffic and faults

    async def _feeds_for_full(self, a: FullAgent) -> tuple[str, dict[str, np.ndarray]] | None:
        active = a.state().get("active") or {}
        name = active.get("model")
        if not name:
            return None
        if name not in self._feeds:
            assert self._oip is not None
            r = await self._oip.get(f"http://127.0.0.1:{a.port}/v2/models/{name}")
            if r.status_code != 200:
                return None
            feeds = {}
            for s in r.json()["inputs"]:
                shape = [d if d > 0 else 1 for d in s["shape"]]
                feeds[s["name"]] = (
                    np.random.default_rng(0).random(shape).astype(OIP_TO_DTYPE.get(s["datatype"], "float32"))
                )
            self._feeds[name] = feeds
        return name, self._traffic_call(self._feeds[name])

    def _traffic_call(self, fixed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The next call of ``options.traffic`` shaped and typed like ``fixed`` (the model's inputs), or ``fixed``
        when there is no traffic or it does not feed this model."""
        t = self.options.traffic
        if not t or set(t) != set(fixed):
            return fixed
        i = self._traffic_at
        self._traffic_at += 1
        out = {}
        for k, ref in fixed.items():
            rows = t[k]
            row = np.asarray(rows[i % len(rows)], dtype=ref.dtype)
            if row.size != ref.size:
                return fixed
            out[k] = row.reshape(ref.shape)
        return out

    async def _infer_full(self, a: FullAgent) -> None:
        assert self._oip is not None
        try:
            got = await self._feeds_for_full(a)
            if got is None:
                return
            name, feeds = got
            body = {
                "inputs": [
                    {"name": k, "shape": list(v.shape), "datatype": "FP32", "data": v.ravel().tolist()}
                    for k, v in feeds.items()
                ]
            }
            r = await self._oip.post(f"http://127.0.0.1:{a.port}/v2/models/{name}/infer", json=body)
            if r.status_code == 200:
                self.traffic_ok += 1
            else:
                self.traffic_failed += 1
        except httpx.HTTPError:
            self.traffic_failed += 1

    async def _infer_lite(self, a: SimAgent) -> None:
        svc = a.service
        info = svc.info
        if info is None:
            return
        feeds = self._feeds.get(info.name)
        if feeds is None:
            feeds = {
                s["name"]: np.random.default_rng(0)
                .random([d if isinstance(d, int) and d > 0 else 1 for d in s["shape"]])
                .astype(s["dtype"])
                for s in info.inputs
            }
            self._feeds[info.name] = feeds
        feeds = self._traffic_call(feeds)
        t = time.perf_counter()
        try:
            _, compute = await svc.infer(feeds, None)
        except Exception as err:  # BadRequest carries the status; any failure is a failed request here
            status = getattr(err, "status", 500)
            svc.record({400: "bad_request", 503: "unavailable"}.get(status, "model_error"), None)
            self.traffic_failed += 1
            return
        svc.record("ok", time.perf_counter() - t, compute)
        self.traffic_ok += 1

    async def _traffic_loop(self) -> None:
        rate = self.options.requests_per_s
        if rate <= 0:
            return
        period = 1.0 / rate
        while True:
            t = time.monotonic()
            for a in self.lite:
                await self._infer_lite(a)
            await asyncio.gather(*(self._infer_full(a) for a in self.full if a.proc and a.proc.poll() is None))
            await asyncio.sleep(max(0.05, period - (time.monotonic() - t)))

    async def _power_loss_loop(self) -> None:
        """kill -9 an agent with the power-loss fault once, in the middle of an update; restart it 1 s later."""
        victims = [a for a in self.full if a.plan.fault("power-loss")]
        while victims:
            await asyncio.sleep(0.05)
            for a in list(victims):
                if a.proc is not None and a.state().get("state") in _UPDATING:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(a.proc.pid, signal.SIGKILL)
                    await asyncio.get_running_loop().run_in_executor(None, a.proc.wait)
                    a.kills += 1
                    self.power_kills += 1
                    victims.remove(a)
                    await asyncio.sleep(1.0)
                    self._spawn(a)

    async def wait_enrolled(self, timeout_s: float = 120.0, progress: Any = None) -> list[dict[str, Any]]:
        """Wait until every planned device is enrolled with the control plane and return the device list.

        :meth:`start` starts the agents; each enrolls from its own check-in loop, over its own (maybe faulty)
        link. A rollout covers the devices enrolled when each of its waves starts, so whoever rolls out to the
        whole simulated fleet must wait for this first. ``progress(enrolled, total)``."""
        end = time.monotonic() + timeout_s
        while True:
            devs = [d for d in await self.api("GET", "/api/v1/devices") if d.get("group") == GROUP]
            if progress is not None:
                progress(len(devs), len(self.plans))
            if len(devs) >= len(self.plans):
                return list(devs)
            self._restart_unenrolled_exits()
            if time.monotonic() >= end:
                missing = [a.plan.name for a in self.full if a.device_id() is None]
                raise EdgefleetError(
                    f"only {len(devs)} of {len(self.plans)} simulated devices enrolled within {timeout_s:.0f} s"
                    + (
                        f" (full agents not enrolled: {', '.join(missing)}; logs in {self.workdir / 'agents'})"
                        if missing
                        else ""
                    )
                )
            await asyncio.sleep(0.25)

    def _restart_unenrolled_exits(self) -> None:
        """A full agent that ended before it enrolled: one that lost its port to another process between
        :func:`free_port` and its bind starts again on a new port (a few times); any other exit ends the wait with
        the agent's own last words."""
        for a in self.full:
            if a.proc is None or a.proc.poll() is None or a.device_id() is not None:
                continue
            said = _tail(a.log)
            if "could not listen" in said and a.port_retries < 3:
                a.port_retries += 1
                a.port = free_port()
                a.cmd = list(a.enroll_cmd)
                a.cmd[a.cmd.index("--port") + 1] = str(a.port)
                self._spawn(a)
                continue
            raise EdgefleetError(
                f"simulated device {a.plan.name} exited ({a.proc.returncode}) before it enrolled: {said or 'no output'}"
            )

    # ------------------------------------------------------------------ views and teardown

    async def publish(
        self, package: Path, *, gate: dict[str, Any] | None = None, bench: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Upload a package and attach its release evidence: the control plane admits a version to a rollout only
        with a passing gate verdict bound to its package (``gate`` is the ``edgefleet gate --json`` document)."""
        up: dict[str, Any] = await self.api(
            "POST",
            "/api/v1/packages",
            content=package.read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
        )
        base = f"/api/v1/models/{up['model']}/versions/{up['version']}"
        if gate is not None:
            await self.api("PUT", f"{base}/gate", params={"package_sha256": up["package_sha256"]}, json=gate)
        if bench is not None:
            await self.api("PUT", f"{base}/bench", json=bench)
        return up

    async def api(self, method: str, path: str, **kw: Any) -> Any:
        """One admin API call. A GET is retried once on a dropped connection (a keep-alive connection the server
        closed just as it was reused); every failure is an :class:`EdgefleetError` with one line."""
        assert self._api is not None
        for attempt in (0, 1):
            try:
                r = await self._api.request(method, path, **kw)
                break
            except httpx.TransportError as err:
                if method != "GET" or attempt:
                    raise ServerUnreachable(
                        f"{method} {path}: the server did not answer ({err or type(err).__name__})"
                    ) from err
        if r.status_code >= 400:
            raise error_of(r)  # the mapping every operator API client shares: the CLI's exit codes follow
        if r.headers.get("content-type", "").startswith("application/json"):
            body = r.json()
            cursor = r.headers.get("x-next-cursor")
            if method == "GET" and isinstance(body, list) and cursor:
                # a list route answers a page at a time: the rest follows the cursor (docs/api.md, "Pagination")
                params = {**dict(kw.pop("params", None) or {}), "cursor": cursor, "limit": 1000}
                body.extend(await self.api(method, path, params=params, **kw))
            return body
        return r.text

    def summary(self) -> dict[str, Any]:
        s = self.stats
        return {
            "devices": len(self.plans),
            "full_agents": len(self.full),
            "lightweight_agents": len(self.lite),
            "full_agents_alive": sum(1 for a in self.full if a.proc and a.proc.poll() is None),
            "checkins": s.checkins,
            "checkins_ok": s.checkins_ok,
            "reports": s.reports,
            "reports_ok": s.reports_ok,
            "injected_link_faults": s.injected,
            "inference_ok": self.traffic_ok,
            "inference_failed": self.traffic_failed,
            "power_loss_kills": self.power_kills,
        }

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for a in self.full:
            if a.proc is not None and a.proc.poll() is None:
                a.proc.terminate()
        await asyncio.gather(*(a.stop() for a in self.lite), return_exceptions=True)
        for a in self.full:
            if a.proc is not None:
                try:
                    await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, a.proc.wait), 10)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(a.proc.pid, signal.SIGKILL)
        for c in (self._api, self._oip):
            if c is not None:
                await c.aclose()
        if self._transport is not None:
            await self._transport.aclose()
