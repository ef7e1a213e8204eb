from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgefleet
from edgefleet import data, examples
from edgefleet.errors import DataError, InputValidationError, ModelError
from edgefleet.runtime import Model, TensorSpec
from edgefleet.runtime.processing import Argmax, Scale, Softmax


def test_load_bare_onnx_and_run(mlp_path: Path, digits: examples.Digits) -> None:
    m = edgefleet.load(mlp_path)
    out = m.run({"X": digits.x_test[:5]})
    assert set(out) == {"label", "probabilities"}
    assert out["probabilities"].shape == (5, 10)
    assert (out["label"] == out["probabilities"].argmax(1)).all()


@pytest.mark.parametrize(
    ("feed", "match"),
    [
        ({"X": np.zeros((1, 64), np.float64)}, r"input 'X' has dtype float64, expected X: float32\[\?, 64\]"),
        ({"X": np.zeros((64,), np.float32)}, r"input 'X' has rank 1 .* expected X: float32\[\?, 64\]"),
        ({"X": np.zeros((1, 63), np.float32)}, r"axis 1 is 63, expected 64"),
        ({"Y": np.zeros((1, 64), np.float32)}, r"unknown input 'Y'; the model expects X: float32\[\?, 64\]"),
        ({}, r"missing input 'X'"),
    ],
)
def test_bad_inputs_name_the_input_and_schema(mlp_path: Path, feed: dict, match: str) -> None:
    m = edgefleet.load(mlp_path)
    with pytest.raises(InputValidationError, match=match):
        m.run(feed)


def test_declared_processing_runs_around_the_model(mlp_path: Path, digits: examples.Digits) -> None:
    raw = TensorSpec(name="X", dtype="float32", shape=[None, 64], value_range=(0, 16))
    m = Model(
        mlp_path.read_bytes(),
        inputs=[raw],
        preprocessing=[Scale(mul=1 / 16)],
        postprocessing=[Softmax(tensor="probabilities"), Argmax(tensor="probabilities")],
    )
    ref = edgefleet.load(mlp_path).run({"X": digits.x_test[:4]})
    out = m.run({"X": digits.x_test[:4] * 16})
    assert (out["probabilities_argmax"] == ref["label"]).all()


def test_not_onnx_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "x.onnx"
    p.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not an ONNX model"):
        edgefleet.load(p)


def test_real_pretrained_model_with_scalar_and_state_inputs(silero_path: Path) -> None:
    m = edgefleet.load(silero_path)
    feed = {
        "input": np.zeros((1, 512), np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, np.int64),
    }
    out = m.run(feed)
    assert 0.0 <= float(out["output"].reshape(-1)[0]) <= 1.0


def test_per_call_npz_round_trip(tmp_path: Path) -> None:
    feeds = [{"a": np.full((1, 3), i, np.float32), "sr": np.array(16000)} for i in range(4)]
    arrays = data.from_feeds(feeds)
    assert arrays["a"].shape == (4, 1, 3) and arrays["sr"].shape == (4,)
    p = data.save_calls(tmp_path / "d.npz", arrays, labels=np.arange(4))
    calls = data.load_calls(p, input_names=["a", "sr"], labels_key="labels")
    assert len(calls) == 4 and calls.feed(2)["a"][0, 0] == 2 and calls.labels is not None
    assert calls.batched(3)["a"].shape == (3, 3)
    with pytest.raises(DataError, match="lacks model input 'b'"):
        data.load_calls(p, input_names=["b"])
    with pytest.raises(DataError, match="labels has 3 entries but the data holds 4 calls"):
        data.save_calls(tmp_path / "e.npz", arrays, labels=np.arange(3))
    assert data.from_batch(np.zeros((5, 64)), "X")["X"].shape == (5, 1, 64)
