"""What runs inside the fresh measurement subprocess: ``python -m edgefleet.bench.worker JOB.json RESULT.json``.

A process of its own per model and tier, so cold start is really cold, peak RSS belongs to this model alone and
the tier's emulation (threads, CPU affinity, ``RLIMIT_DATA``) cannot leak into the caller. The job and the result
are JSON files so the command can also be run by hand, e.g. under ``/usr/bin/time -v``.

Modes: ``measure`` (cold start, SingleStream latency with adaptive sample size, Offline throughput, CPU-seconds and
RAPL joules per inference, peak RSS) and ``paired`` (baseline and candidate interleaved).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from edgefleet._fs import atomic_write
from edgefleet.bench.memory import current_rss_mb, peak_rss_mb, set_data_limit
from edgefleet.bench.report import BenchSettings
from edgefleet.bench.tiers import TierProfile

__all__ = ["WorkerJob", "main", "run_job"]


class WorkerJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["measure", "paired"] = "measure"
    model: str
    baseline: str | None = None
    tier: TierProfile
    data: str | None = None
    settings: BenchSettings = BenchSettings()
    n_generated: int = 64


def _pin(threads: int) -> tuple[list[int] | None, list[str]]:
    notes: list[str] = []
    if not hasattr(os, "sched_setaffinity"):
        return None, ["CPU affinity is not available on this host"]
    available = sorted(os.sched_getaffinity(0))
    cores = available[:threads]
    if len(available) < threads:
        notes.append(f"tier has {threads} threads but only {len(available)} cores are available here")
    os.sched_setaffinity(0, cores)
    return cores, notes


def _rapl_uj() -> dict[str, int]:
    out: dict[str, int] = {}
    base = Path("/sys/class/powercap")
    for p in sorted(base.glob("intel-rapl:*/energy_uj")) if base.is_dir() else []:
        if p.parent.name.count(":") == 1:  # package domains only; sub-domains are already inside them
            try:
                out[p.parent.name] = int(p.read_text())
            except (OSError, ValueError):
                pass
    return out


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _load(path: str, settings: Any) -> Any:
    """A runtime Model from a bare model file (``.onnx``, ``.tflite``, an OpenVINO ``.xml``) or a package (manifest
    I/O and processing applied)."""
    if path.endswith(".efpkg"):
        from edgefleet.package import open_package

        return open_package(Path(path)).load(settings)
    from edgefleet.runtime import Model, load_model

    if path.endswith(".onnx"):  # not load_model: its ONNX check would count in session_create_ms
        return Model(Path(path).read_bytes(), settings=settings)
    return load_model(path, settings)


def _calls(job: WorkerJob, model: Any) -> tuple[Any, str]:
    from edgefleet.data import CallData, from_feeds, load_calls

    if job.data:
        return load_calls(job.data, input_names=model.input_names), "data"
    feeds = [model.sample_feed(seed=i) for i in range(job.n_generated)]
    return CallData(from_feeds(feeds)), "generated"


def _latency(model: Any, feeds: list[dict[str, Any]], s: BenchSettings) -> tuple[dict[str, Any], int, float]:
    from edgefleet.bench.stats import quantile_ci, quantiles_with_ci

    n_feeds = len(feeds)
    for i in range(s.warmup):
        model.run(feeds[i % n_feeds])
    times: list[float] = []
    clock = time.perf_counter
    start = clock()
    deadline = start + s.time_budget_s
    next_check = s.min_samples
    stopped_by = "max_samples"
    i = 0
    while i < s.max_samples:
        t0 = clock()
        model.run(feeds[i % n_feeds])
        t1 = clock()
        times.append(t1 - t0)
        i += 1
        if t1 > deadline:
            stopped_by = "time_budget"
            break
        if i >= next_check:
            # Checking costs a sort; grow the interval so it stays a small share of the loop.
            next_check = int(i * 1.25) + 1
            hw = quantile_ci(times, 0.95).relative_half_width
            if hw is not None and hw <= s.target_relative_half_width:
                stopped_by = "precision"
                break
    duration = clock() - start
    ms = [t * 1000 for t in times]
    stats = {
        "n": len(ms),
        "mean_ms": sum(ms) / len(ms),
        "quantiles": [
            {
                "q": e.q,
                "value_ms": e.value,
                "ci_low_ms": e.ci_low,
                "ci_high_ms": e.ci_high,
                "n": e.n,
                "relative_half_width": e.relative_half_width,
            }
            for e in quantiles_with_ci(ms)
        ],
        "stopped_by": stopped_by,
        "target_relative_half_width": s.target_relative_half_width,
        "duration_s": duration,
    }
    return stats, len(ms), duration


def _throughput(model: Any, calls: Any, s: BenchSettings) -> list[dict[str, Any]]:
    import numpy as np

    from edgefleet.errors import EdgefleetError

    out: list[dict[str, Any]] = []
    for batch in s.batch_sizes:
        try:
            subset = calls.subset(np.arange(batch) % len(calls))
            feed = subset.batched(batch)
            model.run(feed)
            runs, start = 0, time.perf_counter()
            while True:
                model.run(feed)
                runs += 1
                elapsed = time.perf_counter() - start
                if elapsed >= s.throughput_time_s:
                    break
            out.append(
                {"batch": batch, "inferences_per_s": batch * runs / elapsed, "runs": runs, "duration_s": elapsed}
            )
        except (EdgefleetError, ValueError) as err:
            # A fixed batch dimension is a property of the model, not a failure of the benchmark.
            out.append({"batch": batch, "inferences_per_s": None, "runs": 0, "duration_s": 0.0, "error": str(err)})
    return out


def _measure(job: WorkerJob, settings: Any) -> dict[str, Any]:
    s = job.settings
    t0 = time.perf_counter()
    model = _load(job.model, settings)
    t1 = time.perf_counter()
    calls, source = _calls(job, model)
    feeds = list(calls)
    t2 = time.perf_counter()
    model.run(feeds[0])
    t3 = time.perf_counter()
    result: dict[str, Any] = {
        "inputs": source,
        "runtime": model.runtime_name,
        "runtime_version": model.runtime_version,
        "provider": model.provider,
        "session_create_ms": (t1 - t0) * 1000,
        "first_inference_ms": (t3 - t2) * 1000,
        "cold_start_ms": (t1 - t0 + t3 - t2) * 1000,
    }
    cpu0, rapl0 = _cpu_s(), _rapl_uj()
    result["latency"], n, _ = _latency(model, feeds, s)
    cpu1, rapl1 = _cpu_s(), _rapl_uj()
    joules = None
    if rapl0 and rapl1.keys() == rapl0.keys():
        # The counters wrap; a negative delta means it did, and the figure is dropped rather than guessed.
        delta = sum(rapl1[k] - rapl0[k] for k in rapl0)
        joules = delta / 1e6 / n if delta > 0 else None
    result["energy"] = {
        "cpu_seconds_per_inference": (cpu1 - cpu0) / n,
        "joules_per_inference": joules,
        "rapl_domains": sorted(rapl0),
    }
    result["throughput"] = _throughput(model, calls, s)
    return result


def _paired(job: WorkerJob, settings: Any) -> dict[str, Any]:
    from edgefleet.bench.paired import time_paired

    assert job.baseline is not None
    s = job.settings
    candidate = _load(job.model, settings)
    baseline = _load(job.baseline, settings)
    calls, source = _calls(job, candidate)
    feeds = list(calls)
    n = len(feeds)
    # Each arm keeps its own call counter, so pair k feeds call k to both models whichever runs first.
    counters = {"b": 0, "c": 0}

    def run_b() -> object:
        counters["b"] += 1
        return baseline.run(feeds[counters["b"] % n])

    def run_c() -> object:
        counters["c"] += 1
        return candidate.run(feeds[counters["c"] % n])

    run = time_paired(
        run_b,
        run_c,
        time_budget_s=s.paired_time_budget_s,
        slower_threshold=s.slower_threshold,
        faster_threshold=s.faster_threshold,
    )
    return {"inputs": source, "comparison": run.comparison.to_dict(), "stopped_by": run.stopped_by}


def run_job(job: WorkerJob) -> dict[str, Any]:
    """Apply the tier's emulation to this process, run the job, and return the result (never raises)."""
    affinity, notes = _pin(job.tier.cpu_threads)
    limited = set_data_limit(job.tier.memory_mb)
    if not limited:
        notes.append("RLIMIT_DATA could not be set; only the peak-RSS check enforces the memory budget")
    baseline_rss = current_rss_mb()
    result: dict[str, Any] = {
        "status": "ok",
        "error": None,
        "baseline_rss_mb": baseline_rss,
        "emulation": {
            "intra_op_threads": job.tier.intra_op_threads,
            "affinity": affinity,
            "memory_limit_mb": job.tier.memory_mb,
            "rlimit_data_applied": limited,
            "notes": notes,
        },
    }
    try:
        from edgefleet.config import RuntimeSettings

        settings = RuntimeSettings(intra_op_threads=job.tier.intra_op_threads, providers=job.tier.execution_providers)
        result.update(_measure(job, settings) if job.mode == "measure" else _paired(job, settings))
    except MemoryError:
        result["status"] = "failed"
        result["error"] = f"allocation failed within the tier memory budget of {job.tier.memory_mb} MB"
    except Exception as err:  # the bench command must report a failed result, never crash
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        result["status"] = "failed"
        if "alloc" in msg.lower() or "memory" in msg.lower():
            msg = f"allocation failed within the tier memory budget of {job.tier.memory_mb} MB ({msg})"
        result["error"] = msg
    peak = peak_rss_mb()
    result["peak_rss_mb"] = peak
    result["peak_rss_above_baseline_mb"] = max(0.0, peak - baseline_rss)
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.stderr.write("usage: python -m edgefleet.bench.worker JOB.json RESULT.json\n")
        return 2
    job = WorkerJob.model_validate_json(Path(args[0]).read_bytes())
    result = run_job(job)
    atomic_write(Path(args[1]), json.dumps(result).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
