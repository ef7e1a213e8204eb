"""Check-in nudges over MQTT: which topics the server publishes (pure), the agent's wait, and end to end with a real
Mosquitto — a device that polls every ten minutes commits a pin within seconds only because it was nudged, keeps
polling while the broker is away, and, with the broker's ACL from deploy/mosquitto/, cannot read another device's
topic."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
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

from _fleet_support import Fleet, make_packages, running, settings, until
from conftest import free_port, starts_processes
from edgefleet.agent.nudge import INSTALL_HINT, sleep_or_nudge, topics_for
from edgefleet.config import AgentSettings, MqttBroker, ServerSettings, mqtt_broker
from edgefleet.controlplane import nudge
from edgefleet.controlplane.nudge import DEVICE_TOPIC, TIER_TOPIC, Nudger, changed, spread_s, topics
from edgefleet.protocol import nudge_payload, nudge_spread

REPO = Path(__file__).resolve().parents[1]
MOSQUITTO = "/usr/sbin/mosquitto"
SHARED_BROKER = ("127.0.0.1", 1883)  # CI's service broker, for the tests that need no configuration of their own
SLOW_POLL = {"checkin_interval_s": 600.0, "probation_seconds": 0.2, "probation_requests": 1000}


# ------------------------------------------------------------------------------------------ pure decisions


def test_changed_is_a_moved_etag_of_a_device_held_before() -> None:
    before = {"a": "1", "b": "2", "c": "3"}
    after = {"a": "1", "b": "9", "c": "3", "new": "5"}
    assert changed(before, after) == ["b"]
    assert changed({}, {"a": "1"}) == []  # a first load nudges nobody
    assert changed({"a": "1"}, {}) == []
    assert changed({"b": "1", "a": "1"}, {"b": "2", "a": "2"}) == ["a", "b"]


def test_few_changed_devices_get_their_own_topics() -> None:
    assert topics(["d1", "d2"], {}) == [DEVICE_TOPIC.format("d1"), DEVICE_TOPIC.format("d2")]
    assert topics(["d1", "d2"], {"d1": "t"}, max_device_topics=2) == ["edgefleet/devices/d1", "edgefleet/devices/d2"]
    assert topics([], {}) == []


def test_many_changed_devices_are_nudged_per_tier() -> None:
    ids = [f"d{i}" for i in range(5)]
    tier_of = {"d0": "pi4", "d1": "pi4", "d2": "jetson", "d3": "pi4"}  # d4: tier unknown
    assert topics(ids, tier_of, max_device_topics=3) == [
        TIER_TOPIC.format("jetson"),
        TIER_TOPIC.format("pi4"),
        DEVICE_TOPIC.format("d4"),
    ]


def test_names_that_cannot_be_one_topic_level_are_never_published() -> None:
    # a wildcard or a separator would publish to (or be refused for) other topics than the device's own
    assert topics(["ok", "a/b", "a+", "a#", ""], {}) == ["edgefleet/devices/ok"]
    assert topics(["d1", "d2", "d3"], {"d1": "x/y", "d2": "t#", "d3": "t"}, max_device_topics=1) == [
        "edgefleet/tiers/t",
        "edgefleet/devices/d1",
        "edgefleet/devices/d2",
    ]


def test_the_agent_listens_on_its_own_topic_and_its_tiers() -> None:
    assert topics_for("dev-1", "pi4") == ["edgefleet/devices/dev-1", "edgefleet/tiers/pi4"]
    assert topics_for("dev-1", None) == ["edgefleet/devices/dev-1"]
    assert topics_for("dev-1", "a/b") == ["edgefleet/devices/dev-1"]


def test_nudger_publishes_only_for_moved_states_and_survives_a_failing_publish() -> None:
    sent: list[str] = []

    def publish(topic: str, payload: bytes) -> None:
        sent.append(topic)
        assert payload == b""  # a device's own nudge names no spread: it checks in at once
        raise OSError("broker gone")

    n = Nudger(publish)
    assert n.after_refresh(None, {"a": "1", "b": "1"}, {"a": "2", "b": "1"}) == ["edgefleet/devices/a"]  # type: ignore[arg-type]
    assert n.after_refresh(None, {"a": "1"}, {"a": "1"}) == []  # type: ignore[arg-type]
    assert sent == ["edgefleet/devices/a"]


@pytest.mark.parametrize(
    ("url", "broker"),
    [
        ("mqtt://broker", MqttBroker("broker", 1883, None, None)),
        ("mqtt://broker:1884/", MqttBroker("broker", 1884, None, None)),
        ("mqtt://edgefleet-server:s%40cret@10.0.0.5:1883", MqttBroker("10.0.0.5", 1883, "edgefleet-server", "s@cret")),
        ("mqtt://:pw@broker", MqttBroker("broker", 1883, None, "pw")),
    ],
)
def test_broker_urls(url: str, broker: MqttBroker) -> None:
    assert mqtt_broker(url) == broker


@pytest.mark.parametrize(
    "url", ["http://broker", "mqtts://b", "mqtt://", "mqtt://b:0", "mqtt://b:99999", "mqtt://b/x", "http://u:s3cret@b"]
)
def test_a_bad_broker_url_is_one_line_without_the_url(url: str) -> None:
    with pytest.raises(ValueError, match="give mqtt://HOST") as err:
        mqtt_broker(url)
    assert "\n" not in str(err.value) and "s3cret" not in str(err.value)  # a URL may carry a password
    with pytest.raises(ValueError, match="mqtt"):
        AgentSettings(mqtt=url)
    with pytest.raises(ValueError, match="mqtt"):
        ServerSettings(mqtt=url)


def test_the_wait_ends_at_a_nudge_or_at_the_interval() -> None:
    async def go() -> tuple[bool, bool, bool, bool]:
        ev = asyncio.Event()
        # nudged before the wait: it ends at once, and the nudge is spent
        ev.set()
        early = await sleep_or_nudge(asyncio.sleep(3600), ev)
        assert not ev.is_set()
        # nothing nudges: the interval ends it
        timed_out = await sleep_or_nudge(asyncio.sleep(0), ev)
        # a nudge during the wait ends it
        asyncio.get_running_loop().call_soon(ev.set)
        during = await sleep_or_nudge(asyncio.sleep(3600), ev)
        return early, timed_out, during, ev.is_set()

    assert asyncio.run(go()) == (True, False, True, False)


# ------------------------------------------------------------------------------------------ a real broker


def _answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


@contextlib.contextmanager
def _mosquitto(tmp: Path, lines: list[str]) -> Iterator[int]:
    """Mosquitto on a free loopback port with the configuration ``lines`` (its listener added)."""
    port = free_port()
    conf = tmp / "mosquitto.conf"
    user = (
        f"user {os.environ.get('USER', 'root')}\n" if os.geteuid() == 0 else ""
    )  # as root it would drop to `mosquitto`
    conf.write_text(f"listener {port} 127.0.0.1\n{user}" + "".join(line + "\n" for line in lines))
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not _answers("127.0.0.1", port):
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                pytest.fail(f"mosquitto exited with {proc.returncode}: {out}")
            assert time.monotonic() < deadline, "mosquitto did not listen within 30 s"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


@pytest.fixture
@starts_processes
def broker(tmp_path: Path) -> Iterator[str]:
    """An open broker (no logins): ours when Mosquitto is installed, else CI's on 127.0.0.1:1883."""
    pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed: pip install 'edgefleet[mqtt]'")
    if Path(MOSQUITTO).exists():
        with _mosquitto(tmp_path, ["allow_anonymous true", "persistence false"]) as port:
            yield f"mqtt://127.0.0.1:{port}"
    elif _answers(*SHARED_BROKER):
        yield "mqtt://{}:{}".format(*SHARED_BROKER)
    else:
        pytest.skip(f"no MQTT broker: neither {MOSQUITTO} nor one on {SHARED_BROKER[0]}:{SHARED_BROKER[1]}")


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path, digits: Any) -> dict[str, Path]:
    return make_packages(mlp_path, digits.x_test, tmp_path_factory.mktemp("pkgs"), ["1.0.0"])


@pytest.fixture
@starts_processes
def fleet(tmp_path: Path, pkgs: dict[str, Path]) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "cp")
    f.publish(*pkgs.values())
    yield f
    if f.store.nudger is not None:
        f.store.nudger.close()
    f.close()


class _CheckinCounter(httpx.AsyncBaseTransport):
    """Counts the desired-state check-ins the control plane has answered."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner, self.answered = inner, 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        r = await self.inner.handle_async_request(request)
        if request.url.path.endswith("/desired"):
            self.answered += 1
        return r


def test_a_nudged_device_commits_a_pin_long_before_its_next_poll(broker: str, fleet: Fleet, tmp_path: Path) -> None:
    from edgefleet.agent import InProcessBackend

    fleet.configure_group(**SLOW_POLL)  # ten minutes between polls: only a nudge brings the pin within the test
    fleet.store.nudger = nudge.from_url(broker)  # what `edgefleet server --mqtt URL` sets up
    conf = settings(tmp_path / "dev", fleet.url, fleet.enrollment_token(), checkin_interval_s=600.0, mqtt=broker)
    link = _CheckinCounter(fleet.transport())

    async def go() -> tuple[str | None, int]:
        async with running(conf, transport=link, backend_factory=InProcessBackend) as a:
            await until(lambda: a.nudges is not None and a.nudges.subscribed.is_set(), 30, "the subscription")
            # the first check-in, and the one the subscription itself asks for; then ten minutes of sleep, so
            # what the device does next is the pin's nudge
            await until(lambda: link.answered >= 2, 30, "the check-ins of the start")
            assert link.answered == 2 and a.config.checkin_interval_s == 600.0
            await asyncio.to_thread(fleet.pin, "1.0.0")
            await until(lambda: a.state.committed is not None, 90, "the nudged device to commit 1.0.0")
            return (a.state.committed.version if a.state.committed else None), link.answered

    version, answered = asyncio.run(go())
    assert version == "1.0.0" and answered >= 3


def test_without_a_broker_the_device_polls_and_the_server_writes(
    fleet: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed: pip install 'edgefleet[mqtt]'")
    from edgefleet.agent import InProcessBackend

    dead = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    fleet.store.nudger = nudge.from_url(dead)
    conf = settings(tmp_path / "dev", fleet.url, fleet.enrollment_token(), mqtt=dead)
    # on the logger itself: a level another test left on it (or on a parent) must not hide the record
    caplog.set_level(logging.WARNING, logger="edgefleet.agent")

    def outage_logged() -> int:
        return sum("unavailable" in r.getMessage() and r.name == "edgefleet.agent" for r in caplog.records)

    async def go() -> str | None:
        async with running(conf, transport=fleet.transport(), backend_factory=InProcessBackend) as a:
            await until(lambda: a.nudges is not None, 30, "the agent to try the broker")
            await until(outage_logged, 30, "the agent to log the broker's outage")
            # the server's publishes fail quietly: the pin is stored and the device finds it at its next poll
            await asyncio.to_thread(fleet.pin, "1.0.0", probation_seconds=0.2, probation_requests=1000)
            await until(lambda: a.state.committed is not None, 90, "the polling device to commit 1.0.0")
            return a.state.committed.version if a.state.committed else None

    assert asyncio.run(go()) == "1.0.0"
    assert outage_logged() == 1  # once, however many reconnects failed


# ------------------------------------------------------------------------------------------ the broker's ACL


class _Client:
    """A bare paho client logged in as ``user``, collecting what it receives."""

    def __init__(self, port: int, user: str | None, password: str | None) -> None:
        import paho.mqtt.client as mqtt

        self.received: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.refused: Any = None
        self.subacks: dict[int, list[bool]] = {}
        self.acked = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{user}-{free_port()}")
        self.c.reconnect_delay_set(60, 60)  # one try is what these tests look at
        if user is not None:
            self.c.username_pw_set(user, password)
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = lambda c, u, m: self.received.append((m.topic, bytes(m.payload)))
        self.c.connect(host="127.0.0.1", port=port)
        self.c.loop_start()

    def _on_connect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.refused = reason
        self.connected.set()

    def _on_subscribe(self, c: Any, u: Any, mid: int, reasons: list[Any], props: Any) -> None:
        with self.acked:
            self.subacks[mid] = [not r.is_failure for r in reasons]
            self.acked.notify_all()

    def subscribe(self, *topics: str) -> list[bool]:
        _, mid = self.c.subscribe([(t, 1) for t in topics])
        assert mid is not None
        with self.acked:
            assert self.acked.wait_for(lambda: mid in self.subacks, 30), "no SUBACK"
            return self.subacks[mid]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
@starts_processes
def acl_broker(tmp_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """deploy/mosquitto/mosquitto.conf and acl, on a free port, with a password per login made here."""
    pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed: pip install 'edgefleet[mqtt]'")
    passwd_tool = shutil.which("mosquitto_passwd")
    if not Path(MOSQUITTO).exists() or passwd_tool is None:
        pytest.skip(f"the ACL test starts its own broker: needs {MOSQUITTO} and mosquitto_passwd")
    logins = {"edgefleet-server": "server-pw", "dev-a": "a-pw", "dev-b": "b-pw"}
    passwd = tmp_path / "passwd"
    passwd.touch(mode=0o600)
    for user, pw in logins.items():
        subprocess.run([passwd_tool, "-b", str(passwd), user, pw], check=True, capture_output=True)
    where = {"password_file": str(passwd), "acl_file": str(REPO / "deploy" / "mosquitto" / "acl")}
    lines = []
    for line in (REPO / "deploy" / "mosquitto" / "mosquitto.conf").read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key == "listener":
            continue  # ours, on a free port
        lines.append(f"{key} {where[key]}" if key in where else line)
    with _mosquitto(tmp_path, lines) as port:
        yield port, logins


def test_the_acl_keeps_a_device_to_its_own_topic(acl_broker: tuple[int, dict[str, str]]) -> None:
    port, pw = acl_broker
    a = _Client(port, "dev-a", pw["dev-a"])
    snoop = _Client(port, "dev-a", pw["dev-a"])  # dev-a again, trying a wildcard
    server = _Client(port, "edgefleet-server", pw["edgefleet-server"])
    try:
        for c in (a, snoop, server):
            assert c.connected.wait(30) and c.refused is None
        # Mosquitto 2.0 may acknowledge a subscription its ACL does not allow; what the ACL decides is what is
        # delivered, and that is what this test looks at.
        a.subscribe("edgefleet/devices/dev-a", "edgefleet/tiers/pi4", "edgefleet/devices/dev-b")
        snoop.subscribe("edgefleet/devices/+", "edgefleet/tiers/pi4")
        # QoS 1 from one publisher arrives in order: once the last message is in, an earlier one let through would
        # be in too
        for t in ("edgefleet/devices/dev-b", "edgefleet/devices/dev-a", "edgefleet/tiers/pi4"):
            server.c.publish(t, b"1", qos=1)
        _until_received(a, ("edgefleet/tiers/pi4", b"1"))
        _until_received(snoop, ("edgefleet/tiers/pi4", b"1"))
        assert a.received == [("edgefleet/devices/dev-a", b"1"), ("edgefleet/tiers/pi4", b"1")]
        assert ("edgefleet/devices/dev-b", b"1") not in snoop.received, snoop.received
        # a device cannot speak for the server: the broker drops its publish (read-only topics). Its PUBACK comes
        # after the broker routed it, so a marker the server sends afterwards arrives after it, had it been let in.
        a.c.publish("edgefleet/devices/dev-a", b"forged", qos=1).wait_for_publish(30)
        server.c.publish("edgefleet/devices/dev-a", b"2", qos=1)
        _until_received(a, ("edgefleet/devices/dev-a", b"2"))
        assert ("edgefleet/devices/dev-a", b"forged") not in a.received, a.received
    finally:
        for c in (a, snoop, server):
            c.close()


def _until_received(c: _Client, message: tuple[str, bytes]) -> None:
    deadline = time.monotonic() + 30
    while message not in c.received:
        assert time.monotonic() < deadline, (message, c.received)
        time.sleep(0.02)


@pytest.mark.parametrize(("user", "password"), [(None, None), ("dev-a", "wrong")])
def test_the_broker_refuses_anonymous_and_wrong_logins(
    acl_broker: tuple[int, dict[str, str]], user: str | None, password: str | None
) -> None:
    port, _ = acl_broker
    c = _Client(port, user, password)
    try:
        assert c.connected.wait(30)
        assert c.refused is not None and "authori" in str(c.refused).lower()
    finally:
        c.close()


# ------------------------------------------------------------------------------------------ without paho-mqtt

_NO_PAHO = """
import sys


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "paho":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


@pytest.mark.process
def test_mqtt_without_paho_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(_NO_PAHO)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH"))))}
    exe = str(Path(sys.executable).with_name("edgefleet"))
    args = ["--server", "http://127.0.0.1:1", "--data-dir", str(tmp_path / "d"), "--mqtt", "mqtt://127.0.0.1"]
    r = subprocess.run([exe, "agent", *args], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and INSTALL_HINT in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("payload", "spread"),
    [
        (nudge_payload(2.5), 2.5),
        (b"", 5.0),  # an older server: the agent's own default
        (b'{"spread_s": 0}', 0.0),
        (b'{"spread_s": 1e9}', 60.0),  # anyone the broker lets publish could send it: bounded
        (b'{"spread_s": -1}', 5.0),
        (b'{"spread_s": "3"}', 5.0),
        (b'{"spread_s": true}', 5.0),
        (b'{"spread_s": NaN}', 5.0),
        (b"[1]", 5.0),
        (b"\xff\xfe", 5.0),
        (b"{" * 300, 5.0),
    ],
)
def test_a_tier_nudge_names_its_spread_and_a_device_bounds_it(payload: bytes, spread: float) -> None:
    assert nudge_spread(payload, 5.0) == spread


def test_a_tier_nudge_spreads_the_whole_tier_over_the_rate(tmp_path: Path) -> None:
    """Past MAX_DEVICE_TOPICS, one message per tier whose spread is the woken tiers' size over the rate (every
    device of those tiers checks in, also those whose state did not move)."""
    from edgefleet.controlplane.db import Database, Device

    db = Database(f"sqlite:///{tmp_path / 'cp.db'}")
    db.migrate()
    with db.session() as s:
        for i in range(30):
            s.add(Device(id=f"d{i}", tier="rpi4" if i < 20 else "jetson", credential_hash=f"h{i}"))
    sent: list[tuple[str, bytes]] = []
    n = Nudger(lambda t, b: sent.append((t, b)), max_device_topics=5, rate=10.0)
    with db.session() as s:
        n.after_refresh(s, {f"d{i}": "1" for i in range(12)}, {f"d{i}": "2" for i in range(12)})
    assert sent == [("edgefleet/tiers/rpi4", nudge_payload(2.0))]
    sent.clear()
    with db.session() as s:  # two tiers woken by one write share the rate
        n.after_refresh(s, {f"d{i}": "1" for i in range(14, 26)}, {f"d{i}": "2" for i in range(14, 26)})
    assert sent == [("edgefleet/tiers/jetson", nudge_payload(3.0)), ("edgefleet/tiers/rpi4", nudge_payload(3.0))]
    assert spread_s(20, 10.0) == 2.0 and spread_s(5, 0) == 0.0
