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
    with SimFleetProcess(cfg, spec) as sim: sim.command("crash", "sim-00042")  # own process

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
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from lightmqtt import LightClient, LightPool, rss_mb

from moe2.agent.profiler import ProfilerSettings, estimate_profile
from moe2.shared import protocol as p
from moe2.shared.costmodel import ModelFigures
from moe2.shared.devices import load_device_class
from moe2.shared.errors import StaleVersion
from moe2.shared.mqtt import BrokerConfig
from moe2.shared.protocol.profiles import ProfilePoint

log = logging.getLogger("fleetsim")


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
    served: dict[str, p.AppAssignment] = field(default_factory=dict)  # app -> as received

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
            epoch=a.epoch,
            answers=p.assignment_digest(a),  # the exact assignment it answers
            accepted=ok,
            serving=ok and a.serves(gw.gateway),
            reason=None if ok else f"stale version: {a.version} is below {current}",
            code=None if ok else StaleVersion.code,
            current=max(current, a.version) if ok else current,
            proof=a if ok else gw.served.get(a.app),  # what it serves, as received (signed)
        )
        if ok:
            gw.apps[a.app] = a.version
            gw.served[a.app] = a
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
                    # the prompt's length in this family's tokens, as collect stores it (the
                    # cost function prices each expert's real token counts)
                    n_prompt = len(smp.prompt.split()) + 2 + agents[e].family % 3
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
                                "prompt_tokens": n_prompt,
                            }
                        )
                if len(batch) > 20000:
                    reg.add_scores(batch)
                    batch = []
        reg.add_scores(batch)
    finally:
        reg.close()
    return candidates


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
                        "rss_mb": rss_mb(os.getpid()),
                    }
                )
            except Exception as exc:
                say({"ok": False, "error": repr(exc)})


def main() -> None:
    ap = argparse.ArgumentParser(description="the simulated fleet, as a child process")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--spec", default="{}", help="FleetSpec as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    raw = json.loads(args.spec)
    if "candidates" in raw:
        raw["candidates"] = tuple(raw["candidates"])
    _fleet_main(args.port, FleetSpec(**raw))


if __name__ == "__main__":
    main()
