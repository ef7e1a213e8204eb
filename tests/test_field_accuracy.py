"""Field accuracy (docs/operations.md, "Field accuracy"): the pure rollout judgement (insufficient samples wait,
a drop in both halves fails, a drop in one half only is not a regression, tier by tier), the device side (the
feedback route, the bounded memory of predictions, the window's confusion counts) and the control plane's storage
(a retried report counted once, rollups mergeable, the KPI rows)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from edgefleet.agent import feedback
from edgefleet.agent.codec import BadRequest
from edgefleet.agent.feedback import ConfusionCounts, Predictions, parse_feedback, top1
from edgefleet.agent.oip import OIPApp
from edgefleet.agent.serving import Done
from edgefleet.agent.telemetry import WindowAccumulator
from edgefleet.controlplane import field_accuracy, kpi
from edgefleet.controlplane.credentials import hash_secret
from edgefleet.controlplane.db import Database, Device, FieldAccuracyRollup, TelemetryRow, utcnow
from edgefleet.controlplane.reconciler import window_facts
from edgefleet.controlplane.reports import store_report
from edgefleet.controlplane.rollout import (
    CohortStats,
    Outcome,
    RolloutPolicy,
    WindowFacts,
    cohort_stats,
    field_accuracy_vs_control,
    judge,
)
from edgefleet.protocol import MAX_CONFUSION_CELLS, FieldFeedback, Report, TelemetryWindow
from edgefleet.telemetry.sketch import SketchData

POLICY = RolloutPolicy(min_field_accuracy_vs_control=0.95, field_accuracy_min_samples=100)


def _c(
    m: int, c: int, *, tier: str | None = None, halves: tuple[CohortStats, CohortStats] | None = None
) -> CohortStats:
    by_tier = {tier: (m, c)} if tier is not None else {}
    return CohortStats(feedback_matched=m, feedback_correct=c, feedback_by_tier=by_tier, halves=halves)


def _split(a: tuple[int, int], b: tuple[int, int], tier: str | None = None) -> CohortStats:
    return _c(a[0] + b[0], a[1] + b[1], tier=tier, halves=(_c(*a, tier=tier), _c(*b, tier=tier)))


# ------------------------------------------------------------------ the pure judgement


def test_not_judged_without_the_knob_or_a_control() -> None:
    t = _split((200, 20), (200, 20))
    assert field_accuracy_vs_control(t, _c(400, 380), RolloutPolicy()) == field_accuracy_vs_control(t, None, POLICY)
    assert field_accuracy_vs_control(t, None, POLICY).dropped == ()


@pytest.mark.parametrize(
    ("treatment", "control"),
    [((99, 10), (1000, 990)), ((1000, 10), (99, 99)), ((0, 0), (0, 0))],
    ids=["treatment short", "control short", "no feedback"],
)
def test_insufficient_samples_wait(treatment: tuple[int, int], control: tuple[int, int]) -> None:
    v = field_accuracy_vs_control(_c(*treatment), _c(*control), POLICY)
    assert (v.dropped, v.confirming) == ((), ()) and v.short and "need 100 matched labels" in v.short[0]


def test_worse_in_both_halves_is_a_drop() -> None:
    v = field_accuracy_vs_control(_split((150, 30), (150, 40)), _c(400, 380), POLICY)
    assert v.dropped and not v.confirming and not v.short
    assert "field accuracy 23.3% vs control 95.0%" in v.dropped[0]


def test_worse_in_one_half_only_is_not_a_regression() -> None:
    # the earlier half held unusual inputs; the later half is as good as the control
    for halves in (((150, 30), (150, 148)), ((150, 148), (150, 30))):
        v = field_accuracy_vs_control(_split(*halves), _c(400, 380), POLICY)
        assert v == type(v)(), halves


def test_later_half_short_keeps_confirming() -> None:
    v = field_accuracy_vs_control(_split((150, 30), (20, 2)), _c(400, 380), POLICY)
    assert not v.dropped and v.confirming and "confirming in the later half" in v.confirming[0]


def test_within_the_ratio_passes() -> None:
    # 91 % vs 95 %: above 0.95 x 95 % = 90.25 %
    assert (
        field_accuracy_vs_control(_split((200, 182), (200, 182)), _c(400, 380), POLICY)
        == type(field_accuracy_vs_control(_c(0, 0), None, POLICY))()
    )


def test_no_halves_the_whole_window_is_the_evidence() -> None:
    assert field_accuracy_vs_control(_c(300, 30), _c(300, 290), POLICY).dropped


def test_tier_by_tier_and_unshared_tiers() -> None:
    t = CohortStats(feedback_matched=400, feedback_correct=300, feedback_by_tier={"a": (200, 190), "b": (200, 110)})
    c = CohortStats(feedback_matched=400, feedback_correct=380, feedback_by_tier={"a": (200, 190), "b": (200, 190)})
    v = field_accuracy_vs_control(t, c, POLICY)
    assert len(v.dropped) == 1 and "on tier b" in v.dropped[0]
    # a tier only one cohort has is not comparable: nothing judged, the wave waits for a shared tier
    c_other = CohortStats(feedback_matched=400, feedback_correct=380, feedback_by_tier={"z": (400, 380)})
    assert field_accuracy_vs_control(t, c_other, POLICY).short == (
        "need 100 matched labels in both treatment and control to judge field accuracy, "
        "have no tier with feedback in both cohorts",
    )
    # a short tier is skipped while another shared tier is judged
    c_short = CohortStats(feedback_matched=210, feedback_correct=200, feedback_by_tier={"a": (200, 190), "b": (10, 10)})
    assert field_accuracy_vs_control(t, c_short, POLICY) == type(v)()


def _ready(m: int, c: int, *, halves: tuple[CohortStats, CohortStats] | None = None) -> CohortStats:
    return CohortStats(
        devices=3,
        committed=3,
        reporting=3,
        crash_free=3,
        requests=1000,
        feedback_matched=m,
        feedback_correct=c,
        halves=halves,
    )


def test_judge_fails_waits_and_passes_on_field_accuracy() -> None:
    control = _ready(400, 380)
    dropped = _ready(300, 70, halves=(_c(150, 30), _c(150, 40)))
    j = judge(dropped, control, POLICY)
    assert j.outcome is Outcome.failed and "field accuracy" in j.reason
    j = judge(_ready(50, 5), control, POLICY)
    assert j.outcome is Outcome.inconclusive and j.sampling and not j.confirming
    j = judge(_ready(300, 70, halves=(_c(150, 30), _c(150, 148))), control, POLICY)
    assert j.outcome is Outcome.passed
    j = judge(_ready(170, 32, halves=(_c(150, 30), _c(20, 2))), control, POLICY)
    assert j.outcome is Outcome.inconclusive and j.confirming
    # without the knob a drop is not judged
    assert judge(dropped, control, RolloutPolicy()).outcome is Outcome.passed


def test_cohort_stats_sum_feedback_per_tier_and_half() -> None:
    sk = SketchData()
    ws = [
        WindowFacts("d1", 10, 0, 0, sk, tier="a", end=1.0, feedback_matched=100, feedback_correct=90),
        WindowFacts("d1", 10, 0, 0, sk, tier="a", end=2.0, feedback_matched=50, feedback_correct=10),
        WindowFacts("d2", 10, 0, 0, sk, tier="b", end=1.5, feedback_matched=20, feedback_correct=20),
    ]
    st = cohort_stats(ws, devices=2)
    assert (st.feedback_matched, st.feedback_correct) == (170, 120)
    assert st.feedback_by_tier == {"a": (150, 100), "b": (20, 20)}
    assert st.halves is not None
    assert st.halves[0].feedback_by_tier["a"] == (100, 90) and st.halves[1].feedback_by_tier["a"] == (50, 10)


# ------------------------------------------------------------------ the device side


def test_top1() -> None:
    assert top1({"p": np.array([[0.1, 0.7, 0.2]], np.float32)}) == "1"
    assert top1({"p": np.array([0.1, 0.2, 0.9], np.float32)}) == "2"
    assert top1({"label": np.array([7], np.int64), "p": np.zeros((1, 10), np.float32)}) == "7"
    assert top1({"label": np.array(["cat"], object)}) == "cat"
    assert top1({"p": np.zeros((2, 10), np.float32)}) is None  # a batch: no single class
    assert top1({"p": np.array([0.3], np.float32)}) is None  # a score, not a class
    assert top1({}) is None


def test_parse_feedback_refuses_clearly() -> None:
    assert parse_feedback(b'{"id": "r1", "label": 3}') == ("r1", "3")
    assert parse_feedback(b'{"id": "r1", "label": "cat"}') == ("r1", "cat")
    for body, words in [
        (b"[]", "JSON object"),
        (b"{", "JSON object"),
        (b'{"id": "r", "label": 1, "x": 1}', "unknown feedback field 'x'"),
        (b'{"label": 1}', "feedback id"),
        (b'{"id": "r"}', "needs a label"),
        (b'{"id": "r", "label": true}', "integer or a string"),
        (b'{"id": "r", "label": 1.5}', "integer or a string"),
        (b'{"id": "r", "label": ""}', "integer or a string"),
        (json.dumps({"id": "r", "label": "x" * 65}).encode(), "integer or a string"),
    ]:
        with pytest.raises(BadRequest, match=words) as err:
            parse_feedback(body)
        assert err.value.status == 400


def test_predictions_are_bounded_by_count_and_age_and_taken_once() -> None:
    now = [0.0]
    p = Predictions(size=3, ttl_s=10.0, clock=lambda: now[0])
    for i in range(5):
        p.remember(f"r{i}", str(i))
    assert len(p) == 3 and p.take("r0") is None and p.take("r1") is None
    assert p.take("r4") == "4" and p.take("r4") is None  # one label per request
    now[0] = 11.0
    assert p.take("r2") is None and len(p) == 0  # expired, and the expired ones are dropped with it
    p.remember("x" * 300, "1")
    assert len(p) == 0
    assert "unknown, already labelled, older than 10 s" in p.unknown_message("r9")


def test_confusion_counts_are_bounded_and_match_the_wire_model() -> None:
    assert feedback.MAX_CELLS == MAX_CONFUSION_CELLS
    c = ConfusionCounts(max_cells=2)
    assert c.summary() is None
    for pred, label in [("1", "1"), ("1", "2"), ("3", "4"), ("1", "1"), (None, "5")]:
        c.add(pred, label)
    doc = c.summary()
    assert doc == {
        "matched": 4,
        "correct": 2,
        "unmatched": 1,
        "confusion": [{"predicted": "1", "label": "1", "count": 2}, {"predicted": "1", "label": "2", "count": 1}],
    }
    FieldFeedback.model_validate(doc)


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({"matched": 1, "correct": 2}, "more than the 1 matched"),
        ({"matched": 2, "correct": 1, "confusion": [{"predicted": "1", "label": "1", "count": 2}]}, "correct"),
        ({"matched": 2, "correct": 2, "confusion": [{"predicted": "1", "label": "2", "count": 1}]}, "wrong"),
        (
            {"matched": 2, "correct": 2, "confusion": [{"predicted": "1", "label": "1", "count": 1}] * 2},
            "twice",
        ),
        ({"matched": -1}, "greater than or equal"),
    ],
)
def test_the_wire_model_refuses_inconsistent_counts(doc: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        FieldFeedback.model_validate(doc)


class _Svc:
    """What OIPApp uses of a service, for the feedback route."""

    def __init__(self) -> None:
        self.info = type("Info", (), {"name": "m", "version": "2"})()
        self.window = WindowAccumulator()
        self.ready = True
        self.unavailable_reason = ""
        self.shm = None  # no shared memory extension

    def record_feedback(self, predicted: str | None, label: str) -> None:
        self.window.observe_feedback(predicted, label)

    def record(self, outcome: str, total: float | None, compute: float = 0.0) -> None:
        pass  # the feedback route counts no request

    def submit(self, feeds: dict[str, Any], outputs: list[str] | None, done: Done) -> None:
        raise AssertionError("the feedback route runs no inference")

    def render_metrics(self, reply: Callable[[bytes], None]) -> None:
        raise AssertionError("the feedback route renders no metrics")


def _call(app: OIPApp, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    got: list[tuple[int, bytes]] = []
    app.handle(method, path, {}, body, lambda status, payload, extra: got.append((status, payload)))
    return got[0][0], json.loads(got[0][1])


def test_the_feedback_route_matches_counts_and_refuses() -> None:
    svc = _Svc()
    app = OIPApp(svc)
    app.predictions.remember("r1", "3")
    app.predictions.remember("r2", "3")
    assert _call(app, "POST", "/v2/models/m/feedback", b'{"id": "r1", "label": 3}') == (
        200,
        {"id": "r1", "predicted": "3", "label": "3", "correct": True},
    )
    status, doc = _call(app, "POST", "/v2/models/m/versions/2/feedback", b'{"id": "r2", "label": "5"}')
    assert status == 200 and doc["correct"] is False
    status, doc = _call(app, "POST", "/v2/models/m/feedback", b'{"id": "r1", "label": 3}')
    assert status == 404 and "no prediction to match feedback for request id 'r1'" in doc["error"]
    assert _call(app, "POST", "/v2/models/other/feedback", b'{"id": "r1", "label": 3}')[0] == 404
    assert _call(app, "GET", "/v2/models/m/feedback", b"")[0] == 405
    assert _call(app, "POST", "/v2/models/m/feedback", b'{"id": 1}')[0] == 400
    w = svc.window.close(model="m", version="2", model_sha256=None, restarts=0, crashes=0, worker_rss=None, drift=[])
    assert w.feedback is not None and (w.feedback.matched, w.feedback.correct, w.feedback.unmatched) == (2, 1, 1)
    nxt = svc.window.close(model="m", version="2", model_sha256=None, restarts=0, crashes=0, worker_rss=None, drift=[])
    assert nxt.feedback is None  # counts start again with each window


# ------------------------------------------------------------------ the control plane


@pytest.fixture
def db(db_url: str) -> Any:
    d = Database(db_url)
    d.migrate()
    yield d
    d.dispose()


def _report(version: str, matched: int, correct: int, cells: list[tuple[str, str, int]]) -> Report:
    now = utcnow()
    fb = {
        "matched": matched,
        "correct": correct,
        "unmatched": 1,
        "confusion": [{"predicted": p, "label": lab, "count": n} for p, lab, n in cells],
    }
    w = TelemetryWindow(
        window_id=secrets.token_hex(6),
        start=now - timedelta(seconds=30),
        end=now,
        model="digits",
        version=version,
        requests=matched,
        feedback=FieldFeedback.model_validate(fb),
    )
    return Report(batch_id=secrets.token_hex(8), state="committed", telemetry=[w])


def test_stored_once_rolled_up_per_version_and_tier(db: Database) -> None:
    with db.session() as s:
        devs = []
        for i, tier in enumerate(("rpi4", "rpi4", "jetson")):
            d = Device(id=f"dev-{i}", tier=tier, credential_hash=hash_secret(secrets.token_hex(16)))
            s.add(d)
            devs.append(d)
        s.flush()
        again = _report("2", 10, 4, [("1", "1", 4), ("1", "2", 6)])
        assert store_report(s, devs[0], again)
        assert not store_report(s, devs[0], again)  # the retry is counted once
        store_report(s, devs[1], _report("2", 20, 10, [("1", "1", 10), ("3", "2", 10)]))
        store_report(s, devs[2], _report("2", 5, 5, [("1", "1", 5)]))
        store_report(s, devs[2], _report("1", 5, 5, []))
        s.commit()
    with db.session() as s:
        rows = {(r["version"], r["tier"]): r for r in field_accuracy.rows(s, utcnow() - timedelta(hours=1))}
        assert rows[("2", "rpi4")]["matched"] == 30 and rows[("2", "rpi4")]["correct"] == 14
        assert rows[("2", "rpi4")]["accuracy"] == round(14 / 30, 5) and rows[("2", "rpi4")]["unmatched"] == 2
        assert rows[("2", "rpi4")]["confusions"] == [
            {"predicted": "3", "label": "2", "count": 10},
            {"predicted": "1", "label": "2", "count": 6},
        ]
        assert rows[("2", "jetson")]["accuracy"] == 1.0 and rows[("1", "jetson")]["matched"] == 5
        k = kpi.fleet_kpis(s, overdue_after_s=3600)
        assert {(r["version"], r["tier"]) for r in k["field_accuracy"]} == set(rows)
        assert s.query(FieldAccuracyRollup).count() >= 3
        facts = window_facts(s, ["dev-0", "dev-1"], utcnow() - timedelta(hours=1), "2", same=True)
        assert sorted((f.feedback_matched, f.feedback_correct) for f in facts) == [(10, 4), (20, 10)]
        assert all(r.feedback is not None for r in s.query(TelemetryRow))


def test_merge_confusion_is_bounded() -> None:
    into: field_accuracy.Confusion = {"1": {"1": 2}}
    field_accuracy.merge_confusion(into, {"1": {"1": 3, "2": 1}, "4": {"5": 7}}, limit=2)
    assert into == {"1": {"1": 5, "2": 1}}


def test_feedback_rides_the_stats_frames_and_a_bad_label_is_refused() -> None:
    from edgefleet.agent.frames import FrameError, encode, take

    buf = bytearray(encode(("stats", [("ok", 0.01, 0.005), ("feedback", None, "3"), ("feedback", "1", "cat")])))
    assert take(buf) == [("stats", [("ok", 0.01, 0.005), ("feedback", None, "3"), ("feedback", "1", "cat")])]
    for bad in ("", "x" * 65, "a\x00b", 3):
        buf = bytearray(encode(("stats", [("feedback", "1", bad)])))
        with pytest.raises(FrameError, match="feedback label"):
            take(buf)


def test_fleet_status_shows_field_accuracy_and_says_where_no_feedback_matched(
    cp: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from _package_helpers import run_cli

    cp.device("x86-avx2").report(
        model="digits", version="1.0.0", feedback={"matched": 40, "correct": 30, "unmatched": 2}
    )
    cp.device("x86-avx2").report(model="digits", version="2.0.0", feedback={"matched": 0, "correct": 0, "unmatched": 3})
    code, out, err = run_cli(capsys, "fleet", "status", "--server", cp.url, "--api-token", cp.admin)
    assert code == 0, err
    section = out[out.index("field accuracy") :]
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in section.splitlines() if "│ digits" in line]
    rows = {c[1]: c for c in cells}
    # accuracy, matched, unmatched; never a 0 for "none matched"
    assert rows["1.0.0"][3:] == ["0.75", "40", "2"] and rows["2.0.0"][3:] == ["no feedback", "0", "3"], section
    code, out, _ = run_cli(capsys, "fleet", "status", "--server", cp.url, "--api-token", cp.admin, "--json")
    by_version = {r["version"]: r for r in json.loads(out)["field_accuracy"]}
    assert by_version["1.0.0"]["accuracy"] == 0.75 and by_version["2.0.0"]["accuracy"] is None
