"""A simulated fleet for the scale benchmarks: hundreds to thousands of agents that publish
what real ones would (info, status, profile; gateways: status, links, stats, acknowledgements),
retained, through a real broker, one MQTT connection each, all driven by one thread.

Nothing here is product code: it stands in for boxes this machine does not have. Messages
are the protocol's own models (``moe2.shared.protocol``), topics come from ``topics``, so
the controller, the gateways and ``moe2ctl`` see a fleet they cannot tell from a real one,
except that a simulated agent answers no RPC (it computes nothing). Real agents run beside
the simulated ones where answers are needed.

    with SimFleet(BrokerConfig(port=1883), FleetSpec(agents=1000, apps=50)) as fleet:
        fleet.join_all()                     # every agent online, retained state published
        fleet.crash("sim-00042")             # TCP cut: the broker publishes its last will
        fleet.join("sim-00042")              # back, announcing itself again
    with PromptLoad(cfg, clients=1000) as load: load.run("qa", seconds=30)

Bounded: every loop has a deadline, every connection is closed at exit, loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import queue
import random
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from moe2.agent.profiler import ProfilerSettings, estimate_profile
from moe2.shared import protocol as p
from moe2.shared.costmodel import ModelFigures
from moe2.shared.devices import load_device_class
from moe2.shared.mqtt import BrokerConfig
from moe2.shared.protocol.desired import STALE_VERSION
from moe2.shared.protocol.profiles import ProfilePoint

log = logging.getLogger("fleetsim")

OnMessage = Callable[["LightClient", mqtt.MQTTMessage], None]


# --------------------------------------------------------------------------- light clients


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


# --------------------------------------------------------------------------- the fleet

DEVICES = ("orin-agx-64gb", "rtx4090", "cpu-generic")
SIZES_B = (0.5, 1.5, 3.0, 7.0)  # billions of parameters
FAMILIES = 8  # distinct vocabularies among the simulated agents


def family_hash(family: int) -> str:
    return hashlib.sha256(f"moe2-fleetsim-vocabulary-{family}".encode()).hexdigest()


@dataclass(frozen=True)
class FleetSpec:
    """What the simulated fleet looks like."""

    agents: int = 100
    apps: int = 50
    gateways: int = 4  # simulated gateways: they announce the apps and acknowledge pushes
    candidates: tuple[int, int] = (16, 256)  # experts eligible per application (min, max)
    seed: int = 0
    prefix: str = "sim"
    keepalive: int = 30  # seconds; a crashed agent shows offline after 1.5x this at most

    def agent_ids(self) -> list[str]:
        return [f"{self.prefix}-{i:05d}" for i in range(self.agents)]

    def gateway_ids(self) -> list[str]:
        return [f"{self.prefix}-gw-{i:02d}" for i in range(self.gateways)]

    def app_names(self) -> list[str]:
        return [f"app-{i:02d}" for i in range(self.apps)]

    def candidate_sets(self) -> dict[str, list[str]]:
        """App -> the experts that may serve it (scored on it): 16-256 each, drawn so that
        every agent is a candidate somewhere when the fleet is large enough."""
        rng = random.Random(self.seed)
        ids = self.agent_ids()
        lo, hi = self.candidates
        out: dict[str, list[str]] = {}
        order = ids[:]
        rng.shuffle(order)
        at = 0
        for app in self.app_names():
            n = min(len(ids), rng.randint(lo, hi))
            chosen = {order[(at + j) % len(order)] for j in range(n)}
            at += n
            out[app] = sorted(chosen)
        return out


def _backend(device: str) -> p.ComputeBackend:
    gpu = device != "cpu-generic"
    return p.ComputeBackend(
        name="CUDA" if gpu else "CPU",
        gpu_layers=29 if gpu else 0,
        n_layers=29,
        requested_layers=-1 if gpu else 0,
        vram_bytes=(1 << 30) if gpu else 0,
        supports_gpu_offload=gpu,
        devices=[p.ComputeDevice(name="CUDA0", description=device, kind="gpu")] if gpu else [],
    )


@functools.lru_cache(maxsize=64)
def _base_profile(device: str, billions: float) -> p.AgentProfile:
    """The curves of one device class and model size (paper eq. 4)."""
    figures = load_device_class(device).figures()
    model = ModelFigures(n_params=billions * 1e9, weight_bytes=billions * 0.56e9)
    return estimate_profile(
        model,
        figures,
        ProfilerSettings(points=4),
        agent_id="sim",
        model_name="sim",
        n_ctx=4096,
        device_class=device,
        power_mode=None,
    )


@dataclass
class SimAgent:
    agent_id: str
    device: str
    billions: float
    family: int
    started_at: float = field(default_factory=time.time)

    def info(self) -> p.AgentInfo:
        return p.AgentInfo(
            agent_id=self.agent_id,
            model=f"sim-{self.billions:g}b-f{self.family}",
            model_file=f"sim-{self.billions:g}b.Q4_K_M.gguf",
            model_sha256=hashlib.sha256(self.agent_id.encode()).hexdigest(),
            architecture="llama",
            quantization="Q4_K_M",
            n_ctx=4096,
            n_vocab=32000,
            tokenizer_hash=family_hash(self.family),
            bos_id=1,
            eos_ids=[2],
            add_bos=True,
            backend=_backend(self.device),
            device_class=self.device,
            software_version="fleetsim",
            max_sessions=16,
            started_at=self.started_at,
            codecs=["json", "bin1"],
        )

    def status(self, state: str = "online") -> p.AgentStatus:
        return p.AgentStatus(agent_id=self.agent_id, state=state, since=time.time())  # type: ignore[arg-type]

    def profile(self) -> p.AgentProfile:
        """A profile as an agent's start-up profiling publishes it: the curves of its device
        class and size, with measured-looking points (4 lengths, 3 repeats)."""
        prof = _base_profile(self.device, self.billions)
        c = prof.curves
        rng = random.Random(self.agent_id)
        points = [
            ProfilePoint(
                prompt_tokens=n,
                decode_tokens=8,
                prompt_seconds=[c.prompt_seconds.at(n) * rng.uniform(0.95, 1.05) for _ in "abc"],
                token_seconds=[c.token_seconds.at(n) * rng.uniform(0.95, 1.05) for _ in "abc"],
                prompt_joules=[c.prompt_joules.at(n) * rng.uniform(0.95, 1.05) for _ in "abc"],
                token_joules=[c.token_joules.at(n) * rng.uniform(0.95, 1.05) for _ in "abc"],
            )
            for n in (64, 512, 1024, 2048)
        ]
        return prof.model_copy(
            update={
                "agent_id": self.agent_id,
                "model": f"sim-{self.billions:g}b-f{self.family}",
                "points": points,
                "delay_measured": True,
                "duration_s": 40.0,
                "profiled_at": time.time(),
            }
        )


def make_agents(spec: FleetSpec) -> dict[str, SimAgent]:
    """The fleet's agents: device class, size and vocabulary drawn from the spec's seed."""
    rng = random.Random(spec.seed)
    return {
        a: SimAgent(a, rng.choice(DEVICES), rng.choice(SIZES_B), rng.randrange(FAMILIES))
        for a in spec.agent_ids()
    }


@dataclass
class SimGateway:
    gateway: str
    apps: dict[str, int]  # app -> assignment version served (0: local configuration)
    acked: int = 0  # assignments acknowledged

    def status(self, state: str = "online") -> p.GatewayStatus:
        return p.GatewayStatus(
            gateway=self.gateway,
            state=state,  # type: ignore[arg-type]
            group="fleet",
            apps=dict(self.apps) if state == "online" else {},
            since=time.time(),
        )


class SimFleet:
    """The simulated agents and gateways on one broker (see the module docstring)."""

    def __init__(self, broker: BrokerConfig, spec: FleetSpec) -> None:
        self.broker = broker
        self.spec = spec
        self.agents = make_agents(spec)
        self.candidates = spec.candidate_sets()
        self.gateways = {
            g: SimGateway(g, {app: 0 for app in spec.app_names()}) for g in spec.gateway_ids()
        }
        self.pool = LightPool(broker, keepalive=spec.keepalive)
        self.online: set[str] = set()
        self.published = 0  # messages published by the simulation
        self._lock = threading.Lock()

    def __enter__(self) -> SimFleet:
        self.pool.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.close()

    # ------------------------------------------------------------------ agents

    def join(self, agent_id: str) -> LightClient:
        """Connect ``agent_id`` (last will: offline) and publish its info, status, profile."""
        agent = self.agents[agent_id]
        agent.started_at = time.time()
        will = p.encode(p.AgentStatus(agent_id=agent_id, state="offline"))
        client = self.pool.open(
            f"moe2-agent-{agent_id}", will=(p.topics.agent_status(agent_id), will)
        )
        msgs = [
            (p.topics.agent_info(agent_id), p.encode(agent.info())),
            (p.topics.agent_profile(agent_id), p.encode(agent.profile())),
            (p.topics.agent_status(agent_id), p.encode(agent.status())),
        ]

        def publish() -> None:
            for topic, payload in msgs:
                client.publish(topic, payload, retain=True)

        self.pool.call(publish)
        with self._lock:
            self.online.add(agent_id)
            self.published += len(msgs)
        return client

    def join_all(self, agent_ids: Iterable[str] | None = None, timeout: float = 300.0) -> int:
        """Join every agent (or those named) and the gateways; how many are connected."""
        clients = [self.join(a) for a in (agent_ids or self.agents)]
        clients += [self._gateway_join(g) for g in self.gateways]
        return self.pool.wait_connected(clients, timeout)

    def crash(self, agent_id: str) -> None:
        self.pool.crash(f"moe2-agent-{agent_id}")
        with self._lock:
            self.online.discard(agent_id)

    def leave(self, agent_id: str) -> None:
        """A clean stop: offline status, then disconnect."""
        cid = f"moe2-agent-{agent_id}"
        agent = self.agents[agent_id]
        self.pool.publish(
            cid, p.topics.agent_status(agent_id), p.encode(agent.status("offline")), retain=True
        )
        self.pool.disconnect(cid)
        with self._lock:
            self.online.discard(agent_id)

    def churn(self, per_s: float, seconds: float, seed: int = 1) -> int:
        """Crash and rejoin random agents at ``per_s`` events a second for ``seconds``
        (bounded); the number of events."""
        rng = random.Random(seed)
        deadline = time.monotonic() + seconds
        events = 0
        away: list[str] = []
        while time.monotonic() < deadline:
            if away and (rng.random() < 0.5 or len(away) > 10):
                self.join(away.pop(0))
            else:
                victim = rng.choice(sorted(self.online))
                self.crash(victim)
                away.append(victim)
            events += 1
            time.sleep(1.0 / per_s)
        for a in away:
            self.join(a)
        return events

    # ------------------------------------------------------------------ gateways

    def _gateway_join(self, gateway: str) -> LightClient:
        gw = self.gateways[gateway]
        will = p.encode(p.GatewayStatus(gateway=gateway, state="offline", lost=True))

        def on_message(client: LightClient, msg: mqtt.MQTTMessage) -> None:
            self._on_desired(gw, client, msg)

        client = self.pool.open(
            f"moe2-gateway-{gateway}",
            will=(p.topics.gateway_status(gateway), will),
            subscriptions=[p.topics.ALL_DESIRED_APPS],
            on_message=on_message,
        )
        links = {
            a: p.LinkFigures(rtt_s=0.002, bytes_per_s=5e7, measured_at=time.time())
            for app in gw.apps
            for a in self.candidates.get(app, [])[:8]
        }
        report = p.LinkReport(gateway=gateway, links=links)

        def publish() -> None:
            client.publish(p.topics.gateway_status(gateway), p.encode(gw.status()), retain=True)
            client.publish(p.topics.gateway_links(gateway), p.encode(report), retain=True)

        self.pool.call(publish)
        return client

    def _on_desired(self, gw: SimGateway, client: LightClient, msg: mqtt.MQTTMessage) -> None:
        """Acknowledge an assignment as a gateway would (on the pool's thread)."""
        if not msg.payload:
            return
        a = p.decode_message(p.AppAssignment, bytes(msg.payload))
        current = gw.apps.get(a.app, 0)
        ok = a.version > current or (a.version == current and a.version > 0)
        ack = p.AssignmentAck(
            gateway=gw.gateway,
            app=a.app,
            version=a.version,
            accepted=ok,
            serving=ok and a.serves(gw.gateway),
            reason=None if ok else f"{STALE_VERSION}: {a.version} is below {current}",
            current=max(current, a.version) if ok else current,
        )
        if ok:
            gw.apps[a.app] = a.version
        gw.acked += 1
        client.publish(p.topics.assignment_ack(gw.gateway, a.app), p.encode(ack), retain=True)
        if ok and a.version != current:
            client.publish(p.topics.gateway_status(gw.gateway), p.encode(gw.status()), retain=True)

    # ------------------------------------------------------------------ cleanup

    def clear_retained(self, topics: Iterable[str], timeout: float = 120.0) -> None:
        """Clear retained topics (through a connection of our own), so a broker shared with
        later runs does not keep simulated agents."""
        client = self.pool.open(f"fleetsim-clear-{uuid.uuid4().hex[:6]}")
        self.pool.wait_connected([client], 10)
        todo = list(topics)
        deadline = time.monotonic() + timeout
        for i in range(0, len(todo), 500):
            if time.monotonic() > deadline:
                break
            part = todo[i : i + 500]
            self.pool.call(lambda part=part: [client.publish(t, b"", retain=True) for t in part])

    def retained_topics(self) -> list[str]:
        out = []
        for a in self.agents:
            out += [p.topics.agent_info(a), p.topics.agent_status(a), p.topics.agent_profile(a)]
        for g in self.gateways:
            out += [p.topics.gateway_status(g), p.topics.gateway_links(g)]
            out += [p.topics.assignment_ack(g, app) for app in self.spec.app_names()]
        return out


# --------------------------------------------------------------------------- registry


def populate_registry(
    url: str, spec: FleetSpec, samples_per_app: int = 8, dataset: str = "fleet"
) -> dict[str, list[str]]:
    """A registry as a fleet's would be after collection: a dataset of ``samples_per_app``
    two-option questions per application, and every candidate's scores on its applications'
    samples (a skill per expert and application decides how likely the right option is).
    Returns the candidate sets."""
    from moe2.controller.datasets import Sample
    from moe2.controller.registry import Registry

    rng = random.Random(spec.seed + 1)
    candidates = spec.candidate_sets()
    agents = make_agents(spec)  # the same devices and vocabularies as SimFleet's
    samples = [
        Sample(app, f"question {i} of {app}: which word comes next?", (" yes", " no"), i % 2)
        for app in spec.app_names()
        for i in range(samples_per_app)
    ]
    reg = Registry.open(url)
    try:
        reg.add_dataset(dataset, "multiple-choice", "fleetsim", samples)
        rows_by_app: dict[str, list[Any]] = {}
        for smp in reg.samples(dataset):
            rows_by_app.setdefault(smp.app, []).append(smp)
        batch: list[dict[str, Any]] = []
        for app, experts in candidates.items():
            for e in experts:
                skill = rng.gauss(0.0, 1.0)
                h = family_hash(agents[e].family)
                for smp in rows_by_app[app]:
                    for o in range(len(smp.targets)):
                        good = o == smp.answer
                        logit = (skill if good else -skill) + rng.gauss(0.0, 0.7)
                        lp = -math.log1p(math.exp(-logit))  # log sigmoid
                        batch.append(
                            {
                                "sample_id": smp.id,
                                "expert": e,
                                "option": o,
                                "tokenizer_hash": h,
                                "tokens": [5 + o],
                                "logprobs": [lp],
                            }
                        )
                if len(batch) > 20000:
                    reg.add_scores(batch)
                    batch = []
        reg.add_scores(batch)
    finally:
        reg.close()
    return candidates


# --------------------------------------------------------------------------- phones


@dataclass
class LoadReport:
    clients: int
    seconds: float
    sent: int
    answered: int
    errors: dict[str, int]
    unanswered: int  # sent, and neither an answer nor an error by the end
    latencies_s: list[float]
    gateways: dict[str, int] = field(default_factory=dict)  # answers per gateway
    experts: dict[str, int] = field(default_factory=dict)  # answers per expert that answered

    @property
    def per_s(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        xs = sorted(self.latencies_s)
        return xs[min(len(xs) - 1, int(q * (len(xs) - 1)))] if xs else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "sent": self.sent,
            "answered": self.answered,
            "answered_per_s": round(self.per_s, 2),
            "errors": self.errors,
            "unanswered": self.unanswered,
            "p50_s": round(statistics.median(self.latencies_s), 3) if self.latencies_s else None,
            "p99_s": round(self.percentile(0.99), 3) if self.latencies_s else None,
            "by_gateway": dict(sorted(self.gateways.items())),
            "by_expert": dict(sorted(self.experts.items())),
        }


class PromptLoad:
    """``clients`` phones, each its own MQTT connection, each asking one prompt at a time
    with a think time (exponential, mean ``think_s``) between an answer and the next
    question; answers come to each phone's own inbox."""

    def __init__(self, broker: BrokerConfig, clients: int, *, prefix: str = "phone") -> None:
        self.pool = LightPool(broker, keepalive=60)
        self.n = clients
        self.prefix = prefix
        self._lock = threading.Lock()
        self._sent_at: dict[str, tuple[str, float]] = {}  # prompt id -> (phone, perf_counter)
        self._answered: list[float] = []
        self._errors: dict[str, int] = {}
        self._gateways: dict[str, int] = {}
        self._experts: dict[str, int] = {}
        self._due: dict[str, float] = {}  # idle phone -> when it asks next (perf_counter)
        self._sent = 0
        self._think_s = 5.0
        self._rng = random.Random(0)

    def __enter__(self) -> PromptLoad:
        self.pool.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.close()

    def connect(self, timeout: float = 120.0) -> int:
        phones = []
        for i in range(self.n):
            cid = f"{self.prefix}-{i:05d}"
            phones.append(
                self.pool.open(
                    cid,
                    subscriptions=[p.topics.client_answers(cid, cid)],
                    on_message=self._on_reply,
                )
            )
        return self.pool.wait_connected(phones, timeout)

    def _on_reply(self, client: LightClient, msg: mqtt.MQTTMessage) -> None:
        data = json.loads(msg.payload)
        if "index" in data:  # a stream chunk
            return
        with self._lock:
            entry = self._sent_at.pop(str(data.get("id")), None)
            if entry is None:
                return
            phone, sent = entry
            now = time.perf_counter()
            if "error" in data:
                code = str(data["error"].get("code", "?"))
                self._errors[code] = self._errors.get(code, 0) + 1
            else:
                self._answered.append(now - sent)
                gw = str(data.get("gateway"))
                self._gateways[gw] = self._gateways.get(gw, 0) + 1
                for e in data.get("experts", []):
                    self._experts[e["id"]] = self._experts.get(e["id"], 0) + 1
            self._due[phone] = now + self._rng.expovariate(1.0 / self._think_s)

    def run(
        self,
        apps: Sequence[str],
        seconds: float,
        *,
        think_s: float = 5.0,
        max_tokens: int = 4,
        drain_s: float = 60.0,
        seed: int = 0,
    ) -> LoadReport:
        """Ask ``apps`` for ``seconds`` (the first question of each phone at a random time
        within ``think_s``); then wait up to ``drain_s`` for the last answers."""
        self._think_s = think_s
        self._rng = random.Random(seed)
        start = time.perf_counter()
        with self._lock:
            for ph in sorted(self.pool.clients):
                self._due[ph] = start + self._rng.uniform(0, think_s)
        end = start + seconds
        while (now := time.perf_counter()) < end:
            with self._lock:
                ready = [ph for ph, t in self._due.items() if t <= now]
                for ph in ready:
                    del self._due[ph]
            if ready:
                self.pool.call(lambda ready=ready: self._ask(ready, apps, max_tokens))
            time.sleep(0.01)
        elapsed = time.perf_counter() - start
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._sent_at:
                    break
            time.sleep(0.1)
        with self._lock:
            return LoadReport(
                clients=len(self.pool.clients),
                seconds=elapsed,
                sent=self._sent,
                answered=len(self._answered),
                errors=dict(self._errors),
                unanswered=len(self._sent_at),
                latencies_s=list(self._answered),
                gateways=dict(self._gateways),
                experts=dict(self._experts),
            )

    def _ask(self, phones: list[str], apps: Sequence[str], max_tokens: int) -> None:
        """Publish one prompt from each of ``phones`` (on the pool's thread): phone i asks
        application i mod len(apps)."""
        for ph in phones:
            app = apps[int(ph.rsplit("-", 1)[1]) % len(apps)]
            pid = uuid.uuid4().hex[:12]
            req = p.PromptRequest(
                id=pid,
                prompt="the fox eats",
                reply_to=p.topics.client_answers(ph, ph),
                max_tokens=max_tokens,
            )
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = 120
            with self._lock:
                self._sent_at[pid] = (ph, time.perf_counter())
                self._sent += 1
            self.pool.clients[ph].mqtt.publish(
                p.topics.prompts(app), p.encode(req), qos=1, properties=props
            )


# --------------------------------------------------------------------------- processes
# The simulation runs in a process of its own: thousands of sockets there (paho's own
# clients select() on fds below 1024 only) and none of its CPU counted to the measured one.


class SimFleetProcess:
    """``SimFleet`` in a child process, driven by one-line commands::

    with SimFleetProcess(cfg, FleetSpec(agents=1000)) as sim:
        sim.command("crash", "sim-00042")        # -> {"ok": true, ...}
    """

    def __init__(self, broker: BrokerConfig, spec: FleetSpec, timeout: float = 600.0) -> None:
        self.broker = broker
        self.spec = spec
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] = {}

    def __enter__(self) -> SimFleetProcess:
        args = [
            sys.executable,
            str(Path(__file__).resolve()),
            "fleet",
            "--port",
            str(self.broker.port),
            "--spec",
            json.dumps(dataclasses.asdict(self.spec)),
        ]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.ready = self._read()
        return self

    def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()))  # type: ignore[union-attr]
        reader.daemon = True
        reader.start()
        reader.join(self.timeout)
        if not box or not box[0]:
            raise RuntimeError(f"the fleet simulator did not answer (exit {self.proc.poll()})")
        out: dict[str, Any] = json.loads(box[0])
        return out

    def command(self, *words: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(" ".join(words) + "\n")
        self.proc.stdin.flush()
        return self._read()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            self.command("quit")
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def _fleet_main(port: int, spec: FleetSpec) -> None:
    cfg = BrokerConfig(port=port)

    def say(obj: dict[str, Any]) -> None:
        print(json.dumps(obj), flush=True)

    with SimFleet(cfg, spec) as fleet:
        t = time.perf_counter()
        connected = fleet.join_all()
        say(
            {
                "ok": True,
                "connected": connected,
                "join_s": round(time.perf_counter() - t, 2),
                "candidates": fleet.candidates,
                "published": fleet.published,
            }
        )
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            cmd, args = words[0], words[1:]
            try:
                if cmd == "quit":
                    fleet.clear_retained(fleet.retained_topics())
                    say({"ok": True})
                    return
                if cmd == "crash":
                    fleet.crash(args[0])
                elif cmd == "join":
                    fleet.join(args[0])
                elif cmd == "leave":
                    fleet.leave(args[0])
                elif cmd == "churn":
                    say({"ok": True, "events": fleet.churn(float(args[0]), float(args[1]))})
                    continue
                elif cmd != "stats":
                    raise ValueError(f"unknown command {cmd!r}")
                say(
                    {
                        "ok": True,
                        "online": len(fleet.online),
                        "acked": {g.gateway: g.acked for g in fleet.gateways.values()},
                        "rss_mb": _rss_mb(os.getpid()),
                    }
                )
            except Exception as exc:
                say({"ok": False, "error": repr(exc)})


def run_phones(
    broker: BrokerConfig,
    clients: int,
    apps: Sequence[str],
    seconds: float,
    *,
    think_s: float,
    max_tokens: int,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """``PromptLoad`` in a child process; its report as a dict."""
    args = [
        sys.executable,
        str(Path(__file__).resolve()),
        "phones",
        "--port",
        str(broker.port),
        "--clients",
        str(clients),
        "--apps",
        ",".join(apps),
        "--seconds",
        str(seconds),
        "--think-s",
        str(think_s),
        "--max-tokens",
        str(max_tokens),
    ]
    run = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"phones failed ({run.returncode}): {run.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


def _rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description="the simulated fleet, as a child process")
    sub = ap.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fleet")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--spec", default="{}", help="FleetSpec as JSON")
    ph = sub.add_parser("phones")
    ph.add_argument("--port", type=int, required=True)
    ph.add_argument("--clients", type=int, default=1000)
    ph.add_argument("--apps", required=True, help="comma-separated applications")
    ph.add_argument("--seconds", type=float, default=30.0)
    ph.add_argument("--think-s", type=float, default=5.0)
    ph.add_argument("--max-tokens", type=int, default=4)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.what == "fleet":
        raw = json.loads(args.spec)
        if "candidates" in raw:
            raw["candidates"] = tuple(raw["candidates"])
        _fleet_main(args.port, FleetSpec(**raw))
        return
    cfg = BrokerConfig(port=args.port)
    with PromptLoad(cfg, args.clients) as load:
        connected = load.connect()
        apps = args.apps.split(",")
        report = load.run(apps, args.seconds, think_s=args.think_s, max_tokens=args.max_tokens)
    print(json.dumps(report.as_dict() | {"connected": connected}), flush=True)


if __name__ == "__main__":
    main()
