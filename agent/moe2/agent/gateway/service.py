"""The gateway: consumes prompts (shared subscription), answers each exactly once.

Every prompt that names where to answer gets exactly one terminal message there: the final
answer or an error. The network thread only validates and hands prompts to a bounded pool;
beyond ``max_concurrent + max_pending`` prompts the client gets a ``busy`` error at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel

from moe2.agent.gateway.config import GatewayConfig
from moe2.agent.gateway.directory import Directory
from moe2.agent.gateway.gate import Gate, UniformGate, top_k
from moe2.agent.gateway.gatestore import GateStore
from moe2.agent.gateway.generation import Generation, GenerationSettings
from moe2.agent.gateway.links import LinkMonitor
from moe2.shared import protocol as p
from moe2.shared.errors import BadMessage, Moe2Error, NoExperts, UnknownApp
from moe2.shared.mqtt import BrokerConfig, Connection, RpcClient, reply_properties
from moe2.shared.protocol.prompts import check_publish_topic

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, gateway_id: str, config: GatewayConfig, broker: BrokerConfig) -> None:
        self.id = gateway_id
        self.config = config
        self.conn = Connection(broker, f"moe2-gateway-{gateway_id}")
        self.directory = Directory(self.conn)
        self.directory.on_assignment.append(self._ack)
        self.rpc = RpcClient(
            broker, f"gw-{gateway_id}", timeout=config.step_timeout_s, qos=config.rpc_qos
        )
        self.gates: dict[str, Gate] = {}  # per application; uniform until one is pushed
        self.gate_store = GateStore(self.conn, gateway_id, self._use_gate)
        self._pool = ThreadPoolExecutor(config.max_concurrent, thread_name_prefix="prompt")
        self._slots = threading.BoundedSemaphore(config.max_concurrent + config.max_pending)
        self.conn.subscribe(p.topics.prompts_shared(config.group), self._on_prompt, qos=1)
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

    def start(self) -> Gateway:
        self.rpc.start()
        self.conn.start()
        self.links.start()
        return self

    def _served_online_experts(self) -> list[str]:
        wanted = self.directory.assigned_experts()
        for app in self.config.apps.values():
            wanted.update(app.subset)
        return [e for e in wanted if self.directory.online(e) is not None]

    def stop(self) -> None:
        self.links.stop()
        self.conn.stop()
        self.gate_store.close()
        self._pool.shutdown(wait=True, cancel_futures=False)
        self.rpc.close()

    # ------------------------------------------------------------------ replies

    def _send(self, targets: list[tuple[str, bytes | None]], message: BaseModel) -> None:
        payload = message.model_dump_json().encode()
        for topic, corr in targets:
            self.conn.publish(topic, payload, qos=1, properties=reply_properties(corr))

    def _ack(self, a: p.AppAssignment) -> None:
        ack = p.AssignmentAck(gateway=self.id, app=a.app, version=a.version, accepted=True)
        self.conn.publish(p.topics.assignment_ack(self.id, a.app), p.encode(ack), retain=True)
        self.gate_store.want(a.app, a.gate)  # the gate is swapped in once verified and loaded

    def _use_gate(self, app: str, gate: Gate | None) -> None:
        if gate is None:
            self.gates.pop(app, None)
        else:
            self.gates[app] = gate

    # ------------------------------------------------------------------ intake

    def _on_prompt(self, msg: Any) -> None:
        received = time.monotonic()
        props = msg.properties
        rtopic = getattr(props, "ResponseTopic", None) if props else None
        corr = getattr(props, "CorrelationData", None) if props else None
        targets: list[tuple[str, bytes | None]] = []
        if rtopic:
            targets.append((rtopic, bytes(corr) if corr is not None else None))
        app = p.topics.app_from_prompt_topic(msg.topic) or ""
        try:
            req, raw = p.decode_prompt(msg.payload, self.config.max_prompt_bytes)
        except Moe2Error as exc:
            raw = _loose_json(msg.payload)
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
            self._send(
                targets,
                p.prompt_error(req.id, "busy", f"gateway {self.id} is saturated; retry later"),
            )
            return
        self._pool.submit(self._answer, app, req, targets, received)

    # ------------------------------------------------------------------ one prompt

    def _answer(
        self,
        app: str,
        req: p.PromptRequest,
        targets: list[tuple[str, bytes | None]],
        received: float,
    ) -> None:
        try:
            final: BaseModel = self._generate(app, req, targets, received)
            self.answered += 1
        except Moe2Error as exc:
            final = p.prompt_error(req.id, exc.code, exc.message)
            self.errors += 1
        except Exception as exc:  # one prompt's bug must not cost the others their answer
            log.exception("prompt %s failed", req.id)
            final = p.prompt_error(req.id, "internal", f"{type(exc).__name__}: {exc}")
            self.errors += 1
        finally:
            self._slots.release()
        self._send(targets, final)

    def _plan(self, app: str) -> tuple[list[str], int]:
        a = self.directory.assignment(app)
        if a is not None:
            return list(a.subset), a.k
        local = self.config.apps.get(app)
        if local is not None:
            return list(local.subset), local.k
        known = sorted(self.config.apps)
        raise UnknownApp(
            f"no assignment for application {app!r}; this gateway knows "
            f"{', '.join(known) if known else 'no applications'} (push one with moe2ctl)"
        )

    def _generate(
        self,
        app: str,
        req: p.PromptRequest,
        targets: list[tuple[str, bytes | None]],
        received: float,
    ) -> p.PromptAnswer:
        max_tokens = req.max_tokens or self.config.default_max_tokens
        if max_tokens > self.config.max_tokens_limit:
            raise BadMessage(
                f"max_tokens {max_tokens} exceeds this gateway's limit of "
                f"{self.config.max_tokens_limit}"
            )
        subset, k = self._plan(app)
        infos = {n: i for n in subset if (i := self.directory.online(n)) is not None}
        if not infos:
            raise NoExperts(f"none of the experts of {app!r} ({', '.join(subset)}) is online")
        online = [n for n in subset if n in infos]
        gate = self.gates.get(app, UniformGate())
        chosen = dict(top_k(gate.values(req.prompt, online), online, k))
        index = 0

        def on_delta(delta: str) -> None:
            nonlocal index
            if req.stream and delta:
                self._send(targets, p.StreamChunk(id=req.id, index=index, delta=delta))
                index += 1

        settings = GenerationSettings(
            step_timeout_s=self.config.step_timeout_s,
            open_timeout_s=self.config.open_timeout_s,
            top_k=self.config.top_k,
            full_vocab_limit=self.config.full_vocab_limit,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
        )
        gen = Generation(
            self.rpc,
            infos,
            chosen,
            settings,
            deadline=received + self.config.deadline_s,
            on_delta=on_delta,
        )
        result = gen.run(req.prompt, max_tokens)
        return p.PromptAnswer(
            id=req.id,
            text=result.text,
            finish_reason=result.finish_reason,  # type: ignore[arg-type]
            experts=[p.ExpertWeight(id=n, weight=w) for n, w in result.weights.items()],
            tokens=result.tokens,
            latency_ms=(time.monotonic() - received) * 1e3,
            app=app,
            fusion=result.fusion,
            dropped=result.dropped,
        )


def _loose_json(payload: bytes) -> dict[str, Any]:
    import json

    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}
