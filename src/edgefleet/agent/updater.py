"""The network edge of the agent: the check-in client and the resumable package download.

Every transport failure becomes :class:`Offline`, which the agent treats as "keep serving, keep buffering, log
once per outage". A 4xx is not retried in a loop: it is a fact about the request, not about the link; a report
the server will never take (413, 422) is :class:`ReportRejected`, and the agent drops that batch. A download
never writes past the signed length: more data is a :class:`~edgefleet.errors.VerificationError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from edgefleet.agent.state import PersistedState, refusal_key
from edgefleet.errors import AgentError, AuthError, DownloadError, VerificationError
from edgefleet.protocol import (
    API_PREFIX,
    SEVERAL_MODELS_HEADER,
    AgentState,
    CrashUpload,
    CrashUploadResponse,
    CredentialResponse,
    DesiredState,
    EnrollRequest,
    EnrollResponse,
    KeyRotation,
    LogUpload,
    Report,
    ReportResponse,
    SampleUpload,
    SampleUploadResponse,
)

__all__ = [
    "CHUNK",
    "MAX_RESTARTS",
    "Cancelled",
    "ControlPlaneClient",
    "Offline",
    "ReportRejected",
    "download_resumable",
    "jittered",
    "pace_delay",
    "should_update",
    "stagger_delay",
]

log = logging.getLogger("edgefleet.agent")

CHUNK = 64 * 1024
# Starting a download over from byte 0 (the server ignored a Range, answered 416, or sent a file of the wrong
# size) is normal once; a server that makes it happen again and again is not going to deliver the target.
MAX_RESTARTS = 3


class Offline(AgentError):
    """The control plane or repository cannot be reached (or answered 5xx): try again later."""


class Cancelled(AgentError):
    """The desired state moved on while an update was in flight: the update is abandoned, not failed."""


class ReportRejected(AgentError):
    """The control plane will never accept this report as it is (413: too large; 422: invalid): resending it
    would fail forever."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


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
    def __init__(
        self,
        server: str,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        ca_file: Path | str | None = None,
        insecure_http: bool = False,
    ) -> None:
        from edgefleet.transport import check_url, verify_arg

        # The credential and the enrollment token ride in every request: TLS verified, or loopback
        # (docs/security/tls.md). The same client downloads targets, so the pinned CA covers them too. An injected
        # transport (tests, an embedding application) is not the network and brings its own policy.
        self.server = (check_url(server, insecure_http) if transport is None else server).rstrip("/")
        self.http = httpx.AsyncClient(timeout=timeout, transport=transport, verify=verify_arg(ca_file))
        self.device_id: str | None = None
        self.credential: str | None = None

    async def aclose(self) -> None:
        await self.http.aclose()

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential}"} if self.credential else {}

    async def _request(self, method: str, path: str, *, rejectable: bool = False, **kw: object) -> httpx.Response:
        try:
            r = await self.http.request(method, f"{self.server}{API_PREFIX}{path}", **kw)  # type: ignore[arg-type]
        except httpx.HTTPError as err:
            raise Offline(f"control plane {self.server} unreachable: {type(err).__name__}: {err}")
        if r.status_code >= 500:
            raise Offline(f"control plane {self.server} answered {r.status_code}")
        if r.status_code in (401, 403):
            raise AuthError(f"control plane refused the device credential ({r.status_code}): {_err(r)}")
        if rejectable and r.status_code in (413, 422):
            raise ReportRejected(f"control plane answered {r.status_code} to {method} {path}: {_err(r)}", r.status_code)
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
            rejectable=True,
            # absent when empty: servers that predate per-model status refuse unknown fields
            content=report.model_dump_json(exclude=None if report.models else {"models"}),
            # this agent serves additional models (ADR 0108); servers that predate it ignore the header
            headers={**self._auth(), "content-type": "application/json", SEVERAL_MODELS_HEADER: "1"},
        )
        return ReportResponse.model_validate_json(r.content)

    async def rotate_credential(self) -> str:
        """A new credential (the current one works until the new one is first used)."""
        r = await self._request("POST", f"/devices/{self.device_id}/credential", headers=self._auth())
        return CredentialResponse.model_validate_json(r.content).credential

    async def upload_logs(self, upload: LogUpload) -> None:
        """Send this device's log lines, answering the operator's open request."""
        await self._request(
            "POST",
            f"/devices/{self.device_id}/logs",
            content=upload.model_dump_json(),
            headers={**self._auth(), "content-type": "application/json"},
        )

    async def upload_crashes(self, upload: CrashUpload) -> CrashUploadResponse:
        """Send this device's worker crash reports; the answer names those the control plane keeps now."""
        r = await self._request(
            "POST",
            f"/devices/{self.device_id}/crashes",
            rejectable=True,
            content=upload.model_dump_json(),
            headers={**self._auth(), "content-type": "application/json"},
        )
        return CrashUploadResponse.model_validate_json(r.content)

    async def upload_samples(self, upload: SampleUpload) -> SampleUploadResponse:
        """Send input samples sealed for the operator (agent/sampling.py); the answer names those now kept."""
        r = await self._request(
            "POST",
            f"/devices/{self.device_id}/samples",
            rejectable=True,
            content=upload.model_dump_json(),
            headers={**self._auth(), "content-type": "application/json"},
        )
        return SampleUploadResponse.model_validate_json(r.content)

    async def rotate_key(self, public_key: str) -> None:
        """Tell the control plane this device's new X25519 public key."""
        await self._request(
            "POST",
            f"/devices/{self.device_id}/key",
            content=KeyRotation(public_key=public_key).model_dump_json(),
            headers={**self._auth(), "content-type": "application/json"},
        )


def _err(r: httpx.Response) -> str:
    try:
        doc = r.json()
        return str(doc.get("error") or doc.get("detail") or doc)[:300]
    except ValueError:
        return r.text[:300]


def pace_delay(received: int, elapsed_s: float, rate_bps: int) -> float:
    """How long to wait after ``received`` bytes in ``elapsed_s`` so the average stays at or under ``rate_bps``."""
    return max(0.0, received / rate_bps - elapsed_s)


def stagger_delay(device_id: str, target: str, stagger_s: float) -> float:
    """When, within ``stagger_s`` of learning of ``target``, this device starts downloading it: spread evenly over
    a fleet by a hash of the two (so a wave does not hit the repository at once), and the same after a restart."""
    if stagger_s <= 0:
        return 0.0
    digest = hashlib.sha256(f"{device_id}|{target}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * stagger_s


def _chunk_for(rate_bps: int | None) -> int:
    """Read size: a capped download reads in pieces of at most a tenth of a second's worth, so the rate holds over
    short stretches too, not only on average (and never below 1 KiB)."""
    return CHUNK if rate_bps is None else max(1024, min(CHUNK, rate_bps // 10))


async def download_resumable(
    http: httpx.AsyncClient,
    url: str,
    partial: Path,
    *,
    length: int,
    retries: int = 6,
    backoff_s: float = 0.2,
    backoff_max_s: float = 10.0,
    max_restarts: int = MAX_RESTARTS,
    keep_going: Callable[[], bool] = lambda: True,
    rate_bps: int | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> Path:
    """Fetch ``url`` into ``partial``, continuing from its current size with an HTTP Range request.

    Bytes are appended as they arrive, so a cut link loses at most what was in flight. Never writes more than
    ``length`` bytes (the signed length): a server that sends more is refused at once
    (:class:`~edgefleet.errors.VerificationError`, the partial file removed), as is one that makes the download
    start over from byte 0 more than ``max_restarts`` times. Stops on a 4xx (:class:`DownloadError`), after
    ``retries`` failed attempts in a row (:class:`Offline`), or as soon as ``keep_going()`` is false
    (:class:`Cancelled`). With ``rate_bps``, reading is paced to at most that many bytes per second
    (:func:`pace_delay`; a reader that waits makes TCP slow the sender down), on every connection, resumed ones
    included. ``on_bytes`` is told the size of every piece received (what the update cost the link, restarts
    included)."""
    failures = 0
    restarts = 0

    def start_over(why: str) -> None:
        nonlocal restarts
        partial.unlink(missing_ok=True)
        restarts += 1
        if restarts > max_restarts:
            raise VerificationError(f"download of {url} refused: it had to start over {restarts} times ({why})")
        log.info("download of %s starts over: %s", url, why)

    while True:
        have = partial.stat().st_size if partial.exists() else 0
        if have > length:  # not the file we are after
            start_over(f"{have} bytes on disk, more than the signed {length}")
            have = 0
        if have == length:
            return partial
        if not keep_going():
            raise Cancelled("the desired state changed during the download")
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            async with http.stream("GET", url, headers=headers) as r:
                if r.status_code == 416:
                    start_over("the server answered 416 to a Range request")
                    continue
                if 400 <= r.status_code < 500:
                    raise DownloadError(f"download of {url} refused with HTTP {r.status_code}")
                if r.status_code >= 500:
                    raise httpx.TransportError(f"HTTP {r.status_code}")
                resumed = r.status_code == 206 and have > 0
                if have and not resumed:
                    start_over(f"the server ignored the Range request (HTTP {r.status_code})")
                    have = 0
                announced = r.headers.get("content-length")
                if announced is not None and announced.isdigit() and have + int(announced) > length:
                    partial.unlink(missing_ok=True)
                    raise VerificationError(
                        f"download of {url} refused: the server announces {have + int(announced)} bytes, "
                        f"more than the signed length of {length}"
                    )
                size = have
                t0 = monotonic()
                with open(partial, "ab" if resumed else "wb") as f:
                    async for chunk in r.aiter_raw(_chunk_for(rate_bps)):
                        if size + len(chunk) > length:
                            f.close()
                            partial.unlink(missing_ok=True)
                            raise VerificationError(
                                f"download of {url} refused: the server sent more than the signed length of "
                                f"{length} bytes"
                            )
                        f.write(chunk)
                        size += len(chunk)
                        on_bytes(len(chunk))
                        if rate_bps is not None and (wait := pace_delay(size - have, monotonic() - t0, rate_bps)):
                            await sleep(wait)
                        if not keep_going():
                            f.flush()
                            raise Cancelled("the desired state changed during the download")
                    f.flush()
                    os.fsync(f.fileno())
            if size > have:
                failures = 0  # progress: the link works, keep the retry budget for real stalls
            if size < length:
                raise httpx.TransportError("connection closed early")
        except httpx.HTTPError as err:
            failures += 1
            if failures > retries:
                raise Offline(f"download of {url} failed {failures} times: {err}")
            await asyncio.sleep(min(backoff_max_s, backoff_s * 2 ** (failures - 1)))
