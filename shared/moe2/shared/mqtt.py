"""MQTT plumbing both sides use: a connection with TCP_NODELAY and re-subscription on
reconnect, and a typed RPC client (MQTT 5 ResponseTopic + CorrelationData).

    with RpcClient(BrokerConfig(port=1883)) as rpc:
        rpc.use_codec(info)                                          # bin1 if it reads it
        reply = rpc.call("jetson-1", OpenRequest(prompt="Hello"))   # a DistributionReply
        print(reply.dist)

An agent answers on ``replies/<client>/rpc/<agent>``: the topic names the replier, and the
client accepts a reply only on the topic of the agent it asked, with the unguessable
correlation data it sent.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import ssl
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field

from moe2.shared import protocol
from moe2.shared.errors import BadMessage, BrokerError, RequestTimeout, error_from_reply
from moe2.shared.protocol.rpc import _Reply, _Request

R = TypeVar("R", bound=_Reply)

log = logging.getLogger(__name__)

Handler = Callable[[mqtt.MQTTMessage], None]


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
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
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
            self._client.will_set(topic, payload, qos=1, retain=retain)
        # (filter, match, qos, handler, subscription id); handlers of one filter share its id
        self._handlers: list[tuple[str, str, int, Handler, int]] = []
        self._sub_ids: dict[str, int] = {}
        self._next_sub_id = 1
        self._session_up = False  # CONNACK received: subscribe at once (under _lock)
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._pending_subacks: set[int] = set()
        self._connect_error: str | None = None
        self.on_connected: list[Callable[[], None]] = []  # after every (re)subscription
        self.on_session_start: list[Callable[[], None]] = []  # at CONNACK, before subscribing
        # PUBACK reason codes of recent QoS 1 publishes, by message id (bounded).
        self._puback = threading.Condition()
        self._puback_rc: OrderedDict[int, Any] = OrderedDict()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Connection:
        try:
            self._client.connect(
                self.broker.host,
                self.broker.port,
                keepalive=self.broker.keepalive,
                clean_start=True,
            )
        except OSError as exc:
            raise BrokerError(
                f"cannot reach the MQTT broker at {self.broker.host}:{self.broker.port}: {exc}"
            ) from None
        self._client.loop_start()
        if not self._connected.wait(self.broker.connect_timeout):
            self._client.loop_stop()
            reason = self._connect_error or "no CONNACK"
            raise BrokerError(
                f"MQTT broker at {self.broker.host}:{self.broker.port} did not accept us: {reason}"
            )
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Connection:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # ------------------------------------------------------------------ pub/sub

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Call ``handler`` for every message of ``topic_filter``. Each filter is its own
        SUBSCRIBE with an MQTT 5 subscription identifier, so a message is dispatched to the
        handlers of the subscription it was delivered for, even when filters overlap (a
        shared subscription and a plain one, say)."""
        # A shared subscription "$share/<group>/<filter>" delivers messages whose topic
        # matches <filter>: the fallback dispatch (brokers without identifiers) uses that.
        match = topic_filter
        if topic_filter.startswith("$share/"):
            match = topic_filter.split("/", 2)[2]
        with self._lock:
            sub_id = self._sub_ids.get(topic_filter)
            new = sub_id is None
            if sub_id is None:
                sub_id = self._sub_ids[topic_filter] = self._next_sub_id
                self._next_sub_id += 1
            self._handlers.append((topic_filter, match, qos, handler, sub_id))
            if self._session_up and new:
                self._client.subscribe(topic_filter, qos=qos, properties=_sub_props(sub_id))

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._handlers = [h for h in self._handlers if h[0] != topic_filter]
            known = self._sub_ids.pop(topic_filter, None) is not None
            if self._session_up and known:
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
        return self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

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
        if rc is not None and getattr(rc, "value", 0) == 0x10:  # no matching subscribers
            return False
        if rc is not None and getattr(rc, "is_failure", False):
            raise BrokerError(f"the broker refused the message on {topic}: {rc}")
        return True

    # ------------------------------------------------------------------ callbacks

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            self._connect_error = str(rc)
            log.error("MQTT connection refused: %s", rc)
            return
        for hook in list(self.on_session_start):
            try:
                hook()
            except Exception:
                log.exception("on_session_start hook failed")
        with self._lock:
            self._session_up = True
            subs = {f: (q, sid) for f, _, q, _, sid in self._handlers}
            if not subs:
                self._pending_subacks = set()
            else:
                # We count as connected only once the broker has acknowledged every
                # subscription, so nothing published to us after start() returns is missed.
                mids = (
                    client.subscribe(f, qos=q, properties=_sub_props(sid))[1]
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
        if rc != 0:
            log.warning("MQTT connection lost (%s); reconnecting", rc)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any
    ) -> None:
        with self._puback:
            self._puback_rc[mid] = rc
            while len(self._puback_rc) > 10_000:
                self._puback_rc.popitem(last=False)
            self._puback.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        ids = getattr(msg.properties, "SubscriptionIdentifier", None) if msg.properties else None
        with self._lock:
            if ids:
                handlers = [h for _, _, _, h, sid in self._handlers if sid in ids]
            else:
                handlers = [
                    h
                    for _, match, _, h, _ in self._handlers
                    if mqtt.topic_matches_sub(match, msg.topic)
                ]
        for handler in handlers:
            try:
                handler(msg)
            except Exception:  # a bad message must never take the network loop down
                log.exception("handler for %s failed", msg.topic)


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho is untyped here


def _sub_props(sub_id: int) -> Properties:
    props = _properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = sub_id
    return props


def response_properties(response_topic: str, correlation: bytes) -> Properties:
    props = _properties(PacketTypes.PUBLISH)
    props.ResponseTopic = response_topic
    props.CorrelationData = correlation
    return props


def reply_properties(correlation: bytes | None) -> Properties | None:
    if correlation is None:
        return None
    props = _properties(PacketTypes.PUBLISH)
    props.CorrelationData = correlation
    return props


class RpcClient:
    """Typed request/response over MQTT 5 to agents' ``rpc`` topics; thread-safe.

    ``call_async`` returns a Future of the request's reply type, so a gateway can ask k
    experts at once and wait for all; an error reply resolves it with the matching
    ``Moe2Error``.
    """

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str | None = None,
        *,
        timeout: float = 30.0,
        qos: int = 1,
    ) -> None:
        self.client_id = client_id or f"rpc-{uuid.uuid4().hex[:12]}"
        self.timeout = timeout
        self.qos = qos
        self._conn = Connection(broker, self.client_id)
        # correlation -> (the agent asked, the reply type expected, the future)
        self._pending: dict[bytes, tuple[str, type[_Reply] | None, Future[Any]]] = {}
        self._lock = threading.Lock()
        self.codecs: dict[str, str] = {}  # agent -> payload codec of requests to it
        self.rejected_replies = 0  # from an agent that was not asked, or malformed
        self._conn.subscribe(
            protocol.topics.rpc_replies(self.client_id),
            self._on_reply,
            qos=qos,
        )

    def start(self) -> RpcClient:
        self._conn.start()
        return self

    def close(self) -> None:
        self._conn.stop()
        with self._lock:
            pending, self._pending = self._pending, {}
        for _agent, _rt, fut in pending.values():
            if not fut.done():
                fut.set_exception(RequestTimeout("RPC client closed before the reply came"))

    def __enter__(self) -> RpcClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connection(self) -> Connection:
        return self._conn

    def _send(self, agent_id: str, payload: bytes, reply_type: type[_Reply] | None) -> Future[Any]:
        corr = secrets.token_bytes(16)  # unguessable: a forged reply cannot match it
        fut: Future[Any] = Future()
        with self._lock:
            self._pending[corr] = (agent_id, reply_type, fut)
        fut.add_done_callback(lambda _f: self._forget(corr))
        self._conn.publish(
            protocol.topics.agent_rpc(agent_id),
            payload,
            qos=self.qos,
            properties=response_properties(
                protocol.topics.rpc_reply(self.client_id, agent_id), corr
            ),
        )
        return fut

    def send_raw(self, agent_id: str, payload: bytes) -> Future[Any]:
        """Send an already encoded (possibly invalid) request; for tests and tools."""
        return self._send(agent_id, payload, None)

    def use_codec(self, agent: protocol.AgentInfo, preferred: str = "bin1") -> str:
        """Talk to ``agent`` in ``preferred`` when it announces it reads it, else JSON; the
        agent answers in the codec it was asked in."""
        codec = preferred if preferred in agent.codecs else "json"
        self.codecs[agent.agent_id] = codec
        return codec

    def call_async(self, agent_id: str, request: _Request[R]) -> Future[R]:
        payload = protocol.encode_rpc(request, self.codecs.get(agent_id, "json"))
        return self._send(agent_id, payload, type(request).reply_type())

    def wait(self, fut: Future[R], timeout: float | None = None) -> R:
        """The reply of a call; raises the matching Moe2Error for error replies."""
        t = self.timeout if timeout is None else timeout
        try:
            return fut.result(timeout=t)
        except TimeoutError:
            fut.cancel()
            raise RequestTimeout(f"no reply within {t:.1f} s") from None

    def call(self, agent_id: str, request: _Request[R], timeout: float | None = None) -> R:
        return self.wait(self.call_async(agent_id, request), timeout)

    def _forget(self, corr: bytes) -> None:
        with self._lock:
            self._pending.pop(corr, None)

    def _on_reply(self, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        topic = protocol.topics.parse(msg.topic)
        replier = topic.rest[1] if topic is not None and len(topic.rest) == 2 else None
        with self._lock:
            entry = self._pending.get(bytes(corr)) if corr is not None else None
            if entry is None or entry[0] != replier:
                self.rejected_replies += entry is not None
                return  # a late reply to a call that timed out, or not from the agent asked
        _agent, reply_type, fut = entry
        if fut.done():
            return
        try:
            reply = protocol.decode_reply(msg.payload)
        except BadMessage as exc:
            fut.set_exception(exc)
            return
        if isinstance(reply, protocol.ErrorReply):
            fut.set_exception(error_from_reply(reply.error.code, reply.error.message))
        elif reply_type is not None and not isinstance(reply, reply_type):
            fut.set_exception(
                BadMessage(f"agent {replier} answered {reply.op!r} to a {reply_type.__name__}")
            )
        else:
            fut.set_result(reply)
