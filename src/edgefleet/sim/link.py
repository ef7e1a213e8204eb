"""A device's network link as an httpx transport: counts check-ins, and injects the link faults of its plan —
dropped requests (flaky), an outage window (cut), added latency (slow) and a skewed clock (the timestamps the
device sends move by the skew, which is all a server can see of a wrong clock)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx

from edgefleet.sim.spec import DevicePlan

__all__ = ["LinkStats", "SimLink", "skew_report"]

_TIME_KEYS = ("at", "start", "end", "sent_at")


@dataclass
class LinkStats:
    """Shared by every link of a fleet: the figures ``benchmarks/simulate.py`` prints."""

    checkins: int = 0
    checkins_ok: int = 0
    reports: int = 0
    reports_ok: int = 0
    injected: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def success_rate(self) -> float | None:
        n = self.checkins + self.reports
        return (self.checkins_ok + self.reports_ok) / n if n else None


def skew_report(body: bytes, skew_s: float) -> bytes:
    """Move every timestamp of a report (its ``sent_at``, events, telemetry windows) by ``skew_s`` seconds, as a
    device whose clock is off would write them."""
    doc = json.loads(body)

    def move(d: dict[str, Any]) -> None:
        for k in _TIME_KEYS:
            if isinstance(d.get(k), str):
                d[k] = (datetime.fromisoformat(d[k]) + timedelta(seconds=skew_s)).isoformat()

    move(doc)
    for ev in doc.get("events", []):
        move(ev)
    for w in doc.get("telemetry", []):
        move(w)
    return json.dumps(doc).encode()


class SimLink(httpx.AsyncBaseTransport):
    def __init__(
        self, plan: DevicePlan, stats: LinkStats, inner: httpx.AsyncBaseTransport, *, t0: float | None = None
    ) -> None:
        self.stats = stats
        self.inner = inner
        self.rng = random.Random(plan.index)
        self.t0 = time.monotonic() if t0 is None else t0
        flaky, cut, slow, skew = (plan.fault(k) for k in ("flaky", "cut", "slow", "clock-skew"))
        self.drop = float(flaky.value or 0) if flaky else 0.0
        self.cut = (3.0, 3.0 + cut.seconds) if cut else None
        self.delay = slow.seconds if slow else 0.0
        self.skew = skew.seconds if skew else 0.0

    def _kind(self, request: httpx.Request) -> str | None:
        path = request.url.path
        if path.endswith("/desired"):
            return "checkin"
        if path.endswith("/report"):
            return "report"
        return None

    def _count(self, kind: str | None, ok: bool, seconds: float | None = None) -> None:
        if kind == "checkin":
            self.stats.checkins += 1
            self.stats.checkins_ok += ok
        elif kind == "report":
            self.stats.reports += 1
            self.stats.reports_ok += ok
        if ok and seconds is not None and kind and len(self.stats.latencies) < 200_000:
            self.stats.latencies.append(seconds)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        kind = self._kind(request)
        now = time.monotonic() - self.t0
        if (self.cut and self.cut[0] <= now < self.cut[1]) or (self.drop and self.rng.random() < self.drop):
            self.stats.injected += 1
            self._count(kind, False)
            raise httpx.ConnectError("simulated link fault", request=request)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.skew and kind == "report":
            body = skew_report(await request.aread(), self.skew)
            headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
            request = httpx.Request(request.method, request.url, headers=headers, content=body)
        t = time.perf_counter()
        try:
            resp = await self.inner.handle_async_request(request)
        except httpx.HTTPError:
            self._count(kind, False)
            raise
        self._count(kind, resp.status_code < 400, time.perf_counter() - t)
        return resp

    async def aclose(self) -> None:
        # the inner transport is shared by the whole fleet; the fleet closes it
        return None
