"""``edgefleet optimize`` through the real typer app: bad input gives one clear line and exit code 2; the output
says what it was measured against."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgefleet import examples
from edgefleet.cli.main import app
from edgefleet.data import save_calls
from edgefleet.optimize._models import tiny_encoder

runner = CliRunner()


@pytest.fixture()
def files(tmp_path: Path, mlp_path: Path, digits: examples.Digits) -> dict[str, Path]:
    calib = save_calls(tmp_path / "calib.npz", {"X": digits.x_train[:32, None, :]})
    ev = save_calls(tmp_path / "eval.npz", {"X": digits.x_test[:40, None, :]}, labels=digits.y_test[:40])
    return {"model": mlp_path, "calib": calib, "eval": ev, "dir": tmp_path}


def _run(f: dict[str, Path], *extra: str, model: Path | None = None, ev: Path | None = None) -> tuple[int, str]:
    args = ["optimize", str(model or f["model"]), "--calib", str(f["calib"]), "--eval", str(ev or f["eval"])]
    args += ["-o", str(f["dir"] / "out.onnx"), *extra]
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def test_json_report(files: dict[str, Path]) -> None:
    code, out = _run(
        files, "--labels", "labels", "--time-budget", "20", "--json", "--report", str(files["dir"] / "r.json")
    )
    assert code == 0, out
    doc = json.loads(out[out.index("{") :])
    assert doc["metric"] == "top1" and doc["chosen"]["status"] == "chosen" and doc["baseline"] == "input"
    assert doc["candidates"][0]["name"] == "input" and doc["kept_input"] == (doc["chosen"]["name"] == "input")
    assert json.loads((files["dir"] / "r.json").read_text())["output_sha256"] == doc["output_sha256"]
    assert (files["dir"] / "out.onnx").is_file()


def _one_line_error(code: int, out: str, needle: str) -> None:
    assert code == 2, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], out


def test_missing_input_name(files: dict[str, Path], digits: examples.Digits) -> None:
    bad = save_calls(files["dir"] / "bad.npz", {"pixels": digits.x_test[:10, None, :]})
    _one_line_error(*_run(files, ev=bad), "lacks model input 'X'")


def test_wrong_dtype(files: dict[str, Path], digits: examples.Digits) -> None:
    bad = save_calls(files["dir"] / "bad.npz", {"X": digits.x_test[:10, None, :].astype(np.float64)})
    _one_line_error(*_run(files, ev=bad), "dtype float64")


def test_not_onnx(files: dict[str, Path]) -> None:
    _one_line_error(*_run(files, model=files["calib"]), "is not an ONNX model")


def test_labels_wrong_length(files: dict[str, Path], digits: examples.Digits) -> None:
    bad = files["dir"] / "bad.npz"
    np.savez(bad, X=digits.x_test[:10, None, :], labels=digits.y_test[:7])
    _one_line_error(*_run(files, "--labels", "labels", ev=bad), "labels has 7 entries")


def test_top1_without_labels(files: dict[str, Path]) -> None:
    _one_line_error(*_run(files, "--metric", "top1"), "needs labels")


def test_unknown_tier(files: dict[str, Path]) -> None:
    _one_line_error(*_run(files, "--tier", "nope"), "unknown tier")


def test_embedding_output_needs_metric_then_works(tmp_path: Path) -> None:
    model = tmp_path / "encoder.onnx"
    model.write_bytes(tiny_encoder())
    x = np.random.default_rng(0).standard_normal((24, 1, 8, 32)).astype(np.float32)
    f = {
        "model": model,
        "calib": save_calls(tmp_path / "calib.npz", {"X": x[:8]}),
        "eval": save_calls(tmp_path / "eval.npz", {"X": x[8:]}),
        "dir": tmp_path,
    }
    _one_line_error(*_run(f), "--metric top1|agreement|cosine|sqnr")
    code, out = _run(f, "--metric", "cosine", "--time-budget", "10")
    assert code == 0, out
    assert "vs your input model" in out
    assert "faster than your input model" in out or "kept the input: no candidate was measured faster" in out
