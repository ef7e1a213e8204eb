"""Prometheus ``/metrics``: the server's own counters plus fleet aggregates computed at scrape time.

Fleet latency is exported as p95 gauges computed from merged sketches, drift as one PSI gauge per (model, version,
feature) scored on the fleet's merged counts — only for features with enough data; a per-device series would have
unbounded labels. No ``_created`` series: they double the series count and no panel reads them.

The control plane's own health, per process: check-ins by the status they were answered with (refusals and
failures included, so that an error rate can be computed) and the reconciler's rounds (when one last succeeded,
how long each took, the interval it runs at), which the alert rules in deploy/prometheus/ read."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import event, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from edgefleet import __version__
from edgefleet.controlplane import kpi
from edgefleet.controlplane.db import Device, Rollout, RolloutTransition
from edgefleet.controlplane.devices import CLOCK_SKEW_S
from edgefleet.controlplane.errors import status_for
from edgefleet.errors import EdgefleetError

if TYPE_CHECKING:
    from edgefleet.controlplane.store import Store

__all__ = ["CHECKIN_ANSWERS", "ServerMetrics", "checkin_answer"]

# Every status the check-in route answers with, exported from the start (a series that appears only with its first
# refusal makes rate() miss that refusal, and the alert rules' ratios read them all).
CHECKIN_ANSWERS = ("200", "304", "401", "403", "500", "503")
# The families controlplane/errors.py answers 503 (database unavailable) for; anything else unforeseen is a 500.
_DB_DOWN = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
# reconcile rounds: a few milliseconds with nothing to step, seconds with many rollouts or a slow database
_ROUND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def checkin_answer(exc: BaseException) -> str:
    """The status the app's error handlers (controlplane/errors.py) answer a check-in that raised ``exc`` with."""
    if isinstance(exc, EdgefleetError):
        return str(status_for(exc))
    return "503" if isinstance(exc, _DB_DOWN) else "500"


class _Fleet(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        with self.store.db.session() as s:
            k = kpi.fleet_kpis(s, overdue_after_s=self.store.settings.overdue_after_s)
            states = dict(s.execute(select(Rollout.state, func.count()).group_by(Rollout.state)).all())
            invalid = s.scalar(select(func.coalesce(func.sum(Device.invalid_reports), 0))) or 0
            skewed = s.scalar(
                select(func.count()).where(
                    Device.revoked_at.is_(None),
                    Device.clock_offset_s.is_not(None),
                    func.abs(Device.clock_offset_s) > CLOCK_SKEW_S,
                )
            )
        g = GaugeMetricFamily("edgefleet_devices", "Enrolled devices by status", labels=["status"])
        for st in ("active", "revoked", "overdue"):
            g.add_metric([st], k["devices"][st])
        yield g
        yield GaugeMetricFamily(
            "edgefleet_devices_clock_skewed",
            f"Active devices whose clock is off the server's by more than {CLOCK_SKEW_S:g} s",
            value=skewed or 0,
        )
        # a sum of per-device counters kept in the database: the same on every replica, and it survives restarts
        yield CounterMetricFamily(
            "edgefleet_reports_invalid", "Device reports refused as invalid (422/413), all devices", value=int(invalid)
        )
        g = GaugeMetricFamily("edgefleet_rollouts", "Rollouts by state", labels=["state"])
        for st, n in sorted(states.items()):
            g.add_metric([st], n)
        yield g
        g = GaugeMetricFamily(
            "edgefleet_latency_p95_seconds",
            "Fleet p95 latency from merged sketches",
            labels=["model", "version", "tier"],
        )
        for row in k["latency"]:
            if row["p95_ms"] is not None:
                g.add_metric([row["model"], row["version"], row["tier"]], row["p95_ms"] / 1000.0)
        yield g
        for name, key, doc in (
            ("edgefleet_crash_free_ratio", "crash_free_rate", "Share of reporting devices with no worker crash"),
            (
                "edgefleet_update_success_ratio",
                "update_success_rate",
                "Committed / updates the devices finished (reverted and cancelled ones left out)",
            ),
        ):
            if k[key] is not None:
                yield GaugeMetricFamily(name, doc, value=k[key])
        g = GaugeMetricFamily(
            "edgefleet_updates", "Updates in the last 24 h by outcome, each counted once", labels=["outcome"]
        )
        for outcome, n in k["updates"].items():
            g.add_metric([outcome], n)
        yield g
        g = GaugeMetricFamily("edgefleet_active_versions", "Distinct served versions per tier", labels=["tier"])
        for tier, n in k["fragmentation"].items():
            g.add_metric([tier], n)
        yield g
        g = GaugeMetricFamily(
            "edgefleet_drift_psi",
            "Fleet PSI per feature on merged counts (features short of the minimum sample are absent)",
            labels=["model", "version", "feature"],
        )
        for row in k["drift"]:
            if row["psi"] is not None:
                g.add_metric([row["model"], row["version"], row["feature"]], row["psi"])
        yield g
        yield GaugeMetricFamily("edgefleet_drift_alerts", "Features with PSI above 0.25", value=len(k["drift_alerts"]))


class _WithoutCreated:
    """The registry's metrics minus their ``_created`` samples, for this registry only (prometheus_client's
    switch for it is process-wide)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for m in self.registry.collect():
            kept = [x for x in m.samples if not x.name.endswith("_created")]
            if len(kept) != len(m.samples):
                m = Metric(m.name, m.documentation, m.type, m.unit)
                m.samples = kept
            yield m


class ServerMetrics:
    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        self.checkins = Counter(
            "edgefleet_checkins",
            "Desired-state check-ins by the HTTP status answered (401/403 refused, 500/503 failed)",
            ["answer"],
            registry=self.registry,
        )
        # every answer bound once: a labels() lookup takes a lock, too dear per check-in on the hot path
        answers = {a: self.checkins.labels(a) for a in CHECKIN_ANSWERS}
        self.checkins_304 = answers["304"]
        self.checkins_200 = answers["200"]
        self._checkin_answers = answers
        self.reports = Counter("edgefleet_reports", "Report batches received", registry=self.registry)
        self.transitions = Counter(
            "edgefleet_rollout_transitions", "Rollout transitions recorded by this process", registry=self.registry
        )
        self.reconcile_last_success = Gauge(
            "edgefleet_reconciler_last_success_timestamp_seconds",
            "Unix time the reconciler last finished a round without error (0: none yet in this process)",
            registry=self.registry,
        )
        self.reconcile_rounds = Histogram(
            "edgefleet_reconciler_round_seconds",
            "Duration of the reconciler's rounds, failed ones included",
            buckets=_ROUND_BUCKETS,
            registry=self.registry,
        )
        # the alert rules measure the lag in intervals, whatever --reconcile-interval a replica runs with
        Gauge(
            "edgefleet_reconciler_interval_seconds",
            "The reconciler's interval between rounds when nothing wakes it (--reconcile-interval)",
            registry=self.registry,
        ).set(store.settings.reconcile_interval_s)
        Info("edgefleet_build", "The control plane's version", registry=self.registry).info({"version": __version__})
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(_Fleet(store))
        self._count_transitions(store)
        self._exposed = _WithoutCreated(self.registry)

    def _count_transitions(self, store: Store) -> None:
        """Count every ``RolloutTransition`` this process commits, wherever it is written (reconciler, operator
        action, rollout start): rows flushed are noted per session and counted only once their commit succeeds."""
        key = "edgefleet_transitions"

        def flushed(session: Session, _ctx: Any) -> None:
            n = sum(1 for o in session.new if isinstance(o, RolloutTransition))
            if n:
                session.info[key] = session.info.get(key, 0) + n

        def committed(session: Session) -> None:
            n = session.info.pop(key, 0)
            if n:
                self.transitions.inc(n)

        def rolled_back(session: Session) -> None:
            session.info.pop(key, None)

        event.listen(store.db.sessions, "after_flush", flushed)
        event.listen(store.db.sessions, "after_commit", committed)
        event.listen(store.db.sessions, "after_rollback", rolled_back)

    def checkin_failed(self, exc: BaseException) -> None:
        """Count a check-in that ended in ``exc`` under the status it is answered with."""
        answer = checkin_answer(exc)
        child = self._checkin_answers.get(answer)
        (child if child is not None else self.checkins.labels(answer)).inc()

    def reconciled(self, seconds: float, *, ok: bool) -> None:
        """One reconciler round that took ``seconds`` and just ended, without error if ``ok``."""
        self.reconcile_rounds.observe(seconds)
        if ok:
            self.reconcile_last_success.set_to_current_time()

    def render(self) -> bytes:
        return generate_latest(self._exposed)
