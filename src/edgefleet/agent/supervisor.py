"""Supervises the inference worker: start, restart with backoff, count crashes, enforce emulated memory.

A crash is any exit we did not ask for: a segfault, an abort, a failed load, or the RSS watchdog's SIGKILL when
the worker exceeds ``--memory-mb``. The agent keeps answering (503) while no worker runs. Whether crashes amount
to a crash loop is decided by probation (``probation.py``), from :attr:`Supervisor.crash_times`. Given
``on_exit``, each crash is also described for a crash report (``crashes.py``): the worker's faulthandler file (one
per worker, from ``fault_file``), its exit code and its last sampled RSS (sampled every ``rss_interval_s``).

Once the service makes it the active backend, the supervisor hands each worker it starts the agent's listening
socket (:meth:`Supervisor.delegate_http`, ADR 0032): the worker answers HTTP itself and the agent stops
accepting; when the worker's control socket closes, the agent accepts again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import psutil

from edgefleet.agent.backend import InputError
from edgefleet.agent.crashes import WorkerExit, read_fault
from edgefleet.agent.worker.spec import ModelInfo, WorkerSpec
from edgefleet.agent.workerproc import WorkerProcess
from edgefleet.errors import ModelError, WorkerUnavailable
from edgefleet.telemetry.drift import DriftSummary

__all__ = ["Supervisor", "backoff_delay"]

log = logging.getLogger("edgefleet.agent")


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff: base, 2·base, 4·base … capped."""
    return float(min(cap, base * (2 ** max(0, attempt))))


class _Delegation(NamedTuple):
    listen: list[socket.socket]
    on_serving: Callable[[object, bool], None]
    on_stats: Callable[[list[Any], ModelInfo | None], None]
    render_metrics: Callable[[], bytes]
    limits: dict[str, Any] | None
    shm: Any  # the agent's shared memory registry (agent/shm.py), or None


class Supervisor:
    def __init__(
        self,
        spec: WorkerSpec,
        on_crash: Callable[[str], None] | None = None,
        *,
        backoff_base: float = 0.2,
        backoff_max: float = 10.0,
        stable_after_s: float = 30.0,
        watchdog_interval_s: float = 0.05,
        rss_interval_s: float = 1.0,
        fault_file: Callable[[], Path] | None = None,
        on_exit: Callable[[WorkerExit], None] | None = None,
    ) -> None:
        self.spec = spec
        self.on_crash = on_crash
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.stable_after_s = stable_after_s
        self.watchdog_interval_s = watchdog_interval_s
        self.rss_interval_s = rss_interval_s
        self.fault_file = fault_file
        self.on_exit = on_exit
        self.rss_sample: tuple[int, float] | None = None  # the running worker's last RSS sample, and when (monotonic)
        self.info: ModelInfo | None = None
        self.worker: WorkerProcess | None = None
        self.crashes = 0
        self.restarts = 0
        self.crash_times: list[float] = []
        self.last_crash_reason: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._first: asyncio.Future[ModelInfo] | None = None
        self._http: _Delegation | None = None
        self._handovers: set[asyncio.Task[None]] = set()
        self._sampling: tuple[float, Callable[[list[Any], ModelInfo | None], None]] | None = None
        self._mirroring: tuple[float, Callable[[list[Any], ModelInfo | None], None]] | None = None

    @property
    def up(self) -> bool:
        return self.worker is not None

    def delegate_http(
        self,
        listen: socket.socket | list[socket.socket],
        on_serving: Callable[[object, bool], None],
        on_stats: Callable[[list[Any], ModelInfo | None], None],
        render_metrics: Callable[[], bytes],
        limits: Any = None,
        shm: Any = None,
    ) -> None:
        """From now on every worker this supervisor runs serves ``listen`` itself once ready:
        ``on_serving(worker, True/False)`` when it starts and stops doing so, ``on_stats(observations, info)`` for
        its batched per-request facts, ``render_metrics()`` for its ``/metrics`` answers; under ``limits`` (the
        agent's ``httpserver.HTTPLimits``: a worker refuses exactly what the agent would). ``listen`` may be several
        sockets (TCP and a Unix socket). ``shm``: the agent's shared memory registry (agent/shm.py), which each
        worker is sent with ``serve`` and kept in step with both ways."""
        doc = limits._asdict() if limits is not None else None
        listens = listen if isinstance(listen, list) else [listen]
        self._http = _Delegation(listens, on_serving, on_stats, render_metrics, doc, shm)
        if shm is not None:
            shm.on_change = self._forward_shm
        if self.worker is not None:
            self._hand_over(self.worker)

    def _hand_over(self, w: WorkerProcess) -> None:
        d = self._http
        if d is None or self._stopping:
            return
        w.on_stats = d.on_stats
        w.render_metrics = d.render_metrics
        if d.shm is not None:
            w.on_shm = d.shm.apply

        async def go() -> None:
            export = d.shm.export if d.shm is not None else None
            if await w.serve_http(d.listen, d.limits, export) and not w.closed.is_set() and not self._stopping:
                d.on_serving(w, True)

        task = asyncio.get_running_loop().create_task(go())
        self._handovers.add(task)
        task.add_done_callback(self._handovers.discard)

    def _forward_shm(self, change: dict[str, Any]) -> None:
        if self.worker is not None:
            self.worker.send_shm(change)

    def sample_inputs(self, per_min: float, on_samples: Callable[[list[Any], ModelInfo | None], None]) -> None:
        """Have every worker this supervisor runs sample at most ``per_min`` served inputs a minute (0: none) and
        hand them to ``on_samples(batch, info)`` (agent/sampling.py). A worker is told only when its rate changes."""
        self._sampling = (per_min, on_samples)
        if self.worker is not None:
            self._tell_sampling(self.worker)

    def _tell_sampling(self, w: WorkerProcess) -> None:
        if self._sampling is None:
            return
        per_min, w.on_samples = self._sampling
        if w.sample_rate == per_min:
            return
        w.sample_rate = per_min
        with contextlib.suppress(WorkerUnavailable):
            w.submit(("sample", per_min), lambda reply, err: None)

    def mirror_requests(self, per_s: float, on_mirror: Callable[[list[Any], ModelInfo | None], None]) -> None:
        """Have every worker this supervisor runs copy at most ``per_s`` answered requests a second (inputs and
        served outputs; 0: none) to ``on_mirror(batch, info)`` for a shadow phase (agent/shadow.py)."""
        self._mirroring = (per_s, on_mirror)
        if self.worker is not None:
            self._tell_mirroring(self.worker)

    def _tell_mirroring(self, w: WorkerProcess) -> None:
        if self._mirroring is None:
            return
        per_s, w.on_mirror = self._mirroring
        if w.mirror_rate == per_s:
            return
        w.mirror_rate = per_s
        with contextlib.suppress(WorkerUnavailable):
            w.submit(("shadow", per_s), lambda reply, err: None)

    async def flush(self) -> None:
        """Ship the per-request stats a worker serving HTTP still holds (before a telemetry window closes)."""
        w = self.worker
        if w is None or w.on_stats is None:
            return
        with contextlib.suppress(WorkerUnavailable):
            await asyncio.wait_for(w.call(("flush",)), 2.0)

    async def start(self) -> ModelInfo:
        """Start supervising; returns once the first worker is ready, raises if it fails to come up."""
        self._first = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return await self._first

    def _crash(self, reason: str) -> None:
        self.crashes += 1
        self.crash_times.append(time.monotonic())
        del self.crash_times[:-100]
        self.last_crash_reason = reason
        log.warning("inference worker crashed: %s", reason)
        if self.on_crash is not None:
            self.on_crash(reason)

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            spec = self.spec
            if self.fault_file is not None and self.on_exit is not None:
                spec = dataclasses.replace(spec, fault_file=self.fault_file())
            w = WorkerProcess(spec)
            self.rss_sample = None
            started = time.monotonic()
            try:
                self.info = await w.start()
            except Exception as err:
                if not isinstance(err, WorkerUnavailable):
                    err = WorkerUnavailable(f"the inference worker failed to start: {err}")
                if w.proc is not None:  # killed by start() if still running: reaped at once, its exit code known
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, w.proc.wait), 10)
                # a fatal signal while loading left a traceback: a crash to report; a model refused is not
                self._exited(w, str(err), started, only_faulted=True)
                self._crash(str(err))
                if self._first is not None and not self._first.done():
                    self._first.set_exception(err)
            else:
                self.worker = w
                if self._first is not None and not self._first.done():
                    self._first.set_result(self.info)
                sample = self.spec.memory_mb or self.on_exit is not None
                watchdog = asyncio.get_running_loop().create_task(self._watchdog(w)) if sample else None
                self._hand_over(w)
                self._tell_sampling(w)
                self._tell_mirroring(w)
                await w.closed.wait()
                if self._http is not None:
                    self._http.on_serving(w, False)  # the agent accepts again, now (503 until a worker is back)
                if watchdog is not None:
                    watchdog.cancel()
                self.worker = None
                if self._stopping:
                    self._discard_fault(w)
                    return
                if w.proc is not None:
                    await asyncio.get_running_loop().run_in_executor(None, w.proc.wait)
                code = w.proc.returncode if w.proc else None
                why = w.close_reason or "worker exited"
                why = why if code is None or "(exit" in why else f"{why} (exit {code})"
                self._exited(w, why, started)
                self._crash(why)
                if time.monotonic() - started > self.stable_after_s:
                    attempt = 0
            if self._stopping:
                return
            await asyncio.sleep(backoff_delay(attempt, self.backoff_base, self.backoff_max))
            attempt += 1
            self.restarts += 1

    def _exited(self, w: WorkerProcess, reason: str, started: float, *, only_faulted: bool = False) -> None:
        """Describe the worker's end for ``on_exit`` (its faulthandler file is read, then deleted)."""
        fault = read_fault(w.spec.fault_file) if w.spec.fault_file is not None else ""
        if self.on_exit is None or (only_faulted and not fault.strip()):
            return
        now = time.monotonic()
        code = w.proc.poll() if w.proc is not None else None
        info = w.info
        try:
            self.on_exit(
                WorkerExit(
                    reason=reason,
                    exit_code=code,
                    fault=fault,
                    rss_bytes=self.rss_sample[0] if self.rss_sample else None,
                    rss_age_s=now - self.rss_sample[1] if self.rss_sample else None,
                    uptime_s=now - started,
                    model=info.name if info else None,
                    version=info.version if info else None,
                    model_sha256=info.model_sha256 if info else None,
                )
            )
        except Exception:  # a report that cannot be kept must not stop the worker's restart
            log.exception("the worker's crash report could not be kept")

    @staticmethod
    def _discard_fault(w: WorkerProcess) -> None:
        if w.spec.fault_file is not None:
            w.spec.fault_file.unlink(missing_ok=True)

    async def _watchdog(self, w: WorkerProcess) -> None:
        """Samples the worker's RSS (for a crash report). The emulated device memory, when set: a worker whose RSS
        exceeds ``memory_mb`` is killed, as the OOM killer would."""
        assert w.pid is not None
        memory_mb = self.spec.memory_mb
        limit = memory_mb * 1024 * 1024 if memory_mb else None
        interval = self.watchdog_interval_s if memory_mb else self.rss_interval_s
        try:
            proc = psutil.Process(w.pid)
            while True:
                rss = proc.memory_info().rss
                if rss:  # a worker that has just died (not yet reaped) reads 0: not a figure to report
                    self.rss_sample = (rss, time.monotonic())
                if limit is not None and rss > limit:
                    w.close_reason = f"killed: RSS {rss // 2**20} MB exceeds the device memory of {memory_mb} MB"
                    w.kill()
                    return
                await asyncio.sleep(interval)
        except psutil.Error:
            return

    def rss_bytes(self) -> int | None:
        w = self.worker
        if w is None or w.pid is None:
            return None
        try:
            rss = int(psutil.Process(w.pid).memory_info().rss)
        except psutil.Error:
            return None
        if rss:
            self.rss_sample = (rss, time.monotonic())
        return rss

    @property
    def in_flight(self) -> int:
        return self.worker.in_flight if self.worker else 0

    async def _call(self, msg: tuple[Any, ...]) -> Any:
        w = self.worker
        if w is None:
            raise WorkerUnavailable(f"no inference worker is running ({self.last_crash_reason or 'starting'})")
        return await w.call(msg)

    def submit(
        self,
        feeds: dict[str, np.ndarray],
        outputs: list[str] | None,
        done: Callable[[dict[str, Any] | None, float, Exception | None], None],
    ) -> None:
        """The serving hot path: ``done(outputs, compute_s, error)`` runs from the callback that reads the
        worker's answer. Raises WorkerUnavailable while no worker runs."""
        w = self.worker
        if w is None:
            raise WorkerUnavailable(f"no inference worker is running ({self.last_crash_reason or 'starting'})")

        def answered(reply: Any, err: Exception | None) -> None:
            if err is not None:
                done(None, 0.0, err)
            elif reply[0] == "ok":
                done(reply[1], reply[2], None)
            elif reply[1] == "input":
                done(None, 0.0, InputError(reply[2]))
            else:
                done(None, 0.0, ModelError(reply[2]))

        w.submit(("infer", feeds, outputs), answered)

    async def infer(self, feeds: dict[str, np.ndarray], outputs: list[str] | None) -> tuple[dict[str, Any], float]:
        reply = await self._call(("infer", feeds, outputs))
        if reply[0] == "ok":
            return reply[1], reply[2]
        if reply[1] == "input":
            raise InputError(reply[2])
        raise ModelError(reply[2])

    async def drift(self, at_answer: Callable[[], None] | None = None) -> list[DriftSummary]:
        """The worker's histograms since the last call (it resets them). ``at_answer`` runs in the callback that
        reads the answer: every request answered before it (counted in order, or in the stats the worker ships
        just before it) is on one side, every later one on the other."""
        w = self.worker
        if w is None:
            if at_answer is not None:
                at_answer()
            return []
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def answered(reply: Any, err: Exception | None) -> None:
            if at_answer is not None:
                at_answer()
            if not fut.done():
                fut.set_result(reply if err is None else None)

        try:
            w.submit(("drift",), answered)
        except WorkerUnavailable:
            answered(None, None)
        reply = await fut
        if reply is None or reply[0] != "ok" or not isinstance(reply[1], list):
            return []
        try:
            return [DriftSummary.model_validate(d) for d in reply[1]]
        except ValueError:  # the worker's histograms break the schema: this window goes without them
            log.warning("the worker's drift histograms are malformed; dropped")
            return []

    async def golden(self) -> dict[str, Any]:
        reply = await self._call(("golden",))
        if reply[0] != "ok":
            raise ModelError(reply[2])
        if not isinstance(reply[1], dict):
            raise ModelError("the worker's golden-vector answer is malformed")
        return dict(reply[1])

    async def stop(self) -> None:
        self._stopping = True
        if self.worker is not None:
            w = self.worker
            await w.stop()
            self._discard_fault(w)
            if self._http is not None:
                self._http.on_serving(w, False)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
