"""Prometheus ``/metrics`` for the agent: base units (seconds), ``_total`` counters, bounded labels.

Labels are the served model and version (at most two at a time: the committed one and a candidate), the outcome
(a fixed set) and the route (local or remote: hybrid routing, ADR 0105); nothing from a request's path or body
becomes a label. Besides the serving metrics:
``edgefleet_agent_build_info{version}``, the standard ``process_*`` metrics of the agent process, and no
``*_created`` series (a timestamp per series that doubles what a small device ships for no use here).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.metrics_core import Metric

from edgefleet import __version__

__all__ = ["OUTCOMES", "AgentMetrics"]

OUTCOMES = ("ok", "bad_request", "not_found", "unavailable", "overloaded", "model_error")
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model", "version"]
        self.request = Histogram(
            "edgefleet_agent_request_duration_seconds",
            "Infer request time in the agent, parse to response; route: local or remote (hybrid routing)",
            [*labels, "route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.queue = Histogram(
            "edgefleet_agent_queue_duration_seconds",
            "Time an infer request waited for the worker",
            labels,
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.compute = Histogram(
            "edgefleet_agent_compute_duration_seconds",
            "Model run time inside the worker",
            labels,
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "edgefleet_agent_requests",
            "Infer requests by outcome and route (local, or remote: hybrid routing)",
            [*labels, "outcome", "route"],
            registry=self.registry,
        )
        self.remote_unsent = Counter(
            "edgefleet_agent_remote_unsent_requests",
            "Requests routing wanted answered remotely but could not send: budget, timeout, unreachable, refused",
            ["reason"],
            registry=self.registry,
        )
        self.crashes = Counter("edgefleet_agent_worker_crashes", "Inference worker crashes", registry=self.registry)
        self.restarts = Counter("edgefleet_agent_worker_restarts", "Inference worker restarts", registry=self.registry)
        self.updates = Counter(
            "edgefleet_agent_update_events", "Update events by kind", ["kind"], registry=self.registry
        )
        self.dropped = Counter(
            "edgefleet_agent_telemetry_dropped_records",
            "Telemetry records dropped: at the buffer cap, or in a batch the control plane refused (413, 422)",
            registry=self.registry,
        )
        self.buffered = Gauge(
            "edgefleet_agent_telemetry_buffered_records", "Telemetry records waiting for upload", registry=self.registry
        )
        self.build = Gauge(
            "edgefleet_agent_build_info", "The agent's version (value 1)", ["version"], registry=self.registry
        )
        self.build.labels(__version__).set(1)
        ProcessCollector(registry=self.registry)
        self._children: dict[tuple[str, str], tuple[object, object, object]] = {}
        self._view = _WithoutCreated(self.registry)

    def observe(self, model: str, version: str, total: float, queue: float, compute: float) -> None:
        key = (model, version)
        ch = self._children.get(key)
        if ch is None:
            if len(self._children) > 8:  # bounded: forget models long gone
                self._children.clear()
            ch = (self.request.labels(*key, "local"), self.queue.labels(*key), self.compute.labels(*key))
            self._children[key] = ch
        ch[0].observe(total)  # type: ignore[attr-defined]
        ch[1].observe(queue)  # type: ignore[attr-defined]
        ch[2].observe(compute)  # type: ignore[attr-defined]

    def observe_remote(self, model: str, version: str, total: float) -> None:
        """A request the remote endpoint answered: only its total time (queue and compute are the local worker's)."""
        self.request.labels(model, version, "remote").observe(total)

    def count(self, model: str, version: str, outcome: str, route: str = "local") -> None:
        self.requests.labels(model, version, outcome, route).inc()

    def render(self) -> bytes:
        return bytes(generate_latest(self._view))


class _WithoutCreated:
    """The registry as ``generate_latest`` sees it, minus the ``*_created`` samples. prometheus_client can only
    turn them off for the whole process (``disable_created_metrics``), and the agent may share its process with
    others (the simulator, the control plane in tests)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for m in self.registry.collect():
            m.samples = [s for s in m.samples if not s.name.endswith("_created")]
            yield m
