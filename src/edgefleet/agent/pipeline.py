"""One update, one method per state of the state machine (``state.py``): downloading → verifying → staged (where
it waits for a maintenance window, if the group has them) → health_check → probation (the switch), ending in
committed, rolled_back (refused, failed) or a cancellation.

Each step either returns what the next one needs or ends the update by raising: :class:`Retry` (a failure that
may be transient, such as a corrupted download or metadata that looks expired to a skewed clock: tried again,
:data:`MAX_UPDATE_ATTEMPTS` attempts in all, counted in the state file), :class:`Refuse` (final, with the
failure's own event kind), :class:`~edgefleet.agent.updater.Cancelled` (the desired state moved on: not a
failure) or :class:`~edgefleet.agent.updater.Offline` (the partial download is kept and resumed). Every update
thus ends in exactly one of the events ``committed``, ``refused``, ``health_check_failed``, ``rolled_back`` or
``cancelled``.

The pipeline owns no state of its own beyond the retry timer: it reads and saves the agent's persisted state and
events through :class:`UpdateHost`, the narrow view of the agent it is given.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from edgefleet.agent.backend import Backend
from edgefleet.agent.edges import Clock, HealthCheck
from edgefleet.agent.probation import ProbationStats, latency_budget_ms
from edgefleet.agent.service import InferenceService
from edgefleet.agent.slots import SlotStore
from edgefleet.agent.state import Pending, PersistedState, SlotInfo, refusal_key
from edgefleet.agent.updater import Cancelled, ControlPlaneClient, Offline, download_resumable, stagger_delay
from edgefleet.agent.windows import next_open, window_zone
from edgefleet.agent.worker.spec import ModelInfo, WorkerSpec
from edgefleet.config import AgentSettings
from edgefleet.errors import DownloadError, EdgefleetError, VerificationError, WorkerUnavailable
from edgefleet.protocol import AgentState, DesiredState, DeviceConfig, EventKind
from edgefleet.runtime import available_runtimes, runtime_version

if TYPE_CHECKING:
    from edgefleet.package import OpenedPackage
    from edgefleet.repository import TargetInfo, TufClient

__all__ = ["MAX_UPDATE_ATTEMPTS", "RETRY_MAX_S", "Refuse", "Retry", "UpdateHost", "UpdatePipeline"]

log = logging.getLogger("edgefleet.agent")

MAX_UPDATE_ATTEMPTS = 3  # attempts at an update whose failure may be transient, before it becomes a refusal
RETRY_MAX_S = 600.0  # the longest wait between two attempts


class Retry(Exception):
    """The update failed in a way that may be transient: try again later, up to the attempt limit."""


class Refuse(Exception):
    """The update failed for good: one event of ``kind``, never retried in this rollout."""

    def __init__(self, reason: str, kind: EventKind = EventKind.refused) -> None:
        super().__init__(reason)
        self.kind = kind


class UpdateHost(Protocol):
    """What an update needs of the agent that runs it."""

    settings: AgentSettings
    data_dir: Path
    clock: Clock
    health_check: HealthCheck
    transport: httpx.AsyncBaseTransport | None
    slots: SlotStore
    service: InferenceService
    state: PersistedState
    config: DeviceConfig
    desired: DesiredState | None
    identity: dict[str, Any]
    backend: Backend | None
    cp: ControlPlaneClient | None

    def save(self, s: PersistedState) -> None: ...

    def event(
        self,
        kind: EventKind,
        reason: str | None = None,
        model: str | None = None,
        version: str | None = None,
        rollout_id: str | None = None,
        *,
        bytes_downloaded: int | None = None,
        delta_from: str | None = None,
    ) -> None: ...

    def spec(self, slot: SlotInfo) -> WorkerSpec: ...

    def key_for(self, package: Path) -> Path | None: ...

    async def start_backend(self, spec: WorkerSpec) -> tuple[Backend, ModelInfo]: ...

    async def close_window_before_switch(self) -> None: ...

    async def switch_to(self, backend: Backend, info: ModelInfo, probation: ProbationStats) -> None: ...


class UpdatePipeline:
    def __init__(self, host: UpdateHost) -> None:
        self.host = host
        self._retry: tuple[str, float] | None = None  # (refusal key, monotonic time) of the next attempt allowed
        self._tuf_client: TufClient | None = None
        # this attempt's transport: bytes received, the version a delta started from, why a delta was not used
        self._downloaded: int | None = None
        self._delta_from: str | None = None
        self._delta_note: str | None = None

    # ------------------------------------------------------------------ when

    def still_wanted(self, target: str) -> bool:
        d = self.host.desired
        return d is not None and d.target == target

    def retry_due(self, d: DesiredState) -> bool:
        r = self._retry
        return r is None or r[0] != refusal_key(d.rollout_id, d.target or "") or self.host.clock.monotonic() >= r[1]

    # ------------------------------------------------------------------ one update, state by state

    async def run(self, d: DesiredState) -> None:
        """Take the device to ``d``; whatever happens, the update ends in one outcome and never raises (but for
        :class:`~edgefleet.agent.updater.Offline`, which the caller reports, and cancellation)."""
        assert d.target and d.model and d.version
        self._downloaded, self._delta_from, self._delta_note = None, None, None
        try:
            pending, staged = self.downloading(d)
            client = await self.refresh_metadata(d)
            path, info = await self.download(d, client, pending, staged)
            opened = await self.verifying(d, client, path)
            pending = self.staged(d, pending, path, opened, info, staged)
            await self.await_window(d)
            cand, spec = await self.health_check(d, pending)
            await self.switch(d, cand, spec)
        except Retry as err:
            self.retry_or_refuse(d, str(err))
        except Refuse as err:
            self.refuse(d, str(err), err.kind)
        except Cancelled as err:
            self.cancel(d, str(err))
        except (Offline, asyncio.CancelledError):
            raise
        except Exception as err:  # an update must never take the agent down
            log.exception("update to %s failed", d.target)
            self.retry_or_refuse(d, f"update failed: {type(err).__name__}: {err}")
        finally:
            if self._tuf_client is not None:
                # its https connections to the repository are released once the update ends, whichever way
                self._tuf_client.close()
                self._tuf_client = None

    def downloading(self, d: DesiredState) -> tuple[Pending, bool]:
        """Enter ``downloading``: the pending update (its failure count kept across restarts, unless a new
        rollout asks for the same target) and whether its package is staged already."""
        h = self.host
        s = h.state
        if s.pending is not None and s.pending.target == d.target:
            pending = s.pending
            if pending.rollout_id != d.rollout_id:  # a new rollout of the same target starts a fresh count
                pending = pending.model_copy(update={"rollout_id": d.rollout_id, "failures": 0})
        else:
            assert d.model and d.version and d.target
            pending = Pending(
                model=d.model,
                version=d.version,
                target=d.target,
                package_sha256=d.package_sha256,
                rollout_id=d.rollout_id,
            )
        staged = pending.slot is not None and h.slots.path(pending.slot).exists()
        h.save(s.with_(state=AgentState.downloading, reason=None, pending=pending))
        h.event(EventKind.download_started, None, d.model, d.version, d.rollout_id)
        log.info(
            "update to %s (rollout %s), attempt %d of %d",
            d.target,
            d.rollout_id,
            pending.failures + 1,
            MAX_UPDATE_ATTEMPTS,
        )
        return pending, staged

    async def refresh_metadata(self, d: DesiredState) -> TufClient:
        """The repository's signed metadata, refreshed from the pinned root."""
        from edgefleet.repository import TufClient

        h = self.host
        loop = asyncio.get_running_loop()
        tuf_dir = h.data_dir / "tuf"
        root = tuf_dir / "trusted_root.json"
        # the desired state names the repository where the server moved it (object storage, a CDN); the
        # metadata already trusted stays: the same repository, signed by the same keys, served elsewhere
        url = d.repository_url or h.identity["repository_url"]
        fetcher = self._tuf_fetcher(url, loop)
        try:
            client = TufClient(
                tuf_dir / "metadata",
                url,
                root.read_bytes() if not (tuf_dir / "metadata" / "root.json").exists() else None,
                fetcher=fetcher,
                ca_file=h.settings.ca_file,
                # an injected transport is not the network and brings its own policy, as for the control plane
                insecure_http=h.settings.insecure_http or fetcher is not None,
            )
            self._tuf_client = client
            await loop.run_in_executor(None, client.refresh)
        except DownloadError as err:
            # the repository cannot be reached: transient, unlike a verification failure, so not a refusal
            raise Offline(f"repository unreachable: {err}")
        except EdgefleetError as err:
            raise Retry(f"refused: {err}")
        return client

    def _tuf_fetcher(self, repository_url: str, loop: asyncio.AbstractEventLoop) -> Any:
        """With an injected transport, an http(s) repository is read through it too (on this loop, over the
        control plane client's connections); None: the TUF client's own fetcher (the network, or a folder)."""
        h = self.host
        if h.transport is None or h.cp is None or not repository_url.startswith(("http://", "https://")):
            return None
        from edgefleet.agent.loopfetch import LoopFetcher

        return LoopFetcher(h.cp.http, loop)

    async def download(
        self, d: DesiredState, client: TufClient, pending: Pending, staged: bool
    ) -> tuple[Path, TargetInfo]:
        """The target's bytes on disk (resumed where a cut download stopped; never past the signed length)."""
        assert d.target
        h = self.host
        loop = asyncio.get_running_loop()
        try:
            info = await loop.run_in_executor(None, client.target_info, d.target)
        except EdgefleetError as err:
            raise Retry(f"refused: {err}")
        if staged:
            assert pending.slot is not None
            log.info("%s is staged in slot %s already", d.target, pending.slot)
            return h.slots.path(pending.slot), info
        url = await loop.run_in_executor(None, client.target_url, d.target)
        assert h.cp is not None
        partial = h.slots.partial(d.target)
        have = partial.stat().st_size if partial.exists() else 0
        cfg = h.config
        delay = 0.0 if have else stagger_delay(str(h.identity.get("device_id")), d.target, cfg.download_stagger_s)
        if delay:
            log.info("download of %s starts in %.1f s (staggered over %g s)", d.target, delay, cfg.download_stagger_s)
            await h.clock.sleep(delay)
            if not self.still_wanted(d.target):
                raise Cancelled("the desired state changed before the download started")
        self._downloaded = 0
        if not have and (rebuilt := await self.via_delta(d, client, info)) is not None:
            return rebuilt, info
        cap = f", at most {cfg.download_rate_bps} bytes/s" if cfg.download_rate_bps else ""
        log.info("downloading %s: %d bytes%s%s", d.target, info.length, f", resuming at {have}" if have else "", cap)
        t0 = h.clock.monotonic()
        try:
            path = await download_resumable(
                h.cp.http,
                url,
                partial,
                length=info.length,
                keep_going=lambda: self.still_wanted(d.target or ""),
                rate_bps=cfg.download_rate_bps,
                monotonic=h.clock.monotonic,
                sleep=h.clock.sleep,
                on_bytes=self._count,
            )
        except (DownloadError, VerificationError) as err:
            raise Retry(f"refused: {err}")
        log.info("downloaded %s: %d bytes in %.1f s", d.target, info.length, h.clock.monotonic() - t0)
        return path, info

    def _count(self, n: int) -> None:
        self._downloaded = (self._downloaded or 0) + n

    async def via_delta(self, d: DesiredState, client: TufClient, info: TargetInfo) -> Path | None:
        """The target rebuilt from the committed slot's package and a published delta (docs/agent.md, "Delta
        updates"), checked against the FULL target's signed length and hash before anything uses it. None when the
        repository has no delta from the installed package, or when the delta fails in any way (download, apply,
        hash): the reason is logged and reported on the ``verified`` event, and the full package is downloaded."""
        from edgefleet.package.delta import apply_delta

        assert d.target and d.version
        h = self.host
        base = h.state.committed
        if base is None or base.package_sha256 is None or not h.slots.path(base.slot).exists():
            return None
        loop = asyncio.get_running_loop()
        try:
            delta = await loop.run_in_executor(None, client.delta_for, d.target, base.package_sha256)
        except EdgefleetError as err:
            log.info("no delta to %s: %s", d.target, err)
            return None
        if delta is None or delta.length >= info.length:
            return None
        assert h.cp is not None
        source = base.version or "?"
        partial, out = h.slots.partial(delta.name), h.slots.partial(d.target)
        # rebuilt beside, and in place only once verified: a crash never leaves wrong bytes to resume from
        rebuilt = out.with_name(f"{d.target}.rebuilt")
        t0 = h.clock.monotonic()
        log.info("downloading %s: %d bytes, not %d (delta from %s)", delta.name, delta.length, info.length, source)

        def rebuild(delta_file: Path) -> None:
            old = h.slots.path(base.slot).read_bytes()
            new = apply_delta(old, delta_file.read_bytes(), expected_length=info.length)
            with open(rebuilt, "wb") as f:
                f.write(new)
                f.flush()
                os.fsync(f.fileno())

        try:
            url = await loop.run_in_executor(None, client.target_url, delta.name)
            got = await download_resumable(
                h.cp.http,
                url,
                partial,
                length=delta.length,
                keep_going=lambda: self.still_wanted(d.target or ""),
                rate_bps=h.config.download_rate_bps,
                monotonic=h.clock.monotonic,
                sleep=h.clock.sleep,
                on_bytes=self._count,
            )
            await loop.run_in_executor(None, client.verify_file, delta.name, got)
            await loop.run_in_executor(None, rebuild, got)
            await loop.run_in_executor(None, client.verify_file, d.target, rebuilt)
            os.replace(rebuilt, out)
        except (Offline, Cancelled):
            raise  # the partial delta is kept and resumed, like a package's
        except (EdgefleetError, OSError) as err:
            partial.unlink(missing_ok=True)
            rebuilt.unlink(missing_ok=True)
            self._delta_note = f"delta from {source} not used ({err}); downloaded the full package"
            log.warning("update to %s: %s", d.target, self._delta_note)
            return None
        partial.unlink(missing_ok=True)
        self._delta_from = source
        log.info(
            "rebuilt %s from %s and a %d-byte delta in %.1f s: length and sha256 match the signed package",
            d.target,
            source,
            delta.length,
            h.clock.monotonic() - t0,
        )
        return out

    async def verifying(self, d: DesiredState, client: TufClient, path: Path) -> OpenedPackage:
        """Enter ``verifying``: the bytes match the signed metadata, the package opens, and this device can run
        it."""
        from edgefleet.package import check_requirements, open_package

        assert d.target
        h = self.host
        loop = asyncio.get_running_loop()
        h.save(h.state.with_(state=AgentState.verifying))
        try:
            await loop.run_in_executor(None, client.verify_file, d.target, path)
        except EdgefleetError as err:
            path.unlink(missing_ok=True)
            raise Retry(f"refused: the download does not match the signed metadata: {err}")
        try:
            opened = await loop.run_in_executor(None, lambda: open_package(path, device_key=h.key_for(path)))
        except EdgefleetError as err:
            raise Refuse(f"refused: {err}")  # the bytes are the signed ones: opening them again fails the same way
        reasons = check_requirements(
            opened.manifest,
            tier=h.identity.get("tier"),
            runtime_version=runtime_version(),
            memory_mb=h.settings.memory_mb,
            runtimes=available_runtimes(),
        )
        if reasons:
            raise Refuse("refused: incompatible: " + "; ".join(reasons))
        return opened

    def staged(
        self, d: DesiredState, pending: Pending, path: Path, opened: OpenedPackage, info: TargetInfo, staged: bool
    ) -> Pending:
        """Enter ``staged``: the verified package in the idle slot."""
        h = self.host
        h.event(
            EventKind.verified,
            self._delta_note,
            d.model,
            d.version,
            d.rollout_id,
            bytes_downloaded=None if staged else self._downloaded,
            delta_from=self._delta_from,
        )
        log.info("verified %s: length and sha256 %s match the signed metadata", d.target, info.sha256[:16])
        if not staged:
            slot = h.slots.idle_slot(h.state)
            h.slots.stage(path, slot)
            pending = pending.model_copy(
                update={"slot": slot, "model_sha256": opened.model_sha256, "package_sha256": info.sha256}
            )
            log.info("staged %s in slot %s", d.target, slot)
        h.save(h.state.with_(state=AgentState.staged, pending=pending))
        h.event(EventKind.staged, None, d.model, d.version, d.rollout_id)
        return pending

    async def await_window(self, d: DesiredState) -> None:
        """Stay ``staged`` until one of the group's maintenance windows is open (re-read at every look: the
        operator may change them meanwhile). A device serving nothing has no service to protect and goes on at
        once. The health check runs after the wait, so it judges the slot as it is when the switch comes."""
        h = self.host
        while h.state.committed is not None:
            cfg = h.config
            opens = next_open(cfg.maintenance_windows, h.clock.now(), window_zone(cfg.timezone))
            if opens is None:
                return
            reason = f"staged: waiting for the maintenance window that opens at {opens.isoformat(timespec='minutes')}"
            if h.state.reason != reason:
                h.save(h.state.with_(reason=reason))
                log.info("%s: %s", d.target, reason)
            # wake at the opening, and at least once a minute to see a changed desired state or window
            await h.clock.sleep(min(60.0, max(0.5, (opens - h.clock.now()).total_seconds())))
            if not self.still_wanted(d.target or ""):
                raise Cancelled("the desired state changed while waiting for the maintenance window")

    async def health_check(self, d: DesiredState, pending: Pending) -> tuple[SlotInfo, WorkerSpec]:
        """Enter ``health_check``: the staged slot judged (golden vectors and latency, by default in a fresh
        worker) before anything serves it."""
        h = self.host
        assert pending.slot is not None
        h.save(h.state.with_(state=AgentState.health_check))
        cand = SlotInfo(
            slot=pending.slot,
            model=pending.model,
            version=pending.version,
            target=pending.target,
            model_sha256=pending.model_sha256,
            package_sha256=pending.package_sha256,
            rollout_id=pending.rollout_id,
        )
        spec = h.spec(cand)
        tier, cfg = h.identity.get("tier"), h.config
        log.info("health check of %s: golden vectors and latency in a fresh worker", d.target)
        budget: Callable[[ModelInfo], float | None] = lambda i: latency_budget_ms(i.metrics, tier, cfg.p95_budget_ms)  # noqa: E731
        result = await h.health_check(spec, budget)
        if not result.ok:
            raise Refuse(result.reason, EventKind.health_check_failed)
        h.event(EventKind.health_check_passed, result.reason, d.model, d.version, d.rollout_id)
        log.info("health check of %s passed: %s", d.target, result.reason)
        if not self.still_wanted(d.target or ""):
            # The desired state moved on while the health check ran (a halted rollout, say): switching now would
            # serve a version nobody wants, and would have to be undone on the next check-in.
            raise Cancelled("the desired state changed during the health check")
        return cand, spec

    async def switch(self, d: DesiredState, cand: SlotInfo, spec: WorkerSpec) -> None:
        """Enter ``probation``: the candidate serves, watched until it commits or rolls back."""
        h = self.host
        try:
            backend, info = await h.start_backend(spec)
        except WorkerUnavailable as err:
            raise Refuse(f"the new model does not start: {err}", EventKind.rolled_back)
        # The switch: one atomic rename of the state file makes the candidate the active slot.
        h.save(h.state.with_(state=AgentState.probation, active=cand, probation_resumes=0))
        if h.backend is not None:
            await h.close_window_before_switch()  # the old model's last window, before probation counts anything
        # Recorded before probation starts: under load, probation can end (and record ``committed``) while the
        # swap still awaits, and the events must say what happened in the order it happened.
        h.event(EventKind.switched, None, d.model, d.version, d.rollout_id)
        await h.switch_to(backend, info, ProbationStats(h.clock.monotonic()))
        cfg = h.config
        log.info(
            "switched to %s; probation: %d requests or %g s, at most %d worker crashes in %g s, error rate %g",
            d.target,
            cfg.probation_requests,
            cfg.probation_seconds,
            cfg.crash_loop_crashes - 1,
            cfg.crash_loop_window_s,
            cfg.max_error_rate,
        )

    # ------------------------------------------------------------------ how an update ends early

    def settled(self, s: PersistedState, reason: str) -> PersistedState:
        """No update in flight: the committed slot serves (or nothing, on a first install)."""
        return s.with_(
            state=AgentState.committed if s.committed is not None else AgentState.idle,
            reason=reason,
            pending=None,
            active=s.committed,
        )

    def cancel(self, d: DesiredState, why: str) -> None:
        """The desired state moved on: the update is abandoned, which is not a failure (no refusal: the same
        version may be asked for again)."""
        h = self.host
        h.save(self.settled(h.state, f"cancelled: {why}"))
        h.slots.clear_downloads()
        h.event(EventKind.cancelled, why, d.model, d.version, d.rollout_id)
        log.info("update to %s cancelled: %s", d.target, why)

    def retry_or_refuse(self, d: DesiredState, reason: str) -> None:
        """A failure that may be transient (a corrupted download, metadata that looks expired to a skewed clock,
        a full disk): try again later, up to :data:`MAX_UPDATE_ATTEMPTS` attempts in all, counted in the state
        file so that a restart does not reset them; then it is a refusal."""
        h = self.host
        s = h.state
        pending = s.pending if s.pending is not None and s.pending.target == d.target else None
        if pending is None and d.model and d.version and d.target:  # failed before its first save
            pending = Pending(model=d.model, version=d.version, target=d.target, rollout_id=d.rollout_id)
        attempts = (pending.failures if pending is not None else 0) + 1
        h.slots.clear_downloads()  # a corrupted or oversized download is not resumed
        if attempts >= MAX_UPDATE_ATTEMPTS or pending is None:
            self.refuse(d, f"{reason} (attempt {attempts} of {MAX_UPDATE_ATTEMPTS})", EventKind.refused)
            return
        if pending.slot is not None and not h.slots.path(pending.slot).exists():
            pending = pending.model_copy(update={"slot": None})
        st = self.settled(s, f"update to {d.version} failed (attempt {attempts} of {MAX_UPDATE_ATTEMPTS}): {reason}")
        h.save(st.with_(pending=pending.model_copy(update={"failures": attempts})))
        delay = min(RETRY_MAX_S, h.config.checkin_interval_s * 2**attempts)
        self._retry = (refusal_key(d.rollout_id, d.target or ""), h.clock.monotonic() + delay)
        log.warning(
            "update to %s failed (attempt %d of %d), trying again in %.0f s: %s",
            d.target,
            attempts,
            MAX_UPDATE_ATTEMPTS,
            delay,
            reason,
        )

    def refuse(self, d: DesiredState, reason: str, kind: EventKind) -> None:
        """The update failed for good: one event of ``kind`` (the failure's own), never retried in this rollout."""
        assert d.target is not None
        h = self.host
        s = h.state
        key = refusal_key(d.rollout_id, d.target)
        h.save(
            s.with_(
                state=AgentState.rolled_back,
                reason=reason,
                pending=None,
                active=s.committed,
                refused=[*s.refused[-50:], key],
            )
        )
        h.event(kind, reason, d.model, d.version, d.rollout_id)
        if s.committed is None:
            h.service.clear(reason)
        h.slots.clear_downloads()
        log.warning("update to %s failed (%s): %s", d.target, kind.value, reason)
