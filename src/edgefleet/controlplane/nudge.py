"""Check-in nudges over MQTT (docs/controlplane.md, "Nudges over MQTT").

When a write changes devices' desired states, the server publishes an empty message to each changed device's
topic (``edgefleet/devices/{id}``), or, when more than :data:`MAX_DEVICE_TOPICS` changed at once (a rollback, a
group pin), one to each of their tiers' topics (``edgefleet/tiers/{tier}``): the devices then check in at once
instead of at their next poll. A nudge carries no state: the desired state still travels over HTTPS, under the
device's credential, and a lost nudge only means the device learns at its next poll. A tier's nudge names the
seconds its devices spread their check-ins over (tier size / :data:`NUDGE_RATE`, ``protocol.nudge_payload``).

Which topics to publish is pure (:func:`changed`, :func:`topics`); :class:`Nudger` gathers the facts (ETags
before and after a cache refresh, tiers) and hands topics to an injected ``publish``; :class:`MqttPublisher`, the
edge, is a paho-mqtt client in its own thread that reconnects by itself and drops nudges while the broker is away.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgefleet.config import ServerSettings, mqtt_broker
from edgefleet.controlplane.db import Device
from edgefleet.errors import UsageError
from edgefleet.protocol import nudge_payload

if TYPE_CHECKING:
    from edgefleet.controlplane.checkin_cache import Entry

__all__ = [
    "DEVICE_TOPIC",
    "INSTALL_HINT",
    "MAX_DEVICE_TOPICS",
    "NUDGE_RATE",
    "TIER_TOPIC",
    "MqttPublisher",
    "Nudger",
    "changed",
    "etags",
    "from_url",
    "spread_s",
    "topics",
]

log = logging.getLogger(__name__)

DEVICE_TOPIC = "edgefleet/devices/{}"
TIER_TOPIC = "edgefleet/tiers/{}"
# Beyond this many devices changed by one write, one message per tier: a rollback of ten thousand devices is a
# handful of publishes, and the devices of those tiers whose state did not change get a 304 from memory.
MAX_DEVICE_TOPICS = 100
# The check-ins per second a tier's nudge may bring on (the server setting): its devices spread theirs over tier
# size / rate seconds. One replica answered ~4,900/s on 2 cores (docs/scaling.md, "Measured").
NUDGE_RATE: float = ServerSettings.model_fields["nudge_rate"].default
INSTALL_HINT = "--mqtt needs the paho-mqtt package: pip install 'edgefleet[mqtt]'"
_FORBIDDEN = frozenset("+#/\0")  # wildcards and the level separator: such a name cannot be one topic level


def etags(entries: Mapping[str, Entry], ids: Iterable[str] | None = None) -> dict[str, str]:
    """The check-in cache's ETag per device (of ``ids``, or of every device it holds)."""
    if ids is None:
        return {k: e.etag for k, e in entries.items()}
    return {k: e.etag for k in ids if (e := entries.get(k)) is not None}


def changed(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Devices whose desired state moved: held before and after, with another ETag. A device new to the cache is
    left out — just enrolled (it is checking in right now), or a server's first load, which must not nudge the
    whole fleet."""
    return sorted(k for k, tag in after.items() if k in before and before[k] != tag)


def _level_ok(name: str) -> bool:
    return bool(name) and not (_FORBIDDEN & set(name))


def spread_s(devices: int, rate: float) -> float:
    """Seconds over which ``devices`` woken at once check in at ``rate`` per second."""
    return devices / rate if rate > 0 else 0.0


def topics(ids: Sequence[str], tier_of: Mapping[str, str], *, max_device_topics: int = MAX_DEVICE_TOPICS) -> list[str]:
    """The topics that nudge every device of ``ids``: one each, or past ``max_device_topics`` one per tier (a
    device whose tier is unknown or cannot be a topic level keeps its own topic)."""
    if len(ids) <= max_device_topics:
        return [DEVICE_TOPIC.format(i) for i in ids if _level_ok(i)]
    tiers: set[str] = set()
    own: list[str] = []
    for i in ids:
        tier = tier_of.get(i)
        if tier is not None and _level_ok(tier):
            tiers.add(tier)
        elif _level_ok(i):
            own.append(DEVICE_TOPIC.format(i))
    return [TIER_TOPIC.format(t) for t in sorted(tiers)] + own


class Nudger:
    """Publishes the nudges of one cache refresh. ``publish(topic)`` must not block and must be thread-safe: the
    refreshes run in the request and reconciler threads."""

    def __init__(
        self,
        publish: Callable[[str, bytes], None],
        *,
        max_device_topics: int = MAX_DEVICE_TOPICS,
        rate: float = NUDGE_RATE,
    ) -> None:
        self.publish = publish
        self.max_device_topics = max_device_topics
        self.rate = rate

    def after_refresh(self, s: Session, before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
        """Nudge the devices whose ETag moved; returns the topics published."""
        ids = changed(before, after)
        if not ids:
            return []
        tier_of: dict[str, str] = {}
        if len(ids) > self.max_device_topics:
            rows = s.execute(select(Device.id, Device.tier).where(Device.id.in_(ids)))
            tier_of = {row.id: row.tier for row in rows}
        out = topics(ids, tier_of, max_device_topics=self.max_device_topics)
        woken = [t.rsplit("/", 1)[1] for t in out if t.startswith(TIER_TOPIC.format(""))]
        sizes: dict[str, int] = {}
        if woken:  # every device of the tier checks in, also those whose state did not move
            rows = s.execute(select(Device.tier, func.count()).where(Device.tier.in_(woken)).group_by(Device.tier))
            sizes = {tier: int(n) for tier, n in rows}
        # the tiers of one write check in at the same time: their devices share the rate
        tier_body = nudge_payload(spread_s(sum(sizes.values()), self.rate))
        for t in out:
            body = tier_body if t.startswith(TIER_TOPIC.format("")) else b""
            try:
                self.publish(t, body)
            except Exception as exc:  # a nudge is a courtesy: the write it follows has committed already
                log.warning("MQTT nudge to %s failed: %s", t, exc)
        return out

    def close(self) -> None:
        close = getattr(self.publish, "close", None)
        if close is not None:
            close()


class MqttPublisher:
    """The edge: a paho-mqtt client in its own thread. ``__call__`` queues a QoS 0 message and returns; while the
    broker is away the message is dropped (the devices poll meanwhile), the client reconnects with backoff, and
    the outage is logged once."""

    def __init__(self, url: str, *, client_id: str = "") -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise UsageError(INSTALL_HINT) from None
        broker = mqtt_broker(url)
        self.where = f"{broker.host}:{broker.port}"
        self._lock = threading.Lock()
        self._down_logged = False
        self._closing = False
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        if broker.username is not None:
            self.client.username_pw_set(broker.username, broker.password)
        self.client.reconnect_delay_set(1, 60)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_down
        self.client.on_disconnect = self._on_disconnect
        self.client.connect_async(broker.host, broker.port, keepalive=30)
        self.client.loop_start()

    def _note_down(self, why: str) -> None:
        if self._closing:
            return
        with self._lock:
            first, self._down_logged = not self._down_logged, True
        if first:
            log.warning("MQTT broker %s unavailable (%s): devices learn changes at their next poll", self.where, why)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._note_down(str(reason))
            return
        with self._lock:
            was_down, self._down_logged = self._down_logged, False
        log.info("MQTT broker %s connected%s: publishing check-in nudges", self.where, " again" if was_down else "")

    def _on_down(self, client: Any, userdata: Any) -> None:
        self._note_down("cannot connect")

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._note_down(str(reason))

    def __call__(self, topic: str, payload: bytes = b"") -> None:
        self.client.publish(topic, payload, qos=0)

    def close(self) -> None:
        self._closing = True
        self.client.disconnect()
        self.client.loop_stop()


def from_url(url: str | None, *, rate: float = NUDGE_RATE) -> Nudger | None:
    """The server's nudger for ``--mqtt URL`` (None: no broker, nothing published)."""
    return Nudger(MqttPublisher(url), rate=rate) if url else None
