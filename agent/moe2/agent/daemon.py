"""The agent process: MQTT in, one model thread, MQTT out.

The paho network thread only validates requests and queues them, so keepalives keep flowing
(and a hung model still shows up as offline through the last will, not as a hung socket);
the model thread hands them to the scheduler (``batching.py``), which evaluates every request
in progress in one batch per tick, and always replies: a result, or an error with a code, in
the codec the request came in. Nothing a peer sends can stop either thread.

A request's model time (``compute_ms`` in its reply, what its energy is of) is read from the
clock of the meter the profiles use (``Meter.model_clock``: where energy is modelled and the
model computes on the CPU, the model thread's CPU time). What each request spends in the
agent beyond its model work is measured too (``overhead.py``) and announced with the
profile, re-announced when it moves, so that promises count it.

Self-profiling runs on the model thread too (first at start, then on ``profile`` requests),
so no request is measured as its cost, and serves the requests waiting for the model between
two measurements, so a profile delays them by one measurement at most; the profile is
published retained, and a failed profile is logged and answered as an error while the agent
keeps serving.

Stopping (SIGTERM) drains: the gateway, if any, stops taking prompts and finishes those in
flight; then the agent opens no new session and takes no new scoring (``cancelled``) but
serves the sessions other gateways still step and the work it accepted, for up to
``drain_s``; only then does it say offline and disconnect, dropping whatever is left.

Nothing is computed for nobody. Every request carries its deadline (``timeout_ms``, counted
from its arrival here) and names its requester (``RpcClient``): a request whose deadline
passed is never started and one in progress is stopped at its next tick; the work of a
requester that is gone (``requesters.py``) is dropped and its sessions freed; a request sent
again (same requester and correlation) while the first copy is queued or running is ignored
(the first one's reply answers it). Backpressure instead of queueing: new work (open and the
scoring operations) that the work queued ahead would not let finish by its deadline is
refused at once with ``busy`` and a retry-after hint (the time that work takes, at the
throughput the last ticks measured). The metrics count what was dropped and why, and the
model time spent on answers nobody got.

An agent keeps its retained announcements true: when its info or status topic shows something
else than it published (overwritten or cleared by someone with write access), it publishes
them again.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

import paho.mqtt.client as mqtt

from moe2.agent import __version__
from moe2.agent.backend import ModelBackend
from moe2.agent.batching import Drop, Scheduler
from moe2.agent.config import AgentConfig
from moe2.agent.gateway.service import Gateway
from moe2.agent.metrics import AgentMetrics, GatewayMetrics
from moe2.agent.metrics import serve as serve_metrics
from moe2.agent.overhead import RequestTimes, moved, probe
from moe2.agent.profiler import SelfProfiler, current_power_mode
from moe2.agent.requesters import Requesters
from moe2.agent.service import AgentService, work_tokens
from moe2.shared import protocol as p
from moe2.shared.devices import resolve_device_class
from moe2.shared.errors import Busy, Cancelled, ProtocolError, RequestTimeout
from moe2.shared.files import sha256_file
from moe2.shared.mqtt import Connection, reply_properties, reply_qos, requester_of

log = logging.getLogger(__name__)

# A session stepped within this many seconds is in use (a generation steps every few seconds
# at most: the gateways' step timeout); the drain on stop waits for those.
_STEP_GAP_S = 5.0
# How often the model thread frees sessions: idle ones, orphans, those of gone requesters
# (an idle model thread wakes this often, and looks at its own time per request too).
_HOUSEKEEPING_S = 1.0
# How often the agent looks whether its own time per request moved enough to announce.
_OVERHEAD_EVERY_S = 2.0
# New work: what backpressure may refuse, and what a draining agent no longer takes (steps,
# drafts and verifications continue sessions in use).
_NEW_WORK = (p.OpenRequest, p.ScoreRequest, p.ScoreManyRequest, p.ScoreChoicesRequest)


@dataclass
class _Job:
    request: Any
    response_topic: str | None  # None: the agent's own job (the start-up profile)
    correlation: bytes | None
    received: float
    qos: int = 1  # replies travel with the QoS the request came with
    codec: str = "json"  # replies travel in the codec the request came in
    model_s: float = 0.0  # wall seconds of its model work (set by the scheduler)
    deadline: float | None = None  # time.monotonic(): its requester stops waiting then
    requester: str | None = None  # "<owner>/<client id>", when it named itself
    tokens: int | None = None  # model work it asks for, estimated (None: none)
    key: tuple[str, bytes] | None = field(default=None, repr=False)  # (requester, correlation)


_WAKE = _Job(None, None, None, 0.0)  # queued to wake the model thread (a requester is gone)


class Agent:
    def __init__(self, config: AgentConfig, backend: ModelBackend) -> None:
        self.config = config
        self.backend = backend
        self.profiler = self._build_profiler()  # ConfigError: unknown device class or mode
        model_clock = self.profiler.model_clock()
        self.service = AgentService(
            config.id,
            backend,
            config.max_sessions,
            config.default_top_k,
            config.session_idle_s,
            model_clock=model_clock,
        )
        self.service.profiler = self.profiler
        self.profile: p.AgentProfile | None = None  # the last one published
        self.request_times = RequestTimes()  # our own time per request (overhead.py)
        self._overhead_checked = 0.0  # time.monotonic() of the last look at it
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
        # What we announced last, to notice when someone overwrites or clears it.
        self._announced: dict[str, bytes] = {}
        self.conn.subscribe(p.topics.agent_info(config.id), self._on_own_announcement)
        self.conn.subscribe(p.topics.agent_status(config.id), self._on_own_announcement)
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=config.queue_size)
        self._worker = threading.Thread(target=self._work, name="model", daemon=True)
        self._stopped = threading.Event()
        self.metrics = AgentMetrics(config.id)
        self.metrics.watch(self._jobs.qsize, lambda: len(self.service.sessions))
        self.scheduler = Scheduler(
            backend,
            self.service.start,
            self._done,
            clock=model_clock,
            on_model_time=_model_time,
            drop=self._why_drop,
            on_drop=self._on_drop,
            late=lambda job: job.deadline is not None and time.monotonic() > job.deadline,
        )
        self.requesters = Requesters(self.conn, self._requester_gone, self.service.sessions.resync)
        self._draining = False  # stopping: new work is refused, accepted work finishes
        self._closing = False  # disconnected: whatever is left is dropped
        self._gone: set[str] = set()  # requesters whose sessions are still to free
        self._gone_lock = threading.Lock()
        # Jobs queued for the model thread (id -> estimated tokens) and the requests in
        # progress (requester, correlation), both shared with the network thread.
        self._queued: dict[int, int] = {}
        self._inflight: set[tuple[str, bytes]] = set()
        self._queued_lock = threading.Lock()
        # (compute_s, wasted_s, late_s) of the scheduler already in the metrics
        self._compute_counted = (0.0, 0.0, 0.0)
        if backend.offload is not None:
            self.metrics.set_offload(backend.offload)
        self._metrics_server: WSGIServer | None = None
        self._tokens_counted = 0
        self.gateway: Gateway | None = None
        if config.gateway.enabled:
            self.gateway = Gateway(
                config.id, config.gateway, config.broker, GatewayMetrics(self.metrics.registry)
            )
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
            backend=self._compute_backend(),
            device_class=self.profiler.device.device_class,
            software_version=__version__,
            max_sessions=self.config.max_sessions,
            started_at=self.started_at,
            adapter=self._adapter_info(),
            codecs=list(p.CODECS),
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

    def _compute_backend(self) -> p.ComputeBackend | None:
        off = self.backend.offload
        if off is None:
            return None
        return p.ComputeBackend(
            name=off.backend,
            gpu_layers=off.gpu_layers,
            n_layers=off.n_layers,
            requested_layers=off.requested_layers,
            vram_bytes=off.vram_bytes,
            supports_gpu_offload=off.supports_gpu_offload,
            devices=[
                p.ComputeDevice(
                    name=d.name, description=d.description, kind=d.kind, memory_total=d.memory_total
                )
                for d in off.devices
            ],
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
            between=self._serve_waiting,  # requests do not wait for a whole profile
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Agent:
        if self.config.profile.on_start:  # first job: no request is measured as its cost
            self._jobs.put_nowait(_Job(p.ProfileRequest(), None, None, time.monotonic()))
        self._worker.start()
        if self.gateway is not None:  # ready before the agent says it is online
            self.gateway.start()
        if self.config.metrics_port is not None:  # ConfigError: the port is taken
            self._metrics_server = serve_metrics(
                self.metrics.registry, self.config.metrics_host, self.config.metrics_port
            )
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
            self.gateway.stop(drain_s=self.config.drain_s)
        self._drain_sessions()
        self._closing = True  # from here on nobody would get an answer: compute nothing
        offline = p.AgentStatus(agent_id=self.config.id, state="offline", since=time.time())
        try:
            info = self.conn.publish(
                p.topics.agent_status(self.config.id), p.encode(offline), retain=True
            )
            info.wait_for_publish(timeout=2)
        except (RuntimeError, ValueError):
            pass  # not connected: the broker publishes the last will instead
        self.conn.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self._jobs.put(None)
        self._worker.join(timeout=10)
        if self._worker.is_alive():  # never free the model under a running request
            log.warning("the model thread is still busy; exiting without closing the model")
            return
        self.service.close()

    def _drain_sessions(self) -> None:
        """Open no new session and take no new work; serve the sessions in use and the work
        accepted until they are done or ``drain_s``."""
        self.service.accepting = False
        self._draining = True
        deadline = time.monotonic() + self.config.drain_s

        def busy() -> bool:
            # In use: stepped recently. A generation steps every few seconds at most (the
            # gateways' step timeout); a session quiet for longer was abandoned.
            with self._queued_lock:
                queued = len(self._queued)
            return (
                self.service.sessions.in_use(_STEP_GAP_S) > 0
                or not self.scheduler.idle
                or queued > 0
            )

        while time.monotonic() < deadline and busy():
            time.sleep(0.05)
        left = self.service.sessions.in_use(_STEP_GAP_S)
        if left or not self.scheduler.idle:
            log.warning(
                "stopping with %d sessions still in use and %d requests in progress after "
                "%.0f s: dropping them",
                left,
                len(self.scheduler.needs),
                self.config.drain_s,
            )

    def wait(self) -> None:
        self._stopped.wait()

    def _announce(self) -> None:
        if self._stopped.is_set():
            return
        cid = self.config.id
        info = p.encode(self.info)
        online = p.encode(p.AgentStatus(agent_id=cid, state="online", since=time.time()))
        self._announced = {p.topics.agent_info(cid): info, p.topics.agent_status(cid): online}
        for topic, payload in self._announced.items():
            self.conn.publish(topic, payload, retain=True)
        if self.profile is not None:  # again after a reconnect: the broker may have lost it
            self._publish_profile(self.profile)

    def _on_own_announcement(self, msg: mqtt.MQTTMessage) -> None:
        """Our info or status as the broker holds it: announce again when it is not ours."""
        want = self._announced.get(msg.topic)
        if want is None or bytes(msg.payload) == want or self._stopped.is_set():
            return
        if not self.conn.connected:  # our own last will, as the connection went down
            return
        log.warning("%s was changed by someone else; announcing again", msg.topic)
        self.conn.publish(msg.topic, want, retain=True)

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
        try:  # what a request costs here beyond the model, seeded before anything is served
            self.request_times.seed(probe(self.service, self.scheduler.clock))
        except Exception:
            log.exception("could not probe the agent's own time per request")
        prof = self._with_overhead(reply.profile)
        reply = reply.model_copy(update={"profile": prof})
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
        self,
        topic: str,
        correlation: bytes | None,
        message: p.Message,
        qos: int = 1,
        codec: str = "json",
    ) -> None:
        self.conn.publish(
            topic, p.encode_rpc(message, codec), qos=qos, properties=reply_properties(correlation)
        )

    def _on_request(self, msg: mqtt.MQTTMessage) -> None:
        received = time.monotonic()  # decoding is part of a request's handling
        props = msg.properties
        topic = getattr(props, "ResponseTopic", None) if props else None
        corr = getattr(props, "CorrelationData", None) if props else None
        corr = bytes(corr) if corr is not None else None
        qos = reply_qos(msg)
        if not topic:
            # Nowhere to answer: count it, say so in the log, carry on.
            self.dropped_without_reply_topic += 1
            log.warning("request on %s without ResponseTopic dropped (MQTT 5 needed)", msg.topic)
            return
        codec = p.payload_codec(msg.payload)
        try:
            request = p.decode_request(msg.payload, self.config.max_payload_bytes)
        except ProtocolError as exc:
            self._reply(
                topic,
                corr,
                p.error_reply(exc.code, exc.message, p.request_op(msg.payload)),
                qos,
                codec,
            )
            return
        requester = requester_of(msg)
        job = _Job(request, topic, corr, received, qos, codec, requester=requester)
        if request.timeout_ms is not None:
            job.deadline = received + request.timeout_ms / 1e3
        job.tokens = work_tokens(request)
        if requester is not None and corr is not None:
            job.key = (requester, corr)
        refusal = self._refuse(job)
        if refusal is not None:
            reason, err = refusal
            self.metrics.dropped.labels(request.op, reason).inc()
            if isinstance(err, Busy):
                self.metrics.busy.inc()
            after = err.retry_after_s if isinstance(err, Busy) else None
            reply = p.error_reply(
                err.code, err.message, request.op, after * 1e3 if after is not None else None
            )
            self._reply(topic, corr, reply, qos, codec)
            return
        if job.key is not None:
            with self._queued_lock:
                if job.key in self._inflight:  # sent again; the first copy will answer it
                    self.metrics.dropped.labels(request.op, "duplicate").inc()
                    return
                self._inflight.add(job.key)
        with self._queued_lock:
            self._queued[id(job)] = job.tokens or 0
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self._taken(job)
            self._forget(job)
            self.metrics.busy.inc()
            self.metrics.dropped.labels(request.op, "busy").inc()
            err = Busy(
                f"agent {self.config.id} has {self.config.queue_size} requests waiting; retry later"
            )
            self._reply(topic, corr, p.error_reply(err.code, err.message, request.op), qos, codec)

    def _refuse(self, job: _Job) -> tuple[str, Busy | Cancelled] | None:
        """Why new work is refused at once: the agent stops, or the work ahead of it would
        not let it finish by its deadline (backpressure); None: queue it."""
        if not isinstance(job.request, _NEW_WORK):
            return None
        if self._draining:
            return "stopping", Cancelled(f"agent {self.config.id} is stopping; ask another")
        spt = self.scheduler.seconds_per_token
        if job.deadline is None or job.tokens is None or spt is None:
            return None
        n = job.tokens
        with self._queued_lock:
            queued = list(self._queued.values())
        ahead = sum(min(x, n) for x in self.scheduler.needs) + sum(min(x, n) for x in queued)
        wait_s, alone_s = ahead * spt, n * spt
        left = job.deadline - time.monotonic()
        if wait_s + alone_s <= left or alone_s > left:
            return None  # it fits; or not even alone: the deadline, not the load, is short
        return "busy", Busy(
            f"agent {self.config.id} has about {wait_s:.1f} s of work queued ahead of this "
            f"request (~{n} tokens), which has {left:.1f} s left; retry later",
            retry_after_s=wait_s,
        )

    def _taken(self, job: _Job) -> None:
        """The model thread took ``job`` out of the queue."""
        with self._queued_lock:
            self._queued.pop(id(job), None)

    def _forget(self, job: _Job) -> None:
        """``job`` is answered: a copy sent again from now on is a new request."""
        if job.key is not None:
            with self._queued_lock:
                self._inflight.discard(job.key)

    # ------------------------------------------------------------------ dropping

    def _why_drop(self, job: _Job, running: bool) -> Drop | None:
        """Why the scheduler must drop ``job`` now (model thread; ``running``: its task has
        begun); None: go on."""
        if isinstance(job.request, p.CloseRequest):
            return None  # frees a session, costs nothing: always done
        if self._closing:
            return Drop("stopping", Cancelled(f"agent {self.config.id} stopped"))
        if self.requesters.is_gone(job.requester):
            return Drop("requester_gone", Cancelled(f"requester {job.requester} is gone"))
        now = time.monotonic()
        if job.deadline is not None and now > job.deadline:
            waited = now - job.received
            return Drop(
                "expired_running" if running else "expired",
                RequestTimeout(
                    f"the requester's deadline passed {'while' if running else 'before'} agent "
                    f"{self.config.id} {'computed' if running else 'could start'} it "
                    f"({waited:.1f} s after it came); nothing more is computed for it"
                ),
            )
        return None

    def _on_drop(self, job: _Job, why: Drop, lost_s: float) -> None:
        self.metrics.dropped.labels(job.request.op, why.reason).inc()

    def _requester_gone(self, key: str) -> None:
        """A requester is gone (its last will): drop its work, free its sessions."""
        with self._gone_lock:
            self._gone.add(key)
        # Full: the model thread is busy, and frees them at its next housekeeping.
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(_WAKE)

    def _count(self, op: str, reply: p.Message, seconds: float) -> None:
        m = self.metrics
        m.requests.labels(op).inc()
        m.request_seconds.labels(op).observe(seconds)
        if isinstance(reply, p.ErrorReply):
            m.errors.labels(op, reply.error.code).inc()
        evaluated = self.service.tokens_evaluated
        if evaluated > self._tokens_counted:
            m.tokens.inc(evaluated - self._tokens_counted)
            self._tokens_counted = evaluated

    def _work(self) -> None:
        """The model thread: queued requests go to the scheduler, which evaluates every
        active request's next chunk in one batch per tick (``batching.py``); every second,
        sessions are freed (idle, orphaned, or of a requester that is gone)."""
        stopping = False
        max_wait = self.config.batch_wait_ms / 1e3
        next_housekeeping = 0.0
        while not stopping:
            # Wait only when there is nothing to compute; otherwise take what has arrived
            # (and, once idle, what the last tick's other sessions send within a moment).
            idle = block = self.scheduler.idle
            taken, until = 0, 0.0
            while True:
                timeout = _HOUSEKEEPING_S if block else None
                if until:
                    timeout = until - time.monotonic()
                    if timeout <= 0:
                        break
                try:
                    job = self._jobs.get(block=block or bool(until), timeout=timeout)
                except queue.Empty:
                    break
                block = False
                if job is None:
                    stopping = True
                    break
                if job is _WAKE:
                    next_housekeeping = 0.0
                    continue
                self._taken(job)
                self.scheduler.submit(job)
                taken += 1
                if idle:
                    window = self.scheduler.gather_window(taken, max_wait)
                    until = (until or time.monotonic() + window) if window else 0.0
            if stopping:
                break
            self.scheduler.tick()
            self._count_compute()
            if time.monotonic() >= next_housekeeping:
                next_housekeeping = time.monotonic() + _HOUSEKEEPING_S
                self._housekeeping()
            self._announce_overhead()
        # Disconnected: nobody would get an answer now. Compute nothing more.
        dropped = self.scheduler.drop_all(Drop("stopping", Cancelled("the agent stopped")))
        if dropped:
            log.info("dropped %d requests in progress as the agent stopped", dropped)
        self._count_compute()

    def _housekeeping(self) -> None:
        """Free the sessions of requesters that are gone (once no request works on them),
        and those left idle or orphaned."""
        with self._gone_lock:
            gone = list(self._gone)
        for key in gone:
            self.service.sessions.close_owned(key)
            if not self.service.sessions.owned(key):
                with self._gone_lock:
                    self._gone.discard(key)
        self.service.sessions.reclaim_idle()

    def _count_compute(self) -> None:
        s, m = self.scheduler, self.metrics
        now = (s.compute_s, s.wasted_s, s.late_s)
        for counter, value, counted in zip(
            (m.compute_seconds, m.wasted_seconds, m.late_seconds), now, self._compute_counted
        ):
            if value > counted:
                counter.inc(value - counted)
        self._compute_counted = now

    def _serve_waiting(self) -> None:
        """Between two profiling measurements: serve the requests waiting now (a profile
        request waits for the running one to finish)."""
        later: list[_Job | None] = []
        for _ in range(self._jobs.qsize()):
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None or job is _WAKE or isinstance(job.request, p.ProfileRequest):
                later.append(job)
            else:
                self._taken(job)
                self.scheduler.run(job)
        for job in later:
            self._jobs.put(job)

    def _done(self, job: _Job, reply: p.Message) -> None:
        self._forget(job)
        self._count(job.request.op, reply, time.monotonic() - job.received)
        if isinstance(job.request, p.ProfileRequest):
            reply = self._after_profile(job, reply)
        if job.response_topic is None:
            return
        try:
            self._reply(job.response_topic, job.correlation, reply, job.qos, job.codec)
        except Exception:
            log.exception("could not publish the reply to %s", job.response_topic)
            return
        if not isinstance(reply, p.ErrorReply):
            op = job.request.op
            self.request_times.served(op, time.monotonic() - job.received - job.model_s)

    def _with_overhead(self, profile: p.AgentProfile) -> p.AgentProfile:
        curves = profile.curves.model_copy(update={"overhead": self.request_times.figure()})
        return profile.model_copy(update={"curves": curves})

    def _announce_overhead(self) -> None:
        """Publish the profile again when our own time per request moved (looked at every
        ``_OVERHEAD_EVERY_S`` at most)."""
        now = time.monotonic()
        if self.profile is None or now - self._overhead_checked < _OVERHEAD_EVERY_S:
            return
        self._overhead_checked = now
        if not moved(self.profile.curves.overhead, self.request_times.figure()):
            return
        try:
            self._publish_profile(self._with_overhead(self.profile))
        except Exception:
            log.exception("could not publish the profile with the new request overhead")


def _model_time(job: _Job, wall_s: float) -> None:
    job.model_s = wall_s
