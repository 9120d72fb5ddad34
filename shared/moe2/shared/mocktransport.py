"""A transport for ``RpcClient`` without a broker, as httpx's ``MockTransport`` is for an
``httpx.Client``: each request is decoded as an agent decodes it, answered by a handler (an
in-process agent service, or a function of a test), and the reply, encoded in the codec the
request came in, goes back through the client's own reply path (correlation, decoding,
error codes). So code on top of the RPC client is tested without mosquitto::

    services = {"a": AgentService("a", backend, 8)}
    transport = MockTransport(lambda agent, request: services[agent].handle(request))
    with RpcClient(BrokerConfig(), "gw", transport=transport) as rpc:
        rpc.call("a", p.OpenRequest(prompt="the fox eats"))

A handler returns the reply, raises the ``Moe2Error`` the agent would answer, or returns
None (no answer: a dead agent). Requests to one agent are answered in order, agents at the
same time (each has its own thread, as each agent has its model thread). ``latency_s``
delays every message one way (a slow link, without throttling it); ``freeze(agent)`` holds
an agent's work until ``thaw(agent)`` (a stopped process).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from moe2.shared import protocol
from moe2.shared.errors import Busy, Moe2Error
from moe2.shared.mqtt import Handler

log = logging.getLogger(__name__)

Answerer = Callable[[str, protocol.Message], protocol.Message | None]


@dataclass(order=True)
class _Due:
    at: float
    seq: int
    run: Callable[[], None] = field(compare=False)


class MockTransport:
    def __init__(
        self,
        handler: Answerer,
        *,
        latency_s: float = 0.0,  # one way, every message
        max_payload_bytes: int = 4 << 20,
    ) -> None:
        self.handler = handler
        self.latency_s = latency_s
        self.max_payload_bytes = max_payload_bytes
        self.on_connected: list[Callable[[], None]] = []
        self.requests: list[tuple[str, protocol.Message]] = []  # every request decoded
        self._subscribers: list[Handler] = []
        self._seq = itertools.count()
        self._lock = threading.Condition()
        self._timeline: list[_Due] = []  # messages on the wire, by arrival time
        self._queues: dict[str, list[tuple[bytes, str, bytes | None]]] = {}
        self._workers: dict[str, threading.Thread] = {}
        self._frozen: set[str] = set()
        self._stopped = False
        self._wire = threading.Thread(target=self._deliver, name="mock-wire", daemon=True)

    # ------------------------------------------------------------------ RpcTransport

    def start(self) -> MockTransport:
        self._wire.start()
        for callback in self.on_connected:
            callback()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()

    @property
    def connected(self) -> bool:
        return self._wire.is_alive() and not self._stopped

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        self._subscribers.append(handler)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        parsed = protocol.topics.parse(topic)
        if parsed is not None and parsed.kind == "requester":
            return  # the client's presence: no agent here watches it
        if parsed is None or parsed.kind != "rpc" or parsed.agent is None:
            raise ValueError(f"a mock transport carries RPC requests only, not {topic!r}")
        reply_to = getattr(properties, "ResponseTopic", None) if properties else None
        corr = getattr(properties, "CorrelationData", None) if properties else None
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        agent = parsed.agent
        item = (data, str(reply_to or ""), bytes(corr) if corr is not None else None)
        self._later(lambda: self._arrive(agent, item))

    # ------------------------------------------------------------------ faults

    def freeze(self, agent: str) -> None:
        """Hold ``agent``'s work (requests queue up, nothing is answered) until ``thaw``."""
        with self._lock:
            self._frozen.add(agent)

    def thaw(self, agent: str) -> None:
        with self._lock:
            self._frozen.discard(agent)
            self._lock.notify_all()

    # ------------------------------------------------------------------ the wire

    def _later(self, run: Callable[[], None]) -> None:
        with self._lock:
            heapq.heappush(
                self._timeline, _Due(time.monotonic() + self.latency_s, next(self._seq), run)
            )
            self._lock.notify_all()

    def _deliver(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and (
                    not self._timeline or self._timeline[0].at > time.monotonic()
                ):
                    wait = self._timeline[0].at - time.monotonic() if self._timeline else None
                    self._lock.wait(wait)
                if self._stopped:
                    return
                due = heapq.heappop(self._timeline)
            try:
                due.run()
            except Exception:  # a subscriber's bug must not stop the wire
                log.exception("a mock delivery failed")

    def _arrive(self, agent: str, item: tuple[bytes, str, bytes | None]) -> None:
        with self._lock:
            self._queues.setdefault(agent, []).append(item)
            if agent not in self._workers:
                worker = threading.Thread(
                    target=self._serve, args=(agent,), name=f"mock-{agent}", daemon=True
                )
                self._workers[agent] = worker
                worker.start()
            self._lock.notify_all()

    def _serve(self, agent: str) -> None:
        """One agent's requests, in order (its model thread)."""
        while True:
            with self._lock:
                while not self._stopped and (agent in self._frozen or not self._queues[agent]):
                    self._lock.wait()
                if self._stopped:
                    return
                payload, reply_to, corr = self._queues[agent].pop(0)
            reply = self._answer(agent, payload)
            if reply is None or not reply_to:
                continue
            body = protocol.encode_rpc(reply, protocol.payload_codec(payload))
            self._later(self._replier(reply_to, body, corr))

    def _answer(self, agent: str, payload: bytes) -> protocol.Message | None:
        op = protocol.request_op(payload)
        try:
            request = protocol.decode_request(payload, self.max_payload_bytes)
            with self._lock:
                self.requests.append((agent, request))
            return self.handler(agent, request)
        except Busy as exc:  # with the time it asks the requester to wait, as an agent's
            after = exc.retry_after_s
            return protocol.error_reply(
                exc.code, exc.message, op, after * 1e3 if after is not None else None
            )
        except Moe2Error as exc:
            return protocol.error_reply(exc.code, exc.message, op)
        except Exception as exc:  # the agent's catch-all: an internal error, not silence
            log.exception("mock agent %s failed", agent)
            return protocol.error_reply("internal", f"{type(exc).__name__}: {exc}", op)

    def _replier(self, topic: str, payload: bytes, corr: bytes | None) -> Callable[[], None]:
        def reply() -> None:
            msg = mqtt.MQTTMessage(topic=topic.encode())
            msg.payload = payload
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if corr is not None:
                props.CorrelationData = corr
            msg.properties = props
            for subscriber in list(self._subscribers):
                subscriber(msg)

        return reply
