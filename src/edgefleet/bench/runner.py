"""Run the benchmark: one fresh worker subprocess per (model, tier), plus a paired one per baseline comparison.

The parent only prepares jobs, waits and assembles :class:`~edgefleet.bench.report.BenchReport`; everything that
is measured happens in the child (``bench/worker.py``). The child's peak RSS is its own ``VmHWM``, the figure
``/usr/bin/time -v`` prints for the same command. Not ``wait4``'s ``ru_maxrss`` here: Linux carries the forking
parent's high-water mark into the child's ``ru_maxrss`` at ``exec``, so a big parent (one that has trained a model,
say) would inflate it. A child that dies (killed by the kernel, aborted by a failed allocation in C++) becomes a
failed result with the last ``VmHWM`` polled while it ran — never a crash of the bench command.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgefleet.bench.env import Environment, emulation_of, fingerprint
from edgefleet.bench.report import BenchReport, BenchSettings, Comparison, CompatEntry, ModelResult
from edgefleet.bench.tiers import TierProfile
from edgefleet.bench.worker import WorkerJob
from edgefleet.errors import BenchError, UsageError

__all__ = ["ModelInfo", "bench", "model_info", "run_worker", "worker_command"]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    model_sha256: str
    size_bytes: int
    package_sha256: str | None
    opset: dict[str, int]
    runtime: str = "onnxruntime"  # what the package runs on


def model_info(path: Path) -> ModelInfo:
    """Identity of a model or package, checked before any subprocess starts."""
    if not path.is_file():
        raise UsageError(f"model file {path} does not exist")
    package_sha = None
    runtime = "onnxruntime"
    if path.suffix == ".efpkg":
        try:
            from edgefleet.package import open_package
        except ImportError:
            raise BenchError("this build cannot read .efpkg packages yet; bench the .onnx file")
        opened = open_package(path)
        data, package_sha = opened.model_bytes, opened.package_sha256
        runtime = opened.manifest.requirements.runtime
        if opened.manifest.model_format != "onnx":  # a .tflite or an OpenVINO IR: no ONNX opsets to read
            return ModelInfo(path, hashlib.sha256(data).hexdigest(), len(data), package_sha, {}, runtime)
    elif path.suffix == ".onnx":
        data = path.read_bytes()
    else:
        raise UsageError(f"{path}: give an .onnx model or an .efpkg package")
    import onnx

    try:
        proto = onnx.load_from_string(data)
    except Exception as err:
        raise UsageError(f"{path} is not an ONNX model: {err}")
    opset = {imp.domain: int(imp.version) for imp in proto.opset_import}
    return ModelInfo(path, hashlib.sha256(data).hexdigest(), len(data), package_sha, opset, runtime)


def worker_command(job_path: Path, result_path: Path) -> list[str]:
    return [sys.executable, "-m", "edgefleet.bench.worker", str(job_path), str(result_path)]


def run_worker(job: WorkerJob, workdir: Path, timeout_s: float) -> dict[str, Any]:
    """Run one job in a fresh subprocess; a child that dies becomes a failed result with its last polled peak RSS."""
    job_path = workdir / "job.json"
    result_path = workdir / "result.json"
    result_path.unlink(missing_ok=True)
    job_path.write_text(job.model_dump_json())
    stderr_path = workdir / "stderr.txt"
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            worker_command(job_path, result_path), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
        status, peak = _wait(proc, timeout_s)
    if status is None:
        return {"status": "failed", "error": f"measurement exceeded its time limit of {timeout_s:.0f} s"}
    if result_path.is_file() and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        result: dict[str, Any] = json.loads(result_path.read_text())
        return result
    tail = stderr_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    how = f"signal {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status) else "a non-zero exit"
    mem = f"; peak RSS {peak:.0f} MB" if peak is not None else ""
    return {
        "status": "failed",
        "error": f"measurement process ended with {how} within the tier memory budget of "
        f"{job.tier.memory_mb} MB{mem} {tail[0]}".strip(),
        "peak_rss_mb": peak,
    }


def _hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def _wait(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[int | None, float | None]:
    """Wait for the child, polling its ``VmHWM`` so a crashed child still leaves a peak-RSS figure."""
    deadline = time.monotonic() + timeout_s
    peak: float | None = None
    while True:
        hwm = _hwm_mb(proc.pid)
        if hwm is not None:
            peak = max(peak or 0.0, hwm)
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen the child is reaped
            return status, peak
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
            proc.returncode = -9
            return None, peak
        time.sleep(0.02)


def _job_timeout(s: BenchSettings, paired: bool) -> float:
    work = s.paired_time_budget_s if paired else s.time_budget_s + s.throughput_time_s * len(s.batch_sizes)
    return 120.0 + 2 * work


def _result(info: ModelInfo, tier: TierProfile, raw: dict[str, Any], env: Environment) -> ModelResult:
    status, error = raw.get("status", "failed"), raw.get("error")
    peak = raw.get("peak_rss_mb")
    if status == "ok" and peak is not None and peak > tier.memory_mb:
        status, error = "failed", f"peak RSS {peak:.0f} MB exceeds tier memory {tier.memory_mb} MB"
    # A failure stays a failure wherever it was measured; a success on a host that is not the tier's hardware
    # only shows the model runs under emulation, never that it is verified there.
    because = emulation_of(env, tier)
    result: Literal["verified", "emulated", "failed"] = (
        "failed" if status != "ok" else ("emulated" if because else "verified")
    )
    known = set(ModelResult.model_fields)
    fields = {k: v for k, v in raw.items() if k in known}
    fields.update(status=status, error=error)
    fields.setdefault("inputs", "generated")
    return ModelResult(
        model=str(info.path),
        model_sha256=info.model_sha256,
        model_size_bytes=info.size_bytes,
        package_sha256=info.package_sha256,
        opset=info.opset,
        tier=tier.name,
        tier_profile=tier,
        emulated=because is not None,
        emulated_because=because,
        compat=CompatEntry(
            tier=tier.name,
            runtime=info.runtime,
            # the version that ran it; a worker that failed before loading: onnxruntime's is the environment's
            runtime_version=str(
                raw.get("runtime_version") or (env.runtime_version if info.runtime == "onnxruntime" else "unknown")
            ),
            model_sha256=info.model_sha256,
            result=result,
            reason=error or (f"emulated: {because}" if because else None),
        ),
        **fields,
    )


def bench(
    models: Sequence[Path],
    tiers: Sequence[TierProfile],
    *,
    data: Path | None = None,
    baseline: Path | None = None,
    settings: BenchSettings | None = None,
    progress: Progress | None = None,
) -> BenchReport:
    """Benchmark every model on every tier (and against ``baseline`` when given)."""
    s = settings or BenchSettings()
    say = progress or (lambda _msg: None)
    if not models:
        raise UsageError("give at least one model to benchmark")
    if not tiers:
        raise UsageError("give at least one tier")
    if data is not None and not data.is_file():
        raise UsageError(f"data file {data} does not exist")
    infos = [model_info(Path(m)) for m in models]
    base_info = model_info(Path(baseline)) if baseline is not None else None
    env = fingerprint()
    results: list[ModelResult] = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        for info in infos:
            for tier in tiers:
                say(f"{info.path.name} on {tier.name}: measuring")
                job = WorkerJob(model=str(info.path), tier=tier, data=str(data) if data else None, settings=s)
                raw = run_worker(job, Path(tmp), _job_timeout(s, paired=False))
                result = _result(info, tier, raw, env)
                if base_info is not None and result.status == "ok":
                    say(f"{info.path.name} on {tier.name}: paired against {base_info.path.name}")
                    result.comparison = _compare(info, base_info, tier, data, s, Path(tmp))
                results.append(result)
    return BenchReport(environment=env, settings=s, results=results)


def _compare(
    info: ModelInfo, base: ModelInfo, tier: TierProfile, data: Path | None, s: BenchSettings, tmp: Path
) -> Comparison:
    job = WorkerJob(
        mode="paired",
        model=str(info.path),
        baseline=str(base.path),
        tier=tier,
        data=str(data) if data else None,
        settings=s,
    )
    raw = run_worker(job, tmp, _job_timeout(s, paired=True))
    if raw.get("status") != "ok" or "comparison" not in raw:
        return Comparison(
            baseline=str(base.path),
            baseline_sha256=base.model_sha256,
            n_pairs=0,
            median_ratio=None,
            ci_low=None,
            ci_high=None,
            confidence=0.95,
            slower_threshold=s.slower_threshold,
            faster_threshold=s.faster_threshold,
            verdict="inconclusive",
            reason=f"paired run failed: {raw.get('error')}",
            stopped_by="error",
        )
    return Comparison(
        baseline=str(base.path), baseline_sha256=base.model_sha256, stopped_by=raw["stopped_by"], **raw["comparison"]
    )
