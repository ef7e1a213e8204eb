"""The network edge of the agent: the check-in client and the resumable package download.

Every transport failure becomes :class:`Offline`, which the agent treats as "keep serving, keep buffering, log
once per outage". A 4xx is not retried in a loop: it is a fact about the request, not about the link.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from pathlib import Path

import httpx

from edgefleet.agent.state import PersistedState, refusal_key
from edgefleet.errors import AgentError, AuthError, DownloadError
from edgefleet.protocol import (
    API_PREFIX,
    AgentState,
    DesiredState,
    EnrollRequest,
    EnrollResponse,
    Report,
    ReportResponse,
)

__all__ = ["CHUNK", "ControlPlaneClient", "Offline", "download_resumable", "jittered", "should_update"]

CHUNK = 64 * 1024


class Offline(AgentError):
    """The control plane or repository cannot be reached (or answered 5xx): try again later."""


def jittered(interval: float, rng: random.Random | None = None) -> float:
    """±20 % jitter, so a fleet that booted together does not check in together."""
    r = rng or random
    return float(interval * (0.8 + 0.4 * r.random()))


def should_update(s: PersistedState, desired: DesiredState, busy: bool) -> bool:
    """Pure: does the desired state ask for an update this agent should start now?"""
    if busy or desired.target is None or desired.model is None or desired.version is None:
        return False
    if s.state is AgentState.probation:
        return False
    if s.active is not None and s.active.target == desired.target:
        return False
    return refusal_key(desired.rollout_id, desired.target) not in s.refused


class ControlPlaneClient:
    def __init__(self, server: str, *, timeout: float = 10.0) -> None:
        self.server = server.rstrip("/")
        self.http = httpx.AsyncClient(timeout=timeout)
        self.device_id: str | None = None
        self.credential: str | None = None

    async def aclose(self) -> None:
        await self.http.aclose()

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential}"} if self.credential else {}

    async def _request(self, method: str, path: str, **kw: object) -> httpx.Response:
        try:
            r = await self.http.request(method, f"{self.server}{API_PREFIX}{path}", **kw)  # type: ignore[arg-type]
        except httpx.HTTPError as err:
            raise Offline(f"control plane {self.server} unreachable: {type(err).__name__}: {err}")
        if r.status_code >= 500:
            raise Offline(f"control plane {self.server} answered {r.status_code}")
        if r.status_code in (401, 403):
            raise AuthError(f"control plane refused the device credential ({r.status_code}): {_err(r)}")
        if r.status_code >= 400:
            raise AgentError(f"control plane answered {r.status_code} to {method} {path}: {_err(r)}")
        return r

    async def enroll(self, req: EnrollRequest) -> EnrollResponse:
        r = await self._request(
            "POST", "/enroll", content=req.model_dump_json(), headers={"content-type": "application/json"}
        )
        return EnrollResponse.model_validate_json(r.content)

    async def desired(self, etag: str | None) -> tuple[DesiredState | None, str | None]:
        headers = self._auth()
        if etag:
            headers["If-None-Match"] = etag
        r = await self._request("GET", f"/devices/{self.device_id}/desired", headers=headers)
        if r.status_code == 304:
            return None, etag
        return DesiredState.model_validate_json(r.content), r.headers.get("etag")

    async def report(self, report: Report) -> ReportResponse:
        r = await self._request(
            "POST",
            f"/devices/{self.device_id}/report",
            content=report.model_dump_json(),
            headers={**self._auth(), "content-type": "application/json"},
        )
        return ReportResponse.model_validate_json(r.content)


def _err(r: httpx.Response) -> str:
    try:
        doc = r.json()
        return str(doc.get("error") or doc.get("detail") or doc)[:300]
    except ValueError:
        return r.text[:300]


async def download_resumable(
    http: httpx.AsyncClient,
    url: str,
    partial: Path,
    *,
    length: int,
    retries: int = 6,
    backoff_s: float = 0.2,
    backoff_max_s: float = 10.0,
    keep_going: Callable[[], bool] = lambda: True,
) -> Path:
    """Fetch ``url`` into ``partial``, continuing from its current size with an HTTP Range request.

    Bytes are appended as they arrive, so a cut link loses at most what was in flight. Stops on a 4xx
    (:class:`DownloadError`), after ``retries`` failed attempts in a row (:class:`Offline`), or as soon as
    ``keep_going()`` is false (:class:`asyncio.CancelledError`-free: raises :class:`AgentError`)."""
    failures = 0
    while True:
        have = partial.stat().st_size if partial.exists() else 0
        if have > length:  # not the file we are after: start over
            partial.unlink()
            have = 0
        if have == length:
            return partial
        if not keep_going():
            raise AgentError("the desired state changed during the download")
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            async with http.stream("GET", url, headers=headers) as r:
                if r.status_code == 416:
                    partial.unlink(missing_ok=True)
                    continue
                if 400 <= r.status_code < 500:
                    raise DownloadError(f"download of {url} refused with HTTP {r.status_code}")
                if r.status_code >= 500:
                    raise httpx.TransportError(f"HTTP {r.status_code}")
                mode = "ab" if r.status_code == 206 and have else "wb"
                with open(partial, mode) as f:
                    async for chunk in r.aiter_raw(CHUNK):
                        f.write(chunk)
                        if not keep_going():
                            f.flush()
                            raise AgentError("the desired state changed during the download")
                    f.flush()
                    os.fsync(f.fileno())
            if partial.stat().st_size > have:
                failures = 0  # progress: the link works, keep the retry budget for real stalls
            if partial.stat().st_size < length:
                raise httpx.TransportError("connection closed early")
        except httpx.HTTPError as err:
            failures += 1
            if failures > retries:
                raise Offline(f"download of {url} failed {failures} times: {err}")
            await asyncio.sleep(min(backoff_max_s, backoff_s * 2 ** (failures - 1)))
