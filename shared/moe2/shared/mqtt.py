"""MQTT plumbing both sides use: a connection with TCP_NODELAY and re-subscription on
reconnect, and a typed RPC client (MQTT 5 ResponseTopic + CorrelationData).

    with RpcClient(BrokerConfig(port=1883)) as rpc:
        rpc.use_codec(info)                                          # bin1 if it reads it
        reply = rpc.call("jetson-1", OpenRequest(prompt="Hello"))   # a DistributionReply
        print(reply.dist)

An agent answers on ``replies/<owner>/rpc/<agent>``: the topic names the replier, and the
client accepts a reply only on the topic of the agent it asked, with the unguessable
correlation data it sent. ``<owner>`` is the broker login (the ACL lets a user read exactly
``moe2/v1/replies/<user>/#``), or the client id on a broker without logins.

A ``Connection`` with ``session_expiry_s > 0`` keeps its MQTT session across disconnects and
restarts (clean_start false): QoS 1 messages published for it while it is away wait at the
broker, and messages it had not acknowledged are sent again. Handlers subscribed with
``manual_ack=True`` acknowledge a message themselves (``Connection.ack``) once they are done
with it, so a message whose work died with the process is delivered again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import socket
import ssl
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any, Literal, Protocol, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import BaseModel, ConfigDict, Field

from moe2.shared import protocol
from moe2.shared.errors import (
    BadMessage,
    BrokerError,
    Moe2Error,
    RequestTimeout,
    error_from_reply,
)
from moe2.shared.logins import bound_client_id
from moe2.shared.protocol.rpc import _Reply, _Request

R = TypeVar("R", bound=_Reply)

log = logging.getLogger(__name__)

Handler = Callable[[mqtt.MQTTMessage], None]

_REMEMBER_PUBACKS = 4096  # PUBACK results kept for publish_acked (message ids wrap at 65535)


class BrokerConfig(BaseModel):
    """Where the MQTT broker is and how to log in to it."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="MQTT broker host")
    port: int = Field(default=1883, ge=1, le=65535, description="MQTT broker port")
    username: str | None = Field(default=None, description="MQTT user name")
    password: str | None = Field(default=None, description="MQTT password")
    tls_ca: str | None = Field(default=None, description="CA file: enables TLS when set")
    tls_cert: str | None = Field(default=None, description="client certificate file (mTLS)")
    tls_key: str | None = Field(default=None, description="client key file (mTLS)")
    keepalive: int = Field(
        default=3,
        ge=1,
        le=3600,
        description="MQTT keepalive in seconds; the broker declares a silent client dead "
        "after 1.5x this, which is how fast a hung agent shows offline",
    )
    connect_timeout: float = Field(default=10.0, gt=0, description="seconds to wait for CONNACK")

    def owner(self, client_id: str) -> str:
        """Whose ``moe2/v1/replies/<owner>/`` subtree a client reads: its login, else its id."""
        return self.username if self.username else client_id

    def client_id(self, name: str) -> str:
        """The MQTT client id of this login's connection ``name``: one no other login can
        take over (``moe2.shared.logins``)."""
        return bound_client_id(self.username, self.password, name)


def _set_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    # Nagle's algorithm turns a 0.4 ms loopback round trip into 40-90 ms.
    with contextlib.suppress(OSError, AttributeError):  # websockets: nothing to tune
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Connection:
    """One MQTT 5 client with handlers per topic filter, re-subscribed after reconnects."""

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        *,
        will: tuple[str, bytes, bool] | None = None,
        session_expiry_s: int = 0,
        reconnect: bool = True,
        will_expiry_s: int | None = None,
        exact_client_id: bool = False,
    ) -> None:
        """``client_id`` is bound to the login (``BrokerConfig.client_id``) unless
        ``exact_client_id`` (another login's id, known on purpose: adopting a session).
        ``reconnect=False``: a connection lost stays lost (one that borrows another
        client's session must not take it back from its owner). ``will_expiry_s``: the
        broker forgets the last will (a retained one too) this many seconds after it
        published it."""
        self.broker = broker
        self.client_id = client_id if exact_client_id else broker.client_id(client_id)
        # 0: a clean session on every connect; > 0: the broker keeps our session (its
        # subscriptions and the QoS 1 messages for us) this many seconds after we disconnect.
        self.session_expiry_s = session_expiry_s
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,  # _on_message acknowledges, unless a handler does it itself
            reconnect_on_failure=reconnect,
        )
        self._client.on_socket_open = _set_nodelay
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(min_delay=1, max_delay=5)
        if broker.username is not None:
            self._client.username_pw_set(broker.username, broker.password)
        if broker.tls_ca is not None:
            self._client.tls_set(
                ca_certs=broker.tls_ca,
                certfile=broker.tls_cert,
                keyfile=broker.tls_key,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if will is not None:
            topic, payload, retain = will
            will_props = None
            if will_expiry_s is not None:
                will_props = _properties(PacketTypes.WILLMESSAGE)
                will_props.MessageExpiryInterval = will_expiry_s
            self._client.will_set(topic, payload, qos=1, retain=retain, properties=will_props)
        # (filter, match, qos, handler, subscription id, manual ack); handlers of one filter
        # share its id
        self._handlers: list[tuple[str, str, int, Handler, int, bool]] = []
        self._sub_ids: dict[str, int] = {}
        # A message whose subscription identifiers name no current handler: one a persistent
        # session kept from an earlier run of this client. None: acknowledge and drop it.
        self.on_unhandled: Handler | None = None
        self.session_present = False  # the broker resumed a stored session at the last CONNACK
        self._sent: list[mqtt.MQTTMessageInfo] = []  # recent publishes, for flush()
        self._sent_lock = threading.Lock()
        self._gone = threading.Event()  # set by on_disconnect
        self._session_up = False  # CONNACK received: subscribe at once (under _lock)
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._connack = threading.Event()  # a CONNACK that accepted us came (this start)
        self._arrived = 0  # messages received so far
        self._pending_subacks: set[int] = set()
        self._connect_error: str | None = None
        self._sessions = 0  # MQTT sessions begun so far: which one delivered a message
        self._delivered_in: dict[int, int] = {}  # id(message) -> session, until acknowledged
        self._retained_state: set[str] = set()  # filters to subscribe afresh on a resumed session
        self._as_published: set[str] = set()  # filters whose messages keep their retain flag
        self.on_connected: list[Callable[[], None]] = []  # after every (re)subscription
        self.on_session_start: list[Callable[[], None]] = []  # at CONNACK, before subscribing
        # PUBACK reason code values of recent QoS 1 publishes, by message id (bounded; the
        # values, not paho's ReasonCode objects: each of those carries a copy of the table
        # of every code's name, ~1 KB, which made 10,000 of them 35 MB of a gateway's RSS).
        self._puback = threading.Condition()
        self._puback_rc: OrderedDict[int, int] = OrderedDict()
        self._puback_futures: dict[int, Future[Any]] = {}  # publish_future's, by message id

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Connection:
        self._connack.clear()
        props = None
        if self.session_expiry_s > 0:
            props = _properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
        try:
            self._client.connect(
                self.broker.host,
                self.broker.port,
                keepalive=self.broker.keepalive,
                clean_start=self.session_expiry_s == 0,
                properties=props,
            )
        except OSError as exc:
            raise BrokerError(
                f"cannot reach the MQTT broker at {self.broker.host}:{self.broker.port}: {exc}"
            ) from None
        self._client.loop_start()
        if not self._connack.wait(self.broker.connect_timeout) or self._connect_error:
            self._client.loop_stop()
            reason = self._connect_error or "no CONNACK"
            raise BrokerError(
                f"MQTT broker at {self.broker.host}:{self.broker.port} did not accept us: {reason}"
            )
        # Each subscription is acknowledged after the retained messages of the ones before
        # it, which takes a while on a large fleet: wait as long as messages keep coming.
        seen = self._arrived
        while not self._connected.wait(self.broker.connect_timeout):
            if self._arrived == seen:
                self._client.loop_stop()
                raise BrokerError(
                    f"MQTT broker at {self.broker.host}:{self.broker.port} did not acknowledge "
                    f"our subscriptions within {self.broker.connect_timeout:g} s"
                )
            seen = self._arrived
        return self

    def stop(self, *, keep_session: bool = False, flush_s: float = 5.0) -> None:
        """Send what is still queued (QoS 1: until the broker has it, for up to ``flush_s``),
        then disconnect. A persistent session ends with it (the broker drops it at once)
        unless ``keep_session``: what we have finished with needs no redelivery."""
        self.flush(flush_s)
        props = None
        if self.session_expiry_s > 0 and not keep_session:
            props = _properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
        self._gone.clear()
        if self._client.disconnect(properties=props) == mqtt.MQTT_ERR_SUCCESS:
            self._gone.wait(2.0)  # the DISCONNECT is written before the loop stops
        self._client.loop_stop()

    def flush(self, timeout: float) -> bool:
        """Wait until every message published so far has left (QoS 0) or been acknowledged
        (QoS 1) while connected; False if some had not within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._sent_lock:
            pending = [i for i in self._sent if not _settled(i)]
            self._sent = pending
        for info in pending:
            while not _settled(info) and self.connected:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(min(left, 0.1))
        return all(_settled(i) for i in pending)

    def ack(self, msg: mqtt.MQTTMessage) -> None:
        """Acknowledge a message given to a ``manual_ack`` handler (QoS 0: nothing to do).
        A message delivered in an earlier MQTT session is not acknowledged in this one: its
        packet id means nothing here (or another message), and rumqttd drops a connection
        that acknowledges an id it did not send. (A resumed session redelivers with the same
        id, so there the acknowledgement stands.)"""
        with self._lock:
            session = self._delivered_in.pop(id(msg), self._sessions)
        if msg.qos > 0 and session == self._sessions:
            self._client.ack(msg.mid, msg.qos)

    def __enter__(self) -> Connection:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected and subscribed (after a broker restart, say)."""
        return self._connected.wait(timeout)

    # ------------------------------------------------------------------ pub/sub

    def subscribe(
        self,
        topic_filter: str,
        handler: Handler,
        qos: int = 1,
        *,
        manual_ack: bool = False,
        retained_state: bool = False,
        retain_as_published: bool = False,
    ) -> None:
        """Call ``handler`` for every message of ``topic_filter``. Each filter is its own
        SUBSCRIBE with an MQTT 5 subscription identifier, so a message is dispatched to the
        handlers of the subscription it was delivered for, even when filters overlap (a
        shared subscription and a plain one, say). With ``manual_ack`` the handler owns the
        acknowledgement of each message (``ack``); otherwise it is sent once handlers return.
        ``retained_state``: the filter's retained messages must come again on every
        reconnection, also when the broker resumed our session (rumqttd sends them only for a
        new subscription, so we unsubscribe first; mosquitto sends them on every SUBSCRIBE).
        ``retain_as_published`` (MQTT 5): a message published retained arrives with its
        retain flag set even when it is delivered live, so the handler can tell."""
        # A shared subscription "$share/<group>/<filter>" delivers messages whose topic
        # matches <filter>: the fallback dispatch (brokers without identifiers) uses that.
        match = topic_filter
        if topic_filter.startswith("$share/"):
            match = topic_filter.split("/", 2)[2]
        with self._lock:
            sub_id = self._sub_ids.get(topic_filter)
            new = sub_id is None
            if sub_id is None:
                sub_id = self._sub_ids[topic_filter] = _stable_sub_id(
                    topic_filter, set(self._sub_ids.values())
                )
            self._handlers.append((topic_filter, match, qos, handler, sub_id, manual_ack))
            if retained_state:
                self._retained_state.add(topic_filter)
            if retain_as_published:
                self._as_published.add(topic_filter)
            if self._session_up and new:
                self._client.subscribe(
                    topic_filter,
                    options=self._options(topic_filter, qos),
                    properties=_sub_props(sub_id),
                )

    def _options(self, topic_filter: str, qos: int) -> SubscribeOptions:
        return SubscribeOptions(qos=qos, retainAsPublished=topic_filter in self._as_published)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._handlers = [h for h in self._handlers if h[0] != topic_filter]
            known = self._sub_ids.pop(topic_filter, None) is not None
            if self._session_up and known:
                self._client.unsubscribe(topic_filter)

    def unsubscribe_raw(self, topic_filter: str) -> None:
        """Drop a subscription we have no handler for (one a persistent session kept from
        an earlier run of this client)."""
        with self._lock:
            if topic_filter not in self._sub_ids and self._session_up:
                self._client.unsubscribe(topic_filter)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo:
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        with self._sent_lock:  # for flush(): what stop() must not cut off
            if len(self._sent) >= 256:
                self._sent = [i for i in self._sent if not _settled(i)]
            self._sent.append(info)
        return info

    def publish_acked(
        self,
        topic: str,
        payload: bytes | str,
        *,
        retain: bool = False,
        properties: Properties | None = None,
        timeout: float = 10.0,
    ) -> bool:
        """Publish at QoS 1 and wait for the broker's PUBACK. Returns False when the broker
        says no subscriber matched (MQTT 5 reason 0x10), so nobody will see the message.
        Raises BrokerError when the broker does not acknowledge within ``timeout``."""
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")
        with self._puback:
            got = self._puback.wait_for(lambda: info.mid in self._puback_rc, timeout)
            rc = self._puback_rc.pop(info.mid, None)
        if not got:
            raise BrokerError(f"the broker did not acknowledge a message within {timeout:g} s")
        if rc == 0x10:  # no matching subscribers
            return False
        if rc is not None and rc >= 0x80:  # MQTT 5: reason codes from 0x80 are failures
            name = ReasonCode(PacketTypes.PUBACK, identifier=rc)
            raise BrokerError(f"the broker refused the message on {topic}: {name}")
        return True

    def publish_future(
        self, topic: str, payload: bytes | str, *, properties: Properties | None = None
    ) -> Future[bool]:
        """``publish_acked`` without blocking, for event loops: a future that becomes True
        at the broker's PUBACK, False when it says no subscriber matched, or BrokerError when
        it refuses the message. The caller bounds the wait (``asyncio.wait_for`` on
        ``asyncio.wrap_future``) and cancels the future when it gives up."""
        fut: Future[bool] = Future()
        info = self._client.publish(topic, payload, qos=1, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            fut.set_exception(
                BrokerError(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")
            )
            return fut
        with self._puback:
            if info.mid in self._puback_rc:  # the PUBACK came already
                _settle(fut, topic, self._puback_rc.pop(info.mid))
            else:
                self._puback_futures[info.mid] = fut
                fut.add_done_callback(lambda _f: self._forget_puback(info.mid, fut))
        return fut

    def _forget_puback(self, mid: int, fut: Future[Any]) -> None:
        with self._puback:
            if self._puback_futures.get(mid) is fut:
                del self._puback_futures[mid]

    # ------------------------------------------------------------------ callbacks

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            self._connect_error = str(rc)
            self._connack.set()
            log.error("MQTT connection refused: %s", rc)
            return
        self._connect_error = None
        self._connack.set()
        self.session_present = bool(getattr(flags, "session_present", False))
        if not self.session_present:
            with self._lock:
                self._sessions += 1
                self._delivered_in.clear()  # none of those can be acknowledged any more
        for hook in list(self.on_session_start):
            try:
                hook()
            except Exception:
                log.exception("on_session_start hook failed")
        with self._lock:
            self._session_up = True
            subs = {f: (q, sid) for f, _, q, _, sid, _ in self._handlers}
            if not subs:
                self._pending_subacks = set()
            else:
                if self.session_present:
                    # A resumed session keeps its subscriptions, and rumqttd sends retained
                    # messages only for a new one; it also ignores an UNSUBSCRIBE of a filter
                    # this connection has not subscribed yet: subscribe, unsubscribe, then
                    # subscribe below (mosquitto sends the retained messages twice: harmless).
                    for f in sorted(self._retained_state & subs.keys()):
                        q, sid = subs[f]
                        client.subscribe(f, options=self._options(f, q), properties=_sub_props(sid))
                        client.unsubscribe(f)
                # We count as connected only once the broker has acknowledged every
                # subscription, so nothing published to us after start() returns is missed.
                mids = (
                    client.subscribe(f, options=self._options(f, q), properties=_sub_props(sid))[1]
                    for f, (q, sid) in subs.items()
                )
                self._pending_subacks = {m for m in mids if m is not None}
        if not subs:
            self._ready()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, props: Any
    ) -> None:
        for rc in reason_codes:
            if getattr(rc, "is_failure", False):
                log.error("broker refused a subscription (message %d): %s", mid, rc)
        with self._lock:
            if mid not in self._pending_subacks:
                return
            self._pending_subacks.discard(mid)
            done = not self._pending_subacks
        if done:
            self._ready()

    def _ready(self) -> None:
        for hook in list(self.on_connected):
            try:
                hook()
            except Exception:
                log.exception("on_connected hook failed")
        self._connected.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        with self._lock:
            self._session_up = False
        self._connected.clear()
        self._gone.set()
        if rc != 0:
            log.warning("MQTT connection lost (%s); reconnecting", rc)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any
    ) -> None:
        with self._puback:
            code = int(getattr(rc, "value", rc))
            fut = self._puback_futures.pop(mid, None)
            if fut is not None:
                _settle(fut, "", code)
                return
            self._puback_rc[mid] = code
            while len(self._puback_rc) > _REMEMBER_PUBACKS:
                self._puback_rc.popitem(last=False)
            self._puback.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._arrived += 1
        if msg.qos > 0:
            with self._lock:
                self._delivered_in[id(msg)] = self._sessions  # see ack()
        ids = getattr(msg.properties, "SubscriptionIdentifier", None) if msg.properties else None
        with self._lock:
            if ids:
                chosen = [(h, m) for _, _, _, h, sid, m in self._handlers if sid in ids]
            else:
                chosen = [
                    (h, m)
                    for _, match, _, h, _, m in self._handlers
                    if mqtt.topic_matches_sub(match, msg.topic)
                ]
        manual = any(m for _, m in chosen)
        handlers = [h for h, _ in chosen]
        if not handlers and self.on_unhandled is not None:
            handlers, manual = [self.on_unhandled], True
        for handler in handlers:
            try:
                handler(msg)
            except Exception:  # a bad message must never take the network loop down
                log.exception("handler for %s failed", msg.topic)
        if not manual:
            self.ack(msg)


def _settle(fut: Future[bool], topic: str, rc: int) -> None:
    """Resolve a ``publish_future`` from its PUBACK reason code value (as ``publish_acked``
    reads it)."""
    if fut.done():
        return
    with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
        if rc == 0x10:  # no matching subscribers
            fut.set_result(False)
        elif rc >= 0x80:  # MQTT 5: reason codes from 0x80 are failures
            where = f" on {topic}" if topic else ""
            name = ReasonCode(PacketTypes.PUBACK, identifier=rc)
            fut.set_exception(BrokerError(f"the broker refused the message{where}: {name}"))
        else:
            fut.set_result(True)


def _settled(info: mqtt.MQTTMessageInfo) -> bool:
    """Sent (QoS 0) or acknowledged (QoS 1), or failed for good: nothing more to wait for."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):  # failed: not connected, queue full...
        return True


def _stable_sub_id(topic_filter: str, taken: set[int]) -> int:
    """A subscription identifier that depends on the filter alone, so a session the broker
    kept from an earlier run of this client names the same filter with the same id."""
    sub_id = zlib.crc32(topic_filter.encode()) % 268_435_455 + 1  # MQTT 5: 1 .. 2^28 - 1
    while sub_id in taken:
        sub_id = sub_id % 268_435_455 + 1
    return sub_id


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho is untyped here


def _sub_props(sub_id: int) -> Properties:
    props = _properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = sub_id
    return props


# MQTT 5 user property naming the QoS a requester wants its reply at. The delivered QoS does
# not say: rumqttd (the embedded broker) delivers a QoS 0 request at the subscription's QoS 1,
# against MQTT's min(publish, subscription), and forwards QoS 1 messages ~44 ms late, so a
# reply at the delivered QoS would cost a gateway ~44 ms per token there.
REPLY_QOS = "moe2-reply-qos"
# MQTT 5 user property naming the RPC client that sent a request (its client id; the owner
# is the ``replies/<owner>/`` level of the ResponseTopic): the agent drops the work and frees
# the sessions of a requester whose RequesterStatus says it is gone.
REQUESTER = "moe2-requester"


def response_properties(
    response_topic: str,
    correlation: bytes,
    reply_qos: int | None = None,
    *,
    requester: str | None = None,
    expiry_s: float | None = None,
) -> Properties:
    """``expiry_s``: the broker discards the request if it cannot deliver it this soon (MQTT
    5 message expiry, whole seconds, rounded up)."""
    props = _properties(PacketTypes.PUBLISH)
    props.ResponseTopic = response_topic
    props.CorrelationData = correlation
    pairs = []
    if reply_qos is not None:
        pairs.append((REPLY_QOS, str(reply_qos)))
    if requester is not None:
        pairs.append((REQUESTER, requester))
    if pairs:
        props.UserProperty = pairs
    if expiry_s is not None:
        props.MessageExpiryInterval = max(1, math.ceil(expiry_s))
    return props


def requester_of(msg: mqtt.MQTTMessage) -> str | None:
    """The requester a request names: ``<owner>/<client id>``, or None when it does not say.
    The owner is the ``replies/<owner>/`` level of its ResponseTopic: the login that reads the
    answer, and the only one the broker lets publish on ``requesters/<owner>/`` (so only
    that login's ``gone`` drops the request)."""
    props = msg.properties
    pairs = getattr(props, "UserProperty", None) if props else None
    client = next((v for k, v in pairs or () if k == REQUESTER), None)
    topic = getattr(props, "ResponseTopic", None) if props else None
    parsed = protocol.topics.parse(topic) if topic else None
    if client is None or parsed is None or parsed.kind != "reply" or parsed.client is None:
        return None
    return f"{parsed.client}/{client}"


def reply_qos(msg: mqtt.MQTTMessage) -> int:
    """The QoS to answer a request at: the delivered one, or lower when the requester asks."""
    pairs = getattr(msg.properties, "UserProperty", None) if msg.properties else None
    for key, value in pairs or ():
        if key == REPLY_QOS and value in ("0", "1"):
            return min(int(value), msg.qos)
    return min(msg.qos, 1)


def reply_properties(correlation: bytes | None) -> Properties | None:
    if correlation is None:
        return None
    props = _properties(PacketTypes.PUBLISH)
    props.CorrelationData = correlation
    return props


class RpcTransport(Protocol):
    """What ``RpcClient`` needs of a connection: a ``Connection``, or in tests a transport
    that answers without a broker (``moe2.shared.mocktransport.MockTransport``)."""

    on_connected: list[Callable[[], None]]

    def start(self) -> object: ...

    def stop(self) -> None: ...

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None: ...

    @property
    def connected(self) -> bool: ...

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> object: ...


# How long the broker keeps a ``gone`` RequesterStatus (the last will's, or a clean close's)
# before forgetting it, seconds: long enough for agents that were away to see it.
_GONE_EXPIRY_S = 60
# Calls whose deadline passed this long ago are failed (a call nobody waits on, such as a
# close, would otherwise stay pending forever when its reply is lost), seconds.
_EXPIRED_GRACE_S = 1.0


class RpcFuture(Future[R]):
    """The future of one call: its reply, or the matching ``Moe2Error``. ``deadline`` is the
    time.monotonic() value the request carries as its ``timeout_ms``."""

    deadline: float = math.inf


class _Call:
    """A call waiting for its reply (and what it takes to send it again)."""

    __slots__ = ("agent", "codec", "future", "payload", "reply_type", "request")

    def __init__(
        self,
        agent: str,
        reply_type: type[_Reply] | None,
        future: RpcFuture[Any],
        request: _Request[Any] | None,
        payload: bytes | None,
        codec: str,
    ) -> None:
        self.agent, self.reply_type, self.future = agent, reply_type, future
        self.request, self.payload, self.codec = request, payload, codec


class RpcClient:
    """Typed request/response over MQTT 5 to agents' ``rpc`` topics; thread-safe.

    ``call_async`` returns a Future of the request's reply type, so a gateway can ask k
    experts at once and wait for all; an error reply resolves it with the matching
    ``Moe2Error``.

    Every request carries its deadline (``timeout_ms``): the ``deadline`` a call names
    (time.monotonic()), else the client's ``timeout`` from now. The agent drops a request
    whose deadline passed, so nothing is computed for a caller that stopped waiting; ``wait``
    waits until the call's deadline unless told otherwise, and a call nobody waits for fails
    with ``RequestTimeout`` soon after its deadline.

    After a reconnect (a broker restart, a network blip) every call still waiting is sent
    again, with the time it has left: a request or its reply may have been lost with the
    connection. Requests must bear that (a step names the history length it extends:
    ``StepRequest.rewind_to``); a reply that comes twice counts once.

    The client announces itself retained on ``requesters/<owner>/<client id>`` (``online``
    at every connection; ``gone`` when it closes, and by its last will when it dies), and
    names itself in every request: agents drop the queued work and free the sessions of a
    requester that is gone.
    """

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str | None = None,
        *,
        timeout: float = 30.0,
        qos: int = 1,
        transport: RpcTransport | None = None,  # default: a Connection to ``broker``
    ) -> None:
        self.client_id = client_id or f"rpc-{uuid.uuid4().hex[:12]}"
        self.owner = broker.owner(self.client_id)  # replies/<owner>/rpc/<agent>
        self.timeout = timeout
        self.qos = qos
        try:
            self._presence: str | None = protocol.topics.requester(self.owner, self.client_id)
        except BadMessage:  # a login that cannot be a topic level: no presence, no harm
            self._presence = None
        will = None
        if self._presence is not None:
            will = (self._presence, self._status("gone"), True)
        self._conn: RpcTransport = (
            transport
            if transport is not None
            else Connection(broker, self.client_id, will=will, will_expiry_s=_GONE_EXPIRY_S)
        )
        self._pending: dict[bytes, _Call] = {}  # correlation -> the call
        self._lock = threading.Lock()
        self._next_sweep = 0.0
        self._closed = threading.Event()
        self._sweeper = threading.Thread(
            target=self._sweep_until_closed, name="rpc-sweep", daemon=True
        )
        self.codecs: dict[str, str] = {}  # agent -> payload codec of requests to it
        self.rejected_replies = 0  # from an agent that was not asked, or malformed
        self.resent = 0  # calls sent again after a reconnect
        self.expired = 0  # calls failed at their deadline without anyone waiting
        self._connections = 0
        self._conn.subscribe(
            protocol.topics.rpc_replies(self.owner),
            self._on_reply,
            qos=qos,
        )
        self._conn.on_connected.append(self._on_connected)

    def _status(self, state: Literal["online", "gone"]) -> bytes:
        status = protocol.RequesterStatus(client_id=self.client_id, state=state, since=time.time())
        return protocol.encode(status)

    def start(self) -> RpcClient:
        self._conn.start()
        if not self._sweeper.is_alive() and not self._closed.is_set():
            self._sweeper.start()
        return self

    def _sweep_until_closed(self) -> None:
        """A call fails soon after its deadline even when nothing else is sent: whoever
        chains work on its future (a vocabulary fetch, say) learns it failed."""
        while not self._closed.wait(_EXPIRED_GRACE_S):
            try:
                self._sweep()
            except Exception:  # a callback's bug must not stop the sweeping
                log.exception("failing expired RPC calls")

    def close(self) -> None:
        self._closed.set()
        if self._presence is not None and self._conn.connected:
            props = _properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = _GONE_EXPIRY_S
            with contextlib.suppress(RuntimeError, ValueError):
                self._conn.publish(
                    self._presence, self._status("gone"), retain=True, properties=props
                )
        self._conn.stop()
        with self._lock:
            pending, self._pending = self._pending, {}
        for call in pending.values():
            with contextlib.suppress(InvalidStateError):  # answered meanwhile
                call.future.set_exception(RequestTimeout("RPC client closed before the reply came"))

    def __enter__(self) -> RpcClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connection(self) -> RpcTransport:
        return self._conn

    def _send(
        self,
        agent_id: str,
        reply_type: type[_Reply] | None,
        deadline: float,
        request: _Request[Any] | None = None,
        payload: bytes | None = None,
        codec: str = "json",
    ) -> RpcFuture[Any]:
        corr = secrets.token_bytes(16)  # unguessable: a forged reply cannot match it
        fut: RpcFuture[Any] = RpcFuture()
        fut.deadline = deadline
        call = _Call(agent_id, reply_type, fut, request, payload, codec)
        with self._lock:
            self._pending[corr] = call
        fut.add_done_callback(lambda _f: self._forget(corr))
        self._publish(corr, call)
        self._sweep()
        return fut

    def _publish(self, corr: bytes, call: _Call) -> None:
        left = call.future.deadline - time.monotonic()
        payload = call.payload
        if call.request is not None:
            timeout_ms = min(max(left, 0.001) * 1e3, protocol.rpc.MAX_TIMEOUT_MS)
            payload = protocol.encode_rpc(
                call.request.model_copy(update={"timeout_ms": timeout_ms}), call.codec
            )
        assert payload is not None
        self._conn.publish(
            protocol.topics.agent_rpc(call.agent),
            payload,
            qos=self.qos,
            properties=response_properties(
                protocol.topics.rpc_reply(self.owner, call.agent),
                corr,
                self.qos,
                requester=self.client_id,
                expiry_s=left if math.isfinite(left) and left > 0 else None,
            ),
        )

    def _sweep(self) -> None:
        """Fail the calls whose deadline passed a while ago (nobody waits on them now)."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + _EXPIRED_GRACE_S
        with self._lock:
            late = [
                c.future
                for c in self._pending.values()
                if c.future.deadline + _EXPIRED_GRACE_S < now
            ]
        for fut in late:
            with contextlib.suppress(InvalidStateError):
                fut.set_exception(RequestTimeout("no reply before the call's deadline"))
                self.expired += 1

    def _on_connected(self) -> None:
        """On every connect: say we are here; after the first, send the calls still waiting
        again."""
        self._connections += 1
        if self._presence is not None:
            self._conn.publish(self._presence, self._status("online"), retain=True)
        if self._connections > 1:
            self.resend()

    def resend(self, agent_id: str | None = None) -> int:
        """Send the calls still waiting (on ``agent_id``, or on every agent) again, with the
        time they have left: after a reconnect of ours, or when an agent is back online (its
        subscription was gone while it was away, so what we sent meanwhile reached nobody).
        A call whose deadline has passed fails instead (``RequestTimeout``)."""
        now = time.monotonic()
        with self._lock:
            again = [
                (c, call)
                for c, call in self._pending.items()
                if agent_id is None or call.agent == agent_id
            ]
        sent = 0
        for corr, call in again:
            if call.future.deadline <= now:
                with contextlib.suppress(InvalidStateError):
                    call.future.set_exception(RequestTimeout("no reply before the call's deadline"))
                continue
            self._publish(corr, call)
            sent += 1
        self.resent += sent
        if sent:
            log.info("sent %d waiting RPC calls again", sent)
        return sent

    def send_raw(self, agent_id: str, payload: bytes, timeout: float | None = None) -> Future[Any]:
        """Send an already encoded (possibly invalid) request as it is; for tests and tools."""
        t = self.timeout if timeout is None else timeout
        return self._send(agent_id, None, time.monotonic() + t, payload=payload)

    def use_codec(self, agent: protocol.AgentInfo, preferred: str = "bin1") -> str:
        """Talk to ``agent`` in ``preferred`` when it announces it reads it, else JSON; the
        agent answers in the codec it was asked in."""
        codec = preferred if preferred in agent.codecs else "json"
        self.codecs[agent.agent_id] = codec
        return codec

    def call_async(
        self,
        agent_id: str,
        request: _Request[R],
        *,
        deadline: float | None = None,
        timeout: float | None = None,
    ) -> Future[R]:
        """Send ``request``; its deadline is ``deadline`` (time.monotonic()), else ``timeout``
        (default: the client's) from now."""
        if deadline is None:
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        codec = self.codecs.get(agent_id, "json")
        return self._send(agent_id, type(request).reply_type(), deadline, request, codec=codec)

    def wait(self, fut: Future[R], timeout: float | None = None) -> R:
        """The reply of a call; raises the matching Moe2Error for error replies. Waits until
        the call's deadline, or ``timeout`` seconds when given."""
        if timeout is not None:
            t = timeout
        elif isinstance(fut, RpcFuture) and math.isfinite(fut.deadline):
            t = max(0.0, fut.deadline - time.monotonic())
        else:
            t = self.timeout
        try:
            return fut.result(timeout=t)
        except TimeoutError:
            fut.cancel()
            raise RequestTimeout(f"no reply within {t:.1f} s") from None

    def call(
        self,
        agent_id: str,
        request: _Request[R],
        timeout: float | None = None,
        *,
        deadline: float | None = None,
    ) -> R:
        """``call_async`` and ``wait``: the reply within ``timeout`` (or by ``deadline``)."""
        fut = self.call_async(agent_id, request, deadline=deadline, timeout=timeout)
        return self.wait(fut)

    def fail_agent(self, agent_id: str, error: Exception) -> int:
        """Fail every call waiting on ``agent_id`` with ``error`` (its last will said it is
        offline: nobody will answer them). Returns how many were waiting."""
        with self._lock:
            waiting = [c.future for c in self._pending.values() if c.agent == agent_id]
        for fut in waiting:
            with contextlib.suppress(InvalidStateError):  # answered meanwhile
                fut.set_exception(error)
        return len(waiting)

    def pending(self, agent_id: str | None = None) -> int:
        """Calls waiting for a reply (from ``agent_id``, or from any agent)."""
        with self._lock:
            return sum(1 for c in self._pending.values() if agent_id in (None, c.agent))

    def _forget(self, corr: bytes) -> None:
        with self._lock:
            self._pending.pop(corr, None)

    def _on_reply(self, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        topic = protocol.topics.parse(msg.topic)
        replier = topic.rest[1] if topic is not None and len(topic.rest) == 2 else None
        with self._lock:
            call = self._pending.get(bytes(corr)) if corr is not None else None
            if call is None or call.agent != replier:
                self.rejected_replies += call is not None
                return  # a late reply to a call that timed out, or not from the agent asked
        fut, reply_type = call.future, call.reply_type
        if fut.done():
            return
        outcome: Any
        try:
            reply = protocol.decode_reply(msg.payload)
        except Moe2Error as exc:  # malformed, another schema version, too large
            outcome = exc
        else:
            if isinstance(reply, protocol.ErrorReply):
                after = reply.error.retry_after_ms
                outcome = error_from_reply(
                    reply.error.code,
                    reply.error.message,
                    retry_after_s=after / 1e3 if after is not None else None,
                )
            elif reply_type is not None and not isinstance(reply, reply_type):
                outcome = BadMessage(
                    f"agent {replier} answered {reply.op!r} to a {reply_type.__name__}"
                )
            else:
                outcome = reply
        with contextlib.suppress(InvalidStateError):  # failed meanwhile (agent offline)
            if isinstance(outcome, BaseException):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome)
