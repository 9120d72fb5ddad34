"""Prompts a crashed gateway left behind, adopted by a live gateway of its group.

A gateway keeps its MQTT session (``session_expiry_s``) so that a restart loses no prompt. A
gateway that crashes and does not come back leaves that session behind, and mosquitto keeps
handing the session its turn of every shared subscription it held: until the session
expires, that share of its applications' prompts waits there unanswered (half of them, with
two gateways).

So when a gateway's last will says it vanished (``GatewayStatus.lost``) and it is not back
after ``adopt_after_s``, one live gateway of its group (the first by name of those online)
takes its session over: it connects, under its own login, with the lost gateway's client id
(the will names it: ``GatewayStatus.session``; it is bound to the lost gateway's login, so
only those who read gateway statuses, gateways and the controller, know it), takes what
waits there, ends the session (the broker forgets its subscriptions), and publishes each
prompt again on its topic (which names its publisher), with its reply address, correlation
data and remaining expiry, where live gateways take it. A prompt that no gateway can take
then is answered ``unknown_app``; a prompt the broker kept retained is not published again
(it is never served). The borrowed connection never reconnects: a lost gateway that comes
back meanwhile takes its session back.

What the lost gateway had answered but not yet acknowledged is published again too: a client
may see a second final answer for such a prompt (``PromptClient`` keeps the first).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from moe2.shared import protocol as p
from moe2.shared.errors import BrokerError, Moe2Error, UnknownApp
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import BrokerConfig, Connection

log = logging.getLogger(__name__)

_QUIET_S = 0.5  # the adopted session has given what it held once it is quiet this long
_HOLD_MAX_S = 10.0  # and the session is given up after this at most
# Any session expiry > 0 resumes the lost gateway's session (no clean start); we end it when
# we let go.
_HOLD_EXPIRY_S = 60
# What a prompt carries besides its payload, published again as it came.
_KEPT_PROPERTIES = (
    "ResponseTopic",
    "CorrelationData",
    "MessageExpiryInterval",
    "ContentType",
    "PayloadFormatIndicator",
    "UserProperty",
)

Refuse = Callable[[Any, Moe2Error], None]


def session_name(gateway_id: str) -> str:
    """The name of a gateway's kept-session connection; its client id is this name bound to
    the gateway's login (``BrokerConfig.client_id``)."""
    return f"moe2-gateway-{gateway_id}"


class SessionAdopter:
    def __init__(
        self,
        gateway_id: str,
        group: str,
        broker: BrokerConfig,
        conn: Connection,
        fleet: FleetView,
        refuse: Refuse,
        adopt_after_s: float,
    ) -> None:
        self.id = gateway_id
        self.group = group
        self.broker = broker
        self.conn = conn  # ours: the prompts are published again on it
        self.fleet = fleet
        self.refuse = refuse
        self.adopt_after_s = adopt_after_s
        self._lock = threading.Lock()
        self._timers: dict[str, threading.Timer] = {}
        self._stopping = False

    def on_fleet_change(self, kind: str, key: tuple[str, ...], message: Any) -> None:
        """A FleetView listener: a gateway of our group vanished; adopt its session later."""
        if kind != "gateway" or message is None or not message.lost:
            return
        lost = key[0]
        if lost == self.id or message.group != self.group:
            return
        if not message.session:
            log.warning("gateway %s vanished without naming its session: not adopted", lost)
            return
        with self._lock:
            if self._stopping or lost in self._timers:
                return
            timer = threading.Timer(self.adopt_after_s, self._adopt_if_still_lost, (lost,))
            timer.daemon = True
            self._timers[lost] = timer
        timer.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            timers, self._timers = list(self._timers.values()), {}
        for t in timers:
            t.cancel()

    def _adopt_if_still_lost(self, lost: str) -> None:
        with self._lock:
            self._timers.pop(lost, None)
            if self._stopping:
                return
        status = self.fleet.copy().gateway.get(lost)
        if status is None or status.state != "offline" or not status.lost or not status.session:
            return  # back, or stopped since (a drained stop ends its session)
        name = session_name(lost)
        if status.session != name and not status.session.startswith(f"{name}."):
            log.warning("gateway %s names a session that is not its own: not adopted", lost)
            return
        ours = sorted(g for g, s in self.fleet.online_gateways().items() if s.group == self.group)
        if not ours or ours[0] != self.id:
            return  # another live gateway of the group adopts it
        try:
            held = self._take_session(status.session)
        except BrokerError as exc:
            log.warning("could not take over the session of lost gateway %s: %s", lost, exc)
            return
        prompts = [m for m in held if _is_prompt(m.topic) and m.payload and not m.retain]
        if prompts:
            log.warning(
                "gateway %s vanished with %d prompts waiting in its session: publishing them "
                "again for live gateways",
                lost,
                len(prompts),
            )
        for msg in prompts:
            self._publish_again(lost, msg)

    def _take_session(self, session: str) -> list[Any]:
        """Everything the lost gateway's session ``session`` (its client id) held (and got
        while we held it); the session is ended when we let go."""
        held: list[Any] = []
        arrived = threading.Condition()
        borrowed = Connection(
            self.broker,
            session,
            session_expiry_s=_HOLD_EXPIRY_S,
            reconnect=False,
            exact_client_id=True,  # its id, not one of ours
        )

        def keep(msg: Any) -> None:
            with arrived:
                held.append(msg)
                arrived.notify_all()
            borrowed.ack(msg)

        borrowed.on_unhandled = keep  # its subscriptions are none of ours
        borrowed.start()
        try:
            if not borrowed.session_present:
                return []  # expired already, or ended
            give_up = time.monotonic() + _HOLD_MAX_S
            with arrived:
                seen = -1
                while len(held) != seen and time.monotonic() < give_up:
                    seen = len(held)
                    arrived.wait(_QUIET_S)
        finally:
            borrowed.stop()  # DISCONNECT with session expiry 0: the broker drops the session
        with arrived:
            return list(held)

    def _publish_again(self, lost: str, msg: Any) -> None:
        props = Properties(PacketTypes.PUBLISH)
        got = msg.properties
        for name in _KEPT_PROPERTIES:
            value = getattr(got, name, None) if got is not None else None
            if value is not None:
                setattr(props, name, value)
        try:
            taken = self.conn.publish_acked(msg.topic, msg.payload, properties=props)
        except BrokerError as exc:
            self.refuse(
                msg,
                UnknownApp(
                    f"gateway {lost} vanished with this prompt and it could not be handed to "
                    f"another ({exc.message}); retry"
                ),
            )
            return
        if not taken:
            topic = p.topics.parse(msg.topic)
            app = topic.app if topic is not None else msg.topic
            self.refuse(
                msg,
                UnknownApp(
                    f"gateway {lost} vanished with this prompt and no other gateway serves "
                    f"application {app!r}"
                ),
            )


def _is_prompt(topic: str) -> bool:
    t = p.topics.parse(topic)
    return t is not None and t.kind == "prompt" and t.app is not None
