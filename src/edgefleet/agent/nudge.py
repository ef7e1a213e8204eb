"""Check-in nudges over MQTT, the device side (docs/agent.md, "Nudges over MQTT").

With ``--mqtt`` the agent subscribes to its own topic (``edgefleet/devices/{id}``) and its tier's
(``edgefleet/tiers/{tier}``) and checks in at once when a message arrives there, instead of at the end of its
check-in interval. A message carries nothing the agent reads: the desired state still comes over HTTPS with the
device's credential, so a forged or lost nudge costs one check-in or one poll interval, nothing else.

The paho-mqtt client runs in its own thread and hands each message to the event loop
(``call_soon_threadsafe``); it reconnects with backoff by itself, and a broker that is away is logged once while
the check-in loop polls as it always did. Each (re)subscription also counts as a nudge: whatever changed while
the agent was not subscribed is picked up by that check-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from edgefleet.config import mqtt_broker
from edgefleet.errors import UsageError
from edgefleet.protocol import nudge_spread

__all__ = ["INSTALL_HINT", "TIER_SPREAD_S", "NudgeListener", "require_paho", "sleep_or_nudge", "topics_for"]

log = logging.getLogger("edgefleet.agent")

INSTALL_HINT = "--mqtt needs the paho-mqtt package: pip install 'edgefleet[mqtt]'"
# A tier's nudge reaches every device of the tier at once: each waits a random part of the spread the nudge names
# (the server sizes it to the tier, protocol.nudge_spread), or of this long when it names none (an older server),
# so the control plane sees the check-ins spread out rather than as one burst.
TIER_SPREAD_S = 5.0
_FORBIDDEN = frozenset("+#/\0")


def require_paho() -> None:
    """Raise the one-line install hint when paho-mqtt is missing (checked before the agent starts)."""
    try:
        import paho.mqtt.client  # noqa: F401
    except ImportError:
        raise UsageError(INSTALL_HINT) from None


def topics_for(device_id: str, tier: str | None) -> list[str]:
    """The topics a device listens on: its own, and its tier's when the tier can be one topic level."""
    out = [f"edgefleet/devices/{device_id}"]
    if tier and not (_FORBIDDEN & set(tier)):
        out.append(f"edgefleet/tiers/{tier}")
    return out


async def sleep_or_nudge(sleep: Awaitable[None], nudged: asyncio.Event) -> bool:
    """Wait for ``sleep`` or a nudge, whichever comes first; True when nudged. The nudge is consumed, so one that
    arrives during the check-in that follows wakes the next wait at once."""
    if nudged.is_set():
        nudged.clear()
        if asyncio.iscoroutine(sleep):
            sleep.close()  # never awaited: close it so no "never awaited" warning is left behind
        return True
    timer = asyncio.ensure_future(sleep)
    woken = asyncio.ensure_future(nudged.wait())
    try:
        await asyncio.wait({timer, woken}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (timer, woken):
            if not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
    was = nudged.is_set()
    nudged.clear()
    return was


class NudgeListener:
    """Subscribes ``device_id`` to its topics on the broker of ``url`` and calls ``on_nudge`` on the event loop for
    each message (for a tier's, after a random delay of up to ``tier_spread_s``)."""

    def __init__(
        self,
        url: str,
        device_id: str,
        tier: str | None,
        on_nudge: Callable[[], None],
        *,
        loop: asyncio.AbstractEventLoop,
        tier_spread_s: float = TIER_SPREAD_S,
    ) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise UsageError(INSTALL_HINT) from None
        broker = mqtt_broker(url)
        self.device_id, self.tier = device_id, tier
        self.topics = topics_for(device_id, tier)
        self._host, self._port = broker.host, broker.port
        self.where = f"{broker.host}:{broker.port}"
        self._on_nudge, self._loop, self._spread = on_nudge, loop, tier_spread_s
        self._lock = threading.Lock()
        self._down_logged = False
        self._closing = False
        self.subscribed = threading.Event()  # the broker acknowledged the subscriptions (tests wait on it)
        # One session per device id: a second connection with it (the same device started twice) takes the
        # session over, as the broker would anyway. The username is the device id: the broker's ACL gives each
        # device its own topic by it (deploy/mosquitto/acl).
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgefleet-{device_id}")
        self.client.username_pw_set(broker.username or device_id, broker.password)
        self.client.reconnect_delay_set(1, 60)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def start(self) -> None:
        self.client.connect_async(self._host, self._port, keepalive=60)
        self.client.loop_start()

    def stop(self) -> None:
        self._closing = True
        self.client.disconnect()
        self.client.loop_stop()

    # ---------------------------------------------------------------- the client thread

    def _note_down(self, why: str) -> None:
        self.subscribed.clear()
        if self._closing:
            return
        with self._lock:
            first, self._down_logged = not self._down_logged, True
        if first:
            log.warning(
                "MQTT broker %s unavailable (%s): checking in on the interval until it is back", self.where, why
            )

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._note_down(str(reason))
            return
        # subscribed afresh on every connection: a clean session keeps no subscriptions across a reconnect
        client.subscribe([(t, 0) for t in self.topics])

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._note_down("cannot connect")

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._note_down(str(reason))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: list[Any], properties: Any) -> None:
        refused = [t for t, r in zip(self.topics, reasons, strict=False) if getattr(r, "is_failure", False)]
        with self._lock:
            was_down, self._down_logged = self._down_logged, False
        if refused:
            log.warning("MQTT broker %s refused the subscription to %s (its ACL)", self.where, ", ".join(refused))
        else:
            log.info("nudges over MQTT from %s%s", self.where, " again" if was_down else "")
        self.subscribed.set()
        # whatever changed before the subscription took hold is picked up by one check-in now
        self._hand_over(0.0)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        tier = message.topic.startswith("edgefleet/tiers/")
        spread = nudge_spread(bytes(message.payload or b""), self._spread) if tier else 0.0
        self._hand_over(random.uniform(0.0, spread) if spread > 0 else 0.0)

    def _hand_over(self, delay: float) -> None:
        def later() -> None:
            if delay > 0:
                self._loop.call_later(delay, self._on_nudge)
            else:
                self._on_nudge()

        with contextlib.suppress(RuntimeError):  # the event loop closed under a stopping agent
            self._loop.call_soon_threadsafe(later)
