"""Delta updates: bytes of the delta against the full package, and the time to make and to apply one.

Three next versions of the digits MLP package (``edgefleet.examples``), each against the same installed version:

* **fine-tuned**: the same architecture trained further (scikit-learn's ``warm_start``: a few more epochs from the
  installed weights), so every weight changed;
* **metadata only**: the same model under a new version (the manifest and its timestamps change);
* **golden vectors only**: the same model with other sample inputs, so other golden vectors.

The delta is what ``edgefleet publish`` signs in (``edgefleet.package.delta``). *make* is the publisher's cost;
*apply* is the device's: rebuild the package from the installed one plus the delta and check the SHA-256 of the
result, which is what the agent does before it stages anything. Times are medians on THIS machine, not on a device.

    .venv/bin/python benchmarks/delta.py [--hidden 64] [--epochs 20] [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any


def _mlp(hidden: tuple[int, ...], epochs: int) -> tuple[bytes, bytes]:
    """The installed model and the fine-tuned next one, as ONNX bytes (the same classifier trained on)."""
    from skl2onnx import to_onnx
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    from edgefleet.examples import OPSET, digits

    d = digits(0)
    clf = MLPClassifier(hidden_layer_sizes=hidden, random_state=0, max_iter=200, warm_start=True)

    def onnx_bytes() -> bytes:
        onx = to_onnx(
            clf, d.x_train[:1], target_opset={"": OPSET, "ai.onnx.ml": 3}, options={id(clf): {"zipmap": False}}
        )
        return bytes(onx.SerializeToString())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(d.x_train, d.y_train)
        first = onnx_bytes()
        clf.max_iter = epochs  # warm_start: this many more epochs from the weights above
        clf.fit(d.x_train, d.y_train)
    return first, onnx_bytes()


def _time(fn: Any, repeat: int) -> tuple[Any, float]:
    out, times = None, []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", default="64", help="hidden layer sizes, comma-separated [64]")
    ap.add_argument("--epochs", type=int, default=20, help="further training epochs of the fine-tuned case [20]")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs of make and apply; the median is shown [5]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from edgefleet.data import CallData
    from edgefleet.examples import digits
    from edgefleet.package import build_package
    from edgefleet.package.delta import apply_delta, make_delta

    hidden = tuple(int(h) for h in args.hidden.split(","))
    base_model, tuned_model = _mlp(hidden, args.epochs)
    x = digits(0).x_test
    calls, other_calls = CallData({"X": x[:16, None, :]}), CallData({"X": x[16:32, None, :]})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)

        def pkg(model: bytes, version: str, sample: CallData) -> bytes:
            path = build_package(
                model, out / f"d-{version}.efpkg", name="digits", version=version, sample_inputs=sample
            )
            return path.read_bytes()

        installed = pkg(base_model, "1.0.0", calls)
        cases = [
            ("fine-tuned", pkg(tuned_model, "1.1.0", calls)),
            ("metadata only", pkg(base_model, "1.0.1", calls)),
            ("golden vectors only", pkg(base_model, "1.0.2", other_calls)),
        ]
        for label, new in cases:
            delta, make_s = _time(lambda new=new: make_delta(installed, new), args.repeat)
            sha = hashlib.sha256(new).hexdigest()

            def apply(delta: bytes = delta, new: bytes = new, sha: str = sha) -> bool:
                rebuilt = apply_delta(installed, delta, expected_length=len(new))
                return hashlib.sha256(rebuilt).hexdigest() == sha

            ok, apply_s = _time(apply, args.repeat)
            assert ok, label
            rows.append(
                {
                    "case": label,
                    "full_bytes": len(new),
                    "delta_bytes": len(delta),
                    "ratio": len(delta) / len(new),
                    "make_ms": make_s * 1000,
                    "apply_ms": apply_s * 1000,
                }
            )
    if args.json:
        print(json.dumps({"hidden": hidden, "epochs": args.epochs, "installed_bytes": len(installed), "cases": rows}))
        return
    print(f"digits MLP, hidden {hidden}; installed package {len(installed):,} bytes; medians of {args.repeat} runs")
    print(f"{'case':<22}{'full bytes':>12}{'delta bytes':>13}{'delta/full':>12}{'make ms':>10}{'apply ms':>10}")
    for r in rows:
        print(
            f"{r['case']:<22}{r['full_bytes']:>12,}{r['delta_bytes']:>13,}{r['ratio']:>12.1%}"
            f"{r['make_ms']:>10.1f}{r['apply_ms']:>10.1f}"
        )
    print("apply = rebuild from the installed package + SHA-256 of the result, on this machine (not a device)")


if __name__ == "__main__":
    main()
