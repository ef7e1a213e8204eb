"""TLS end to end: `edgefleet server --tls-cert/--tls-key` as a real process with a private CA made here; the real
agent enrolls over https with the CA pinned; the CLI client and the TUF client trust it through EDGEFLEET_CA_FILE /
``ca_file``; cleartext to another machine and an untrusted certificate are refused with one line; the nginx
recipe of docs/security/tls.md terminates TLS in front of the server (skipped when nginx is not installed)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from _fleet_support import running, until
from _package_helpers import assert_refused, run_cli
from conftest import free_port, starts_processes
from edgefleet.config import AgentSettings
from edgefleet.errors import DownloadError, UsageError
from edgefleet.transport import check_url, verify_arg

EDGEFLEET = str(Path(sys.executable).with_name("edgefleet"))
Capsys = pytest.CaptureFixture[str]


# ------------------------------------------------------------------------------------------------ certificates


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


@dataclass
class Pki:
    ca: Path  # what clients pin
    cert: Path  # the server's certificate, signed by ca
    key: Path


def make_pki(folder: Path, name: str = "edgefleet test CA") -> Pki:
    """A private CA and a server certificate for 127.0.0.1 / localhost signed by it."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(ca=folder / "ca.pem", cert=folder / "server.pem", key=folder / "server.key")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pki.key, key)
    return pki


# ------------------------------------------------------------------------------------------------ the server


def _wait_healthy(url: str, verify: ssl.SSLContext | bool, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {log.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", verify=verify, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server at {url} did not answer in 90 s: {log.read_text()}")


@dataclass
class Server:
    url: str
    admin: str
    pki: Pki
    log: Path
    repo: Path


def _start_server(tmp: Path, pki: Pki, *extra: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    log = tmp / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                EDGEFLEET,
                "server",
                "--db",
                f"sqlite:///{tmp / 'cp.db'}",
                "--repo",
                str(tmp / "repo"),
                "--port",
                str(port),
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return proc, port, log


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
@starts_processes
def tls_server(tmp_path: Path) -> Iterator[Server]:
    pki = make_pki(tmp_path / "pki")
    proc, port, log = _start_server(tmp_path, pki, "--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
    url = f"https://127.0.0.1:{port}"
    try:
        _wait_healthy(url, verify_arg(pki.ca), proc, log)
        yield Server(url, (tmp_path / "admin-token").read_text().strip(), pki, log, tmp_path / "repo")
    finally:
        _stop(proc)


# ------------------------------------------------------------------------------------------------ tests


def test_server_speaks_https_and_says_so(tls_server: Server) -> None:
    lines = tls_server.log.read_text().splitlines()
    assert any(line.startswith(f"edgefleet control plane on {tls_server.url}  ") for line in lines), lines
    outside = tls_server.repo.parent / "repo.root-keys"
    assert any(f"root key written to {outside}: move it offline" in line for line in lines), lines
    # cleartext to the TLS port gets no answer from the application
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_server.url.replace("https://", "http://") + "/healthz", timeout=5)


def test_agent_enrolls_over_https_with_the_ca_pinned(
    tls_server: Server, tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFLEET_CA_FILE", str(tls_server.pki.ca))
    monkeypatch.delenv("EDGEFLEET_INSECURE_HTTP", raising=False)
    code, out, err = run_cli(
        capsys, "devices", "token", "--tier", "rpi4", "--json", "--server", tls_server.url,
        "--api-token", tls_server.admin,
    )  # fmt: skip
    assert code == 0, err
    token = json.loads(out)["token"]
    data = tmp_path / "device"
    settings = AgentSettings(
        server=tls_server.url,
        token=token,
        data_dir=data,
        ca_file=tls_server.pki.ca,
        checkin_interval_s=0.2,
        telemetry_interval_s=0.5,
    )

    async def enroll() -> None:
        async with running(settings):
            await until(lambda: (data / "identity.json").exists(), 60, "enrollment over https")

    asyncio.run(enroll())
    identity = json.loads((data / "identity.json").read_text())
    # the server saw https, so it hands out an https repository URL: the device never falls back to cleartext
    assert identity["repository_url"] == f"{tls_server.url}/tuf"
    code, out, err = run_cli(capsys, "devices", "list", "--json", "--server", tls_server.url,
                             "--api-token", tls_server.admin)  # fmt: skip
    assert code == 0, err
    assert [d["device_id"] for d in json.loads(out)] == [identity["device_id"]]

    # The device's TUF client reads the repository over https with the same pinned CA.
    from edgefleet.repository import TufClient

    root = (data / "tuf" / "trusted_root.json").read_bytes()
    client = TufClient(tmp_path / "tuf-cache", identity["repository_url"], root, ca_file=tls_server.pki.ca)
    try:
        client.refresh()
        assert client.targets() == []
    finally:
        client.close()
    fresh = TufClient(tmp_path / "tuf-cache-2", identity["repository_url"], root)  # the system CAs only
    try:
        with pytest.raises(DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
            fresh.refresh()
    finally:
        fresh.close()


def test_clients_without_the_ca_refuse_the_certificate(
    tls_server: Server, tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGEFLEET_CA_FILE", raising=False)
    code, _, err = run_cli(capsys, "devices", "list", "--server", tls_server.url, "--api-token", tls_server.admin)
    assert_refused(code, err, match="TLS certificate is not trusted: set EDGEFLEET_CA_FILE", exit_code=4)

    # A CA that did not sign the server's certificate is refused just the same: the pin is to one CA.
    other = make_pki(tmp_path / "other", name="another CA")
    monkeypatch.setenv("EDGEFLEET_CA_FILE", str(other.ca))
    code, _, err = run_cli(capsys, "devices", "list", "--server", tls_server.url, "--api-token", tls_server.admin)
    assert_refused(code, err, match="certificate is not trusted", exit_code=4)

    from edgefleet.agent.updater import ControlPlaneClient, Offline
    from edgefleet.protocol import EnrollRequest, Hardware

    async def enroll(ca: Path | None) -> None:
        cp = ControlPlaneClient(tls_server.url, ca_file=ca)
        try:
            await cp.enroll(
                EnrollRequest(
                    token="whatever",
                    hardware=Hardware(arch="x86_64", cpu_count=2, memory_mb=1024),
                    runtime_version="1.0",
                    agent_version="0.1.0",
                    public_key="00" * 32,
                )
            )
        finally:
            await cp.aclose()

    for ca in (None, other.ca):
        with pytest.raises(Offline, match="CERTIFICATE_VERIFY_FAILED"):
            asyncio.run(enroll(ca))


def test_cleartext_to_another_machine_is_refused_unless_allowed(
    tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = "http://10.1.2.3:8700"
    monkeypatch.delenv("EDGEFLEET_INSECURE_HTTP", raising=False)
    monkeypatch.delenv("EDGEFLEET_CA_FILE", raising=False)
    code, _, err = run_cli(capsys, "devices", "list", "--server", remote, "--api-token", "t")
    assert_refused(code, err, match=f"refusing cleartext {remote}")
    assert "EDGEFLEET_INSECURE_HTTP=1" in err and "https://" in err
    code, _, err = run_cli(capsys, "agent", "--server", remote, "--token", "t", "--data-dir", tmp_path / "a")
    assert_refused(code, err, match=f"refusing cleartext {remote}")
    assert "--insecure-http" in err
    assert not (tmp_path / "a").exists()  # refused before anything was created
    (tmp_path / "root.json").write_text("{}")
    code, _, err = run_cli(
        capsys, "fetch", "digits", "1.0.0", "--repo", remote + "/tuf", "--root", tmp_path / "root.json", "-o",
        tmp_path / "out",
    )  # fmt: skip
    assert_refused(code, err, match="refusing cleartext")

    # Allowed when asked for (nothing listens there, so only the constructors run), and loopback always is.
    from edgefleet.agent.updater import ControlPlaneClient
    from edgefleet.cli.connection import client
    from edgefleet.sdk import Client

    Client(remote, "t", insecure_http=True).close()
    monkeypatch.setenv("EDGEFLEET_INSECURE_HTTP", "1")
    client(remote, "t").close()
    monkeypatch.setenv("EDGEFLEET_INSECURE_HTTP", "maybe")
    with pytest.raises(UsageError, match="EDGEFLEET_INSECURE_HTTP='maybe': use 1 or 0"):
        client(remote, "t")
    asyncio.run(ControlPlaneClient(remote, insecure_http=True).aclose())
    for url in ("http://127.0.0.1:8700", "http://127.9.9.9", "http://localhost:1", "http://[::1]:8700"):
        assert check_url(url) == url
    for url in ("http://10.1.2.3", "http://example.com", "http://[2001:db8::1]:80", "http://127.0.0.1.nip.io"):
        with pytest.raises(UsageError, match="refusing cleartext"):
            check_url(url)
    with pytest.raises(UsageError, match="not an http"):
        check_url("ftp://127.0.0.1/x")
    with pytest.raises(UsageError, match="does not exist"):
        verify_arg(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(UsageError, match="no usable PEM certificate"):
        verify_arg(tmp_path / "junk.pem")


def test_server_tls_options_are_checked_before_it_starts(tmp_path: Path, capsys: Capsys) -> None:
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other")
    base: list[str | Path] = [
        "server",
        "--db",
        f"sqlite:///{tmp_path / 'cp.db'}",
        "--repo",
        tmp_path / "repo",
        "--port",
        "1",
    ]
    code, _, err = run_cli(capsys, *base, "--tls-cert", pki.cert)
    assert_refused(code, err, match="give both --tls-cert PEM and --tls-key PEM")
    code, _, err = run_cli(capsys, *base, "--tls-cert", pki.cert, "--tls-key", tmp_path / "nope.key")
    assert_refused(code, err, match="does not exist")
    code, _, err = run_cli(capsys, *base, "--tls-cert", pki.cert, "--tls-key", other.key)
    assert_refused(code, err, match="not a matching PEM certificate and key")
    assert not (tmp_path / "repo").exists()  # nothing was created for a server that never started


# ------------------------------------------------------------------------------------------------ nginx recipe


NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{server_block}
}}
"""


def nginx_server_block(docs: str) -> str:
    """The ``server { … }`` block of the recipe in docs/security/tls.md, so the test runs what the docs say."""
    start = docs.index("server {")
    depth = 0
    for i in range(start, len(docs)):
        depth += {"{": 1, "}": -1}.get(docs[i], 0)
        if depth == 0 and docs[i] == "}":
            return docs[start : i + 1]
    raise AssertionError("docs/security/tls.md has no complete nginx server block")


@pytest.mark.process
def test_nginx_terminates_tls_in_front_of_the_control_plane(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if nginx is None:
        pytest.skip(
            "nginx is not installed (not on PATH): the reverse-proxy recipe of docs/security/tls.md is untested"
        )
    pki = make_pki(tmp_path / "pki")
    proc, cp_port, log = _start_server(tmp_path, pki, "--forwarded-allow-ips", "127.0.0.1")
    ngx: subprocess.Popen[bytes] | None = None
    try:
        _wait_healthy(f"http://127.0.0.1:{cp_port}", True, proc, log)
        port = free_port()
        docs = (Path(__file__).parents[1] / "docs" / "security" / "tls.md").read_text()
        block = (
            nginx_server_block(docs)
            .replace("edgefleet.example.com", "127.0.0.1")
            .replace("listen 443 ssl", f"listen 127.0.0.1:{port} ssl")
            .replace("/etc/edgefleet/tls/fullchain.pem", str(pki.cert))
            .replace("/etc/edgefleet/tls/privkey.pem", str(pki.key))
            .replace("127.0.0.1:8700", f"127.0.0.1:{cp_port}")
        )
        user = f"user {_user()};\n" if os.geteuid() == 0 else ""  # as root, nginx's workers would become nobody
        conf = tmp_path / "nginx.conf"
        conf.write_text(NGINX_CONF.format(user=user, tmp=tmp_path, server_block=block))
        ngx = subprocess.Popen(
            [nginx, "-p", str(tmp_path), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "nginx-stderr.log").open("wb"),
            stdin=subprocess.DEVNULL,
        )
        url = f"https://127.0.0.1:{port}"
        _wait_healthy(url, verify_arg(pki.ca), ngx, tmp_path / "nginx-stderr.log")
        admin = (tmp_path / "admin-token").read_text().strip()
        with httpx.Client(base_url=url, verify=verify_arg(pki.ca), timeout=30) as http:
            tok = http.post(
                "/api/v1/enrollment-tokens", json={"tier": "rpi4"}, headers={"Authorization": f"Bearer {admin}"}
            )
            assert tok.status_code == 201, tok.text
            r = http.post(
                "/api/v1/enroll",
                json={
                    "token": tok.json()["token"],
                    "hardware": {"arch": "aarch64", "cpu_count": 4, "memory_mb": 4096},
                    "runtime_version": "1.32.0",
                    "agent_version": "0.1.0",
                    "public_key": "00" * 32,
                },
            )
        assert r.status_code == 200, r.text
        # The control plane saw the request as https on the proxy's address: X-Forwarded-Proto and Host arrived.
        assert r.json()["repository_url"] == f"{url}/tuf"
    finally:
        if ngx is not None:
            _stop(ngx)
        _stop(proc)


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name
