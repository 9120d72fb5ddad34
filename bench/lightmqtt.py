"""Many MQTT clients in one thread, for the scale benchmarks (``fleetsim.py``, ``phones.py``):
paho's external-loop API driven by one selector, so thousands of connections cost one thread
(paho's own ``loop_start`` threads select() on file descriptors below 1024 only).

    with LightPool(BrokerConfig(port=1883)) as pool:
        c = pool.open("phone-1", subscriptions=["moe2/v1/replies/phone-1/#"], on_message=cb)
        pool.wait_connected([c], 10)
        pool.publish("phone-1", "moe2/v1/prompts/qa", payload)
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from moe2.shared.mqtt import BrokerConfig

log = logging.getLogger("lightmqtt")

OnMessage = Callable[["LightClient", mqtt.MQTTMessage], None]


class LightClient:
    """One MQTT 5 connection of the pool. Use it from the pool's thread only (``pool.call``)."""

    def __init__(self, pool: LightPool, client_id: str, on_message: OnMessage | None) -> None:
        self.pool = pool
        self.client_id = client_id
        self.connected = threading.Event()
        self.closed = False
        self.on_message = on_message
        self.mqtt = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        self.mqtt.max_queued_messages_set(0)
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_message = self._on_message
        self.mqtt.on_socket_open = pool._socket_open
        self.mqtt.on_socket_close = pool._socket_close
        self.mqtt.on_socket_register_write = pool._register_write
        self.mqtt.on_socket_unregister_write = pool._unregister_write
        self.subscriptions: list[str] = []

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            log.warning("%s refused: %s", self.client_id, rc)
            return
        for f in self.subscriptions:
            client.subscribe(f, qos=1)
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self.on_message is not None:
            try:
                self.on_message(self, msg)
            except Exception:
                log.exception("simulated client %s failed on %s", self.client_id, msg.topic)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        self.mqtt.publish(topic, payload, qos=qos, retain=retain)


class LightPool:
    """Many MQTT clients in one thread (epoll): simulated agents, gateways and phones.

    Paho's external-loop API: sockets are registered with a selector, read when readable,
    written when paho asks, and ``loop_misc`` (keepalive) runs round-robin over the clients.
    """

    def __init__(self, broker: BrokerConfig, *, keepalive: int = 30) -> None:
        self.broker = broker
        self.keepalive = keepalive
        self.clients: dict[str, LightClient] = {}
        self._by_sock: dict[int, LightClient] = {}
        self._writers: set[LightClient] = set()
        self._sel = selectors.DefaultSelector()
        self._todo: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="light-pool", daemon=True)
        self._misc_at = 0
        self._misc_t = time.monotonic()
        self._opening: LightClient | None = None

    def __enter__(self) -> LightPool:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the loop

    def call(self, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Run ``fn`` on the pool's thread and return what it returns."""
        done: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

        def job() -> None:
            try:
                done.put((True, fn()))
            except BaseException as exc:  # handed back to the caller
                done.put((False, exc))

        self._todo.put(job)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        ok, value = done.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def _run(self) -> None:
        while not self._stop.is_set():
            while True:
                try:
                    job = self._todo.get_nowait()
                except queue.Empty:
                    break
                job()
            for c in list(self._writers):
                if c.mqtt.loop_write() != mqtt.MQTT_ERR_SUCCESS:
                    self._writers.discard(c)
            for key, _ in self._sel.select(timeout=0.02):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                client: LightClient = key.data
                if client.mqtt.loop_read() != mqtt.MQTT_ERR_SUCCESS and not client.closed:
                    self._drop(client)
            self._misc()

    def _misc(self) -> None:
        # Keepalive pings: every client once per sweep (a quarter of the keepalive), a slice
        # of them per turn in proportion to the time passed.
        now = time.monotonic()
        due = (now - self._misc_t) / (self.keepalive / 4)
        if due * len(self.clients) < 1:
            return
        self._misc_t = now
        clients = list(self.clients.values())
        n = min(len(clients), max(1, round(due * len(clients))))
        start = self._misc_at % len(clients)
        for c in (clients[start:] + clients[:start])[:n]:
            c.mqtt.loop_misc()
        self._misc_at = start + n

    def _socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        owner = self._opening
        assert owner is not None and owner.mqtt is client
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sel.register(sock, selectors.EVENT_READ, owner)
        self._by_sock[sock.fileno()] = owner

    def _socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)

    def _register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        owner = self._by_sock.get(sock.fileno())
        if owner is not None:
            self._writers.add(owner)

    def _unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        owner = self._by_sock.get(sock.fileno())
        if owner is not None:
            self._writers.discard(owner)

    def _drop(self, client: LightClient) -> None:
        client.closed = True
        self.clients.pop(client.client_id, None)
        self._writers.discard(client)
        sock = client.mqtt.socket()
        if sock is not None:
            self._by_sock.pop(sock.fileno(), None)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)

    # ------------------------------------------------------------------ clients

    def open(
        self,
        client_id: str,
        *,
        will: tuple[str, bytes] | None = None,
        subscriptions: Sequence[str] = (),
        on_message: OnMessage | None = None,
        keepalive: int | None = None,
    ) -> LightClient:
        """Connect a client (on the pool's thread; returns before its CONNACK: ``connected``
        says when it is in)."""

        def do() -> LightClient:
            c = LightClient(self, client_id, on_message)
            c.subscriptions = list(subscriptions)
            if will is not None:
                c.mqtt.will_set(will[0], will[1], qos=1, retain=True)
            self._opening = c
            try:
                c.mqtt.connect(
                    self.broker.host, self.broker.port, keepalive=keepalive or self.keepalive
                )
            finally:
                self._opening = None
            self.clients[client_id] = c
            return c

        return self.call(do)  # type: ignore[no-any-return]

    def wait_connected(self, clients: Iterable[LightClient], timeout: float) -> int:
        """How many of ``clients`` are connected once all are, or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        pending = list(clients)
        for c in pending:
            c.connected.wait(max(0.0, deadline - time.monotonic()))
        return sum(c.connected.is_set() for c in pending)

    def crash(self, client_id: str) -> None:
        """Cut the connection as a power cut would: no DISCONNECT, the broker's last will."""

        def do() -> None:
            c = self.clients.get(client_id)
            if c is None:
                return
            sock = c.mqtt.socket()
            self._drop(c)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

        self.call(do)

    def disconnect(self, client_id: str) -> None:
        """A clean goodbye (no last will)."""

        def do() -> None:
            c = self.clients.get(client_id)
            if c is not None:
                c.mqtt.disconnect()
                c.mqtt.loop_write()
                self._drop(c)

        self.call(do)

    def publish(
        self, client_id: str, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1
    ) -> None:
        self.call(lambda: self.clients[client_id].publish(topic, payload, retain=retain, qos=qos))

    def close(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.call(self._disconnect_all, timeout=30)
            self._stop.set()
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
            self._thread.join(10)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _disconnect_all(self) -> None:
        for c in list(self.clients.values()):
            with contextlib.suppress(Exception):
                c.mqtt.disconnect()
                c.mqtt.loop_write()
            self._drop(c)


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
