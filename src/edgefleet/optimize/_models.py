"""Small genuinely trained models built by hand for the optimize tests and benchmark (no torch, no hub).

scikit-learn (the ``demo`` extra) is imported lazily, as in :mod:`edgefleet.examples`."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet.examples import OPSET, Digits


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x_shape: list[int | str], n_out: int) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def digits_cnn(d: Digits, filters: int = 8, seed: int = 0) -> bytes:
    """Conv(3x3, PCA filters of digit patches) → Relu → MaxPool(2) → Flatten → Gemm (logistic regression trained on
    the conv features). Input ``X`` float32[N, 1, 8, 8]."""
    import onnxruntime as ort
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    imgs = d.x_train.reshape(-1, 8, 8)
    patches = np.stack([imgs[:, i : i + 3, j : j + 3].reshape(len(imgs), 9) for i in range(6) for j in range(6)])
    pca = PCA(n_components=filters, random_state=seed).fit(patches.reshape(-1, 9))
    w = pca.components_.reshape(filters, 1, 3, 3).astype(np.float32)
    feat_nodes = [
        helper.make_node("Conv", ["X", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
    ]
    n_feat = filters * 16
    feat_graph = helper.make_graph(
        feat_nodes,
        "features",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("f", TensorProto.FLOAT, ["N", n_feat])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    feat_model = helper.make_model(feat_graph, opset_imports=[helper.make_opsetid("", OPSET)])
    sess = ort.InferenceSession(feat_model.SerializeToString(), providers=["CPUExecutionProvider"])
    feats = sess.run(["f"], {"X": d.x_train.reshape(-1, 1, 8, 8)})[0]
    clf = LogisticRegression(max_iter=2000).fit(feats, d.y_train)
    nodes = [*feat_nodes, helper.make_node("Gemm", ["f", "B", "C"], ["logits"], name="classifier", transB=1)]
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(clf.coef_.astype(np.float32), "B"),
        numpy_helper.from_array(clf.intercept_.astype(np.float32), "C"),
    ]
    return _model(nodes, inits, ["N", 1, 8, 8], 10)


OUTLIER_SCALE = 5000.0


def outlier_mlp(d: Digits, hidden: int = 512, seed: int = 0) -> bytes:
    """A trained digits MLP (64 → hidden → hidden → 10) with one extra input feature that carries a huge, useless
    value (column 64, about ``OUTLIER_SCALE``) and zero weight: per-tensor INT8 of the first layer's input leaves
    the real pixels a step of ~20, i.e. nothing. Input ``X`` float32[N, 65]."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(hidden, hidden), random_state=seed, max_iter=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(d.x_train, d.y_train)
    w1 = np.vstack([clf.coefs_[0], np.zeros((1, hidden))]).astype(np.float32)
    ws = [w1, clf.coefs_[1].astype(np.float32), clf.coefs_[2].astype(np.float32)]
    bs = [b.astype(np.float32) for b in clf.intercepts_]
    nodes = [
        helper.make_node("Gemm", ["X", "W0", "B0"], ["h0"], name="dense0"),
        helper.make_node("Relu", ["h0"], ["a0"], name="relu0"),
        helper.make_node("Gemm", ["a0", "W1", "B1"], ["h1"], name="dense1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Gemm", ["a1", "W2", "B2"], ["logits"], name="dense2"),
    ]
    inits = [numpy_helper.from_array(a, f"W{i}") for i, a in enumerate(ws)]
    inits += [numpy_helper.from_array(b, f"B{i}") for i, b in enumerate(bs)]
    return _model(nodes, inits, ["N", 65], 10)


def with_outlier(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Digits ``[N, 64]`` plus the outlier column ``[N, 65]``."""
    rng = np.random.default_rng(seed)
    col = rng.uniform(0.5, 1.0, size=(len(x), 1)) * OUTLIER_SCALE
    return np.hstack([x, col]).astype(np.float32)


def conv_stack(channels: int = 32, size: int = 32, seed: int = 0) -> bytes:
    """Two 3x3 convolutions over a [1, channels, size, size] map then global pooling: Conv dominates the compute,
    so dynamic quantization (ConvInteger) shows its cost. Random weights: its task is speed, not accuracy.
    Input ``X`` float32[N, channels, size, size]."""
    rng = np.random.default_rng(seed)
    w0 = (rng.standard_normal((channels, channels, 3, 3)) * 0.05).astype(np.float32)
    w1 = (rng.standard_normal((channels, channels, 3, 3)) * 0.05).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["X", "W0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c1"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["logits"], name="flatten"),
    ]
    inits = [numpy_helper.from_array(w0, "W0"), numpy_helper.from_array(w1, "W1")]
    return _model(nodes, inits, ["N", channels, size, size], channels)


def silero_calls(path: str, n: int = 120, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-call feeds for Silero VAD: 512-sample chunks of synthetic audio (silence, noise, voiced bursts) with the
    recurrent ``state`` each call really receives when the float model runs the stream in order."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    t = np.arange(512) / 16000
    chunks = []
    for i in range(n):
        phase = (i // 15) % 3
        x = rng.normal(0, 0.002, 512)
        if phase == 1:  # voiced: harmonics of a wandering pitch with a syllable envelope
            f0 = 120 + 40 * np.sin(i / 5)
            x += sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 8)) * 0.3
        elif phase == 2:
            x += rng.normal(0, 0.05, 512)
        chunks.append(x.astype(np.float32)[None, :])
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    states = []
    for c in chunks:
        states.append(state)
        _, state = sess.run(None, {"input": c, "state": state, "sr": np.array(16000, np.int64)})
    return {"input": np.stack(chunks), "state": np.stack(states), "sr": np.full(n, 16000, np.int64)}


def tiny_encoder(seq: int = 8, hidden: int = 32, ffn: int = 64, seed: int = 0) -> bytes:
    """One transformer encoder layer (single-head self-attention, residuals, LayerNormalization, a Relu
    feed-forward) over ``X`` float32[N, seq, hidden] (token embeddings), writing ``last_hidden_state``
    float32[N, seq, hidden]: an output with no class axis, as a sentence-embedding model has. Random weights: its
    task is the shape of a real embedding model, not accuracy."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    inits = {
        "Wq": w(hidden, hidden),
        "Wk": w(hidden, hidden),
        "Wv": w(hidden, hidden),
        "Wo": w(hidden, hidden),
        "W1": w(hidden, ffn),
        "B1": np.zeros(ffn, np.float32),
        "W2": w(ffn, hidden),
        "B2": np.zeros(hidden, np.float32),
        "scale": np.array(1 / np.sqrt(hidden), np.float32),
        "g0": np.ones(hidden, np.float32),
        "b0": np.zeros(hidden, np.float32),
        "g1": np.ones(hidden, np.float32),
        "b1": np.zeros(hidden, np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["X", "Wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["X", "Wk"], ["k"], name="k"),
        helper.make_node("MatMul", ["X", "Wv"], ["v"], name="v"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Mul", ["s", "scale"], ["ss"], name="scale"),
        helper.make_node("Softmax", ["ss"], ["a"], name="attn", axis=-1),
        helper.make_node("MatMul", ["a", "v"], ["ctx"], name="ctx"),
        helper.make_node("MatMul", ["ctx", "Wo"], ["o"], name="o"),
        helper.make_node("Add", ["o", "X"], ["r0"], name="res0"),
        helper.make_node("LayerNormalization", ["r0", "g0", "b0"], ["h"], name="ln0", axis=-1),
        helper.make_node("MatMul", ["h", "W1"], ["f0"], name="ffn0"),
        helper.make_node("Add", ["f0", "B1"], ["f1"], name="ffn0_bias"),
        helper.make_node("Relu", ["f1"], ["f2"], name="ffn_relu"),
        helper.make_node("MatMul", ["f2", "W2"], ["f3"], name="ffn1"),
        helper.make_node("Add", ["f3", "B2"], ["f4"], name="ffn1_bias"),
        helper.make_node("Add", ["f4", "h"], ["r1"], name="res1"),
        helper.make_node("LayerNormalization", ["r1", "g1", "b1"], ["last_hidden_state"], name="ln1", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", seq, hidden])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["N", seq, hidden])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())
