"""The fleet's state as its retained messages describe it, decoded and typed, in one place.

Every process that needs to know the fleet uses this view: the gateway (who is online, with
which vocabulary; what it is asked to serve), the controller (``moe2ctl agents``, ``sync``,
pushes), ``LocalFleet`` and the tests.

    view = FleetView(conn)                       # subscribes; kept current while conn lives
    conn.start()
    view.online("orin-1")                        # AgentInfo, or None when offline/unknown
    view.wait(lambda v: v.online("orin-1") is not None, timeout=30)

    snap = FleetView.snapshot(BrokerConfig(host="10.0.0.2"))   # connect, read, disconnect

Identity is bound to the topic: a message about agent X is accepted only on X's topics and
only when its payload names X too, so an agent cannot speak for another one.

At fleet scale (thousands of agents, tens of thousands of retained messages on every
connection) the network thread only queues what arrives; a worker thread of the view decodes
and applies it in arrival order. So the connection keeps reading (its keepalive answers are
queued behind the retained flood, and a client that falls behind its keepalive is dropped),
and the state subscriptions are QoS 0: no acknowledgement per retained message, and nothing is
lost that a resync would not bring back (every (re)connection reads the retained state again).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import paho.mqtt.client as mqtt

from moe2.shared import protocol as p
from moe2.shared.costmodel import CostCurve
from moe2.shared.errors import Moe2Error
from moe2.shared.mqtt import BrokerConfig, Connection

log = logging.getLogger(__name__)

M = TypeVar("M", bound=p.Message)

# What a view can follow; each is one retained topic family.
KINDS = (
    "info",
    "status",
    "profile",
    "links",
    "gateway",
    "stats",
    "assignment_ack",
    "gate_ack",
    "desired_app",
)
_FILTERS = {
    "info": p.topics.ALL_AGENT_INFO,
    "status": p.topics.ALL_AGENT_STATUS,
    "profile": p.topics.ALL_AGENT_PROFILES,
    "links": p.topics.ALL_GATEWAY_LINKS,
    "gateway": p.topics.ALL_GATEWAY_STATUS,
    "stats": p.topics.ALL_GATEWAY_STATS,
    "assignment_ack": p.topics.ALL_ASSIGNMENT_ACKS,
    "gate_ack": p.topics.ALL_GATE_ACKS,
    "desired_app": p.topics.ALL_DESIRED_APPS,
}
_MODELS: dict[str, type[p.Message]] = {
    "info": p.AgentInfo,
    "status": p.AgentStatus,
    "profile": p.AgentProfile,
    "links": p.LinkReport,
    "gateway": p.GatewayStatus,
    "stats": p.AppStats,
    "assignment_ack": p.AssignmentAck,
    "gate_ack": p.GateAck,
    "desired_app": p.AppAssignment,
}
# The payload field that must name the same agent/app as the topic.
_IDENTITY = {
    "info": ("agent_id", "agent"),
    "status": ("agent_id", "agent"),
    "profile": ("agent_id", "agent"),
    "links": ("gateway", "agent"),
    "gateway": ("gateway", "agent"),
    "stats": ("gateway", "agent"),
    "assignment_ack": ("gateway", "agent"),
    "gate_ack": ("gateway", "agent"),
    "desired_app": ("app", "app"),
}

# Largest retained message the view decodes (a profile with many points is the largest).
MAX_STATE_BYTES = 1 << 20

Listener = Callable[[str, tuple[str, ...], Any], None]  # (kind, key, message or None)


@dataclass
class FleetState:
    """Plain data: the decoded retained state, keyed as the topics are."""

    info: dict[str, p.AgentInfo] = field(default_factory=dict)  # agent -> info
    status: dict[str, p.AgentStatus] = field(default_factory=dict)
    profile: dict[str, p.AgentProfile] = field(default_factory=dict)
    links: dict[str, p.LinkReport] = field(default_factory=dict)  # gateway -> report
    gateway: dict[str, p.GatewayStatus] = field(default_factory=dict)
    stats: dict[str, p.AppStats] = field(default_factory=dict)  # gateway -> its answers' costs
    assignment_ack: dict[tuple[str, str], p.AssignmentAck] = field(default_factory=dict)
    gate_ack: dict[tuple[str, str], p.GateAck] = field(default_factory=dict)  # (gw, version)
    desired_app: dict[str, p.AppAssignment] = field(default_factory=dict)  # app -> assignment
    refused: list[tuple[str, str]] = field(default_factory=list)  # (topic, why), latest last

    # ------------------------------------------------------------------ questions

    def online(self, agent_id: str) -> p.AgentInfo | None:
        st = self.status.get(agent_id)
        return self.info.get(agent_id) if st is not None and st.state == "online" else None

    def online_agents(self) -> dict[str, p.AgentInfo]:
        return {a: i for a in sorted(self.info) if (i := self.online(a)) is not None}

    def online_gateways(self) -> dict[str, p.GatewayStatus]:
        return {g: s for g, s in sorted(self.gateway.items()) if s.state == "online"}

    def version_floor(
        self, app: str, proven: Callable[[p.AppAssignment], bool] | None = None
    ) -> tuple[int, int]:
        """(epoch, version) of the highest assignment of ``app`` the fleet shows: the retained
        one and what each gateway serves (a gateway may hold a version whose retained copy
        was cleared). (0, 0) when none.

        A gateway counts only when it announces itself as one (``gateway``): the broker's
        ACL lets only gateway logins write a gateway status and acknowledgements, so an
        expert's acknowledgement is no evidence. What a gateway serves is its ``current``
        version, never the version it was sent (a rejected forgery says nothing), and with
        ``proven`` (the controller's check of its own signature) only assignments it
        accepts count: the retained one, and each gateway's ``proof``. Then no login without
        the signing key can move the next version, let alone to the end of the range."""
        keys: list[tuple[int, int]] = []
        retained = self.desired_app.get(app)
        if retained is not None and (proven is None or proven(retained)):
            keys.append(retained.key)
        for (gw, a_app), ack in self.assignment_ack.items():
            if a_app != app or gw not in self.gateway:
                continue
            proof = ack.proof
            if proof is not None and proof.app == app and proof.version == ack.current:
                if proven is None or proven(proof):
                    keys.append(proof.key)
            elif proven is None and ack.current:
                keys.append((ack.epoch or 0, ack.current) if ack.accepted else (0, ack.current))
        return max(keys, default=(0, 0))

    def latest_version(self, app: str) -> int:
        """The version number of ``version_floor`` (within its epoch)."""
        return self.version_floor(app)[1]

    def gate_latency(self, version: str) -> tuple[CostCurve, int] | None:
        """(seconds the gate ``version`` takes on a prompt, as a curve in its tokens; how many
        gated prompts it was fitted on): the online gateway's figure with the most prompts
        behind it (every gateway's when none announces its status); None: not announced."""
        online = self.online_gateways()
        acks = [
            a
            for (gw, v), a in self.gate_ack.items()
            if v == version
            and a.state == "loaded"
            and a.latency is not None
            and (gw in online or not self.gateway)
        ]
        if not acks:
            return None
        best = max(acks, key=lambda a: (a.latency_prompts, a.gateway))
        assert best.latency is not None
        return best.latency, best.latency_prompts

    def gateway_overhead(self) -> p.GatewayOverhead | None:
        """A gateway's own time per answer, as the online gateway with the most answers
        behind its figure announced it; None: none announced one."""
        known = [g.overhead for g in self.online_gateways().values() if g.overhead is not None]
        return max(known, key=lambda o: o.answers, default=None)

    def best_links(self) -> dict[str, p.LinkFigures]:
        """Expert -> the most recent link figures any gateway measured to it."""
        out: dict[str, p.LinkFigures] = {}
        for report in self.links.values():
            for expert, fig in report.links.items():
                if expert not in out or fig.measured_at > out[expert].measured_at:
                    out[expert] = fig
        return out


class FleetView(FleetState):
    """A ``FleetState`` kept current by subscriptions on a connection; thread-safe reads
    through its methods, change notifications through ``listeners``."""

    def __init__(self, conn: Connection, kinds: Iterable[str] = KINDS) -> None:
        super().__init__()
        self._cond = threading.Condition()
        self.listeners: list[Listener] = []
        self.rejected = 0  # messages refused (malformed, or identity not matching the topic)
        self.kinds = tuple(kinds)
        # Resync on every (re)connection: the broker resends what is retained, then our
        # marker; whatever it did not resend is gone (a broker restarted without its state).
        self.synced = threading.Event()  # the retained state of this connection has arrived
        self.synced_at = 0.0  # time.monotonic() when it last did
        self._fresh: set[tuple[str, Any]] | None = None  # (kind, key) seen since connecting
        self._conn = conn
        self._marker = _marker_topic(conn)
        self.sync_listeners: list[Callable[[], None]] = []  # called each time synced is set
        self.arrived = 0  # messages received so far (progress of a resync)
        # What the network thread received, applied in order by the view's worker thread:
        # ("message", msg) | ("marker", msg) | ("session", None).
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self._session = 0  # connections so far: a marker counts for its own connection only
        for kind in self.kinds:
            if kind not in _FILTERS:
                raise ValueError(f"unknown fleet state kind {kind!r}; expected one of {KINDS}")
            conn.subscribe(_FILTERS[kind], self._arrive, qos=0, retained_state=True)
        conn.subscribe(self._marker, self._arrive_marker)
        conn.on_session_start.append(self._session_start)
        conn.on_connected.append(self._subscribed)

    # ------------------------------------------------------------------ resync

    def _session_start(self) -> None:
        self.synced.clear()  # at once: whoever checks sees the resync under way
        self._session += 1
        self._enqueue("session", None)

    def _begin_resync(self) -> None:
        with self._cond:
            self.synced.clear()
            self._fresh = set()

    # ------------------------------------------------------------------ the worker

    def _arrive(self, msg: mqtt.MQTTMessage) -> None:
        self._enqueue("message", msg)

    def _arrive_marker(self, msg: mqtt.MQTTMessage) -> None:
        self._enqueue("marker", (self._session, msg))

    def _enqueue(self, what: str, msg: Any) -> None:
        """On the network thread: queue, and make sure a worker runs."""
        self.arrived += what == "message"
        self._inbox.put((what, msg))
        with self._worker_lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="fleet-view", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        """Apply what arrived, in order; the thread ends after a quiet second (a view that
        is no longer used leaves no thread behind)."""
        while True:
            try:
                what, msg = self._inbox.get(timeout=1.0)
            except queue.Empty:
                with self._worker_lock:
                    if self._inbox.empty():
                        self._worker = None
                        return
                continue
            try:
                if what == "message":
                    self._on_message(msg)
                elif what == "marker":
                    session, marker = msg
                    if session == self._session:  # not a marker of a connection since lost
                        self._on_marker(marker)
                else:
                    self._begin_resync()
            except Exception:  # one bad message must not stop the view
                log.exception("fleet view failed on %s", getattr(msg, "topic", what))

    def _subscribed(self) -> None:
        self._conn.publish(self._marker, b"end-of-retained", qos=1)

    def _on_marker(self, msg: mqtt.MQTTMessage) -> None:
        gone: list[tuple[str, Any]] = []
        with self._cond:
            fresh, self._fresh = self._fresh, None
            if fresh is not None:
                for kind in self.kinds:
                    table: dict[Any, Any] = getattr(self, kind)
                    for index in [i for i in table if (kind, i) not in fresh]:
                        del table[index]
                        gone.append((kind, index))
            self.synced_at = time.monotonic()
            self.synced.set()
            self._cond.notify_all()
        for kind, index in gone:
            log.info("%s %s is no longer on the broker", kind, index)
            self._notify(kind, index if isinstance(index, tuple) else (index,), None)
        for hook in list(self.sync_listeners):
            try:
                hook()
            except Exception:
                log.exception("fleet sync listener failed")

    # ------------------------------------------------------------------ intake

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        topic = p.topics.parse(msg.topic)
        if topic is None or topic.kind not in _MODELS:
            return
        kind = topic.kind
        key: tuple[str, ...]
        if kind == "assignment_ack":
            key = (str(topic.agent), str(topic.app))
        elif kind == "gate_ack":
            key = (str(topic.agent), str(topic.version))
        elif kind == "desired_app":
            key = (str(topic.app),)
        else:
            key = (str(topic.agent),)
        table: dict[Any, Any] = getattr(self, kind)
        index = key if len(key) > 1 else key[0]
        with self._cond:
            if self._fresh is not None:
                self._fresh.add((kind, index))
        if not msg.payload:  # a cleared retained message
            with self._cond:
                old = table.pop(index, None)
                self._cond.notify_all()
            if old is not None:
                self._notify(kind, key, None)
            return
        message = self._decode(kind, msg.topic, bytes(msg.payload), topic)
        if message is None:
            return
        with self._cond:
            table[index] = message
            self._cond.notify_all()
        self._notify(kind, key, message)

    def _decode(self, kind: str, topic_str: str, payload: bytes, topic: p.Topic) -> Any:
        try:
            message = p.decode_message(_MODELS[kind], payload, MAX_STATE_BYTES)
        except Moe2Error as exc:
            self._refuse(topic_str, exc.message)
            return None
        field_name, topic_part = _IDENTITY[kind]
        if getattr(message, field_name) != getattr(topic, topic_part):
            named = getattr(message, field_name)
            self._refuse(topic_str, f"it names {field_name} {named!r}, not the topic's")
            return None
        return message

    def _refuse(self, topic: str, why: str) -> None:
        log.warning("ignoring %s: %s", topic, why)
        with self._cond:
            self.rejected += 1
            self.refused.append((topic, why))
            del self.refused[:-100]  # the latest 100

    def _notify(self, kind: str, key: tuple[str, ...], message: Any) -> None:
        for listener in list(self.listeners):
            try:
                listener(kind, key, message)
            except Exception:  # one listener's bug must not stop the others or the view
                log.exception("fleet listener failed on %s %s", kind, key)

    # ------------------------------------------------------------------ reads

    def online(self, agent_id: str) -> p.AgentInfo | None:
        with self._cond:
            return super().online(agent_id)

    def online_agents(self) -> dict[str, p.AgentInfo]:
        with self._cond:
            return super().online_agents()

    def online_gateways(self) -> dict[str, p.GatewayStatus]:
        with self._cond:
            return super().online_gateways()

    def version_floor(
        self, app: str, proven: Callable[[p.AppAssignment], bool] | None = None
    ) -> tuple[int, int]:
        with self._cond:
            return super().version_floor(app, proven)

    def copy(self) -> FleetState:
        """A consistent snapshot as plain data."""
        with self._cond:
            return FleetState(
                **{k: dict(getattr(self, k)) for k in KINDS}, refused=list(self.refused)
            )

    def wait(self, predicate: Callable[[FleetState], bool], timeout: float) -> bool:
        """Wait until ``predicate(state)`` holds (checked on every change); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(FleetState(**{k: getattr(self, k) for k in KINDS})):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    # ------------------------------------------------------------------ one-shot reads

    @classmethod
    def snapshot(
        cls, broker: BrokerConfig, kinds: Iterable[str] = KINDS, wait_s: float = 3.0
    ) -> FleetState:
        """Connect, read the retained state, disconnect.

        The broker sends retained messages while it handles a SUBSCRIBE, so a marker
        published to our own inbox afterwards arrives after all of them; ``wait_s`` bounds
        the wait with nothing arriving, on a broker that orders things differently."""
        conn = Connection(broker, f"moe2-view-{uuid.uuid4().hex[:12]}")
        view = cls(conn, kinds)
        with conn:
            if not view.wait_synced(wait_s):
                log.warning("no end-of-retained marker within %.1f s; state may be partial", wait_s)
        return view.copy()

    def wait_synced(self, quiet_s: float) -> bool:
        """Wait for the end-of-retained marker for as long as retained messages keep coming
        (a large fleet's state takes longer than ``quiet_s`` to arrive); False once
        ``quiet_s`` passed with no message and no marker."""
        seen = self.arrived
        while True:
            if self.synced.wait(quiet_s):
                return True
            if self.arrived == seen:
                return False
            seen = self.arrived


def _marker_topic(conn: Connection) -> str:
    """Our own topic for the end-of-retained marker, under the replies subtree of our login
    (the one a broker with moe2's ACL lets us read and write)."""

    def name(value: str) -> str:
        try:
            return p.check_name("client id", value)
        except Moe2Error:  # not a topic name (too long...): a stable stand-in
            return f"c-{hashlib.sha256(value.encode()).hexdigest()[:24]}"

    return p.topics.sync_marker(name(conn.broker.owner(conn.client_id)), name(conn.client_id))
