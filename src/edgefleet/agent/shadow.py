"""Shadow evaluation on the device (docs/adr/0107-shadow-evaluation.md): a rollout's candidate runs beside the
served model on copies of live requests, and never answers one.

The pieces, from the request to the report:

* The serving worker copies answered requests (inputs and its outputs) at most ``rate_per_s`` a second and ships
  them to the agent in ``("mirror", …)`` frames (``worker/mirror.py``): after the answer, like drift counting,
  so the served answer never waits for it.
* :func:`install` puts the candidate named by the desired state's ``shadow`` order in the idle slot: downloaded,
  verified against the signed metadata, opened and checked against this device, exactly as an update would —
  but the persisted state never names it, and nothing switches to it.
* :class:`ShadowEvaluator` runs the candidate in a worker process of its own (``role="shadow"``, which lowers its
  own priority with ``os.nice``) and feeds it the copies through a bounded queue. A copy that arrives while the
  queue is full, or while the candidate has spent its CPU share (``cpu_share`` of one core, a token bucket over
  its own compute time), is dropped and counted: the candidate never competes with the served model for more
  than its share. Each answer is compared with the served one (:func:`agrees`) and counted, with the
  candidate's compute latency in a DDSketch and its errors, into the open telemetry window (:meth:`take`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.agent.worker.spec import ModelInfo, WorkerSpec
from edgefleet.agent.workerproc import WorkerProcess
from edgefleet.errors import WorkerUnavailable
from edgefleet.protocol import ShadowOrder, ShadowStats
from edgefleet.telemetry.sketch import LatencySketch

if TYPE_CHECKING:
    from edgefleet.agent.pipeline import UpdatePipeline

__all__ = [
    "COSINE_MIN",
    "QUEUE_MAX",
    "CpuBudget",
    "ShadowEvaluator",
    "agrees",
    "install",
    "metric_for",
]

log = logging.getLogger("edgefleet.agent")

QUEUE_MAX = 8  # mirrored requests waiting for the candidate; more are dropped (counted), never queued without bound
COSINE_MIN = 0.99  # the cosine metric's agreement: this similarity of the first output, or more
_COSINE = frozenset({"cosine", "cosine-min", "sqnr"})


def metric_for(declared: str | None) -> str:
    """What agreement means for a package whose optimize lineage declares ``declared`` (manifest
    ``lineage.accuracy.metric``): ``cosine`` for the similarity metrics, else ``top1`` (the default)."""
    return "cosine" if declared in _COSINE else "top1"


def _first_common(served: Mapping[str, Any], candidate: Mapping[str, Any], want: Callable[[np.ndarray], bool]) -> str:
    for name, value in served.items():
        if name in candidate and isinstance(value, np.ndarray) and want(value):
            return name
    return ""


def agrees(served: Mapping[str, Any], candidate: Mapping[str, Any], metric: str = "top1") -> bool:
    """Whether the candidate's answer agrees with the served one. ``top1``: the same top class on every row of
    the first output of class scores (float, last axis > 1), else equal labels (the first integer output);
    ``cosine``: the first float output's cosine similarity is at least :data:`COSINE_MIN`. Outputs that cannot
    be compared (no common name, other shapes) disagree."""

    def scores(a: np.ndarray) -> bool:
        return a.dtype.kind == "f" and a.ndim >= 1 and a.shape[-1] > 1

    if metric == "cosine":
        name = _first_common(served, candidate, lambda a: a.dtype.kind == "f")
        if not name:
            return False
        a = np.asarray(served[name], np.float64).ravel()
        b = np.asarray(candidate[name], np.float64).ravel()
        if a.shape != b.shape:
            return False
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if na == 0.0 or nb == 0.0:
            return na == nb
        return float(a @ b) / (na * nb) >= COSINE_MIN
    name = _first_common(served, candidate, scores)
    if name:
        a, b = np.asarray(served[name]), np.asarray(candidate[name])
        return a.shape == b.shape and bool(np.array_equal(np.argmax(a, axis=-1), np.argmax(b, axis=-1)))
    name = _first_common(served, candidate, lambda a: a.dtype.kind in "iub")
    if name:
        return bool(np.array_equal(np.asarray(served[name]), np.asarray(candidate[name])))
    return False


class CpuBudget:
    """A token bucket of compute seconds: ``share`` of one core accrues per second of wall time, up to
    ``burst_s``; the candidate may start a request only while the bucket is not empty (its last run may take it
    below zero, and later requests wait for the refill)."""

    def __init__(self, share: float, *, burst_s: float = 0.5, now: float = 0.0) -> None:
        self.share = share
        self.burst_s = burst_s
        self.tokens = burst_s
        self.at = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst_s, self.tokens + (now - self.at) * self.share)
        self.at = now

    def allow(self, now: float) -> bool:
        self._refill(now)
        return self.tokens > 0

    def spend(self, seconds: float, now: float) -> None:
        self._refill(now)
        self.tokens -= seconds


@dataclass
class _Window:
    compared: int = 0
    agreed: int = 0
    errors: int = 0
    dropped: int = 0
    sketch: LatencySketch = field(default_factory=LatencySketch)


class ShadowEvaluator:
    """One shadow phase: the candidate's worker, the queue of mirrored requests, the open window's counts."""

    def __init__(
        self,
        order: ShadowOrder,
        spec: WorkerSpec,
        metric: str = "top1",
        *,
        monotonic: Callable[[], float] = time.monotonic,
        queue_max: int = QUEUE_MAX,
    ) -> None:
        self.order = order
        self.spec = spec
        self.metric = metric
        self.monotonic = monotonic
        self.queue_max = queue_max
        self.budget = CpuBudget(order.cpu_share, now=monotonic())
        self.queue: collections.deque[tuple[dict[str, Any], dict[str, Any]]] = collections.deque()
        self.window = _Window()
        self.worker: WorkerProcess | None = None
        self.info: ModelInfo | None = None
        self.failed: str | None = None  # the candidate's worker ended: every later copy counts as its error
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> ModelInfo:
        w = WorkerProcess(self.spec)
        self.info = await w.start()
        self.worker = w
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self.info

    def offer(self, batch: list[Any], info: ModelInfo | None = None) -> None:
        """Copies from the serving worker (``[(inputs, served outputs), …]``): queued while there is room and CPU
        share, else dropped and counted. Runs in the event loop's callback that read the frame."""
        now = self.monotonic()
        for item in batch:
            try:
                feeds, served = item
            except (TypeError, ValueError):
                continue  # a worker may be hostile: a malformed copy is ignored, not trusted
            if not isinstance(feeds, dict) or not isinstance(served, dict):
                continue
            if self.failed is not None:
                self._count(None, None)
            elif len(self.queue) >= self.queue_max or not self.budget.allow(now):
                self.window.dropped += 1
            else:
                self.queue.append((feeds, served))
        if self.queue:
            self._wake.set()

    def _count(self, agreed: bool | None, seconds: float | None) -> None:
        w = self.window
        w.compared += 1
        if agreed is None:
            w.errors += 1
        elif agreed:
            w.agreed += 1
        if seconds is not None:
            w.sketch.add(seconds)

    async def _run(self) -> None:
        w = self.worker
        assert w is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.queue:
                feeds, served = self.queue.popleft()
                try:
                    reply = await w.call(("infer", feeds, None))
                except WorkerUnavailable as err:
                    self.failed = str(err)
                    log.warning("shadow candidate %s stopped: %s", self.order.version, err)
                    self._count(None, None)
                    for _ in range(len(self.queue)):
                        self._count(None, None)
                    self.queue.clear()
                    return
                if reply[0] == "ok":
                    compute = float(reply[2])
                    self.budget.spend(compute, self.monotonic())
                    self._count(agrees(served, reply[1], self.metric), compute)
                else:
                    self._count(None, None)

    def take(self) -> ShadowStats:
        """The open window's counts, and a fresh window from here."""
        w, self.window = self.window, _Window()
        return ShadowStats(
            rollout_id=self.order.rollout_id,
            model=self.order.model,
            version=self.order.version,
            metric=self.metric,
            compared=w.compared,
            agreed=w.agreed,
            errors=w.errors,
            dropped=w.dropped,
            latency=w.sketch.to_data(),
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.worker is not None:
            await self.worker.stop()


async def install(pipeline: UpdatePipeline, order: ShadowOrder) -> tuple[Path, str]:
    """Put the order's candidate in the idle slot, verified like an update (signed length and hash, the package
    opens, it fits this device) but named by no persisted state; returns its path and the agreement metric its
    manifest declares. Raises :class:`~edgefleet.errors.EdgefleetError` (or Offline) with the reason."""
    from edgefleet.agent.updater import Offline, download_resumable
    from edgefleet.errors import VerificationError
    from edgefleet.package import check_requirements, open_package
    from edgefleet.protocol import DesiredState
    from edgefleet.runtime import available_runtimes, runtime_version

    h = pipeline.host
    desired = h.desired or DesiredState(device_id=str(h.identity.get("device_id") or "device"))
    loop = asyncio.get_running_loop()
    client = await pipeline.refresh_metadata(desired)
    try:
        info = await loop.run_in_executor(None, client.target_info, order.target)
        url = await loop.run_in_executor(None, client.target_url, order.target)
        if h.cp is None:
            raise Offline("no control plane client yet")
        partial = h.slots.partial(order.target + ".shadow")
        path = await download_resumable(
            h.cp.http,
            url,
            partial,
            length=info.length,
            keep_going=lambda: h.desired is not None and h.desired.shadow == order,
            rate_bps=h.config.download_rate_bps,
            monotonic=h.clock.monotonic,
            sleep=h.clock.sleep,
        )
        await loop.run_in_executor(None, client.verify_file, order.target, path)
    finally:
        client.close()  # this pipeline is the shadow's own: its client ends with the install
    opened = await loop.run_in_executor(None, lambda: open_package(path, device_key=h.key_for(path)))
    reasons = check_requirements(
        opened.manifest,
        tier=h.identity.get("tier"),
        runtime_version=runtime_version(),
        memory_mb=h.settings.memory_mb,
        runtimes=available_runtimes(),
    )
    if reasons:
        path.unlink(missing_ok=True)
        raise VerificationError("incompatible: " + "; ".join(reasons))
    slot = h.slots.idle_slot(h.state)
    staged = h.slots.stage(path, slot)
    accuracy = opened.manifest.lineage.accuracy
    return staged, metric_for(accuracy.metric if accuracy is not None else None)
