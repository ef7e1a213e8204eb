"""Replicas behind a load balancer: readiness follows the database, a database outage is a 503 and never a crash,
and check-ins keep being answered from memory while the database is away.

The real PostgreSQL at 127.0.0.1:5432 sits behind a TCP link the test can cut (:class:`CuttableLink`: the
database itself is shared by every test, so the outage is made on the way to it, as a network partition would).
The load balancer's configuration (deploy/haproxy/haproxy.cfg) is checked by the real HAProxy, and two real
``edgefleet server`` replicas behind it serve a device while one of them is killed."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from _cp_support import CP, pg_reachable, pg_schema_url
from conftest import free_port, starts_processes

ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
EDGEFLEET = str(Path(sys.executable).with_name("edgefleet"))


class CuttableLink:
    """A TCP forwarder to PostgreSQL on a port of its own; ``cut()`` drops every connection and refuses new ones
    (the database is gone for whoever uses this port), ``restore()`` listens again on the same port."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.target = target
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def cut(self) -> None:
        assert self._listener is not None
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from pg_schema_url()


@pytest.mark.postgres
def test_a_database_outage_is_a_503_and_check_ins_go_on_from_memory(pg_url: str, tmp_path: Path) -> None:
    link = CuttableLink()
    cp = CP(tmp_path, pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{link.port}"))
    try:
        assert cp.http.get("/health/ready").json()["status"] == "ready"
        dev = cp.device("rpi4")
        dev.desired()
        etag = dev.etag
        assert etag is not None
        dev_auth = {"Authorization": f"Bearer {dev.credential}"}

        link.cut()
        t0 = time.monotonic()
        r = cp.http.get("/health/ready")
        assert r.status_code == 503 and r.json()["reason"].startswith("database:"), r.text
        assert time.monotonic() - t0 < 10  # the load balancer learns it in seconds, not a TCP timeout
        # the check-in hot path answers from memory: unchanged (304) and in full (200)
        desired = f"/api/v1/devices/{dev.id}/desired"
        assert cp.http.get(desired, headers={**dev_auth, "If-None-Match": etag}).status_code == 304
        full = cp.http.get(desired, headers=dev_auth)
        assert full.status_code == 200 and full.json()["device_id"] == dev.id
        # what needs the database is refused as the server's passing trouble, never a 500
        for r in (cp.http.get("/api/v1/devices", headers=cp.h()), _report(cp, dev.id, dev_auth)):
            assert r.status_code == 503, (r.status_code, r.text)
            assert r.json()["error"] == "DatabaseUnavailable" and r.headers["retry-after"] == "5"

        link.restore()
        deadline = time.monotonic() + 30
        while cp.http.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the replica did not become ready again"
            time.sleep(0.2)
        assert _report(cp, dev.id, dev_auth).status_code == 200
        assert [d["device_id"] for d in cp.api("GET", "/api/v1/devices")] == [dev.id]
    finally:
        link.cut()
        cp.close()


def _report(cp: CP, device_id: str, auth: dict[str, str]) -> httpx.Response:
    body = {"batch_id": f"b-{time.monotonic_ns()}", "state": "idle"}
    return cp.http.post(f"/api/v1/devices/{device_id}/report", json=body, headers=auth)


@pytest.mark.process
def test_the_load_balancer_configuration_is_valid() -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (`make system-deps` installs Debian's)")
    r = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "Configuration file is valid" in r.stdout + r.stderr, r.stdout + r.stderr


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(cond: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while True:
        if got := cond():
            return got
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
@starts_processes
def replicas(pg_url: str, tmp_path: Path) -> Iterator[tuple[str, list[subprocess.Popen[bytes]], str]]:
    """Two replicas on one database and one repository folder, behind HAProxy with the shipped configuration
    (its ports replaced by free ones)."""
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (`make system-deps` installs Debian's)")
    why = pg_reachable()
    if why:
        pytest.skip(why)
    lb, p1, p2 = free_port(), free_port(), free_port()
    cfg = HAPROXY_CFG.read_text()
    cfg = cfg.replace("127.0.0.1:8700", f"127.0.0.1:{lb}").replace("127.0.0.1:8701", f"127.0.0.1:{p1}")
    cfg = cfg.replace("127.0.0.1:8702", f"127.0.0.1:{p2}")
    (tmp_path / "haproxy.cfg").write_text(cfg)
    servers: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ)
    for i, port in enumerate((p1, p2)):
        args = [EDGEFLEET, "server", "--db", pg_url, "--repo", str(tmp_path / "repo"), "--port", str(port)]
        servers.append(subprocess.Popen([*args, "--reconcile-interval", "0.5"], env=env, stdin=subprocess.DEVNULL))
        _wait(lambda p=port: _ok(f"http://127.0.0.1:{p}/health/ready"), 60, f"replica {i + 1}")
    proxy = subprocess.Popen(["haproxy", "-f", str(tmp_path / "haproxy.cfg")], stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{lb}"
        _wait(lambda: _ok(f"{url}/health/ready"), 30, "the load balancer")
        yield url, servers, (tmp_path / "admin-token").read_text().strip()
    finally:
        proxy.terminate()
        for p in [*servers, proxy]:
            if p.poll() is None:
                p.kill()
            p.wait(10)


@pytest.mark.postgres
def test_a_replica_killed_behind_the_load_balancer_loses_nothing(
    replicas: tuple[str, list[subprocess.Popen[bytes]], str], tmp_path: Path, mlp_path: Path
) -> None:
    from _cp_support import build_pkg, gate_verdict

    url, servers, admin = replicas
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=60)
    pkg = build_pkg(mlp_path, tmp_path / "pkgs", "1.0.0")
    up = api.post("/api/v1/packages", content=pkg.read_bytes(), headers={"Content-Type": "application/octet-stream"})
    assert up.status_code == 201, up.text
    sha = up.json()["package_sha256"]
    gate = api.put("/api/v1/models/digits/versions/1.0.0/gate", params={"package_sha256": sha}, json=gate_verdict())
    assert gate.status_code == 200, gate.text
    # a short probation, so the commit comes in seconds (the default watches a new version for a minute)
    lab = {"checkin_interval_s": 0.3, "telemetry_interval_s": 1, "probation_seconds": 1, "probation_requests": 1000}
    assert api.put("/api/v1/groups/lab", json={"config": lab}).status_code == 200
    token = api.post("/api/v1/enrollment-tokens", json={"tier": "test-tier", "group": "lab"}).json()["token"]
    agent = subprocess.Popen(
        [EDGEFLEET, "agent", "--server", url, "--token", token, "--data-dir", str(tmp_path / "dev"),
         "--port", str(free_port()), "--checkin-interval", "0.3", "--telemetry-interval", "1"],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        dev = _wait(lambda: api.get("/api/v1/devices").json(), 60, "enrollment")[0]["device_id"]
        servers[0].send_signal(signal.SIGKILL)  # one replica dies; the balancer takes it out after two checks
        servers[0].wait(10)
        r = api.post(f"/api/v1/devices/{dev}/pin", json={"model": "digits", "version": "1.0.0"})
        assert r.status_code == 200, r.text
        # the device, talking to whichever replica is alive, installs it and the survivor hears of the commit
        _wait(
            lambda: (
                (d := api.get(f"/api/v1/devices/{dev}").json())["served"]["version"] == "1.0.0"
                and d["state"] == "committed"
            ),
            90,
            "the commit through the surviving replica",
        )
    finally:
        agent.terminate()
        agent.wait(15)
