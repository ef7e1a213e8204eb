"""A FAKE control plane for the agent tests, run as a real process on 127.0.0.1.

It is a fake because the real control plane (``edgefleet.controlplane``) is being built in parallel; it speaks
exactly the ``edgefleet.protocol`` endpoints and serves a real TUF repository folder at ``/tuf/``
(``/tuf/metadata/…``, ``/tuf/targets/…`` with HTTP Range). Everything it stores lives in a JSON file, so a test
can kill it (``kill -9``: a server that dies) and start it again on the same port.

Test controls (not part of the protocol): ``POST /_test/config`` sets the desired state, ``offline`` (answer 503
to everything), ``drop_after`` (cut the connection once after that many bytes of a target) and
``die_after_store`` (store the next report's batch, then exit before answering), ``corrupt`` (flip a byte in that
many next target downloads), ``throttle`` (seconds of sleep per 4 KiB of a target) and ``reject_reports`` (answer
the next reports with these statuses, e.g. ``[413, 422]``, storing nothing); ``GET /_test/stats`` returns what
arrived: windows, events, batches, duplicate batches, bytes and GETs served per target, rejected reports and the
``sent_at`` of each accepted one.

Run: ``python tests/agent_support.py --port P --repo DIR --state FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx

TOKEN = "enroll-token-0001"
CREDENTIAL = "device-credential-0001"
DEVICE = "dev-1"


def build_app(repo: Path, state_file: Path) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from edgefleet.protocol import DesiredState, EnrollRequest, EnrollResponse, Report, ReportResponse

    st: dict[str, Any] = {
        "desired": {"device_id": DEVICE},
        "offline": False,
        "drop_after": None,
        "die_after_store": False,
        "tier": "test-tier",
        "batches": [],
        "duplicates": 0,
        "windows": [],
        "events": [],
        "reports": [],
        "bytes": {},
        "enrolled": 0,
        "corrupt": 0,
        "throttle": 0.0,
        "reject_reports": [],
        "rejected": [],
        "gets": {},
        "sent_at": [],
    }
    if state_file.exists():
        st.update(json.loads(state_file.read_text()))

    def save() -> None:
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(st))
        os.replace(tmp, state_file)

    def offline() -> Response | None:
        return JSONResponse({"error": "offline (test)"}, 503) if st["offline"] else None

    def authed(request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {CREDENTIAL}"

    async def enroll(request: Request) -> Response:
        if (r := offline()) is not None:
            return r
        req = EnrollRequest.model_validate_json(await request.body())
        if req.token != TOKEN:
            return JSONResponse({"error": "bad token"}, 401)
        st["enrolled"] += 1
        save()
        base = str(request.base_url).rstrip("/")
        from edgefleet.repository import Repository

        root = Repository(repo).root_json().decode()
        ans = EnrollResponse(
            device_id=DEVICE, credential=CREDENTIAL, tier=st["tier"], root_json=root, repository_url=f"{base}/tuf"
        )
        return Response(ans.model_dump_json(), media_type="application/json")

    async def desired(request: Request) -> Response:
        if (r := offline()) is not None:
            return r
        if not authed(request):
            return JSONResponse({"error": "bad credential"}, 401)
        body = DesiredState.model_validate(st["desired"]).model_dump_json()
        etag = '"' + hashlib.sha256(body.encode()).hexdigest()[:16] + '"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"etag": etag})
        return Response(body, media_type="application/json", headers={"etag": etag})

    async def report(request: Request) -> Response:
        if (r := offline()) is not None:
            return r
        if not authed(request):
            return JSONResponse({"error": "bad credential"}, 401)
        body = await request.body()
        if st["reject_reports"]:
            status = st["reject_reports"].pop(0)
            st["rejected"].append({"status": status, "batch_id": json.loads(body)["batch_id"], "bytes": len(body)})
            save()
            return JSONResponse({"error": f"rejected (test): {status}"}, status)
        rep = Report.model_validate_json(body)
        st["sent_at"].append(rep.sent_at.isoformat() if rep.sent_at else None)
        if rep.batch_id in st["batches"]:
            st["duplicates"] += 1
        else:
            st["batches"].append(rep.batch_id)
            st["windows"] += [w.model_dump(mode="json") for w in rep.telemetry]
            st["events"] += [e.model_dump(mode="json") for e in rep.events]
        st["reports"].append(
            {
                "state": rep.state.value,
                "reason": rep.state_reason,
                "served": rep.served.model_dump(),
                "dropped": rep.dropped_records,
            }
        )
        if st["die_after_store"]:
            st["die_after_store"] = False
            save()
            os._exit(1)  # stored, never answered
        save()
        return Response(
            ReportResponse(accepted_batch_ids=[rep.batch_id]).model_dump_json(), media_type="application/json"
        )

    async def tuf(request: Request) -> Response:
        if (r := offline()) is not None:
            return r
        rel = request.path_params["path"]
        if not rel.startswith(("metadata/", "targets/")) or ".." in rel:
            return JSONResponse({"error": "not found"}, 404)
        p = repo / rel
        if not p.is_file():
            return JSONResponse({"error": "not found"}, 404)
        data = p.read_bytes()
        start, status, headers = 0, 200, {"accept-ranges": "bytes"}
        rng = request.headers.get("range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                return Response(status_code=416)
            status = 206
            headers["content-range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        headers["content-length"] = str(len(body))
        cut = st["drop_after"] if rel.startswith("targets/") else None
        if cut is not None:
            st["drop_after"] = None
        name = rel.split("/", 1)[1]
        if rel.startswith("targets/"):
            st["gets"][name] = st["gets"].get(name, 0) + 1
            if st["corrupt"] and body:
                st["corrupt"] -= 1
                flipped = bytearray(body)
                flipped[len(flipped) // 2] ^= 0xFF
                body = bytes(flipped)
        throttle = float(st["throttle"]) if rel.startswith("targets/") else 0.0

        def chunks() -> Iterator[bytes]:
            step = 4096
            for i in range(0, len(body), step):
                piece = body[i : i + step]
                if cut is not None and i >= cut:
                    save()
                    raise ConnectionAbortedError("link cut (test)")
                st["bytes"][name] = st["bytes"].get(name, 0) + len(piece)
                if throttle:
                    time.sleep(throttle)
                yield piece
            save()

        return StreamingResponse(chunks(), status_code=status, headers=headers)

    async def config(request: Request) -> Response:
        st.update(await request.json())
        save()
        return JSONResponse({"ok": True})

    async def stats(request: Request) -> Response:
        return JSONResponse(st)

    return Starlette(
        routes=[
            Route("/api/v1/enroll", enroll, methods=["POST"]),
            Route("/api/v1/devices/{id}/desired", desired),
            Route("/api/v1/devices/{id}/report", report, methods=["POST"]),
            Route("/tuf/{path:path}", tuf),
            Route("/_test/config", config, methods=["POST"]),
            Route("/_test/stats", stats),
        ]
    )


class FakeControlPlane:
    """Runs the fake in a subprocess; ``kill()`` and ``start()`` again keep its stored data."""

    def __init__(self, port: int, repo: Path, state_file: Path) -> None:
        self.port, self.repo, self.state_file = port, repo, state_file
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> None:
        args = [
            sys.executable,
            __file__,
            "--port",
            str(self.port),
            "--repo",
            str(self.repo),
            "--state",
            str(self.state_file),
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        if not wait:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/_test/stats", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("the fake control plane did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def configure(self, **kw: Any) -> None:
        httpx.post(f"{self.url}/_test/config", json=kw, timeout=5).raise_for_status()

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/_test/stats", timeout=5).json())

    def desire(self, name: str | None, version: str | None, rollout: str | None = "r1", **config: Any) -> None:
        d: dict[str, Any] = {
            "device_id": DEVICE,
            "model": name,
            "version": version,
            "rollout_id": rollout,
            "target": f"{name}-{version}.efpkg" if name else None,
        }
        # Fast loops for tests. A document of version >= 1 overrides the agent's command-line intervals (version 0
        # means "no document" and leaves the flags in charge).
        d["config"] = {"version": 1, "checkin_interval_s": 0.2, "telemetry_interval_s": 0.5} | config
        self.configure(desired=d)


def make_packages(mlp: Path, digits_x: Any, out: Path, versions: list[str], **kw: Any) -> dict[str, Path]:
    """Packages ``digits-<v>.efpkg`` of the digits MLP with golden vectors and a drift reference."""
    from edgefleet.data import CallData
    from edgefleet.package import build_package

    calls = CallData({"X": digits_x[:16, None, :]})
    ref = CallData({"X": digits_x[:200, None, :]})
    return {
        v: build_package(
            mlp, out / f"digits-{v}.efpkg", name="digits", version=v, sample_inputs=calls, reference_data=ref, **kw
        )
        for v in versions
    }


def make_repo(path: Path, packages: list[Path]) -> Path:
    from edgefleet.repository import Repository

    repo = Repository.init(path)
    for p in packages:
        repo.publish(p)
    return path


class AgentProc:
    """``edgefleet agent`` as a real process."""

    def __init__(self, server: str, data_dir: Path, port: int, **opts: Any) -> None:
        self.server, self.data_dir, self.port, self.opts = server, data_dir, port, opts
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self, env: dict[str, str] | None = None) -> None:
        exe = str(Path(sys.executable).with_name("edgefleet"))
        args = [
            exe,
            "agent",
            "--server",
            self.server,
            "--token",
            TOKEN,
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.port),
            "--checkin-interval",
            str(self.opts.get("checkin", 0.2)),
            "--telemetry-interval",
            str(self.opts.get("telemetry", 0.5)),
        ]
        for k in ("memory_mb", "buffer_max_records"):
            if k in self.opts:
                args += [f"--{k.replace('_', '-')}", str(self.opts[k])]
        self.proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def serving(self) -> str | None:
        """The version the agent serves now, or None (503: nothing serving)."""
        try:
            r = httpx.get(f"{self.url}/v2/models/digits", timeout=2)
        except httpx.HTTPError:
            return "down"
        return str(r.json()["versions"][0]) if r.status_code == 200 else None

    def wait_until(self, pred: Any, timeout: float = 60, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode} waiting for {what}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")


def state_of(data_dir: Path) -> dict[str, Any]:
    """The agent's persisted state (``{}`` before its first save)."""
    try:
        return dict(json.loads((data_dir / "state.json").read_text()))
    except FileNotFoundError:
        return {}


def committed_version(data_dir: Path) -> str | None:
    return (state_of(data_dir).get("committed") or {}).get("version")


# ---------------------------------------------------------------- the agent in this process


def install(data_dir: Path, package: Path, *, slot: str = "A", rollout: str | None = "r1") -> Any:
    """A device that has ``package`` committed in ``slot``, as a finished update leaves it. Returns its SlotInfo."""
    from edgefleet.agent.state import PersistedState, SlotInfo, StateStore
    from edgefleet.package import open_package
    from edgefleet.protocol import AgentState, target_name

    m = open_package(package).manifest
    (data_dir / "slots").mkdir(parents=True, exist_ok=True)
    (data_dir / "slots" / f"{slot}.efpkg").write_bytes(package.read_bytes())
    info = SlotInfo(
        slot=slot, model=m.name, version=m.version, target=target_name(m.name, m.version), rollout_id=rollout
    )
    StateStore(data_dir).save(PersistedState(state=AgentState.committed, committed=info, active=info))
    return info


def settings(data_dir: Path, server: str | None = None, **kw: Any) -> Any:
    """Fast loops, as the process tests use."""
    from edgefleet.config import AgentSettings

    opts: dict[str, Any] = {"checkin_interval_s": 0.2, "telemetry_interval_s": 0.5, **kw}
    return AgentSettings(server=server, token=TOKEN if server else None, data_dir=data_dir, **opts)


@contextlib.asynccontextmanager
async def running(agent_settings: Any, **kw: Any) -> AsyncIterator[Any]:
    """An ``edgefleet.agent.Agent`` in this process, without its HTTP server; stopped on the way out."""
    from edgefleet.agent import Agent

    a = Agent(agent_settings, serve_http=False, **kw)
    await a.start()
    try:
        yield a
    finally:
        await a.stop()


async def until(pred: Any, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def buffered(data_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The records of ``kind`` ("window" or "event") waiting in an agent's telemetry buffer, oldest first."""
    import sqlite3

    db = sqlite3.connect(data_dir / "telemetry.db")
    try:
        rows = db.execute("SELECT body FROM records WHERE kind = ? ORDER BY id", (kind,)).fetchall()
    finally:
        db.close()
    return [json.loads(r[0]) for r in rows]


if __name__ == "__main__":
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--state", type=Path, required=True)
    a = p.parse_args()
    uvicorn.run(build_app(a.repo, a.state), host="127.0.0.1", port=a.port, log_level="warning")
