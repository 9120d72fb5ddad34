"""MQTT plumbing both sides use: a connection with TCP_NODELAY and re-subscription on
reconnect, and an RPC client (MQTT 5 ResponseTopic + CorrelationData).

    with RpcClient(BrokerConfig(port=1883)) as rpc:
        reply = rpc.call("jetson-1", OpenRequest(prompt="Hello"))
        print(reply.dist.ids[:5])
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field

from moe2.shared import protocol
from moe2.shared.errors import BadMessage, BrokerError, RequestTimeout, error_from_reply

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
        self._handlers: list[tuple[str, str, int, Handler]] = []  # (filter, match, qos, fn)
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._suback_mid: int | None = None
        self._pending_subs: list[tuple[str, int]] = []
        self._connect_error: str | None = None
        self.on_connected: list[Callable[[], None]] = []

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
        # A shared subscription "$share/<group>/<filter>" delivers messages whose topic
        # matches <filter>; dispatch on that.
        match = topic_filter
        if topic_filter.startswith("$share/"):
            match = topic_filter.split("/", 2)[2]
        with self._lock:
            self._handlers.append((topic_filter, match, qos, handler))
        if self._connected.is_set():
            self._client.subscribe(topic_filter, qos=qos)

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

    # ------------------------------------------------------------------ callbacks

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            self._connect_error = str(rc)
            log.error("MQTT connection refused: %s", rc)
            return
        with self._lock:
            subs = [(f, q) for f, _, q, _ in self._handlers]
        if not subs:
            self._ready()
            return
        # One SUBSCRIBE for all filters; we count as connected only once the broker has
        # acknowledged it, so nothing published to us after start() returns is missed.
        self._pending_subs = subs
        _, self._suback_mid = client.subscribe(subs)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, props: Any
    ) -> None:
        if mid != self._suback_mid:
            return
        for (topic_filter, _), rc in zip(self._pending_subs, reason_codes):
            if getattr(rc, "is_failure", False):
                log.error("broker refused the subscription to %s: %s", topic_filter, rc)
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
        self._connected.clear()
        if rc != 0:
            log.warning("MQTT connection lost (%s); reconnecting", rc)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            handlers = [
                h for _, match, _, h in self._handlers if mqtt.topic_matches_sub(match, msg.topic)
            ]
        for handler in handlers:
            try:
                handler(msg)
            except Exception:  # a bad message must never take the network loop down
                log.exception("handler for %s failed", msg.topic)


def response_properties(response_topic: str, correlation: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = response_topic
    props.CorrelationData = correlation
    return props


def reply_properties(correlation: bytes | None) -> Properties | None:
    if correlation is None:
        return None
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = correlation
    return props


class RpcClient:
    """Request/response over MQTT 5 to agents' ``rpc`` topics; thread-safe.

    ``call_async`` returns a Future, so a gateway can ask k experts at once and wait for all.
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
        self.inbox = protocol.topics.replies(self.client_id)
        self._conn = Connection(broker, self.client_id)
        self._pending: dict[bytes, Future[Any]] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._conn.subscribe(self.inbox, self._on_reply, qos=qos)

    def start(self) -> RpcClient:
        self._conn.start()
        return self

    def close(self) -> None:
        self._conn.stop()
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(RequestTimeout("RPC client closed before the reply came"))

    def __enter__(self) -> RpcClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connection(self) -> Connection:
        return self._conn

    def send_raw(self, agent_id: str, payload: bytes) -> Future[Any]:
        """Send an already encoded (possibly invalid) request; for tests and tools."""
        corr = next(self._counter).to_bytes(8, "big")
        fut: Future[Any] = Future()
        with self._lock:
            self._pending[corr] = fut
        self._conn.publish(
            protocol.topics.agent_rpc(agent_id),
            payload,
            qos=self.qos,
            properties=response_properties(self.inbox, corr),
        )
        fut.add_done_callback(lambda _f: self._forget(corr))
        return fut

    def call_async(self, agent_id: str, request: BaseModel) -> Future[Any]:
        return self.send_raw(agent_id, protocol.encode(request))

    def wait(self, fut: Future[Any], timeout: float | None = None) -> Any:
        """The reply of a call; raises the matching Moe2Error for error replies."""
        t = self.timeout if timeout is None else timeout
        try:
            reply = fut.result(timeout=t)
        except TimeoutError:
            fut.cancel()
            raise RequestTimeout(f"no reply within {t:.1f} s") from None
        if isinstance(reply, protocol.ErrorReply):
            raise error_from_reply(reply.error.code, reply.error.message)
        return reply

    def call(self, agent_id: str, request: BaseModel, timeout: float | None = None) -> Any:
        return self.wait(self.call_async(agent_id, request), timeout)

    def _forget(self, corr: bytes) -> None:
        with self._lock:
            self._pending.pop(corr, None)

    def _on_reply(self, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        if corr is None:
            log.warning("reply without CorrelationData on %s ignored", msg.topic)
            return
        with self._lock:
            fut = self._pending.get(bytes(corr))
        if fut is None or fut.done():
            return  # late reply to a call that timed out
        try:
            fut.set_result(protocol.decode_reply(msg.payload))
        except BadMessage as exc:
            fut.set_exception(exc)
