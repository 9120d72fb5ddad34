"""The gateway: takes prompts for the applications it serves, answers each exactly once.

Every prompt that names where to answer gets exactly one terminal message there: the final
answer or an error. The network thread only validates and hands prompts to a bounded pool;
beyond ``max_concurrent + max_pending`` prompts the client gets a ``busy`` error at once.

What it knows of the fleet comes from one ``FleetView`` (agents' info and status, the
retained assignments); which prompts reach it and how each application is served, from its
``AppRouter``; token texts, from its ``VocabCache``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel

from moe2.agent.gateway.config import GatewayConfig
from moe2.agent.gateway.gate import Gate, UniformGate, top_k
from moe2.agent.gateway.gatestore import GateStore
from moe2.agent.gateway.generation import Generation, Sampling
from moe2.agent.gateway.links import LinkMonitor
from moe2.agent.gateway.routing import AppRouter
from moe2.agent.gateway.speculative import GammaMemory
from moe2.agent.gateway.stats import AppStatsWindow, answer_energy
from moe2.agent.gateway.vocab import Vocab, VocabCache
from moe2.shared import protocol as p
from moe2.shared.errors import BadMessage, Busy, InternalError, Moe2Error, NoExperts, UnknownApp
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import BrokerConfig, Connection, RpcClient, reply_properties
from moe2.shared.protocol.prompts import check_publish_topic

log = logging.getLogger(__name__)

Targets = list[tuple[str, bytes | None]]  # (topic, MQTT 5 correlation data) to answer on


class Gateway:
    def __init__(self, gateway_id: str, config: GatewayConfig, broker: BrokerConfig) -> None:
        self.id = gateway_id
        self.config = config
        offline = p.GatewayStatus(gateway=gateway_id, state="offline", group=config.group)
        self.conn = Connection(
            broker,
            f"moe2-gateway-{gateway_id}",
            will=(p.topics.gateway_status(gateway_id), p.encode(offline), True),
        )
        self.fleet = FleetView(self.conn, ("info", "status", "profile", "gateway", "desired_app"))
        self.rpc = RpcClient(
            broker, f"gw-{gateway_id}", timeout=config.step_timeout_s, qos=config.rpc_qos
        )
        self.vocabs = VocabCache(self.rpc, config.open_timeout_s)
        self.gamma_memory = GammaMemory()  # draft lengths learned across prompts
        self.gates: dict[str, Gate] = {}  # per application; uniform until one is pushed
        self.gate_store = GateStore(self.conn, gateway_id, self._use_gate)
        self.router = AppRouter(
            gateway_id, config, self.conn, self._on_prompt, self._on_unrouted, self.gate_store.want
        )
        self.fleet.listeners.append(self.router.on_fleet_change)
        self.fleet.listeners.append(self._on_fleet_change)
        self._pool = ThreadPoolExecutor(config.max_concurrent, thread_name_prefix="prompt")
        self._slots = threading.BoundedSemaphore(config.max_concurrent + config.max_pending)
        self.links = LinkMonitor(
            gateway_id,
            self.conn,
            self.rpc,
            self._served_online_experts,
            config.link_probe_interval_s,
            config.link_probe_first_s,
        )
        self.answered = 0
        self.errors = 0
        self.stats = AppStatsWindow(gateway_id, config.stats_window_s)
        self._stop_stats = threading.Event()
        self._stats_thread = threading.Thread(target=self._publish_stats, name="app-stats")
        self._stats_thread.daemon = True

    def start(self) -> Gateway:
        self.rpc.start()
        self.router.sync_subscriptions()  # the local applications, subscribed on connecting
        self.conn.start()
        self.links.start()
        self._stats_thread.start()
        return self

    def _publish_stats(self) -> None:
        last: dict[str, p.AppFigures] | None = None
        while not self._stop_stats.wait(self.config.stats_interval_s):
            report = self.stats.report()
            if report.apps == last:
                continue  # nothing new: keep the broker quiet
            last = report.apps
            try:
                self.conn.publish(p.topics.gateway_stats(self.id), p.encode(report), retain=True)
            except Exception:  # best effort: the next round tries again
                log.exception("could not publish the application figures")

    def stop(self) -> None:
        self._stop_stats.set()
        self.links.stop()
        self.router.stop_intake()
        self.conn.stop()
        self.gate_store.close()
        self._pool.shutdown(wait=True, cancel_futures=False)
        self.rpc.close()

    def _served_online_experts(self) -> list[str]:
        return sorted(e for e in self.router.experts() if self.fleet.online(e) is not None)

    def _on_fleet_change(self, kind: str, key: tuple[str, ...], message: Any) -> None:
        # Learn each vocabulary as soon as an agent that has it comes online.
        if kind in ("info", "status") and message is not None:
            info = self.fleet.online(key[0])
            if info is not None:
                self.vocabs.prefetch(key[0], info)

    def _use_gate(self, app: str, gate: Gate | None) -> None:
        if gate is None:
            self.gates.pop(app, None)
        else:
            self.gates[app] = gate

    # ------------------------------------------------------------------ replies

    def _send(self, targets: Targets, message: BaseModel) -> None:
        payload = message.model_dump_json().encode()
        for topic, corr in targets:
            self.conn.publish(topic, payload, qos=1, properties=reply_properties(corr))

    # ------------------------------------------------------------------ intake

    def _targets(self, msg: Any) -> Targets:
        """Where to answer: the MQTT 5 ResponseTopic (with its correlation data), if any."""
        props = msg.properties
        rtopic = getattr(props, "ResponseTopic", None) if props else None
        corr = getattr(props, "CorrelationData", None) if props else None
        return [(rtopic, bytes(corr) if corr is not None else None)] if rtopic else []

    def _refuse(self, msg: Any, targets: Targets, error: Moe2Error) -> None:
        """Answer a prompt we will not serve, to whoever we can find (never parsing an
        oversized payload to find them)."""
        payload = msg.payload
        raw = _loose_json(payload) if len(payload) <= self.config.max_prompt_bytes else {}
        reply_to = raw.get("reply_to") if isinstance(raw.get("reply_to"), str) else None
        pid = raw.get("id") if isinstance(raw.get("id"), str) else None
        if reply_to and reply_to not in [t for t, _ in targets]:
            with contextlib.suppress(ValueError):
                targets.append((check_publish_topic(reply_to), None))
        if not targets:
            log.warning("unanswerable prompt on %s dropped: %s", msg.topic, error.message)
            return
        self.errors += 1
        self._send(targets, p.prompt_error(pid, error.code, error.message))

    def _on_unrouted(self, msg: Any) -> None:
        """The catch-all: answer ``unknown_app`` when no online gateway serves the app."""
        topic = p.topics.parse(msg.topic)
        app = topic.app if topic is not None else None
        if app is None or app in self.router.served():
            return
        if any(app in g.apps for g in self.fleet.online_gateways().values()):
            return  # a gateway that serves it has its own copy
        served = sorted({a for g in self.fleet.online_gateways().values() for a in g.apps})
        self._refuse(
            msg,
            self._targets(msg),
            UnknownApp(
                f"no online gateway serves application {app!r}; served: "
                f"{', '.join(served) if served else 'none'}"
            ),
        )

    def _on_prompt(self, msg: Any) -> None:
        received = time.monotonic()
        props = msg.properties
        rtopic = getattr(props, "ResponseTopic", None) if props else None
        corr = getattr(props, "CorrelationData", None) if props else None
        targets: Targets = []
        if rtopic:
            targets.append((rtopic, bytes(corr) if corr is not None else None))
        topic = p.topics.parse(msg.topic)
        app = topic.app if topic is not None and topic.app is not None else ""
        try:
            req, _raw = p.decode_prompt(msg.payload, self.config.max_prompt_bytes)
        except Moe2Error as exc:
            # Say why to whoever we can find, but never parse an oversized payload for it.
            raw = (
                _loose_json(msg.payload) if len(msg.payload) <= self.config.max_prompt_bytes else {}
            )
            reply_to = raw.get("reply_to") if isinstance(raw.get("reply_to"), str) else None
            pid = raw.get("id") if isinstance(raw.get("id"), str) else None
            if reply_to and reply_to not in [t for t, _ in targets]:
                with contextlib.suppress(ValueError):
                    targets.append((check_publish_topic(reply_to), None))
            if not targets:
                log.warning("unanswerable prompt on %s dropped: %s", msg.topic, exc.message)
                return
            self.errors += 1
            self._send(targets, p.prompt_error(pid, exc.code, exc.message))
            return
        if req.reply_to not in [t for t, _ in targets]:
            targets.insert(0, (req.reply_to, None))
        if not self._slots.acquire(blocking=False):
            self.errors += 1
            err = Busy(f"gateway {self.id} is saturated; retry later")
            self._send(targets, p.prompt_error(req.id, err.code, err.message))
            return
        self._pool.submit(self._answer, app, req, targets, received)

    # ------------------------------------------------------------------ one prompt

    def _answer(self, app: str, req: p.PromptRequest, targets: Targets, received: float) -> None:
        try:
            final: BaseModel = self._generate(app, req, targets, received)
            self.answered += 1
        except Moe2Error as exc:
            final = p.prompt_error(req.id, exc.code, exc.message)
            self.errors += 1
            self.stats.errored(app)
        except Exception as exc:  # one prompt's bug must not cost the others their answer
            log.exception("prompt %s failed", req.id)
            err = InternalError(f"{type(exc).__name__}: {exc}")
            final = p.prompt_error(req.id, err.code, err.message)
            self.errors += 1
            self.stats.errored(app)
        finally:
            self._slots.release()
        self._send(targets, final)

    def _generate(
        self, app: str, req: p.PromptRequest, targets: Targets, received: float
    ) -> p.PromptAnswer:
        max_tokens = req.max_tokens or self.config.default_max_tokens
        if max_tokens > self.config.max_tokens_limit:
            raise BadMessage(
                f"max_tokens {max_tokens} exceeds this gateway's limit of "
                f"{self.config.max_tokens_limit}"
            )
        plan = self.router.plan(app)
        infos = {n: i for n in plan.subset if (i := self.fleet.online(n)) is not None}
        if not infos:
            raise NoExperts(f"none of the experts of {app!r} ({', '.join(plan.subset)}) is online")
        online = [n for n in plan.subset if n in infos]
        gate = self.gates.get(app, UniformGate())
        chosen = dict(top_k(gate.values(req.prompt, online), online, plan.k))
        vocabs: dict[str, Vocab] = {}
        for name in list(chosen):
            try:
                vocabs[name] = self.vocabs.get(name, infos[name])
            except Moe2Error as exc:
                log.warning("expert %s left out of %s: %s", name, req.id, exc.message)
                del chosen[name]
        if not chosen:
            raise NoExperts(f"no vocabulary is known for the experts chosen for {app!r}")
        index = 0

        def on_delta(delta: str) -> None:
            nonlocal index
            if req.stream and delta:
                self._send(targets, p.StreamChunk(id=req.id, index=index, delta=delta))
                index += 1

        gen = Generation(
            self.rpc,
            infos,
            vocabs,
            chosen,
            self.config,
            Sampling(req.temperature, req.top_p, req.seed),
            deadline=received + self.config.deadline_s,
            on_delta=on_delta,
            gamma_memory=self.gamma_memory,
        )
        result = gen.run(req.prompt, max_tokens)
        latency_s = time.monotonic() - received
        profiles = self.fleet.copy().profile
        energy, measured = answer_energy(profiles, result.prompt_tokens, max(1, result.tokens))
        self.stats.answered(
            app,
            latency_s=latency_s,
            steps=max(1, result.tokens),
            energy_j_per_step=energy,
            energy_measured=measured,
        )
        return p.PromptAnswer(
            id=req.id,
            text=result.text,
            finish_reason=result.finish_reason,
            experts=[p.ExpertWeight(id=n, weight=w) for n, w in result.weights.items()],
            tokens=result.tokens,
            latency_ms=latency_s * 1e3,
            app=app,
            fusion=result.fusion,
            dropped=result.dropped,
            gateway=self.id,
        )


def _loose_json(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}
