"""Task metrics beyond per-decision agreement: CTC sequences, the worst call's cosine, and the user's own function.

Pure functions over output arrays, plus :func:`resolve_metric` / :func:`load_user_metric`, the one place that imports
user code. Why these exist (docs/optimize.md, "Metrics"):

* a CTC recognizer's per-time-step argmax is not its answer: the decoded sequence is. Quantization that flips a
  repeated frame or a blank frame (``a a _`` → ``a _ _``) changes no text, yet ``agreement`` counts it as a
  disagreement and keeps such a model float. ``ctc`` scores ``1 - CER`` of the candidate's greedy decode against
  the input model's;
* ``cosine`` is computed over all calls flattened, so one call the candidate ruins (a quiet input that static
  quantization rounds to zero) weighs in proportion to its norm and vanishes; ``cosine-min`` is the worst call's;
* anything else is the user's: ``module:function`` or ``path/to/file.py:function``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import onnx

from edgefleet.errors import DataError

__all__ = [
    "BUILTIN_METRICS",
    "CTC_BLANK_KEY",
    "CTC_TRIM_KEY",
    "Metric",
    "MetricSpec",
    "UserMetric",
    "call_user_metric",
    "character_error_rate",
    "ctc_decode",
    "ctc_score",
    "ctc_sequences",
    "edit_distance",
    "load_user_metric",
    "parse_trim",
    "resolve_metric",
    "trimmed",
]

Metric = Literal["top1", "agreement", "cosine", "cosine-min", "sqnr", "ctc"]
BUILTIN_METRICS: tuple[str, ...] = get_args(Metric)
CTC_BLANK_KEY = "ctc_blank"  # metadata_props key a CTC model may carry its blank index under
CTC_TRIM_KEY = "ctc_trim"  # ... and the classes its text is stripped of at either end (comma-separated indices)
# (reference outputs [n, ...], candidate outputs [n, ...], labels or None) -> score, higher is better
UserMetric = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], float]


@dataclass(frozen=True)
class MetricSpec:
    """A metric ready to score: ``name`` is what the report records (a built-in name, or the user's spec as given);
    ``blank`` the CTC blank index (None until the model is known: then its metadata, else 0); ``trim`` the classes
    a decoded line is stripped of at either end before comparing (a recognizer's space: its text is stripped, so a
    space quantization adds or drops at a line's end changes no text; None until the model is known: then its
    metadata, else none); ``fn`` the user's function and ``source_sha256`` the hash of the file that defines it, so a
    report names the code that scored."""

    name: str
    blank: int | None = None
    fn: UserMetric | None = None
    source_sha256: str | None = None
    trim: tuple[int, ...] | None = None

    def for_model(self, model: onnx.ModelProto) -> MetricSpec:
        """``ctc`` without an explicit blank or trim takes the model's ``ctc_blank`` / ``ctc_trim`` metadata, else
        blank 0 and no trim."""
        if self.name != "ctc" or (self.blank is not None and self.trim is not None):
            return self
        meta = {p.key: p.value for p in model.metadata_props}
        blank, trim = self.blank, self.trim
        if blank is None:
            raw = meta.get(CTC_BLANK_KEY, "0").strip()
            if not raw.isdigit():
                raise DataError(
                    f"the model's metadata {CTC_BLANK_KEY}={meta[CTC_BLANK_KEY]!r} is not a class index; "
                    "pass --ctc-blank N"
                )
            blank = int(raw)
        if trim is None:
            raw = meta.get(CTC_TRIM_KEY, "")
            try:
                trim = parse_trim(raw)
            except DataError:
                raise DataError(
                    f"the model's metadata {CTC_TRIM_KEY}={raw!r} is not a list of class indices; pass --ctc-trim N,M"
                ) from None
        return MetricSpec("ctc", blank=blank, trim=trim)


def parse_trim(text: str) -> tuple[int, ...]:
    """``"6624"`` or ``"6624,0"`` → class indices; empty → none."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise DataError(f"--ctc-trim {text!r}: give class indices separated by commas, e.g. 6624")
    return tuple(sorted({int(p) for p in parts}))


def resolve_metric(metric: str, ctc_blank: int | None = None, ctc_trim: tuple[int, ...] | None = None) -> MetricSpec:
    """The metric named by ``--metric`` (a built-in name, ``module:function`` or ``path/to/file.py:function``),
    user code imported now so that a bad spec stops the run before any model is built; one-line DataError else."""
    if ctc_blank is not None and metric != "ctc":
        raise DataError(f"--ctc-blank applies to --metric ctc only, not {metric!r}")
    if ctc_trim is not None and metric != "ctc":
        raise DataError(f"--ctc-trim applies to --metric ctc only, not {metric!r}")
    if ctc_blank is not None and ctc_blank < 0:
        raise DataError(f"--ctc-blank must be a class index >= 0, not {ctc_blank}")
    if ctc_trim is not None and ctc_blank is not None and ctc_blank in ctc_trim:
        raise DataError(f"--ctc-trim {ctc_blank}: the blank never appears in a decoded line")
    if metric in BUILTIN_METRICS:
        return MetricSpec(metric, blank=ctc_blank, trim=ctc_trim)
    if ":" not in metric:
        raise DataError(
            f"unknown metric {metric!r}; use one of {', '.join(BUILTIN_METRICS)}, "
            "or module:function / path/to/file.py:function"
        )
    fn, sha = load_user_metric(metric)
    return MetricSpec(metric, fn=fn, source_sha256=sha)


def load_user_metric(spec: str) -> tuple[UserMetric, str | None]:
    """Import ``spec``'s function; the sha256 of its defining file (None for a module without one)."""
    # rpartition: a Windows path ("C:\\m.py:f") holds a colon of its own
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise DataError(f"metric {spec!r} is not module:function or path/to/file.py:function")
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    try:
        module = _import_file(spec, Path(where)) if is_file else importlib.import_module(where)
    except DataError:
        raise
    except Exception as err:  # user code: any exception while importing it is the user's to fix
        raise DataError(f"metric {spec!r}: cannot import {where}: {_one_line(err)}")
    fn = getattr(module, name, None)
    if fn is None:
        raise DataError(f"metric {spec!r}: {where} has no attribute {name!r}")
    if not callable(fn):
        raise DataError(f"metric {spec!r}: {where}.{name} is a {type(fn).__name__}, not a function")
    source = getattr(module, "__file__", None)
    sha = hashlib.sha256(Path(source).read_bytes()).hexdigest() if source and Path(source).is_file() else None
    return fn, sha


def _import_file(spec: str, path: Path) -> object:
    if not path.is_file():
        raise DataError(f"metric {spec!r}: file {path} does not exist")
    data = path.read_bytes()
    # named by content, so a file edited between two runs in one process is imported afresh
    mod_name = f"_edgefleet_user_metric_{hashlib.sha256(str(path.resolve()).encode() + data).hexdigest()[:16]}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    loader_spec = importlib.util.spec_from_file_location(mod_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise DataError(f"metric {spec!r}: {path} is not a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[mod_name] = module  # dataclasses and pickling inside the file look themselves up here
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[mod_name]
        raise
    return module


def call_user_metric(spec: MetricSpec, ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None) -> float:
    """One call of the user's function; its mistakes (an exception, a non-number) are one DataError line."""
    assert spec.fn is not None
    try:
        value = spec.fn(ref, out, labels)
    except Exception as err:  # user code
        raise DataError(f"metric {spec.name!r} raised {_one_line(err)}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise DataError(f"metric {spec.name!r} returned {type(value).__name__} {shown}, not a float")
    return float(value)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# --- CTC ---------------------------------------------------------------------------------------------------------


def ctc_decode(frames: np.ndarray, blank: int) -> list[int]:
    """Greedy CTC decode of one call's ``[T, C]`` scores: per-step argmax, repeats collapsed, blanks dropped."""
    best = np.argmax(frames, axis=-1)
    if best.size == 0:
        return []
    keep = np.ones(best.shape, dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    return [int(t) for t in best[keep] if t != blank]


def trimmed(seq: list[int], trim: tuple[int, ...]) -> list[int]:
    """``seq`` without the ``trim`` classes at either end (a stripped line of text)."""
    lo, hi = 0, len(seq)
    while lo < hi and seq[lo] in trim:
        lo += 1
    while hi > lo and seq[hi - 1] in trim:
        hi -= 1
    return seq[lo:hi]


def ctc_sequences(out: np.ndarray, blank: int, trim: tuple[int, ...] = ()) -> list[list[int]]:
    """Decoded sequence of every call of ``out`` ``[n_calls, ...]``, stripped of ``trim`` classes at either end; a
    call is ``[T, C]``, ``[T, 1, C]`` or ``[1, T, C]`` (a batch of one, either layout)."""
    call = out.shape[1:]
    if len(call) == 2:
        frames = out
    elif len(call) == 3 and call[1] == 1:
        frames = out[:, :, 0, :]
    elif len(call) == 3 and call[0] == 1:
        frames = out[:, 0, :, :]
    else:
        shape = "[" + ", ".join(str(d) for d in call) + "]"
        raise DataError(
            f"metric ctc reads one sequence per call, [T, C], [T, 1, C] or [1, T, C], but the output is {shape}"
        )
    classes = frames.shape[-1]
    if not 0 <= blank < classes:
        raise DataError(f"the CTC blank index {blank} is not one of the output's {classes} classes; pass --ctc-blank N")
    if any(not 0 <= t < classes for t in trim):
        raise DataError(f"--ctc-trim {','.join(map(str, trim))}: not all of the output's {classes} classes")
    if not trim:
        return [ctc_decode(f, blank) for f in frames]
    return [trimmed(ctc_decode(f, blank), trim) for f in frames]


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance (unit insertions, deletions, substitutions) between two token sequences."""
    if a == b:
        return 0
    if not a or not b:
        return max(len(a), len(b))
    y = np.asarray(b)
    cols = np.arange(len(b) + 1)
    prev = cols.copy()
    for i, tok in enumerate(a, start=1):
        # substitution/deletion from the row above, then insertions along the row: row[j] = min_k<=j (tmp[k] + j-k)
        tmp = np.empty_like(prev)
        tmp[0] = i
        tmp[1:] = np.minimum(prev[:-1] + (y != tok), prev[1:] + 1)
        prev = np.minimum.accumulate(tmp - cols) + cols
    return int(prev[-1])


def character_error_rate(ref: list[int], hyp: list[int]) -> float:
    """Edit distance over the reference's length, capped at 1 so one garbage call costs at most one call's worth
    (an empty reference counts 0 against an empty hypothesis, else 1)."""
    if not ref:
        return 0.0 if not hyp else 1.0
    return min(1.0, edit_distance(ref, hyp) / len(ref))


def ctc_score(ref: list[list[int]], hyp: list[list[int]]) -> tuple[float, float]:
    """(1 - mean per-call CER, share of calls decoded identically) of ``hyp`` against ``ref``."""
    if not ref:
        return float("nan"), float("nan")
    cer = [character_error_rate(r, h) for r, h in zip(ref, hyp, strict=True)]
    same = [r == h for r, h in zip(ref, hyp, strict=True)]
    return 1.0 - float(np.mean(cer)), float(np.mean(same))
