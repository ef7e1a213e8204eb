"""The health check before a switch: load the staged package in a fresh worker, reproduce the golden vectors
within tolerance, and keep their p95 latency within the budget. A worker that crashes fails the check."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgefleet.agent.worker.spec import ModelInfo, WorkerSpec
from edgefleet.agent.workerproc import WorkerProcess
from edgefleet.errors import WorkerUnavailable

__all__ = ["HealthResult", "check_latency", "run_health_check"]


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    reason: str
    p95_ms: float | None = None
    info: ModelInfo | None = None


def check_latency(latencies_s: list[float], budget_ms: float | None) -> tuple[bool, float | None, str]:
    """Pure: does the golden run's p95 fit the budget?"""
    if not latencies_s:
        return True, None, "no golden calls to time"
    p95 = float(np.percentile(latencies_s, 95)) * 1000
    if budget_ms is not None and p95 > budget_ms:
        return False, p95, f"golden p95 latency {p95:.3f} ms exceeds the budget of {budget_ms:g} ms"
    return True, p95, f"golden p95 latency {p95:.3f} ms"


async def run_health_check(spec: WorkerSpec, budget_ms_for: object, timeout_s: float = 120.0) -> HealthResult:
    """``budget_ms_for(info) -> float | None`` picks the budget once the manifest is known."""
    w = WorkerProcess(WorkerSpec(spec.path, spec.device_key, "health", spec.memory_mb, spec.intra_op_threads))
    try:
        info = await w.start(timeout_s)
        reply = await w.call(("golden",))
    except WorkerUnavailable as err:
        return HealthResult(False, f"health check failed: {err}")
    finally:
        await w.stop()
    if reply[0] != "ok":
        return HealthResult(False, f"health check failed: {reply[2]}", info=info)
    budget = budget_ms_for(info) if callable(budget_ms_for) else None
    ok, p95, why = check_latency(reply[1]["latencies_s"], budget)
    return HealthResult(ok, why if ok else f"health check failed: {why}", p95, info)
