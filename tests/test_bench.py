"""The benchmark runner with real onnxruntime sessions in real measurement subprocesses (short time budgets)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgefleet.bench.report import BenchReport, BenchSettings, schema_json
from edgefleet.bench.runner import bench, worker_command
from edgefleet.bench.synthetic import big_initializer_model
from edgefleet.bench.tiers import get_tier, host_tier
from edgefleet.bench.worker import WorkerJob
from edgefleet.cli.main import app
from edgefleet.data import save_calls
from edgefleet.errors import UsageError

FAST = BenchSettings(
    time_budget_s=0.5, min_samples=100, warmup=5, batch_sizes=[1, 4], throughput_time_s=0.05, paired_time_budget_s=0.5
)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("big") / "big.onnx"
    p.write_bytes(big_initializer_model())
    assert p.stat().st_size >= 200_000_000
    return p


@pytest.mark.process
def test_bench_records_absolute_figures(mlp_path: Path, digits_calls: dict[str, np.ndarray], tmp_path: Path) -> None:
    data = save_calls(tmp_path / "calls.npz", digits_calls)
    report = bench([mlp_path], [get_tier("x86-avx2")], data=data, settings=FAST)
    (r,) = report.results
    assert r.status == "ok", r.error
    assert r.inputs == "data" and r.tier == "x86-avx2"
    assert r.cold_start_ms is not None and r.cold_start_ms > 0
    assert r.baseline_rss_mb is not None and r.peak_rss_mb is not None and r.peak_rss_mb >= r.baseline_rss_mb
    lat = r.latency
    assert lat is not None and lat.n >= 100 and lat.stopped_by in ("precision", "time_budget", "max_samples")
    assert [q.q for q in lat.quantiles] == [0.5, 0.9, 0.95, 0.99, 0.999]
    p50, p95 = lat.quantile(0.5), lat.quantile(0.95)
    assert p50 is not None and p95 is not None and p50.value_ms is not None and p95.value_ms is not None
    assert p50.value_ms <= p95.value_ms
    assert [t.batch for t in r.throughput] == [1, 4] and all(t.inferences_per_s for t in r.throughput)
    assert r.energy is not None and r.energy.cpu_seconds_per_inference > 0
    # the tier's serving threads (as the agent runs the model), on as many cores as the tier has
    assert r.emulation is not None and r.emulation.intra_op_threads == 1 and r.emulation.rlimit_data_applied
    assert r.compat.result == "verified" and r.compat.model_sha256 == r.model_sha256
    assert r.opset[""] == 17
    assert report.environment.runtime_version == r.compat.runtime_version
    # The report round-trips through its own schema.
    assert BenchReport.model_validate_json(report.model_dump_json()) == report


@pytest.mark.process
def test_generated_inputs_and_paired_baseline(mlp_path: Path) -> None:
    report = bench([mlp_path], [get_tier("arm-a53-small")], baseline=mlp_path, settings=FAST)
    (r,) = report.results
    assert r.status == "ok" and r.inputs == "generated"
    assert r.emulation is not None and r.emulation.affinity is not None and len(r.emulation.affinity) == 1
    assert r.comparison is not None and r.comparison.baseline_sha256 == r.model_sha256
    assert r.comparison.n_pairs >= 30 and r.comparison.verdict in ("same", "faster", "slower")


@pytest.mark.process
def test_over_budget_model_is_a_failed_result(big_model: Path) -> None:
    """A 208 MB model on the 256 MB tier: a clear failed result, not a crash of the bench."""
    report = bench([big_model], [get_tier("arm-a53-small")], settings=FAST)
    (r,) = report.results
    assert r.status == "failed"
    assert r.error is not None and re.search(r"256 MB", r.error), r.error
    assert r.compat.result == "failed"


@pytest.mark.process
def test_peak_rss_agrees_with_usr_bin_time(big_model: Path, tmp_path: Path) -> None:
    """The recorded absolute peak RSS of a measurement subprocess vs ``/usr/bin/time -v`` on the same command."""
    gnu_time = shutil.which("time", path="/usr/bin")
    if gnu_time is None:
        pytest.skip("/usr/bin/time is not installed (Debian package `time`)")
    settings = BenchSettings(time_budget_s=0.3, min_samples=10, warmup=1, batch_sizes=[1], throughput_time_s=0.05)
    report = bench([big_model], [host_tier()], settings=settings)
    (r,) = report.results
    assert r.status == "ok", r.error
    job = WorkerJob(model=str(big_model), tier=host_tier(), settings=settings)
    (tmp_path / "job.json").write_text(job.model_dump_json())
    proc = subprocess.run(
        [gnu_time, "-v", *worker_command(tmp_path / "job.json", tmp_path / "result.json")],
        capture_output=True,
        text=True,
        check=True,
    )
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    assert m is not None, proc.stderr
    time_mb = int(m.group(1)) / 1024
    assert r.peak_rss_mb is not None and time_mb > 200
    assert abs(r.peak_rss_mb - time_mb) / time_mb < 0.10, (r.peak_rss_mb, time_mb)
    assert r.peak_rss_above_baseline_mb is not None and r.peak_rss_above_baseline_mb > 200


@pytest.mark.process
def test_fixed_batch_model_records_throughput_errors(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["X"], ["Y"])],
        "fixed",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])],
    )
    p = tmp_path / "fixed.onnx"
    p.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    (r,) = bench([p], [get_tier("x86-avx2")], settings=FAST).results
    assert r.status == "ok"
    by_batch = {t.batch: t for t in r.throughput}
    assert by_batch[1].inferences_per_s and by_batch[4].inferences_per_s is None and by_batch[4].error


def test_usage_errors(mlp_path: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        bench([tmp_path / "missing.onnx"], [get_tier("x86-avx2")], settings=FAST)
    with pytest.raises(UsageError, match="data file"):
        bench([mlp_path], [get_tier("x86-avx2")], data=tmp_path / "none.npz", settings=FAST)
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(UsageError, match="onnx"):
        bench([bad], [get_tier("x86-avx2")], settings=FAST)


def test_published_schema_is_current() -> None:
    assert (ROOT / "docs" / "bench.schema.json").read_text() == schema_json(), (
        "docs/bench.schema.json is stale: run `edgefleet bench --schema > docs/bench.schema.json`"
    )


@pytest.mark.process
def test_cli_bench_json_and_errors(mlp_path: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "bench.json"
    args = ["bench", str(mlp_path), "-t", "x86-avx2", "-o", str(out), "--time-budget", "0.3", "--min-samples", "50"]
    res = runner.invoke(app, [*args, "--batch-sizes", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["results"][0]["status"] == "ok"
    assert json.loads(res.stdout)["results"][0]["tier"] == "x86-avx2"
    # CliRunner calls the typer app directly; cli.main.run() turns these errors into one line and exit code 2.
    res = runner.invoke(app, ["bench", str(mlp_path), "-t", "no-such-tier"])
    assert isinstance(res.exception, UsageError) and res.exception.exit_code == 2
    assert "no-such-tier" in str(res.exception)
    res = runner.invoke(app, ["bench", str(mlp_path), "--batch-sizes", "1,x"])
    assert isinstance(res.exception, UsageError) and "--batch-sizes" in str(res.exception)
