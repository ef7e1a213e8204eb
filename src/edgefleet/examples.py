"""Small real models for the demo, the tests and the benchmarks, trained from scikit-learn's bundled data.

No hub download: digits ships with scikit-learn, and Silero VAD's pretrained ONNX file ships inside its wheel.
scikit-learn and skl2onnx come with the ``demo`` extra.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.errors import UsageError

__all__ = ["Digits", "digits", "silero_vad_path", "train_digits_mlp"]

OPSET = 17


@dataclass(frozen=True)
class Digits:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _sklearn() -> None:
    if importlib.util.find_spec("sklearn") is None or importlib.util.find_spec("skl2onnx") is None:
        raise UsageError("this needs scikit-learn and skl2onnx: pip install 'edgefleet[demo]'")


def digits(seed: int = 0) -> Digits:
    """The 8x8 digits, pixels scaled to [0, 1], as float32; a stratified 70/30 split."""
    _sklearn()
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return Digits(xtr, ytr.astype(np.int64), xte, yte.astype(np.int64))


def train_digits_mlp(hidden: tuple[int, ...] = (64,), seed: int = 0, max_iter: int = 200) -> bytes:
    """An MLP classifier on digits as ONNX bytes: input ``X`` float32[N, 64]; outputs ``label``, ``probabilities``."""
    _sklearn()
    import warnings

    from skl2onnx import to_onnx
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    d = digits(seed)
    clf = MLPClassifier(hidden_layer_sizes=hidden, random_state=seed, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(d.x_train, d.y_train)
    onx = to_onnx(
        clf,
        d.x_train[:1],
        target_opset={"": OPSET, "ai.onnx.ml": 3},
        options={id(clf): {"zipmap": False}},
    )
    return bytes(onx.SerializeToString())


def silero_vad_path() -> Path | None:
    """Silero VAD's pretrained ONNX model from the ``silero-vad`` wheel, if installed (``make test`` installs it)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "silero_vad_16k_op15.onnx"
        if p.is_file():
            return p
    return None
