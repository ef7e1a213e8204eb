"""Ground truth for served requests: ``POST /v2/models/{m}[/versions/{v}]/feedback`` (docs/operations.md,
"Field accuracy").

An application that learns the true class of a request it sent (``{"id": ..., "label": ...}``, the ``id`` its
infer request carried and its response echoed) reports it to the device. Whoever serves the OIP port — the worker
itself (ADR 0032) or the agent — remembers the predicted top-1 class of each recent request that carried an id
(:class:`Predictions`: bounded by count and age), matches the feedback to it and counts the (predicted, label)
pair (:class:`ConfusionCounts`). Only those counts leave the process, with the per-request stats, into the
telemetry window of the version that answered (``protocol.FieldFeedback``); inputs and ids never do.

Lean: the inference worker imports this module, so the standard library only (the outputs are numpy arrays, used
through their attributes).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from edgefleet.agent.codec import BadRequest

__all__ = [
    "FEEDBACK",
    "MAX_CELLS",
    "MAX_LABEL_CHARS",
    "REMEMBER_N",
    "REMEMBER_S",
    "ConfusionCounts",
    "Predictions",
    "parse_feedback",
    "top1",
]

# The tag of a feedback observation in the worker's stats batches (``("feedback", predicted, label)``, where a
# request's observation is ``(outcome, total_s, compute_s)``); predicted is None for an unmatched id.
FEEDBACK = "feedback"
# How many recent predictions, and for how long, feedback can still be matched to: a few minutes of traffic at a
# device's typical rate, a few hundred KB at most.
REMEMBER_N = 4096
REMEMBER_S = 600.0
MAX_ID_CHARS = 256
MAX_LABEL_CHARS = 64
MAX_LABEL_INT = 2**31 - 1
MAX_CELLS = 1024  # = protocol.MAX_CONFUSION_CELLS (tests/test_field_accuracy.py checks they agree)


def _label_text(v: Any) -> str | None:
    """A class as the window names it: an int's decimal digits, or the string itself."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return str(v) if -MAX_LABEL_INT <= v <= MAX_LABEL_INT else None
    if isinstance(v, str) and 0 < len(v) <= MAX_LABEL_CHARS and "\x00" not in v:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return None
        return v
    return None


def top1(results: dict[str, Any]) -> str | None:
    """The predicted class of one answered request, from its first output: the index of the largest score of a
    float vector (``[C]`` or ``[1, C]``), or the value of a single integer or string (a model that outputs its
    label). None when the answer holds no single top-1 class (a batch, a regression output, a scalar score)."""
    for arr in results.values():
        shape = getattr(arr, "shape", None)
        kind = getattr(getattr(arr, "dtype", None), "kind", "")
        if shape is None or len(shape) > 2 or (len(shape) == 2 and shape[0] != 1):
            return None
        size = int(arr.size)
        if kind == "f" and size >= 2:
            return str(int(arr.argmax()))
        if size != 1:
            return None
        v = arr.reshape(-1)[0]
        if kind in "iu":
            return _label_text(int(v))
        if kind in "OSU":
            return _label_text(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
        return None
    return None


def parse_feedback(body: bytes) -> tuple[str, str]:
    """``(request id, label)`` of a feedback body, or BadRequest (400) saying what is wrong."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest('feedback must be a JSON object {"id": "<request id>", "label": <int or string>}') from None
    if not isinstance(doc, dict):
        raise BadRequest('feedback must be a JSON object {"id": "<request id>", "label": <int or string>}')
    extra = sorted(set(doc) - {"id", "label"})
    if extra:
        raise BadRequest(f"unknown feedback field {extra[0]!r}; expected id and label")
    rid = doc.get("id")
    if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID_CHARS:
        raise BadRequest(f"feedback id must be the request id (a string of 1 to {MAX_ID_CHARS} characters)")
    if "label" not in doc:
        raise BadRequest("feedback needs a label: the request's true class, an integer or a string")
    label = _label_text(doc["label"])
    if label is None:
        raise BadRequest(
            f"feedback label must be an integer or a string of 1 to {MAX_LABEL_CHARS} characters, "
            f"got {json.dumps(doc['label'])[:80]}"
        )
    return rid, label


class Predictions:
    """Recent request ids → predicted top-1 class, at most ``size`` of them and none older than ``ttl_s``."""

    def __init__(
        self, size: int = REMEMBER_N, ttl_s: float = REMEMBER_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.size, self.ttl_s, self.clock = size, ttl_s, clock
        self._recent: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._recent)

    def remember(self, request_id: str, predicted: str) -> None:
        if len(request_id) > MAX_ID_CHARS:
            return
        recent = self._recent
        recent[request_id] = (self.clock(), predicted)
        recent.move_to_end(request_id)  # an id reused by the client names its latest request
        while len(recent) > self.size:
            recent.popitem(last=False)

    def take(self, request_id: str) -> str | None:
        """The prediction for ``request_id``, forgotten as it is taken (one label per request); None when unknown,
        expired or taken before."""
        got = self._recent.pop(request_id, None)
        if got is None:
            return None
        at, predicted = got
        if self.clock() - at > self.ttl_s:
            self._expire()
            return None
        return predicted

    def _expire(self) -> None:
        cutoff = self.clock() - self.ttl_s
        recent = self._recent
        while recent:
            key, (at, _) = next(iter(recent.items()))
            if at >= cutoff:
                break
            del recent[key]

    def unknown_message(self, request_id: str) -> str:
        return (
            f"no prediction to match feedback for request id {request_id[:80]!r}: unknown, already labelled, older "
            f"than {self.ttl_s:g} s or than the last {self.size} requests with an id, or its response held no single "
            "top-1 class"
        )


class ConfusionCounts:
    """One telemetry window's feedback: matched, correct and unmatched counts, and (predicted, label) pair counts
    for up to :data:`MAX_CELLS` distinct pairs (feedback past that counts in the totals only)."""

    def __init__(self, max_cells: int = MAX_CELLS) -> None:
        self.max_cells = max_cells
        self.matched = self.correct = self.unmatched = 0
        self.cells: dict[tuple[str, str], int] = {}

    def add(self, predicted: str | None, label: str | None) -> None:
        if predicted is None or label is None:
            self.unmatched += 1
            return
        self.matched += 1
        if predicted == label:
            self.correct += 1
        key = (predicted, label)
        n = self.cells.get(key)
        if n is not None:
            self.cells[key] = n + 1
        elif len(self.cells) < self.max_cells:
            self.cells[key] = 1

    def summary(self) -> dict[str, Any] | None:
        """The wire form (``protocol.FieldFeedback``), or None when no feedback came."""
        if not (self.matched or self.unmatched):
            return None
        return {
            "matched": self.matched,
            "correct": self.correct,
            "unmatched": self.unmatched,
            "confusion": [{"predicted": p, "label": lab, "count": n} for (p, lab), n in sorted(self.cells.items())],
        }
