"""Worker crash reports: a crash of the inference worker leaves a report on the device (how it ended, faulthandler's
traceback, the last sampled RSS, the model); it is uploaded while the device's group consents, listed by the API,
the CLI and the device page; without consent it stays on the device and the control plane refuses it; a hostile
upload is refused whole and harms nothing.

Pure parts first (``agent/crashes.py``); then an agent in this process with its real supervised worker against the
real control plane (``tests/_fleet_support.py``), its worker killed with SIGSEGV and SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from _fleet_support import Fleet, install, make_packages, running, settings, until
from _package_helpers import run_cli
from edgefleet.agent.crashes import CrashStore, WorkerExit, build_report, fault_tail, signal_name
from edgefleet.protocol import MAX_CRASH_REPORTS, MAX_CRASH_UPLOAD_BYTES, MAX_FAULT_CHARS, CrashReport


def _exit(**kw: Any) -> WorkerExit:
    base: dict[str, Any] = {
        "reason": "worker exited (exit -11)",
        "exit_code": -11,
        "fault": "Fatal Python error: Segmentation fault\n",
        "rss_bytes": 50 * 2**20,
        "rss_age_s": 0.4,
        "uptime_s": 12.0,
        "model": "digits",
        "version": "1.0.0",
        "model_sha256": "ab" * 32,
    }
    return WorkerExit(**(base | kw))


def test_signal_names_and_the_traceback_tail() -> None:
    assert signal_name(-11) == "SIGSEGV" and signal_name(-9) == "SIGKILL" and signal_name(-6) == "SIGABRT"
    assert signal_name(0) is None and signal_name(137) is None and signal_name(None) is None
    assert signal_name(-200) == "signal 200"
    assert fault_tail("abc", 5) == ("abc", 0)
    assert fault_tail("0123456789", 4) == ("6789", 6)  # the innermost frames are written last: they stay


def test_a_report_is_bounded_and_scrubbed() -> None:
    secret = "s3cr3t-credential-xyz"
    huge = "x" * (MAX_FAULT_CHARS + 100) + f"\nFile 'model.py' {secret}\x00 end"
    r = build_report(
        _exit(fault=huge, reason=f"worker exited; token {secret}", exit_code=-11, model="m" * 300),
        at=datetime.now(UTC),
        agent_version="1.2.3",
        runtime_version="1.20.0",
        secrets=[secret, ""],
    )
    assert r.signal == "SIGSEGV" and r.exit_code == -11
    assert len(r.fault) == MAX_FAULT_CHARS and r.fault_dropped > 100 and r.fault.endswith("[scrubbed] end")
    assert secret not in r.fault and secret not in r.reason and "\x00" not in r.fault
    assert r.model == "m" * 128 and r.rss_bytes == 50 * 2**20 and r.uptime_s == 12.0
    assert CrashReport.model_validate_json(r.model_dump_json()) == r  # what the device keeps, the wire takes
    odd = build_report(
        _exit(exit_code=100_000, reason="", rss_age_s=-1.0),
        at=datetime.now(UTC),
        agent_version=None,
        runtime_version=None,
    )
    assert odd.exit_code is None and odd.signal is None and odd.reason == "worker exited" and odd.rss_age_s == 0.0


def test_the_device_keeps_the_newest_reports_until_acknowledged(tmp_path: Path) -> None:
    folder = tmp_path / "crashes"
    folder.mkdir()
    (folder / "worker-old.fault").write_text("from a worker of the agent's previous run")
    store = CrashStore(folder, keep=3)
    assert not list(folder.glob("*.fault"))  # that worker ended with its agent: not a crash
    reports = [
        build_report(
            _exit(reason=f"crash {i}"),
            at=datetime(2026, 1, 1, 0, 0, i, tzinfo=UTC),
            agent_version=None,
            runtime_version=None,
        )
        for i in range(5)
    ]
    for r in reports:
        store.add(r)
    assert [r.reason for r in store.pending()] == ["crash 2", "crash 3", "crash 4"]
    assert store.forget([reports[3].crash_id, "unknown"]) == 1
    assert [r.reason for r in CrashStore(folder, keep=3).pending()] == ["crash 2", "crash 4"]  # durable
    (folder / "20260101T000009000000-bad.crash.json").write_text("{not json")
    assert len(store.pending()) == 2 and not (folder / "20260101T000009000000-bad.crash.json").exists()
    assert store.fault_file().parent == folder and store.fault_file() != store.fault_file()


# ------------------------------------------------------------------------------------------------ end to end


def _report(**kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"crash_id": "c-hostile", "at": datetime.now(UTC).isoformat(), "reason": "worker exited"}
    return doc | kw


def test_crash_reports_end_to_end(
    fleet: Fleet, tmp_path: Path, mlp_path: Path, digits: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgefleet.agent import Supervisor

    pkg = make_packages(mlp_path, digits.x_test, tmp_path, ["1.0.0"])["1.0.0"]
    data_dir = tmp_path / "dev"
    install(data_dir, pkg)
    conf = settings(data_dir, "http://control-plane.test", fleet.enrollment_token())

    def crashes(dev: str) -> list[dict[str, Any]]:
        return list(fleet.api("GET", f"/api/v1/devices/{dev}/crashes")["crashes"])

    async def kill_worker(a: Any, sig: int) -> None:
        sup = a.backend
        assert isinstance(sup, Supervisor)
        await until(lambda: sup.worker is not None and sup.rss_sample is not None, 60, "a worker with an RSS sample")
        assert sup.worker is not None and sup.worker.pid is not None
        os.kill(sup.worker.pid, sig)

    async def go() -> tuple[str, str, list[CrashReport]]:
        async with running(conf, transport=fleet.transport()) as a:
            await until(lambda: fleet.device_ids() and a.identity.get("credential"), 30, "enrollment")
            dev = fleet.device_ids()[0]
            credential = str(a.identity["credential"])

            # no consent: the report is kept on the device and not sent
            await kill_worker(a, signal.SIGSEGV)
            await until(lambda: a.crashes.pending(), 30, "the crash report kept on the device")
            # the crash reached the control plane as a count in a telemetry window: check-ins went on meanwhile
            await until(lambda: any(w["worker_crashes"] for w in fleet.windows(dev)), 30, "the crash counted")
            kept = a.crashes.pending()
            assert len(kept) == 1 and crashes(dev) == []
            # and a device that sends one anyway is refused
            r = await asyncio.to_thread(
                fleet.http.post,
                f"/api/v1/devices/{dev}/crashes",
                json={"reports": [kept[0].model_dump(mode="json")]},
                headers={"Authorization": f"Bearer {credential}"},
            )
            assert r.status_code == 409 and "has not consented to crash reports" in r.json()["detail"], r.text

            await asyncio.to_thread(fleet.configure_group, crash_reports=True)
            await until(lambda: crashes(dev), 30, "the report uploaded")
            await until(lambda: not a.crashes.pending(), 30, "the acknowledged report forgotten on the device")

            # SIGKILL cannot be caught: a report without a traceback
            await kill_worker(a, signal.SIGKILL)
            await until(lambda: len(crashes(dev)) == 2, 30, "the second report uploaded")
            return dev, credential, kept

    dev, credential, kept = asyncio.run(go())
    newest, first = crashes(dev)
    assert first["crash_id"] == kept[0].crash_id and first["signal"] == "SIGSEGV" and first["exit_code"] == -11
    assert "Fatal Python error: Segmentation fault" in first["fault"] and 'File "' in first["fault"]
    assert (first["model"], first["version"]) == ("digits", "1.0.0") and len(first["model_sha256"]) == 64
    assert first["rss_bytes"] > 10 * 2**20 and 0 <= first["rss_age_s"] < 30 and first["uptime_s"] > 0
    assert first["agent_version"] and first["runtime_version"]
    assert newest["signal"] == "SIGKILL" and newest["fault"] == "" and newest["rss_bytes"] > 0
    assert not list((tmp_path / "dev" / "crashes").glob("*.fault"))  # every worker's file is cleaned up

    # audited: the consent given, the upload
    audit = fleet.api("GET", "/api/v1/audit")
    consent = [e for e in audit if e["action"] == "group.consent"]
    assert consent and consent[0]["detail"] == {"crash_reports": True}, consent
    assert any(e["action"] == "device.crashes_uploaded" and e["target"] == dev for e in audit)

    # the CLI lists them (user text never markup), and --json for scripts
    code, out, err = run_cli(capsys, "devices", "crashes", dev, "--server", fleet.url, "--api-token", fleet.admin)
    assert code == 0, err
    assert "SIGKILL  digits 1.0.0  RSS " in out and "SIGSEGV  digits 1.0.0  RSS " in out
    assert "| Fatal Python error: Segmentation fault" in out and "(no traceback" in out
    code, out, _ = run_cli(
        capsys, "devices", "crashes", dev, "--json", "--limit", "1", "--server", fleet.url, "--api-token", fleet.admin
    )
    doc = json.loads(out)
    assert code == 0 and doc["consent"] is True and [c["signal"] for c in doc["crashes"]] == ["SIGKILL"]

    # the device page lists them
    page = fleet.http.get(f"/devices/{dev}", headers=fleet.h()).text
    assert re.findall(r'data-testid="crash-signal">([^<]*)<', page) == ["SIGKILL", "SIGSEGV"]
    assert "Fatal Python error: Segmentation fault" in page

    # hostile uploads are refused whole, naming what is wrong, and store nothing
    post = lambda body, **kw: fleet.http.post(  # noqa: E731
        f"/api/v1/devices/{dev}/crashes", headers={"Authorization": f"Bearer {credential}", **kw}, content=body
    )
    bad = {
        "reports.0.fault": _report(fault="x" * (MAX_FAULT_CHARS + 1)),
        "reports.0.rss_bytes": _report(rss_bytes=-1),
        "reports.0.reason": _report(reason="nul\x00byte"),
        "reports.0.exit_code": _report(exit_code=1000),
        "reports.0.at": _report(at="2999-01-01T00:00:00+00:00"),
        "reports.0.evil": _report(evil=True),
    }
    for field, report in bad.items():
        r = post(json.dumps({"reports": [report]}), **{"content-type": "application/json"})
        assert r.status_code == 422 and field in r.json()["detail"], (field, r.text)
    too_many = {"reports": [_report(crash_id=f"c{i}") for i in range(MAX_CRASH_REPORTS + 1)]}
    r = post(json.dumps(too_many))
    assert r.status_code == 422 and "reports" in r.json()["detail"], r.text
    r = post(b"{" + b" " * MAX_CRASH_UPLOAD_BYTES + b"}")
    assert r.status_code == 413, r.text
    assert post(b"not json").status_code == 422
    assert fleet.http.post(f"/api/v1/devices/{dev}/crashes", json={"reports": [_report()]}).status_code == 401
    assert len(crashes(dev)) == 2

    # a report sent again (its answer lost) is stored once
    sent = {k: v for k, v in first.items() if k != "received_at"}  # the server's field, not the device's
    r = post(json.dumps({"reports": [sent, sent]}))
    assert r.status_code == 200 and r.json() == {"accepted_crash_ids": [first["crash_id"]]}, r.text
    assert len(crashes(dev)) == 2


def test_the_server_stores_each_report_once_and_keeps_the_newest(cp: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On both databases: idempotent by crash_id, bounded per device, one device's reports never touch another's."""
    from edgefleet.controlplane import crashes as server_crashes

    monkeypatch.setattr(server_crashes, "KEEP_PER_DEVICE", 3)
    cp.api("PUT", "/api/v1/groups/lab", json={"config": {"crash_reports": True}})
    a, b = cp.device("t", group="lab"), cp.device("t", group="lab")

    def send(dev: Any, *ids: str) -> Any:
        t0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
        reports = [_report(crash_id=i, at=datetime.fromtimestamp(t0 + int(i[1:]), UTC).isoformat()) for i in ids]
        r = cp.http.post(f"/api/v1/devices/{dev.id}/crashes", json={"reports": reports}, headers=cp.h(dev.credential))
        assert r.status_code == 200, r.text
        return r.json()["accepted_crash_ids"]

    assert send(a, "c1", "c2", "c1") == ["c1", "c2"]
    assert send(a, "c2", "c3") == ["c2", "c3"]  # c2's answer was lost: sent again, stored once
    assert send(b, "c1") == ["c1"]
    assert send(a, "c4", "c5") == ["c4", "c5"]
    listed = lambda dev: [c["crash_id"] for c in cp.api("GET", f"/api/v1/devices/{dev.id}/crashes")["crashes"]]  # noqa: E731
    assert listed(a) == ["c5", "c4", "c3"] and listed(b) == ["c1"]
    uploads = [e for e in cp.api("GET", "/api/v1/audit") if e["action"] == "device.crashes_uploaded"]
    assert sorted(len(e["detail"]["crash_ids"]) for e in uploads) == [1, 1, 2, 2]  # only what was new


@pytest.mark.process
def test_an_aborting_worker_is_described_with_its_traceback(
    tmp_path: Path, mlp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor alone, with a model whose worker aborts after loading (the FAULT_ENV test hook)."""
    from edgefleet.agent import Supervisor, WorkerSpec
    from edgefleet.agent.worker.main import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "1:abort")  # a bare ONNX model is version 1
    store = CrashStore(tmp_path / "crashes")
    seen: list[WorkerExit] = []

    async def go() -> None:
        sup = Supervisor(
            WorkerSpec(mlp_path), None, backoff_base=30.0, rss_interval_s=0.01, fault_file=store.fault_file,
            on_exit=seen.append,
        )  # fmt: skip
        await sup.start()
        try:
            await until(lambda: seen, 60, "the worker's end described")
        finally:
            await sup.stop()

    asyncio.run(go())
    (ex,) = seen
    assert ex.exit_code == -6 and signal_name(ex.exit_code) == "SIGABRT"
    assert "Fatal Python error: Aborted" in ex.fault and " in fault\n" in ex.fault  # the frame that called abort()
    # the worker aborts 0.2 s after loading: under load it may die before its first RSS sample (then it says none)
    assert (ex.rss_bytes is None) == (ex.rss_age_s is None) and (ex.rss_bytes is None or ex.rss_bytes > 0)
    assert ex.version == "1" and ex.model_sha256 and ex.uptime_s
    assert not list(store.folder.glob("*.fault"))
