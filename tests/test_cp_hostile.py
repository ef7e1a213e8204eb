"""No device can poison fleet data: reports that break the wire format's bounds are refused at the edge (422 naming
the field, 413 over the size cap), counted on the device and never stored, and the fleet views, the dashboard,
/metrics and the reconciler keep answering afterwards — on SQLite and on the real PostgreSQL. Server time: every
stored record carries the server's receive time, and the device's clock offset is recorded and flagged.

Plus property tests of the wire models: arbitrary JSON is refused with a ValidationError and nothing else, and
whatever is accepted can be stored and aggregated."""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import func, select

from _cp_support import CP, SimDevice, build_pkg, pg_schema_url
from edgefleet.controlplane import kpi
from edgefleet.controlplane.db import Database, Device, ReportBatch, TelemetryRow, UpdateEventRow
from edgefleet.controlplane.devices import CLOCK_SKEW_S
from edgefleet.controlplane.reconciler import reconcile_once
from edgefleet.controlplane.reports import store_report
from edgefleet.protocol import (
    MAX_COUNT,
    MAX_CPU_PERCENT,
    MAX_REPORT_BYTES,
    MAX_RSS_BYTES,
    MAX_WORKER_EVENTS,
    Report,
    TelemetryWindow,
    validation_message,
)
from edgefleet.telemetry.drift import DriftSummary
from edgefleet.telemetry.sketch import (
    MAX_KEY,
    MAX_LATENCY_S,
    MIN_KEY,
    MIN_LATENCY_S,
    RELATIVE_ACCURACY,
    LatencySketch,
    SketchData,
)

Doc = dict[str, Any]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('hostile') / 'cp.db'}"
    else:
        yield from pg_schema_url()


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory, db_url: str) -> Iterator[CP]:
    c = CP(tmp_path_factory.mktemp("cp"), db_url)
    yield c
    c.close()


def _report(now: datetime | None = None, *, version: str = "1.0.0") -> Doc:
    """A report a healthy agent would send, as JSON-ready data: every hostile case below breaks one thing of it."""
    now = now or datetime.now(UTC)
    sk = LatencySketch()
    sk.extend([0.002] * 40 + [0.010] * 10)
    return {
        "batch_id": secrets.token_hex(8),
        "state": "committed",
        "served": {"model": "digits", "version": version},
        "events": [
            {
                "event_id": secrets.token_hex(6),
                "at": now.isoformat(),
                "kind": "committed",
                "model": "digits",
                "version": version,
            }
        ],
        "telemetry": [
            {
                "window_id": secrets.token_hex(6),
                "start": (now - timedelta(seconds=10)).isoformat(),
                "end": now.isoformat(),
                "model": "digits",
                "version": version,
                "requests": 55,
                "errors": {"error": 5},
                "latency": sk.to_data().model_dump(mode="json"),
                "cpu_percent": 12.5,
                "rss_bytes": 50_000_000,
                "drift": [{"feature": "in.X.mean", "psi": 0.01, "n": 50, "counts": [25.0, 25.0]}],
            }
        ],
        "sent_at": now.isoformat(),
    }


def _post(cp: CP, dev: SimDevice, body: Doc | bytes | Iterator[bytes]) -> Any:
    # json.dumps writes NaN and Infinity as bare literals, as a careless or hostile sender would
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    return cp.http.post(
        f"/api/v1/devices/{dev.id}/report",
        content=content,
        headers={"Authorization": f"Bearer {dev.credential}", "Content-Type": "application/json"},
    )


def _stored(cp: CP, device_id: str) -> tuple[int, int, int]:
    with cp.store.db.session() as s:
        return (
            s.scalar(select(func.count()).select_from(ReportBatch).where(ReportBatch.device_id == device_id)) or 0,
            s.scalar(select(func.count()).select_from(UpdateEventRow).where(UpdateEventRow.device_id == device_id))
            or 0,
            s.scalar(select(func.count()).select_from(TelemetryRow).where(TelemetryRow.device_id == device_id)) or 0,
        )


def _set(path: str, value: Any) -> Callable[[Doc], None]:
    """Set a dotted path of the report (``telemetry.0.latency.keys``) to ``value``."""

    def apply(d: Doc) -> None:
        *parents, last = path.split(".")
        node: Any = d
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = value

    return apply


def _lat(**kw: Any) -> Callable[[Doc], None]:
    def apply(d: Doc) -> None:
        d["telemetry"][0]["latency"].update(kw)

    return apply


def _mismatched(d: Doc) -> None:
    d["telemetry"][0]["latency"]["keys"].append(5)


_2099 = "2099-01-01T00:00:00+00:00"

# (case, how it breaks the good report, the field the refusal must name)
HOSTILE: list[tuple[str, Callable[[Doc], None], str]] = [
    ("sketch keys and counts of different lengths", _mismatched, "telemetry.0.latency.counts"),
    ("sketch key 1e7", _lat(keys=[10_000_000], counts=[50.0]), "telemetry.0.latency.keys.0"),
    ("sketch key far below 1 ps", _lat(keys=[-10_000_000], counts=[50.0]), "telemetry.0.latency.keys.0"),
    ("negative sketch count", _lat(counts=[-1.0] * 2), "telemetry.0.latency.counts.0"),
    ("sketch count not what its buckets hold", _lat(count=49.0), "telemetry.0.latency.count"),
    ("another sketch accuracy", _lat(relative_accuracy=0.02), "telemetry.0.latency.relative_accuracy"),
    ("sketch sum Infinity", _lat(sum=float("inf")), "telemetry.0.latency.sum"),
    ("sketch max NaN", _lat(max=float("nan")), "telemetry.0.latency.max"),
    ("more latencies than requests", _set("telemetry.0.requests", 10), "telemetry.0.latency"),
    ("negative errors", _set("telemetry.0.errors", {"error": -50_000}), "telemetry.0.errors.error"),
    ("errors over requests", _set("telemetry.0.errors", {"error": 40, "timeout": 20}), "telemetry.0.errors"),
    ("65 error outcomes", _set("telemetry.0.errors", {f"o{i}": 0 for i in range(65)}), "telemetry.0.errors"),
    ("requests 2**70", _set("telemetry.0.requests", 2**70), "telemetry.0.requests"),
    ("requests over a 32-bit column", _set("telemetry.0.requests", 2**31), "telemetry.0.requests"),
    ("negative requests", _set("telemetry.0.requests", -1), "telemetry.0.requests"),
    ("cpu NaN", _set("telemetry.0.cpu_percent", float("nan")), "telemetry.0.cpu_percent"),
    ("cpu -Infinity", _set("telemetry.0.cpu_percent", float("-inf")), "telemetry.0.cpu_percent"),
    ("cpu 1e9 %", _set("telemetry.0.cpu_percent", 1e9), "telemetry.0.cpu_percent"),
    ("rss 2**70", _set("telemetry.0.rss_bytes", 2**70), "telemetry.0.rss_bytes"),
    ("crashes 2**40", _set("telemetry.0.worker_crashes", 2**40), "telemetry.0.worker_crashes"),
    ("negative restarts", _set("telemetry.0.worker_restarts", -3), "telemetry.0.worker_restarts"),
    ("window dated 2099", _set("telemetry.0.start", _2099), "telemetry.0.start"),
    ("window start after end", _set("telemetry.0.end", "2020-01-01T00:00:00Z"), "telemetry.0.end"),
    ("naive timestamp", _set("events.0.at", "2025-01-01T00:00:00"), "events.0.at"),
    ("event dated 2099", _set("events.0.at", _2099), "events.0.at"),
    ("sent_at dated 2099", _set("sent_at", _2099), "sent_at"),
    ("year 1 with an offset", _set("events.0.at", "0001-01-01T00:00:00+05:00"), "events.0.at"),
    ("state_reason of 2001 chars", _set("state_reason", "x" * 2001), "state_reason"),
    ("version of 65 chars", _set("events.0.version", "1" * 65), "events.0.version"),
    ("model of 129 chars", _set("telemetry.0.model", "m" * 129), "telemetry.0.model"),
    ("batch id of 65 chars", _set("batch_id", "b" * 65), "batch_id"),
    ("NUL in a reason", _set("events.0.reason", "bad\x00reason"), "events.0.reason"),
    ("unknown event kind", _set("events.0.kind", "exploded"), "events.0.kind"),
    ("unknown field", _set("telemetry.0.gpu", 1), "telemetry.0.gpu"),
    ("drift counts not summing to n", _set("telemetry.0.drift.0.n", 7), "telemetry.0.drift.0"),
    ("drift psi NaN", _set("telemetry.0.drift.0.psi", float("nan")), "telemetry.0.drift.0.psi"),
    ("drift of 1025 bins", _set("telemetry.0.drift.0.counts", [0.0] * 1025), "telemetry.0.drift.0.counts"),
]


def _events(n: int) -> Callable[[Doc], None]:
    def apply(d: Doc) -> None:
        ev = d["events"][0]
        d["events"] = [{**ev, "event_id": f"e{i}"} for i in range(n)]

    return apply


HOSTILE.append(("10001 events", _events(10_001), "events"))


@pytest.mark.parametrize(("case", "breaks", "field"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_report_is_refused_naming_the_field_and_nothing_is_stored(
    cp: CP, case: str, breaks: Callable[[Doc], None], field: str
) -> None:
    dev = cp.device("rpi4")
    doc = _report()
    breaks(doc)
    r = _post(cp, dev, doc)
    assert r.status_code == 422, (case, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    assert f"{field}:" in detail, (case, detail)
    assert r.json()["error"] == "InvalidReportError"
    assert _stored(cp, dev.id) == (0, 0, 0)
    d = cp.api("GET", f"/api/v1/devices/{dev.id}")
    assert d["state"] is None and d["served"]["version"] is None  # nothing of the report applied
    assert d["invalid_reports"] == 1 and d["last_invalid_at"] is not None
    assert f"{field}:" in d["last_invalid_report"] and len(d["last_invalid_report"]) <= 500
    # the same device's next good report is accepted as ever
    good = _report()
    assert _post(cp, dev, good).status_code == 200
    assert _stored(cp, dev.id) == (1, 1, 1)
    assert cp.api("GET", f"/api/v1/devices/{dev.id}")["invalid_reports"] == 1


def test_not_json_is_refused(cp: CP) -> None:
    dev = cp.device("rpi4")
    for body in (b"not json", b"[" * 100_000, b'{"batch_id": "b", "state": "idle", "dropped_records": 1' + b"0" * 5000):
        r = _post(cp, dev, body)
        assert r.status_code == 422 and r.json()["error"] == "InvalidReportError", r.text
    assert cp.api("GET", f"/api/v1/devices/{dev.id}")["invalid_reports"] == 3
    assert _stored(cp, dev.id) == (0, 0, 0)


def _huge() -> bytes:
    doc = _report()
    doc["state_reason"] = "x" * 12_500_000
    return json.dumps(doc).encode()


def test_over_the_size_cap_is_413_with_and_without_content_length(cp: CP) -> None:
    dev = cp.device("rpi4")
    body = _huge()
    assert len(body) > 12_000_000
    r = _post(cp, dev, body)
    assert r.status_code == 413 and r.json()["error"] == "TooLargeError", r.text
    assert r.request.headers["content-length"] == str(len(body))

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    r = _post(cp, dev, chunks())
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413 and r.json()["error"] == "TooLargeError", r.text
    assert _stored(cp, dev.id) == (0, 0, 0)
    d = cp.api("GET", f"/api/v1/devices/{dev.id}")
    assert d["invalid_reports"] == 2 and "cap" in d["last_invalid_report"]
    # just under the cap is read and judged on its content
    doc = _report()
    ev = {**doc["events"][0], "kind": "download_started", "reason": "r" * 2000}
    doc["events"] = [{**ev, "event_id": f"e{i}"} for i in range(1900)]
    near = json.dumps(doc).encode()
    assert MAX_REPORT_BYTES - 200_000 < len(near) <= MAX_REPORT_BYTES
    assert _post(cp, dev, near).status_code == 200
    assert _stored(cp, dev.id) == (1, 1900, 1)


def test_auth_comes_before_the_body(cp: CP) -> None:
    dev, other = cp.device("rpi4"), cp.device("rpi4")
    body = _huge()
    r = cp.http.post(f"/api/v1/devices/{dev.id}/report", content=body, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    bad = json.dumps({"batch_id": "x", "state": "exploded"}).encode()
    headers = {"Authorization": f"Bearer {other.credential}"}
    assert cp.http.post(f"/api/v1/devices/{dev.id}/report", content=bad, headers=headers).status_code == 403
    # a stranger's garbage is not counted against the device it names
    assert cp.api("GET", f"/api/v1/devices/{dev.id}")["invalid_reports"] == 0


@pytest.fixture(scope="module")
def pkg(mlp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pkg(mlp_path, tmp_path_factory.mktemp("pkgs"), "1.0.0")


def test_the_fleet_still_answers_after_every_hostile_report(cp: CP, pkg: Path) -> None:
    cp.upload(pkg)
    devs = [cp.device("hostile-tier") for _ in range(2)]
    body = {
        "model": "digits",
        "version": "1.0.0",
        "policy": {"waves": [100], "bake_s": 0, "min_devices": 1, "min_requests": 10},
    }
    rid = cp.api("POST", "/api/v1/rollouts", json=body)["rollout_id"]
    reconcile_once(cp.store)
    evil = devs[0]
    for _, breaks, _ in HOSTILE:
        doc = _report()
        breaks(doc)
        assert _post(cp, evil, doc).status_code == 422
    assert _post(cp, evil, _huge()).status_code == 413
    assert _stored(cp, evil.id) == (0, 0, 0)
    for d in devs:
        assert _post(cp, d, _report()).status_code == 200
    reconcile_once(cp.store)
    reconcile_once(cp.store)
    h = cp.h()
    for path in ("/api/v1/fleet", "/", f"/devices/{evil.id}", "/metrics", f"/api/v1/rollouts/{rid}", "/api/v1/devices"):
        r = cp.http.get(path, headers=h)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
    fleet = cp.api("GET", "/api/v1/fleet")
    for row in fleet["latency"]:
        assert row["error_rate"] is None or 0 <= row["error_rate"] <= 1
        assert row["requests"] >= 0
    d = cp.api("GET", f"/api/v1/devices/{evil.id}")
    assert d["invalid_reports"] == len(HOSTILE) + 1 and d["state"] == "committed"


def test_server_time_and_clock_offset(cp: CP) -> None:
    dev = cp.device("rpi4")
    device_now = datetime.now(UTC) - timedelta(minutes=5)  # this device's clock is 5 minutes behind
    doc = _report(device_now)
    before = datetime.now(UTC)
    assert _post(cp, dev, doc).status_code == 200
    after = datetime.now(UTC)
    d = cp.api("GET", f"/api/v1/devices/{dev.id}")
    assert -300 - (after - before).total_seconds() - 1 <= d["clock_offset_s"] <= -300 + 1
    assert d["clock_skewed"] is True and abs(d["clock_offset_s"]) > CLOCK_SKEW_S
    with cp.store.db.session() as s:
        ev = s.scalars(select(UpdateEventRow).where(UpdateEventRow.device_id == dev.id)).one()
        win = s.scalars(select(TelemetryRow).where(TelemetryRow.device_id == dev.id)).one()
        batch = s.scalars(select(ReportBatch).where(ReportBatch.device_id == dev.id)).one()
        assert abs((ev.at - device_now).total_seconds()) < 1e-3  # the device's own reading is kept ...
        assert before <= ev.received_at <= after  # ... and judged on the server's
        assert ev.received_at == win.received_at == batch.received_at  # one reading per report
        assert (d["last_seen"] is not None) and ev.received_at.isoformat() == d["last_seen"]
    # its clock is fixed: the next report clears the flag
    assert _post(cp, dev, _report()).status_code == 200
    d = cp.api("GET", f"/api/v1/devices/{dev.id}")
    assert abs(d["clock_offset_s"]) < 5 and d["clock_skewed"] is False
    # a report without sent_at (an older agent) leaves the last reading as it was
    doc = _report()
    del doc["sent_at"]
    assert _post(cp, dev, doc).status_code == 200
    assert cp.api("GET", f"/api/v1/devices/{dev.id}")["clock_offset_s"] == d["clock_offset_s"]
    assert cp.api("GET", f"/api/v1/devices/{cp.device('rpi4').id}")["clock_offset_s"] is None


def test_openapi_names_the_report_schema(cp: CP) -> None:
    spec = cp.http.get("/openapi.json").json()
    op = spec["paths"]["/api/v1/devices/{device_id}/report"]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/Report" and op["requestBody"]["required"] is True
    schemas = spec["components"]["schemas"]
    assert {"Report", "TelemetryWindow", "SketchData", "UpdateEvent", "DriftSummary"} <= set(schemas)
    assert schemas["Report"]["properties"]["batch_id"]["maxLength"] == 64
    assert {"413", "422"} <= set(op["responses"])


# ------------------------------------------------------------------------------------------------ properties


def test_sketch_key_range_is_derived_from_the_mapping() -> None:
    from ddsketch import DDSketch

    mapping = DDSketch(RELATIVE_ACCURACY)._mapping
    assert (mapping.key(1e-12), mapping.key(365.25 * 86400)) == (MIN_KEY, MAX_KEY)
    assert -1500 < MIN_KEY < -1300 and 800 < MAX_KEY < 950


_floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 5e-324, 1e-13, 1e-12, 0.002, MAX_LATENCY_S, 1e300]
)


@settings(max_examples=200, deadline=None, database=None)
@given(values=st.lists(_floats, max_size=50))
def test_the_agents_own_sketches_always_pass(values: list[float]) -> None:
    sk = LatencySketch()
    sk.extend(values)
    data = SketchData.model_validate(sk.to_data().model_dump())
    assert data.count == len([v for v in values if not math.isnan(v)])
    now = datetime.now(UTC)
    TelemetryWindow(window_id="w", start=now, end=now, requests=len(values), latency=data)
    assert all(MIN_KEY <= k <= MAX_KEY for k in data.keys)
    if data.count:
        q = LatencySketch.from_data(data).quantile(0.95)
        assert q is not None and MIN_LATENCY_S * 0.98 <= q <= MAX_LATENCY_S * 1.02


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | _floats | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=20,
)
_field_names = st.sampled_from(
    ["batch_id", "state", "state_reason", "served", "events", "telemetry", "dropped_records", "sent_at", "x"]
)
_window_keys = st.sampled_from([*TelemetryWindow.model_fields, "x"])


def _mutations() -> st.SearchStrategy[Doc]:
    """The good report with some fields replaced by arbitrary JSON, at the top and inside a window."""

    def build(top: dict[str, Any], window: dict[str, Any], latency: dict[str, Any]) -> Doc:
        d = _report()
        d.update(top)
        if isinstance(d.get("telemetry"), list) and d["telemetry"] and isinstance(d["telemetry"][0], dict):
            d["telemetry"][0].update(window)
            if isinstance(d["telemetry"][0].get("latency"), dict):
                d["telemetry"][0]["latency"].update(latency)
        return d

    return st.builds(
        build,
        st.dictionaries(_field_names, _json, max_size=2),
        st.dictionaries(_window_keys, _json, max_size=2),
        st.dictionaries(st.sampled_from(list(SketchData.model_fields)), _json, max_size=2),
    )


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_json | _mutations())
def test_arbitrary_json_raises_only_validation_errors(doc: Any) -> None:
    for parse in (lambda: Report.model_validate(doc), lambda: Report.model_validate_json(json.dumps(doc))):
        try:
            r = parse()
        except ValidationError as exc:
            msg = validation_message(exc)
            assert msg and "\n" not in msg
            continue
        # accepted: it aggregates
        merged = LatencySketch.merged(w.latency for w in r.telemetry)
        merged.quantile(0.5)


_text64 = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=64)
_ids = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=64)


@st.composite
def _valid_reports(draw: st.DrawFn) -> Doc:
    """Reports right up to every bound: what the server accepts must store and aggregate on both databases."""
    now = datetime.now(UTC)
    times = st.datetimes(
        min_value=datetime(1970, 1, 1),
        max_value=(now + timedelta(hours=23)).replace(tzinfo=None),
        timezones=st.just(UTC),
    )
    windows = []
    for _ in range(draw(st.integers(0, 3))):
        buckets = draw(
            st.dictionaries(
                st.integers(MIN_KEY, MAX_KEY), st.floats(0, 1e6) | st.sampled_from([0.0, 1.0, 1e-300]), max_size=30
            )
        )
        zero = draw(st.sampled_from([0.0, 0.0, 3.0]))
        count = math.fsum(buckets.values()) + zero
        lo, hi = sorted(draw(st.lists(st.floats(0, MAX_LATENCY_S), min_size=2, max_size=2)))
        requests = draw(st.integers(min(math.ceil(count), MAX_COUNT), MAX_COUNT))
        errors = draw(st.dictionaries(_ids, st.integers(0, 1000), max_size=5))
        if sum(errors.values()) > requests:
            errors = {}
        a, b = sorted(draw(st.lists(times, min_size=2, max_size=2)))
        windows.append(
            {
                "window_id": draw(_ids),
                "start": a.isoformat(),
                "end": b.isoformat(),
                "model": draw(st.none() | st.text(max_size=128).filter(lambda s: "\x00" not in s)),
                "version": draw(st.none() | _text64),
                "requests": requests,
                "errors": errors,
                "latency": {
                    "keys": list(buckets),
                    "counts": list(buckets.values()),
                    "zero_count": zero,
                    "count": count,
                    "sum": draw(st.floats(0, 1e12)),
                    "min": lo if count else None,
                    "max": hi if count else None,
                },
                "worker_restarts": draw(st.sampled_from([0, MAX_WORKER_EVENTS])),
                "worker_crashes": draw(st.sampled_from([0, 1, MAX_WORKER_EVENTS])),
                "cpu_percent": draw(st.none() | st.floats(0, MAX_CPU_PERCENT)),
                "rss_bytes": draw(st.none() | st.integers(0, MAX_RSS_BYTES)),
                "drift": [DriftSummary(feature="f", psi=draw(st.floats(0, 1e6)), n=10, counts=[4.0, 6.0]).model_dump()],
            }
        )
    events = [
        {
            "event_id": draw(_ids),
            "at": draw(times).isoformat(),
            "kind": draw(st.sampled_from(["committed", "rolled_back", "cancelled", "refused"])),
            "model": draw(st.none() | st.just("m" * 128)),
            "version": draw(st.none() | _text64),
            "rollout_id": draw(st.none() | _text64),
            "reason": draw(st.none() | st.text(max_size=2000).filter(lambda s: "\x00" not in s)),
        }
        for _ in range(draw(st.integers(0, 3)))
    ]
    return {
        "batch_id": draw(_ids),
        "state": draw(st.sampled_from(["idle", "committed", "probation"])),
        "state_reason": draw(st.none() | _text64),
        "served": {"model": "digits", "version": draw(_text64), "model_sha256": draw(_text64)},
        "agent_version": draw(st.none() | _text64),
        "runtime_version": draw(st.none() | _text64),
        "events": events,
        "telemetry": windows,
        "dropped_records": draw(st.sampled_from([0, MAX_COUNT])),
        "sent_at": draw(st.none() | times.map(lambda t: t.isoformat())),
    }


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def fresh_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    urls = iter([f"sqlite:///{tmp_path / 'fuzz.db'}"]) if request.param == "sqlite" else pg_schema_url()
    db = Database(next(urls))
    db.migrate()
    try:
        yield db
    finally:
        db.dispose()
        for _ in urls:  # drops the PostgreSQL schema
            pass


def test_whatever_is_accepted_can_be_stored_and_aggregated(fresh_db: Database) -> None:
    with fresh_db.session() as s:
        s.add(Device(id="dev-fuzz", tier="t", credential_hash="h" * 64))

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
    )
    @given(doc=_valid_reports())
    def run(doc: Doc) -> None:
        r = Report.model_validate_json(json.dumps(doc))  # built within every bound: must be accepted
        LatencySketch.merged(w.latency for w in r.telemetry).quantile(0.95)
        with fresh_db.session() as s:
            d = s.get(Device, "dev-fuzz")
            assert d is not None
            store_report(s, d, r)

    run()
    with fresh_db.session() as s:
        assert (s.scalar(select(func.count()).select_from(ReportBatch)) or 0) > 0
        kpi.fleet_kpis(s, overdue_after_s=60)
        for w in s.scalars(select(TelemetryRow)):
            LatencySketch.from_data(SketchData.model_validate(w.latency)).quantile(0.95)
