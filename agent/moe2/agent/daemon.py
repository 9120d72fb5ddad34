"""The agent process: MQTT in, one model thread, MQTT out.

The paho network thread only validates requests and queues them, so keepalives keep flowing
(and a hung model still shows up as offline through the last will, not as a hung socket);
the model thread runs one request at a time and always replies: a result, or an error with
a code. Nothing a peer sends can stop either thread.

Self-profiling runs on the model thread too (first at start, then on ``profile`` requests),
so no request is measured as its cost; the profile is published retained, and a failed
profile is logged and answered as an error while the agent keeps serving.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from moe2.agent import __version__
from moe2.agent.backend import ModelBackend
from moe2.agent.config import AgentConfig
from moe2.agent.gateway.service import Gateway
from moe2.agent.profiler import SelfProfiler, current_power_mode
from moe2.agent.service import AgentService
from moe2.shared import protocol as p
from moe2.shared.devices import resolve_device_class
from moe2.shared.errors import Busy, InternalError, Moe2Error, ProtocolError
from moe2.shared.files import sha256_file
from moe2.shared.mqtt import Connection, reply_properties

log = logging.getLogger(__name__)


@dataclass
class _Job:
    request: Any
    response_topic: str | None  # None: the agent's own job (the start-up profile)
    correlation: bytes | None
    received: float
    qos: int = 1  # replies travel with the QoS the request came with


class Agent:
    def __init__(self, config: AgentConfig, backend: ModelBackend) -> None:
        self.config = config
        self.backend = backend
        self.service = AgentService(config.id, backend, config.max_sessions, config.default_top_k)
        self.profiler = self._build_profiler()  # ConfigError: unknown device class or mode
        self.service.profiler = self.profiler
        self.profile: p.AgentProfile | None = None  # the last one published
        self.started_at = time.time()
        self.info = self._build_info()
        offline = p.encode(p.AgentStatus(agent_id=config.id, state="offline"))
        self.conn = Connection(
            config.broker,
            f"moe2-agent-{config.id}",
            will=(p.topics.agent_status(config.id), offline, True),
        )
        self.conn.on_connected.append(self._announce)
        self.conn.subscribe(p.topics.agent_rpc(config.id), self._on_request, qos=1)
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=config.queue_size)
        self._worker = threading.Thread(target=self._work, name="model", daemon=True)
        self._stopped = threading.Event()
        self.gateway: Gateway | None = None
        if config.gateway.enabled:
            self.gateway = Gateway(config.id, config.gateway, config.broker)
        self.dropped_without_reply_topic = 0

    def _build_info(self) -> p.AgentInfo:
        mi = self.backend.info
        digest = None
        if self.config.hash_model_file:
            digest = sha256_file(self.config.model)
        return p.AgentInfo(
            agent_id=self.config.id,
            model=mi.name,
            model_file=self.config.model.name,
            model_sha256=digest,
            architecture=mi.architecture,
            quantization=mi.quantization,
            n_ctx=mi.n_ctx,
            n_vocab=mi.n_vocab,
            tokenizer_hash=mi.tokenizer_hash,
            bos_id=mi.bos_id,
            eos_ids=list(mi.eos_ids),
            add_bos=mi.add_bos,
            chat_template=mi.chat_template,
            device_class=self.profiler.device.device_class,
            software_version=__version__,
            max_sessions=self.config.max_sessions,
            started_at=self.started_at,
            adapter=self._adapter_info(),
        )

    def _adapter_info(self) -> p.AdapterInfo | None:
        cfg, meta = self.config, self.backend.info.adapter
        if cfg.lora is None or meta is None:
            return None
        return p.AdapterInfo(
            name=cfg.lora_name or meta.name or cfg.lora.stem,
            file=cfg.lora.name,
            sha256=sha256_file(cfg.lora) if cfg.hash_model_file else None,
            scale=meta.scale,
            cluster=cfg.lora_cluster or meta.cluster,
        )

    def _build_profiler(self) -> SelfProfiler:
        cfg = self.config.profile
        device, how = resolve_device_class(self.config.device_class)
        mode = cfg.power_mode or current_power_mode(device)
        log.info("device class %s, %s; power mode %s", device.device_class, how, mode or "unknown")
        return SelfProfiler(
            self.backend,
            device,
            mode,
            cfg,
            agent_id=self.config.id,
            meter=cfg.meter,
            cancelled=lambda: self._stopped.is_set(),  # stopping: abandon between measurements
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Agent:
        if self.config.profile.on_start:  # first job: no request is measured as its cost
            self._jobs.put_nowait(_Job(p.ProfileRequest(), None, None, time.monotonic()))
        self._worker.start()
        if self.gateway is not None:  # ready before the agent says it is online
            self.gateway.start()
        self.conn.start()
        adapter = self.info.adapter
        log.info(
            "agent %s serving %s%s",
            self.config.id,
            self.info.model,
            f" + LoRA {adapter.name} (cluster {adapter.cluster})" if adapter else "",
        )
        return self

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.gateway is not None:
            self.gateway.stop()
        offline = p.AgentStatus(agent_id=self.config.id, state="offline", since=time.time())
        try:
            info = self.conn.publish(
                p.topics.agent_status(self.config.id), p.encode(offline), retain=True
            )
            info.wait_for_publish(timeout=2)
        except (RuntimeError, ValueError):
            pass  # not connected: the broker publishes the last will instead
        self.conn.stop()
        self._jobs.put(None)
        self._worker.join(timeout=10)
        if self._worker.is_alive():  # never free the model under a running request
            log.warning("the model thread is still busy; exiting without closing the model")
            return
        self.service.close()

    def wait(self) -> None:
        self._stopped.wait()

    def _announce(self) -> None:
        cid = self.config.id
        self.conn.publish(p.topics.agent_info(cid), p.encode(self.info), retain=True)
        online = p.AgentStatus(agent_id=cid, state="online", since=time.time())
        self.conn.publish(p.topics.agent_status(cid), p.encode(online), retain=True)
        if self.profile is not None:  # again after a reconnect: the broker may have lost it
            self._publish_profile(self.profile)

    def _publish_profile(self, profile: p.AgentProfile) -> None:
        self.profile = profile
        self.conn.publish(
            p.topics.agent_profile(self.config.id), p.encode(profile), qos=1, retain=True
        )

    def _after_profile(self, job: _Job, reply: p.Message) -> p.Message:
        """Publish a new profile and log the outcome (the start-up profile has no caller)."""
        when = "start-up" if job.response_topic is None else "requested"
        if isinstance(reply, p.ErrorReply):
            log.log(
                logging.ERROR if job.response_topic is None else logging.WARNING,
                "%s profile failed (%s): %s; %s",
                when,
                reply.error.code,
                reply.error.message,
                "serving with the previous profile" if self.profile else "serving without one",
            )
            return reply
        assert isinstance(reply, p.ProfileReply)
        prof = reply.profile
        log.info(
            "%s profile: %d prompt lengths in %.1f s, energy from %s (%s)",
            when,
            len(prof.points),
            prof.duration_s,
            prof.meter_source,
            "measured" if prof.energy_measured else "modelled, not measured",
        )
        if not reply.published:
            return reply
        try:
            self._publish_profile(prof)
        except Exception:
            log.exception("could not publish the profile")
            return reply.model_copy(update={"published": False})
        return reply

    # ------------------------------------------------------------------ requests

    def _reply(
        self, topic: str, correlation: bytes | None, message: p.Message, qos: int = 1
    ) -> None:
        self.conn.publish(
            topic, p.encode(message), qos=qos, properties=reply_properties(correlation)
        )

    def _on_request(self, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        topic = getattr(props, "ResponseTopic", None) if props else None
        corr = getattr(props, "CorrelationData", None) if props else None
        corr = bytes(corr) if corr is not None else None
        if not topic:
            # Nowhere to answer: count it, say so in the log, carry on.
            self.dropped_without_reply_topic += 1
            log.warning("request on %s without ResponseTopic dropped (MQTT 5 needed)", msg.topic)
            return
        try:
            request = p.decode_request(msg.payload, self.config.max_payload_bytes)
        except ProtocolError as exc:
            self._reply(
                topic,
                corr,
                p.error_reply(exc.code, exc.message, p.request_op(msg.payload)),
                msg.qos,
            )
            return
        try:
            self._jobs.put_nowait(_Job(request, topic, corr, time.monotonic(), msg.qos))
        except queue.Full:
            err = Busy(
                f"agent {self.config.id} has {self.config.queue_size} requests waiting; retry later"
            )
            self._reply(topic, corr, p.error_reply(err.code, err.message, request.op), msg.qos)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                reply: p.Message = self.service.handle(job.request)
            except Moe2Error as exc:
                reply = p.error_reply(exc.code, exc.message, job.request.op)
            except Exception as exc:  # a bug must cost one request, not the agent
                log.exception("request %s failed", job.request.op)
                err = InternalError(f"{type(exc).__name__}: {exc}")
                reply = p.error_reply(err.code, err.message, job.request.op)
            if isinstance(job.request, p.ProfileRequest):
                reply = self._after_profile(job, reply)
            if job.response_topic is None:
                continue
            try:
                self._reply(job.response_topic, job.correlation, reply, job.qos)
            except Exception:
                log.exception("could not publish the reply to %s", job.response_topic)
