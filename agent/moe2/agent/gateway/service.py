"""The gateway: takes prompts for the applications it serves, answers each exactly once.

Every prompt that names where to answer gets exactly one terminal message there: the final
answer or an error. The network thread only validates and hands prompts to a bounded pool;
beyond ``max_concurrent + max_pending`` prompts the client gets a ``busy`` error at once. A
generation holds one session on each expert it asks, never more on an expert than it
announced it holds (``capacity.py``); it waits in line for them, and gets ``busy`` when the
wait would pass ``queue_s``.

No accepted prompt is lost to a stop or a crash:

- the prompt subscriptions live in a persistent MQTT session (``session_expiry_s``), and a
  prompt is acknowledged to the broker only once its answer is sent: a gateway killed
  mid-answer gets its unanswered prompts again when it restarts (with the prompts the broker
  held for it meanwhile), as long as it is back within the session expiry; one that is not
  back within ``adopt_after_s`` has its session taken over by a live gateway of its group,
  which hands the prompts waiting there to live gateways (``adopt.py``);
- ``stop`` drains: it unsubscribes (other gateways take the new prompts), finishes the
  prompts in flight for up to ``drain_s``, answers any left ``cancelled``, then disconnects.

A client that gives up on a prompt publishes a ``PromptCancel`` (``moe2/v1/cancel/<app>``,
or ``moe2/v1/cancel/<app>/<owner>`` for a prompt it published on ``prompts/<app>/<owner>``;
read by every gateway): the gateway holding the prompt ends its generation at the next
reply it waits for (within ``_ALIVE_CHECK_S``-sized polls of the generation), closes the
experts' sessions and answers ``cancelled``; a prompt still waiting for a slot is answered
at once. A cancel that arrives before its prompt is remembered for ``_CANCEL_MEMORY_S``.
A cancel stops only a prompt of its own application and owner level (``PromptKey``): the
broker's ACL lets a login write only ``cancel/+/<itself>``, so no user cancels another's.

Metric labels name only what the fleet defines: an application this gateway does not serve
is counted under ``_unknown`` (clients choose topic names; Prometheus series must not grow
with them).

Replies go only where the broker lets a gateway publish: the replies namespace inside
``moe2/v1/`` (``check_reply_topic``), and outside it only when a probe at start shows the
broker allows it (a broker without logins). A prompt whose ``reply_to`` the broker would
refuse is answered ``bad_request`` on its MQTT 5 ResponseTopic, when it has a usable one.

A prompt published on ``prompts/<app>/<owner>`` (what a client with a broker login does: the
broker's ACL lets it publish only there) is answered only inside ``replies/<owner>/``: a
``reply_to`` or ResponseTopic that names another user's inbox is refused, and an error that
has no usable address goes to ``replies/<owner>/errors``. So no client can make a gateway
write into another user's inbox. A prompt the broker kept retained is never served: the
gateway that sees it clears it and answers ``bad_request`` (mosquitto hands retained messages
to shared subscriptions too, so it would otherwise be served again at every subscription).

What it knows of the fleet comes from one ``FleetView`` (agents' info and status, the
retained assignments); which prompts reach it and how each application is served, from its
``AppRouter``; token texts, from its ``VocabCache``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from moe2.agent.gateway.adopt import SessionAdopter, session_name
from moe2.agent.gateway.capacity import ExpertSlots
from moe2.agent.gateway.choices import ChoiceScorer
from moe2.agent.gateway.config import GatewayConfig
from moe2.agent.gateway.gate import Gate, UniformGate, timed_values, top_k
from moe2.agent.gateway.gatestore import GateStore, onnx_loader
from moe2.agent.gateway.generation import Generation, Sampling
from moe2.agent.gateway.links import LinkMonitor
from moe2.agent.gateway.plans import DecoderMemory
from moe2.agent.gateway.routing import AppRouter
from moe2.agent.gateway.stats import AppStatsWindow, OwnTime, answer_energy, overhead_moved
from moe2.agent.gateway.vocab import Vocab, VocabCache
from moe2.agent.metrics import UNKNOWN_APP, GatewayMetrics
from moe2.shared import protocol as p
from moe2.shared.answercost import GENERATED, Work
from moe2.shared.errors import (
    BadMessage,
    BrokerError,
    Busy,
    Cancelled,
    ExpertOffline,
    InternalError,
    Moe2Error,
    NoExperts,
    UnknownApp,
)
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import BrokerConfig, Connection, RpcClient, reply_properties
from moe2.shared.protocol.prompts import addressable, check_reply_topic
from moe2.shared.signing import Verifier

log = logging.getLogger(__name__)

# After our own (re)connection, an expert's "offline" may be its last will published by a
# broker that restarted; it is back within a second or two. Seconds.
_RECONNECT_GRACE_S = 5.0
# How long an expert's "offline" stands before what waits on it fails (a broker shutting
# down publishes every last will just before it drops us). Seconds.
_OFFLINE_CONFIRM_S = 1.0
_REMEMBER_ANSWERED = 10_000  # prompt messages remembered, to spot a second copy
# A cancel for a prompt not (yet) here is remembered this long, seconds (and at most
# _REMEMBER_CANCELS of them): it may come before its prompt.
_CANCEL_MEMORY_S = 60.0
_REMEMBER_CANCELS = 10_000

# (app, owner, prompt id, reply_to): the topic's application and owner level (None: no
# owner level), shared by a prompt and its cancel, and what the PromptCancel names.
PromptKey = tuple[str, str | None, str, str]

Targets = list[tuple[str, bytes | None]]  # (topic, MQTT 5 correlation data) to answer on


class Gateway:
    def __init__(
        self,
        gateway_id: str,
        config: GatewayConfig,
        broker: BrokerConfig,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.id = gateway_id
        self.config = config
        self.metrics = metrics or GatewayMetrics(CollectorRegistry())
        self.metrics.max_concurrent.set(config.max_concurrent)
        self.metrics.max_pending.set(config.max_pending)
        # Our kept session's client id (bound to our login), named in our status and last
        # will so that a live gateway can adopt the session should we vanish.
        session = broker.client_id(session_name(gateway_id))
        offline = p.GatewayStatus(
            gateway=gateway_id, state="offline", group=config.group, lost=True, session=session
        )
        self.conn = Connection(
            broker,
            session,
            will=(p.topics.gateway_status(gateway_id), p.encode(offline), True),
            session_expiry_s=config.session_expiry_s,
        )
        self.conn.on_unhandled = self._on_stale
        # Prompts for applications nobody serves: answered at once, so no kept session.
        self.unrouted_conn = Connection(broker, f"moe2-gateway-{gateway_id}-unrouted")
        self.fleet = FleetView(self.conn, ("info", "status", "profile", "gateway", "desired_app"))
        self.rpc = RpcClient(
            broker, f"gw-{gateway_id}", timeout=config.step_timeout_s, qos=config.rpc_qos
        )
        self.vocabs = VocabCache(self.rpc, config.open_timeout_s)
        self.decoders = DecoderMemory()  # decoding costs learned per set of experts
        self.gates: dict[str, Gate] = {}  # per application; uniform until one is pushed
        verifier = Verifier.load(config.trusted_keys) if config.trusted_keys else None
        if verifier is None:
            log.warning("no trusted fleet keys: desired state is applied without a signature")
        self.gate_store = GateStore(
            self.conn,
            gateway_id,
            self._use_gate,
            onnx_loader(config.gate_providers, config.gate_engine_cache),
            verifier=verifier,
        )
        self.router = AppRouter(
            gateway_id,
            config,
            self.conn,
            self._when_synced(self._on_prompt),
            self._when_synced(self._on_unrouted),
            self.gate_store.want,
            verifier,
            catch_all_conn=self.unrouted_conn,
        )
        self.fleet.listeners.append(self.router.on_fleet_change)
        self.fleet.listeners.append(self._on_fleet_change)
        self.adopter: SessionAdopter | None = None
        if config.adopt_after_s is not None and config.session_expiry_s > 0:
            self.adopter = SessionAdopter(
                gateway_id,
                config.group,
                broker,
                self.conn,
                self.fleet,
                self._refuse,
                config.adopt_after_s,
            )
            self.fleet.listeners.append(self.adopter.on_fleet_change)
        self._pool = ThreadPoolExecutor(config.max_concurrent, thread_name_prefix="prompt")
        self._slots = threading.BoundedSemaphore(config.max_concurrent + config.max_pending)
        self.experts = ExpertSlots()  # sessions held on each expert
        # Prompts accepted and not yet answered, by MQTT message id (a redelivery of one of
        # them after a reconnect is the same prompt, not a new one).
        self._inflight: dict[int, str] = {}
        self._inflight_lock = threading.Condition()
        # Prompts answered lately, by (message id, payload hash): a copy the broker sends
        # again (our acknowledgement was lost with the connection) is acknowledged, not
        # answered twice.
        self._answered: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._connected_at = 0.0  # time.monotonic() of our last (re)connection
        self._offline_pending: dict[str, float] = {}  # expert -> when its "offline" came
        self._offline_lock = threading.Lock()
        self.conn.on_connected.append(self._on_connected)
        self._abandon = threading.Event()  # drain timed out: end generations with 'cancelled'
        self.may_reply_outside = True  # the broker lets us publish outside moe2/ (probed)
        # Prompts wait until the fleet's retained state is in (our marker came back): a
        # restarted gateway gets the prompts its session kept before it knows any expert.
        self._parked: list[tuple[Any, Any]] = []  # (handler, message)
        self._sync_lock = threading.Lock()
        self.fleet.sync_listeners.append(self._on_synced)
        self.links = LinkMonitor(
            gateway_id,
            self.conn,
            self.rpc,
            self._served_online_experts,
            config.link_probe_interval_s,
            config.link_probe_first_s,
        )
        # Cancellation: the prompts accepted and not answered, and cancels seen early.
        self._cancel_lock = threading.Lock()
        self._cancel_events: dict[PromptKey, threading.Event] = {}
        self._early_cancels: OrderedDict[PromptKey, float] = OrderedDict()
        self.unrouted_conn.subscribe(p.topics.ALL_CANCELS, self._on_cancel)
        self.answered = 0
        self.errors = 0
        self.stats = AppStatsWindow(gateway_id, config.stats_window_s)
        # Our own time per answer (the latency less the gate and the waits on the experts),
        # announced in our status: promises add it to every answer.
        self.own_time = OwnTime()
        self.router.overhead = self.own_time.figure
        self.choices = ChoiceScorer(
            gateway_id, self.rpc, self.fleet, self._choose, config, self.stats, self.own_time
        )
        self._stop_stats = threading.Event()
        self._stats_thread = threading.Thread(target=self._publish_stats, name="app-stats")
        self._stats_thread.daemon = True

    def start(self) -> Gateway:
        self.rpc.start()
        self.router.sync_subscriptions()  # the local applications, subscribed on connecting
        self.conn.start()
        self.unrouted_conn.start()
        self.may_reply_outside = self._probe_reply_outside()
        self.links.start()
        self._stats_thread.start()
        return self

    def _publish_stats(self) -> None:
        last: dict[str, p.AppFigures] | None = None
        announced: p.GatewayOverhead | None = None
        while not self._stop_stats.wait(self.config.stats_interval_s):
            try:
                self.gate_store.announce()  # the gates' latency, when it moved
            except Exception:  # best effort, as the figures below
                log.exception("could not announce the gates' latency")
            own = self.own_time.figure()
            if overhead_moved(announced, own) and self.conn.connected:
                try:  # our own time per answer, in our status, when it moved
                    self.router.publish_status()
                    announced = own
                except Exception:
                    log.exception("could not announce the gateway's own time per answer")
            report = self.stats.report()
            if report.apps == last:
                continue  # nothing new: keep the broker quiet
            last = report.apps
            try:
                self.conn.publish(p.topics.gateway_stats(self.id), p.encode(report), retain=True)
            except Exception:  # best effort: the next round tries again
                log.exception("could not publish the application figures")

    def stop(self, drain_s: float = 30.0) -> None:
        """Stop taking prompts, finish those in flight (for up to ``drain_s``; any left then
        are answered ``cancelled``), then disconnect."""
        self._stop_stats.set()
        if self.adopter is not None:
            self.adopter.stop()
        self.links.stop()
        self.router.stop_intake()
        if not self._drained(drain_s):
            log.warning("prompts still running after %.0f s: answering them 'cancelled'", drain_s)
            self._abandon.set()
            self._drained(10.0)
        self._pool.shutdown(wait=True, cancel_futures=False)
        self.unrouted_conn.stop()
        self.conn.stop()
        self.gate_store.close()
        self.rpc.close()

    def _drained(self, timeout: float) -> bool:
        with self._inflight_lock:
            return self._inflight_lock.wait_for(lambda: not self._inflight, timeout)

    def _probe_reply_outside(self) -> bool:
        """Whether the broker lets this gateway publish outside moe2/ (a broker with logins
        and moe2's ACL does not): one QoS 1 message that nobody reads, and its PUBACK."""
        try:
            self.conn.publish_acked(p.topics.reply_probe(self.id), b"", timeout=5)
        except BrokerError as exc:
            log.info("replies outside moe2/ are refused by the broker (%s)", exc.message)
            return False
        return True

    def _served_online_experts(self) -> list[str]:
        return sorted(e for e in self.router.experts() if self.fleet.online(e) is not None)

    def _on_fleet_change(self, kind: str, key: tuple[str, ...], message: Any) -> None:
        # Learn each vocabulary as soon as an agent that has it comes online.
        if kind in ("info", "status") and message is not None:
            info = self.fleet.online(key[0])
            if info is not None:
                self.vocabs.prefetch(key[0], info)
        # Back online (after a broker restart, say): what we asked it while it was away
        # reached nobody; ask again (requests bear it: steps name their history length).
        if kind == "status" and message is not None and message.state == "online":
            self.rpc.resend(key[0])
        # An expert whose last will says offline answers nothing more: fail what waits on it
        # about a second later rather than at the step timeout. Not at once: a broker that
        # shuts down publishes every agent's last will before it drops us too, and just after
        # we reconnect the agents are coming back; give them _RECONNECT_GRACE_S.
        if kind == "status" and (message is None or message.state == "offline"):
            with self._offline_lock:
                if key[0] in self._offline_pending:
                    return
                self._offline_pending[key[0]] = time.monotonic()
            self._check_offline_later(key[0], _OFFLINE_CONFIRM_S)

    def _on_connected(self) -> None:
        self._connected_at = time.monotonic()

    def _check_offline_later(self, expert: str, delay: float) -> None:
        timer = threading.Timer(delay, self._check_offline, (expert,))
        timer.daemon = True
        timer.start()

    def _check_offline(self, expert: str) -> None:
        with self._offline_lock:
            since = self._offline_pending.get(expert)
        if since is None:
            return
        now = time.monotonic()
        if self.fleet.online(expert) is None:
            if not self.conn.connected:  # our connection is down too: the broker, likely
                self._check_offline_later(expert, _OFFLINE_CONFIRM_S)
                return
            back = self._connected_at + _RECONNECT_GRACE_S
            if self._connected_at >= since - _OFFLINE_CONFIRM_S and now < back:
                self._check_offline_later(expert, back - now)  # we reconnected meanwhile
                return
        with self._offline_lock:
            self._offline_pending.pop(expert, None)
        if self.fleet.online(expert) is not None:
            return
        n = self.rpc.fail_agent(expert, ExpertOffline(f"expert {expert} went offline"))
        if n:
            log.warning("expert %s went offline: %d requests to it failed", expert, n)

    def _expert_alive(self, expert: str) -> bool:
        """Online, or offline so recently that it is not certain (see _on_fleet_change)."""
        if self.fleet.online(expert) is not None:
            return True
        with self._offline_lock:
            return expert in self._offline_pending

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

    def _deliverable(self, topic: str, owner: str | None) -> str:
        """``topic`` if this gateway may answer there a prompt of ``owner`` (the login its
        topic names; None: not named), else ValueError saying why."""
        check_reply_topic(topic, owner)
        if not self.may_reply_outside and p.topics.reply_owner(topic) is None:
            raise ValueError(
                f"this broker does not let gateways publish to {topic!r}: reply on "
                f"{p.topics.REPLIES_ROOT}/<your user>/..., the subtree your login may read"
            )
        return topic

    # ------------------------------------------------------------------ intake

    def _response_target(self, msg: Any, owner: str | None) -> Targets:
        """The MQTT 5 ResponseTopic (with its correlation data), when usable."""
        props = msg.properties
        rtopic = getattr(props, "ResponseTopic", None) if props else None
        corr = getattr(props, "CorrelationData", None) if props else None
        if not rtopic:
            return []
        try:
            return [(self._deliverable(rtopic, owner), bytes(corr) if corr is not None else None)]
        except ValueError as exc:
            log.warning("ignoring ResponseTopic %r: %s", rtopic, exc)
            return []

    def _refuse(self, msg: Any, error: Moe2Error) -> None:
        """Answer a prompt we will not serve, to whoever we can find (never parsing an
        oversized payload, and never recursively, to find them); within the replies of the
        user its topic names, else nowhere."""
        try:
            owner = p.topics.prompt_owner(msg.topic)
        except BadMessage:
            log.warning("prompt on %s names no valid user: dropped (%s)", msg.topic, error.message)
            return
        targets = self._response_target(msg, owner)
        pid: str | None = None
        if len(msg.payload) <= self.config.max_prompt_bytes:
            pid, reply_to = addressable(msg.payload)
            if reply_to and reply_to not in [t for t, _ in targets]:
                with contextlib.suppress(ValueError):
                    targets.append((self._deliverable(reply_to, owner), None))
        if not targets and owner is not None:
            targets = [(p.topics.prompt_errors(owner), None)]
        if not targets:
            log.warning("unanswerable prompt on %s dropped: %s", msg.topic, error.message)
            return
        self.errors += 1
        self.metrics.errors.labels(self._app_label(_app_of(msg)), error.code).inc()
        self._send(targets, p.prompt_error(pid, error.code, error.message))

    def _app_label(self, app: str) -> str:
        """``app`` as a metric label: the applications this gateway serves, else one label."""
        return app if app in self.router.served() else UNKNOWN_APP

    # ------------------------------------------------------------------ cancellation

    def _on_cancel(self, msg: Any) -> None:
        """A client's ``PromptCancel``: stop the prompt it names, if it is ours."""
        topic = p.topics.parse(msg.topic)
        if topic is None or topic.kind != "cancel" or topic.app is None:
            log.debug("ignoring a cancel on %s: not a cancel topic", msg.topic)
            return
        try:
            cancel = p.decode_cancel(msg.payload)
        except Moe2Error as exc:
            log.debug("ignoring a cancel on %s: %s", msg.topic, exc.message)
            return
        key = (topic.app, topic.client, cancel.id, cancel.reply_to)
        now = time.monotonic()
        with self._cancel_lock:
            event = self._cancel_events.get(key)
            if event is None:  # not here (yet): it may be on its way, or another gateway's
                self._early_cancels[key] = now
                self._early_cancels.move_to_end(key)
                while self._early_cancels and (
                    len(self._early_cancels) > _REMEMBER_CANCELS
                    or next(iter(self._early_cancels.values())) < now - _CANCEL_MEMORY_S
                ):
                    self._early_cancels.popitem(last=False)
                return
        log.info("prompt %s cancelled by its client", cancel.id)
        self.metrics.cancelled.inc()
        event.set()
        self.experts.wake()  # a prompt waiting for experts' sessions gives up now

    def _track(self, key: PromptKey) -> threading.Event | None:
        """The cancellation event of a prompt being accepted; None when it was cancelled
        already (its cancel came first)."""
        now = time.monotonic()
        with self._cancel_lock:
            seen = self._early_cancels.pop(key, None)
            if seen is not None and seen >= now - _CANCEL_MEMORY_S:
                return None
            event = self._cancel_events[key] = threading.Event()
            return event

    def _untrack(self, key: PromptKey) -> None:
        with self._cancel_lock:
            self._cancel_events.pop(key, None)

    def _on_unrouted(self, msg: Any) -> None:
        """The catch-all: answer ``unknown_app`` when no online gateway serves the app, and
        ``bad_request`` when the topic names no valid application (no gateway's
        subscription to an application matches it)."""
        if msg.retain and not msg.payload:
            return  # a retained prompt cleared
        topic = p.topics.parse(msg.topic)
        if topic is None or topic.kind != "prompt" or topic.app is None:
            if self._refuse_retained(msg):
                return
            self._refuse(
                msg,
                BadMessage(
                    f"{msg.topic!r} is not a prompt topic: publish to "
                    f"{p.topics.PROMPTS_ROOT}/<app> or {p.topics.PROMPTS_ROOT}/<app>/<your user>, "
                    "each a name of 1-64 letters, digits, '_', '.', '-' starting with a letter "
                    "or digit"
                ),
            )
            return
        app = topic.app
        if app in self.router.served():
            return
        if any(app in g.apps for g in self.fleet.online_gateways().values()):
            return  # a gateway that serves it has its own copy
        if self._refuse_retained(msg):
            return
        served = sorted({a for g in self.fleet.online_gateways().values() for a in g.apps})
        self._refuse(
            msg,
            UnknownApp(
                f"no online gateway serves application {app!r}; served: "
                f"{', '.join(served) if served else 'none'}"
            ),
        )

    def _refuse_retained(self, msg: Any) -> bool:
        """A prompt the broker keeps retained (its retain flag set: our subscriptions keep
        it as published): clear it and answer ``bad_request``, so it is never served, now or
        at a later subscription. False when ``msg`` was not retained."""
        if not msg.retain:
            return False
        if msg.payload:
            log.warning("clearing a retained prompt on %s", msg.topic)
            try:
                self.conn.publish(msg.topic, b"", qos=1, retain=True)
            except (RuntimeError, ValueError):  # not connected: seen again at the next subscribe
                log.warning("could not clear the retained prompt on %s", msg.topic)
            self._refuse(
                msg,
                BadMessage(
                    "prompts must not be published retained (the broker would hand the prompt "
                    "to every gateway that subscribes later); it was cleared and not served"
                ),
            )
        return True

    def _when_synced(self, handler: Any) -> Any:
        def park_or_handle(msg: Any) -> None:
            with self._sync_lock:
                if not self.fleet.synced.is_set():
                    self._parked.append((handler, msg))
                    return
            handler(msg)

        return park_or_handle

    def _on_synced(self) -> None:
        """The fleet view has the broker's retained state (after each connection)."""
        with self._sync_lock:
            parked, self._parked = self._parked, []
        if parked:
            log.info("the fleet's state is in: taking %d prompts that waited for it", len(parked))
        for handler, held in parked:
            handler(held)

    def _on_stale(self, msg: Any) -> None:
        """A message for a subscription of an earlier run of this gateway, kept in its
        persistent session (it served other applications then)."""
        topic = p.topics.parse(msg.topic)
        if topic is not None and topic.kind == "prompt" and topic.app is not None:
            if topic.app in self.router.served():
                self._when_synced(self._on_prompt)(msg)  # acknowledged once answered
                return
            for shared in p.topics.prompts_shared(self.config.group, topic.app):
                self.conn.unsubscribe_raw(shared)
            if not self._refuse_retained(msg):
                self._refuse(
                    msg,
                    UnknownApp(
                        f"gateway {self.id} no longer serves application {topic.app!r} (the "
                        "prompt waited for it while it was away); retry"
                    ),
                )
        self.conn.ack(msg)

    def _on_prompt(self, msg: Any) -> None:
        """Intake of one prompt; it is acknowledged to the broker once answered."""
        accepted = False
        try:
            accepted = self._intake(msg)
        finally:
            if not accepted:
                self._done(msg)

    def _done(self, msg: Any) -> None:
        """The prompt of ``msg`` is answered: acknowledge it, remember it a while."""
        self.conn.ack(msg)
        with self._inflight_lock:
            self._inflight.pop(msg.mid, None)
            self._answered[(msg.mid, hash(bytes(msg.payload)))] = None
            while len(self._answered) > _REMEMBER_ANSWERED:
                self._answered.popitem(last=False)
            self._inflight_lock.notify_all()

    def _intake(self, msg: Any) -> bool:
        received = time.monotonic()
        if msg.dup:
            with self._inflight_lock:
                if msg.mid in self._inflight:
                    return True  # sent again after a reconnect; the first copy is running
                if (msg.mid, hash(bytes(msg.payload))) in self._answered:
                    log.info("prompt message %d came again; answered already", msg.mid)
                    return False
        if self._refuse_retained(msg):
            return False
        topic = p.topics.parse(msg.topic)
        if topic is None or topic.kind != "prompt" or topic.app is None:
            return False  # an invalid owner level: the catch-all answers it
        app, owner = topic.app, topic.client
        targets = self._response_target(msg, owner)
        try:
            req, _raw = p.decode_prompt(msg.payload, self.config.max_prompt_bytes)
            reply_to = self._deliverable(req.reply_to, owner)
        except (Moe2Error, ValueError) as exc:
            error = exc if isinstance(exc, Moe2Error) else BadMessage(f"reply_to: {exc}")
            self._refuse(msg, error)
            return False
        if reply_to not in [t for t, _ in targets]:
            targets.insert(0, (reply_to, None))
        key = (app, owner, req.id, req.reply_to)
        cancelled = self._track(key)
        if cancelled is None:
            self.errors += 1
            self.metrics.errors.labels(self._app_label(app), Cancelled.code).inc()
            gone = Cancelled(f"prompt {req.id} was cancelled by its client before it started")
            self._send(targets, p.prompt_error(req.id, gone.code, gone.message))
            return False
        if not self._slots.acquire(blocking=False):
            self._untrack(key)
            self.errors += 1
            self.metrics.errors.labels(self._app_label(app), Busy.code).inc()
            err = Busy(f"gateway {self.id} is saturated; retry later")
            self._send(targets, p.prompt_error(req.id, err.code, err.message))
            return False
        with self._inflight_lock:
            self._inflight[msg.mid] = req.id
        log.debug("prompt %s accepted (message %d)", req.id, msg.mid)
        self.metrics.in_flight.inc()
        self._pool.submit(self._answer, msg, app, req, targets, received, cancelled, key)
        return True

    # ------------------------------------------------------------------ one prompt

    def _answer(
        self,
        msg: Any,
        app: str,
        req: p.PromptRequest,
        targets: Targets,
        received: float,
        cancelled: threading.Event,
        key: PromptKey,
    ) -> None:
        m = self.metrics
        label = self._app_label(app)
        try:
            if cancelled.is_set():
                raise Cancelled(f"prompt {req.id} was cancelled by its client before it started")
            final: BaseModel = (
                self.choices.answer(app, req, received)
                if req.choices is not None  # multiple choice: scored, not generated
                else self._generate(app, req, targets, received, cancelled)
            )
            self.answered += 1
            m.prompts.labels(label).inc()
        except Moe2Error as exc:
            if isinstance(exc, Cancelled) and cancelled.is_set():
                # The generation says why it stopped in its own words; the client asked.
                exc = Cancelled(f"prompt {req.id} was cancelled by its client")
            final = p.prompt_error(req.id, exc.code, exc.message)
            self.errors += 1
            self.stats.errored(app)
            m.errors.labels(label, exc.code).inc()
        except Exception as exc:  # one prompt's bug must not cost the others their answer
            log.exception("prompt %s failed", req.id)
            err = InternalError(f"{type(exc).__name__}: {exc}")
            final = p.prompt_error(req.id, err.code, err.message)
            self.errors += 1
            self.stats.errored(app)
            m.errors.labels(label, err.code).inc()
        finally:
            self._untrack(key)
            self._slots.release()
            m.in_flight.dec()
        log.debug("prompt %s answered: %s", req.id, type(final).__name__)
        try:
            self._send(targets, final)
        except Exception:
            log.exception("could not send the answer to prompt %s", req.id)
        finally:
            # Answered: the broker may forget the prompt. Not before: had we died, it would
            # have been delivered again when we came back.
            self._done(msg)

    def _choose(
        self, app: str, text: str
    ) -> tuple[dict[str, p.AgentInfo], dict[str, float], float]:
        """The online experts of ``app``'s subset (waited for a moment just after a
        reconnect), the gate's top-k of them for ``text`` with their weights, and the
        seconds the gate took."""
        plan = self.router.plan(app)
        infos = {n: i for n in plan.subset if (i := self.fleet.online(n)) is not None}
        grace = self._connected_at + _RECONNECT_GRACE_S - time.monotonic()
        if not infos and grace > 0:  # just reconnected: the experts are likely coming back
            self.fleet.wait(lambda s: any(s.online(n) for n in plan.subset), grace)
            infos = {n: i for n in plan.subset if (i := self.fleet.online(n)) is not None}
        if not infos:
            raise NoExperts(f"none of the experts of {app!r} ({', '.join(plan.subset)}) is online")
        online = [n for n in plan.subset if n in infos]
        gate = self.gates.get(app, UniformGate())
        values, gate_s = timed_values(gate, text, online)
        if not isinstance(gate, UniformGate):
            self.gate_store.record(gate, gate.tokens(text), gate_s)
        return infos, dict(top_k(values, online, plan.k)), gate_s

    def _generate(
        self,
        app: str,
        req: p.PromptRequest,
        targets: Targets,
        received: float,
        cancelled: threading.Event,
    ) -> p.PromptAnswer:
        max_tokens = req.max_tokens or self.config.default_max_tokens
        if max_tokens > self.config.max_tokens_limit:
            raise BadMessage(
                f"max_tokens {max_tokens} exceeds this gateway's limit of "
                f"{self.config.max_tokens_limit}"
            )
        infos, chosen, gate_s = self._choose(app, req.gate_text)
        vocabs: dict[str, Vocab] = {}
        left_out: list[p.DroppedExpert] = []  # chosen, but unusable: the answer says so
        for name in list(chosen):
            try:
                vocab = self.vocabs.get(name, infos[name])
                if vocab.n_vocab != infos[name].n_vocab:
                    # An announcement that does not match the vocabulary its tokenizer has
                    # (a forged or broken info): never fuse on it.
                    raise BadMessage(
                        f"announces n_vocab={infos[name].n_vocab}, its tokenizer has "
                        f"{vocab.n_vocab} tokens"
                    )
                vocabs[name] = vocab
            except Moe2Error as exc:
                log.warning("expert %s left out of %s: %s", name, req.id, exc.message)
                del chosen[name]
                left_out.append(
                    p.DroppedExpert(id=name, code=exc.code, reason=exc.message, at_token=0)
                )
        if not chosen:
            raise NoExperts(f"no vocabulary is known for the experts chosen for {app!r}")
        capacity = {n: infos[n].max_sessions for n in chosen}
        deadline = received + self.config.deadline_s
        wait_until = min(deadline, received + self.config.queue_s)
        with self.experts.hold(capacity, wait_until, cancelled.is_set):
            return self._fuse(
                app,
                req,
                max_tokens,
                targets,
                received,
                deadline,
                infos,
                vocabs,
                chosen,
                gate_s,
                cancelled,
                left_out,
            )

    def _fuse(
        self,
        app: str,
        req: p.PromptRequest,
        max_tokens: int,
        targets: Targets,
        received: float,
        deadline: float,
        infos: dict[str, p.AgentInfo],
        vocabs: dict[str, Vocab],
        chosen: dict[str, float],
        gate_s: float,
        cancelled: threading.Event,
        left_out: list[p.DroppedExpert],
    ) -> p.PromptAnswer:
        index = 0

        def on_chunk(delta: str, logprobs: list[p.TokenLogprob]) -> None:
            nonlocal index
            if req.stream and (delta or logprobs):
                chunk = p.StreamChunk(
                    id=req.id, index=index, delta=delta, logprobs=logprobs if req.logprobs else None
                )
                self._send(targets, chunk)
                index += 1

        gen = Generation(
            self.rpc,
            infos,
            vocabs,
            chosen,
            self.config,
            Sampling(req.temperature, req.top_p, req.seed),
            deadline=deadline,
            on_chunk=on_chunk,
            alive=self._expert_alive,
            # The gateway stops (drain timed out), or the client cancelled the prompt.
            abandoned=lambda: self._abandon.is_set() or cancelled.is_set(),
            memory=self.decoders,
            top_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        )
        result = gen.run(req.prompt, max_tokens, req.messages)
        latency_s = time.monotonic() - received
        steps = max(1, result.tokens)
        per_token = result.speculation is None or result.speculation.rounds == 0
        if result.waited_s is not None and per_token:  # the work the cost model counts
            self.own_time.add(GENERATED, steps=steps, seconds=latency_s - gate_s - result.waited_s)
        works = {n: Work(length) for n, length in result.prompt_tokens.items() if length > 0}
        energy = answer_energy(self.fleet.copy().profile, works, steps, GENERATED)
        self.stats.answered(app, latency_s=latency_s, gate_s=gate_s, steps=steps, energy=energy)
        m, label = self.metrics, self._app_label(app)
        m.tokens.labels(label).inc(result.tokens)
        for seconds in result.step_seconds:
            m.step_seconds.labels(label).observe(seconds)
        dropped = [*left_out, *result.dropped]
        for d in dropped:
            m.dropped.labels(label, d.id).inc()
        if result.tokens and latency_s > 0:
            m.tokens_per_s.labels(label).observe(result.tokens / latency_s)
        return p.PromptAnswer(
            id=req.id,
            text=result.text,
            finish_reason=result.finish_reason,
            experts=[p.ExpertWeight(id=n, weight=w) for n, w in result.weights.items()],
            tokens=result.tokens,
            latency_ms=latency_s * 1e3,
            app=app,
            fusion=result.fusion,
            dropped=dropped,
            gateway=self.id,
            logprobs=result.logprobs,
            gate_ms=gate_s * 1e3,
            compute_ms=result.compute_ms,
        )


def _app_of(msg: Any) -> str:
    topic = p.topics.parse(msg.topic)
    return topic.app if topic is not None and topic.app is not None else ""
