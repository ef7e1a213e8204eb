"""Prometheus ``/metrics``: the server's own counters plus fleet aggregates computed at scrape time.

Fleet latency is exported as p95 gauges computed from merged sketches; a per-device histogram would have
unbounded labels."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from edgefleet.controlplane import kpi
from edgefleet.controlplane.db import Rollout

if TYPE_CHECKING:
    from edgefleet.controlplane.store import Store

__all__ = ["ServerMetrics"]


class _Fleet(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        with self.store.db.session() as s:
            k = kpi.fleet_kpis(s, overdue_after_s=self.store.settings.overdue_after_s)
            states = dict(s.execute(select(Rollout.state, func.count()).group_by(Rollout.state)).all())
        g = GaugeMetricFamily("edgefleet_devices", "Enrolled devices by status", labels=["status"])
        for st in ("active", "revoked", "overdue"):
            g.add_metric([st], k["devices"][st])
        yield g
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
            ("edgefleet_update_success_ratio", "update_success_rate", "Committed / all finished updates"),
        ):
            if k[key] is not None:
                yield GaugeMetricFamily(name, doc, value=k[key])
        g = GaugeMetricFamily("edgefleet_active_versions", "Distinct served versions per tier", labels=["tier"])
        for tier, n in k["fragmentation"].items():
            g.add_metric([tier], n)
        yield g
        yield GaugeMetricFamily("edgefleet_drift_alerts", "Features with PSI above 0.25", value=len(k["drift_alerts"]))


class ServerMetrics:
    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        self.checkins = Counter(
            "edgefleet_checkins", "Desired-state check-ins by answer", ["answer"], registry=self.registry
        )
        # the hot path's two series, bound once (a labels() lookup takes a lock per check-in)
        self.checkins_304 = self.checkins.labels("304")
        self.checkins_200 = self.checkins.labels("200")
        self.reports = Counter("edgefleet_reports", "Report batches received", registry=self.registry)
        self.transitions = Counter(
            "edgefleet_rollout_transitions", "Rollout transitions recorded by this process", registry=self.registry
        )
        self.registry.register(_Fleet(store))

    def render(self) -> bytes:
        return generate_latest(self.registry)
