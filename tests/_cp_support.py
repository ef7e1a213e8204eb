"""Helpers shared by the control-plane tests (tests/test_cp_*.py): database URLs for SQLite and a fresh schema on
the real PostgreSQL at 127.0.0.1:5432, an app on a temp folder, packages built from the digits MLP, and a
protocol-exact device driver for the in-process API tests (the real agent runs in test_cp_e2e.py).

``CP.upload`` attaches a passing gate verdict bound to the package's SHA-256, as a release pipeline does, so the
release policy (a passing gate for the package, by default) admits what the tests roll out; ``gate=False``
uploads a version without evidence."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import event
from starlette.types import ASGIApp

from conftest import free_port
from edgefleet.config import ServerSettings
from edgefleet.controlplane.app import create_app
from edgefleet.data import CallData
from edgefleet.protocol import Report
from edgefleet.telemetry.sketch import LatencySketch

PG_BASE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def pg_reachable() -> str | None:
    """None when the server answers, else why not."""
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=2):
            return None
    except Exception as exc:
        return f"no PostgreSQL at 127.0.0.1:5432 (database test, user postgres): {str(exc).splitlines()[0]}"


def pg_schema_url() -> Generator[str, None, None]:
    """A fresh schema per use, dropped afterwards; the URL sets search_path to it."""
    import psycopg

    why = pg_reachable()
    if why:
        pytest.skip(why)
    schema = "ef_" + uuid.uuid4().hex[:12]
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as c:
            c.execute(f"DROP SCHEMA {schema} CASCADE")


@contextlib.contextmanager
def sql_statements(cp: CP) -> Iterator[list[str]]:
    """The SQL statements the server runs inside the block."""
    statements: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    engine = cp.store.db.engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


class CP:
    """An app on a temp folder with an in-process client (no lifespan: tests drive the reconciler themselves)."""

    def __init__(self, tmp: Path, db_url: str, *, edge: Callable[[ASGIApp], ASGIApp] | None = None) -> None:
        """``edge`` wraps the app that the loopback server serves (a faulty link, say); ``self.app`` stays the
        app itself."""
        # No deltas unless a test turns them on (``store.repo.deltas``): the update tests count full-package bytes.
        self.settings = ServerSettings(db=db_url, repo=tmp / "repo", overdue_after_s=3600, repo_deltas=0)
        self.app: FastAPI = create_app(self.settings)
        self.admin = (tmp / "admin-token").read_text().strip()
        self.store = self.app.state.context.store
        self.served: ASGIApp = edge(self.app) if edge is not None else self.app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.serve()
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def serve(self) -> None:
        """A real HTTP server on loopback; lifespan off, so no background loop races the test's own reconciles."""
        self.server = uvicorn.Server(
            uvicorn.Config(self.served, host="127.0.0.1", port=self.port, lifespan="off", log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), f"the control plane could not listen on port {self.port}"
            time.sleep(0.01)

    def stop_serving(self) -> None:
        """The server goes away at once, open connections cut (its database stays, as a crashed server's does)."""
        self.server.should_exit = True
        self.server.force_exit = True
        self.thread.join(10)

    def close(self) -> None:
        self.http.close()
        self.stop_serving()
        self.store.db.dispose()

    def h(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.admin}"}

    def api(self, method: str, path: str, token: str | None = None, **kw: Any) -> Any:
        headers = {**self.h(token), **kw.pop("headers", {})}
        r = self.http.request(method, path, headers=headers, **kw)
        assert r.status_code < 400, (r.status_code, r.text)
        return r.json()

    def token(self, role: str) -> str:
        return str(self.api("POST", "/api/v1/tokens", json={"role": role})["token"])

    def upload(self, pkg: Path, *, gate: bool = True) -> dict[str, Any]:
        out = dict(
            self.api(
                "POST",
                "/api/v1/packages",
                content=pkg.read_bytes(),
                headers={**self.h(), "Content-Type": "application/octet-stream"},
            )
        )
        if gate:
            self.attach_gate(out["model"], out["version"], out["package_sha256"])
        return out

    def attach_gate(self, model: str, version: str, package_sha256: str, *, passed: bool = True) -> dict[str, Any]:
        return dict(
            self.api(
                "PUT",
                f"/api/v1/models/{model}/versions/{version}/gate",
                params={"package_sha256": package_sha256},
                json=gate_verdict(passed),
            )
        )

    def device(self, tier: str, *, runtime_version: str = "1.32.0", group: str | None = None) -> SimDevice:
        tok = self.api("POST", "/api/v1/enrollment-tokens", json={"tier": tier, "group": group})["token"]
        from edgefleet.bench.tiers import default_tiers

        # the device reports the hardware of its tier (a tier this repository does not ship is not checked)
        known = default_tiers().get(tier)
        return SimDevice.enroll(self, tok, runtime_version, arch=known.arch if known else "x86_64")


class SimDevice:
    """Speaks the check-in protocol exactly as protocol.py says; decides nothing (the real agent does that)."""

    def __init__(self, cp: CP, device_id: str, credential: str) -> None:
        self.cp, self.id, self.credential = cp, device_id, credential
        self.etag: str | None = None
        self.served: str | None = "1.0.0"
        self.n = 0

    @classmethod
    def enroll(cls, cp: CP, token: str, runtime_version: str = "1.32.0", *, arch: str = "x86_64") -> SimDevice:
        r = cp.http.post(
            "/api/v1/enroll",
            json={
                "token": token,
                "hardware": {"arch": arch, "cpu_count": 2, "memory_mb": 1024},
                "runtime_version": runtime_version,
                "agent_version": "0.1.0",
                "public_key": secrets.token_hex(32),
            },
        )
        assert r.status_code == 200, r.text
        return cls(cp, r.json()["device_id"], r.json()["credential"])

    def desired(self) -> dict[str, Any]:
        r = self.cp.http.get(
            f"/api/v1/devices/{self.id}/desired", headers={"Authorization": f"Bearer {self.credential}"}
        )
        assert r.status_code == 200, r.text
        self.etag = r.headers["etag"]
        return dict(r.json())

    def report(
        self,
        *,
        model: str | None,
        version: str | None,
        events: Sequence[tuple[str, str | None]] = (),
        requests: int = 50,
        errors: int = 0,
        crashes: int = 0,
        latency_s: float = 0.002,
        batch_id: str | None = None,
        state: str = "committed",
        event_version: str | None = None,
        rollout_id: str | None = None,
        clock_offset_s: float = 0.0,
        drift: list[dict[str, Any]] | None = None,
        feedback: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``rollout_id`` goes on the events (the real agent sends its desired state's); ``clock_offset_s`` sets
        the device's clock off the server's; ``drift`` is the window's per-feature summaries; ``feedback`` its
        ground-truth counts (``protocol.FieldFeedback``)."""
        self.n += 1
        now = datetime.now(UTC) + timedelta(seconds=clock_offset_s)
        sk = LatencySketch()
        sk.extend(np.full(max(requests, 0), latency_s).tolist())
        body = Report(
            batch_id=batch_id or f"b{self.n}-{secrets.token_hex(4)}",
            state=state,
            served={"model": model, "version": version},
            events=[
                {
                    "event_id": secrets.token_hex(6),
                    "at": now,
                    "kind": k,
                    "model": model,
                    "version": event_version or version,
                    "rollout_id": rollout_id,
                    "reason": why,
                }
                for k, why in events
            ],
            telemetry=[
                {
                    "window_id": secrets.token_hex(6),
                    "start": now - timedelta(seconds=10),
                    "end": now,
                    "model": model,
                    "version": version,
                    "requests": requests,
                    "errors": {"error": errors} if errors else {},
                    "latency": sk.to_data(),
                    "worker_crashes": crashes,
                    "drift": drift or [],
                    **({"feedback": feedback} if feedback is not None else {}),
                }
            ]
            if requests or crashes
            else [],
        )
        r = self.cp.http.post(
            f"/api/v1/devices/{self.id}/report",
            content=body.model_dump_json(),
            headers={"Authorization": f"Bearer {self.credential}", "Content-Type": "application/json"},
        )
        assert r.status_code == 200, r.text
        return dict(r.json())


def gate_verdict(passed: bool = True) -> dict[str, Any]:
    """A verdict as ``edgefleet gate --json`` prints it, decided by the gate's own ``decide``."""
    from edgefleet.gate.checks import CheckResult
    from edgefleet.gate.verdict import decide

    status = "pass" if passed else "fail"
    check = CheckResult(name="package.valid", status=status, reason=f"test fixture: {status}")
    return decide([check]).model_dump(mode="json")


def build_pkg(
    mlp_path: Path,
    out_dir: Path,
    version: str,
    *,
    tiers: list[str] | None = None,
    name: str = "digits",
    reference_calls: int = 0,
) -> Path:
    """``reference_calls`` > 0 puts a drift reference (``reference.json``) built from that many calls in the
    package."""
    from edgefleet.package import Requirements, build_package

    rng = np.random.default_rng(0)
    x = rng.random((4, 1, 64), dtype=np.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    return build_package(
        mlp_path,
        out_dir / f"{name}-{version}.efpkg",
        name=name,
        version=version,
        sample_inputs=CallData({"X": x}),
        requirements=Requirements(tiers=tiers or []),
        reference_data=CallData({"X": rng.random((reference_calls, 1, 64), dtype=np.float32)})
        if reference_calls
        else None,
    )
