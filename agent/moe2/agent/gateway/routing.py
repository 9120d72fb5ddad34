"""Which applications this gateway serves, with which experts, and where its prompts come from.

An application is served from the gateway's local configuration (``--serve-app``) until the
controller pushes an assignment for it; a pushed assignment then decides, and may leave this
gateway out (``AppAssignment.gateways``). For every application it serves, the gateway holds
the shared subscriptions ``$share/<group>/moe2/v1/prompts/<app>`` and ``.../<app>/+`` (a
prompt that names its publisher), so a prompt only ever reaches a gateway that serves its
application; a prompt for an application nobody serves reaches every gateway's catch-all
subscription (a shared group of its own), and the one gateway that gets it answers
``unknown_app`` when no online gateway announces that application.

Versions only grow. A version above the current one is applied and acknowledged; the same
version with the same content is acknowledged again; anything else is rejected with a reason
and the version served (``current``).

With fleet keys configured (``trusted_keys``), an assignment is applied only when one of them
signed it (``moe2.shared.signing``); anything else is rejected with the reason. Going back to
the local configuration is then a signed ``revert`` assignment (a version like any other); a
cleared retained message (nobody can sign an empty payload) changes nothing. Without fleet
keys, both a revert and a cleared retained assignment return the application to the local
configuration, and the version floor stays.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moe2.agent.gateway.config import GatewayConfig
from moe2.shared import protocol as p
from moe2.shared.errors import BadMessage, BadSignature, Moe2Error, StaleVersion, UnknownApp
from moe2.shared.mqtt import Connection
from moe2.shared.protocol.desired import describe_version
from moe2.shared.signing import Verifier

log = logging.getLogger(__name__)

PromptHandler = Callable[[Any], None]
GateWanted = Callable[[str, p.GateRef | None], None]  # (app, gate to load or None: uniform)


@dataclass(frozen=True)
class Plan:
    """How one application is served right now."""

    app: str
    subset: list[str]
    k: int
    gate: p.GateRef | None
    version: int  # 0: the local configuration


class AppRouter:
    def __init__(
        self,
        gateway_id: str,
        config: GatewayConfig,
        conn: Connection,
        on_prompt: PromptHandler,
        on_unrouted: PromptHandler,
        on_gate: GateWanted,
        verifier: Verifier | None = None,
        catch_all_conn: Connection | None = None,
    ) -> None:
        self.id = gateway_id
        self.verifier = verifier  # None: unsigned desired state is applied
        self.config = config
        self.conn = conn
        # The catch-all lives on a connection without a kept session: a crashed gateway's
        # kept session would still get its turn of the group's prompts (mosquitto hands
        # shared-subscription messages to offline sessions too) and answer none of them.
        self.catch_all_conn = catch_all_conn or conn
        self.on_prompt = on_prompt
        self.on_unrouted = on_unrouted
        self.on_gate = on_gate
        # The gateway's own time per answer, carried in our status (None: not measured yet).
        self.overhead: Callable[[], p.GatewayOverhead | None] = lambda: None
        self._lock = threading.RLock()
        self._pushed: dict[str, p.AppAssignment] = {}  # app -> the accepted assignment
        # app -> highest (epoch, version) accepted (kept after a clear)
        self._floor: dict[str, tuple[int, int]] = {}
        self._last: dict[str, p.AppAssignment] = {}  # app -> the message of that version
        self._acks: dict[str, p.AssignmentAck] = {}  # app -> the last acknowledgement sent
        self._subscribed: set[str] = set()
        self._catch_all = False  # subscribed to prompts of every application
        self._stopping = False
        conn.on_connected.append(self._republish)

    # ------------------------------------------------------------------ the plan

    def served(self) -> dict[str, int]:
        """App -> version served (0: local configuration)."""
        with self._lock:
            out = {app: 0 for app in self.config.apps if app not in self._pushed}
            for app, a in self._pushed.items():
                if a.serves(self.id):
                    out[app] = a.version
            return dict(sorted(out.items()))

    def plan(self, app: str) -> Plan:
        with self._lock:
            a = self._pushed.get(app)
            if a is not None and a.serves(self.id):
                return Plan(app, list(a.subset), a.k, a.gate, a.version)
            local = self.config.apps.get(app)
            if a is None and local is not None:
                return Plan(app, list(local.subset), local.k, None, 0)
            served = sorted(self.served())
        raise UnknownApp(
            f"gateway {self.id} does not serve application {app!r}; it serves "
            f"{', '.join(served) if served else 'no applications'}"
        )

    def experts(self) -> set[str]:
        """Every expert of every application this gateway serves."""
        with self._lock:
            return {e for app in self.served() for e in self.plan(app).subset}

    # ------------------------------------------------------------------ desired state

    def on_fleet_change(self, kind: str, key: tuple[str, ...], message: Any) -> None:
        """A FleetView listener: applies retained assignments as they arrive."""
        if kind != "desired_app":
            return
        app = key[0]
        if message is None:
            if self.verifier is not None:
                log.warning("%s: retained assignment cleared; ignored (not signed)", app)
                return
            self._cleared(app)
        else:
            self._received(message)

    def _received(self, a: p.AppAssignment) -> None:
        if self.verifier is not None:
            try:
                self.verifier.verify(a)
            except BadSignature as exc:
                self._ack(a, rejected=BadSignature(f"bad signature: {exc.message}"))
                return
        with self._lock:
            floor = self._floor.get(a.app, (0, 0))
            current = self._last.get(a.app)
            if a.key < floor or (a.key == floor and current != a):
                version = describe_version(a.key)
                why = (
                    f"stale version: {version} is below the version "
                    f"{describe_version(floor)} served"
                    if a.key < floor
                    else f"stale version: {version} already names another assignment"
                )
                self._ack(a, rejected=StaleVersion(why))
                return
            if not a.revert and a.k > len(a.subset):
                self._ack(a, rejected=BadMessage(f"k={a.k} exceeds the subset of {len(a.subset)}"))
                return
            if a.key == floor:  # the same message again (a reconnect): say so again
                self._ack(a)
                return
            if a.key[0] > floor[0] and floor != (0, 0):
                log.warning(
                    "%s: a new epoch of versions, %s (was %s)",
                    a.app,
                    describe_version(a.key),
                    describe_version(floor),
                )
            self._floor[a.app] = a.key
            self._last[a.app] = a
            if a.revert:
                self._pushed.pop(a.app, None)
            else:
                self._pushed[a.app] = a
            serving = a.app in self.served()
        log.info(
            "%s %s: %s",
            a.app,
            describe_version(a.key),
            "back to the local configuration"
            if a.revert
            else ("serving" if serving else "left to others"),
        )
        self.on_gate(a.app, a.gate if serving and not a.revert else None)
        self.sync_subscriptions()
        # Acknowledged once the subscriptions changed (sent before the ack on this connection):
        # whoever sees the ack finds the prompts routed as it says.
        with self._lock:
            self._ack(a)

    def _cleared(self, app: str) -> None:
        with self._lock:
            if self._pushed.pop(app, None) is None:
                return
        log.info("%s: pushed assignment cleared; back to the local configuration", app)
        self.on_gate(app, None)
        self.sync_subscriptions()

    def _ack(self, a: p.AppAssignment, *, rejected: Moe2Error | None = None) -> None:
        """Acknowledge ``a``: accepted, or ``rejected`` with its code and reason."""
        accepted = rejected is None
        reason = rejected.message if rejected is not None else None
        ack = p.AssignmentAck(
            gateway=self.id,
            app=a.app,
            version=a.version,
            epoch=a.epoch,
            answers=p.assignment_digest(a),
            accepted=accepted,
            serving=accepted and a.serves(self.id),
            reason=reason,
            code=rejected.code if rejected is not None else None,
            current=self._floor.get(a.app, (0, 0))[1],
            proof=self._last.get(a.app),
        )
        if accepted and a.revert:
            ack = ack.model_copy(update={"serving": a.app in self.config.apps})
        if not accepted:
            log.warning("rejected %s v%d: %s", a.app, a.version, reason)
        self._acks[a.app] = ack
        self.conn.publish(p.topics.assignment_ack(self.id, a.app), p.encode(ack), retain=True)

    # ------------------------------------------------------------------ subscriptions

    def sync_subscriptions(self) -> None:
        """One shared subscription per served application; none for the others."""
        unrouted = p.topics.prompts_unrouted(self.config.group)
        with self._lock:
            wanted = set() if self._stopping else set(self.served())
            add, drop = wanted - self._subscribed, self._subscribed - wanted
            self._subscribed = wanted
            first = not self._catch_all and not self._stopping
            self._catch_all = not self._stopping
        # Retain as published: a prompt published retained keeps its flag, so it is refused
        # (and cleared) as it arrives, not served (service.py).
        if first:
            self.catch_all_conn.subscribe(unrouted, self.on_unrouted, retain_as_published=True)
        elif self._stopping:
            self.catch_all_conn.unsubscribe(unrouted)
        for app in sorted(add):  # the prompt handler acknowledges each prompt once answered
            for shared in p.topics.prompts_shared(self.config.group, app):
                self.conn.subscribe(
                    shared, self.on_prompt, manual_ack=True, retain_as_published=True
                )
        for app in sorted(drop):
            for shared in p.topics.prompts_shared(self.config.group, app):
                self.conn.unsubscribe(shared)
        if (add or drop) and self.conn.connected:  # else _republish does it on connecting
            self.publish_status()

    def publish_status(self, state: str = "online") -> None:
        status = self.status(state)
        self.conn.publish(p.topics.gateway_status(self.id), p.encode(status), retain=True)

    def status(self, state: str = "online") -> p.GatewayStatus:
        return p.GatewayStatus(
            gateway=self.id,
            state=state,  # type: ignore[arg-type]
            group=self.config.group,
            apps=self.served() if state == "online" else {},
            since=time.time(),
            session=self.conn.client_id,
            overhead=self.overhead() if state == "online" else None,
            max_concurrent=self.config.max_concurrent,
            max_pending=self.config.max_pending,
        )

    def _republish(self) -> None:
        """After (re)connecting: our status and acknowledgements, in case the broker lost
        its retained copies."""
        if self._stopping:
            return
        self.publish_status()
        with self._lock:
            acks = list(self._acks.values())
        for ack in acks:
            self.conn.publish(p.topics.assignment_ack(self.id, ack.app), p.encode(ack), retain=True)

    def stop_intake(self) -> None:
        """Stop taking prompts (unsubscribe every application) and say so."""
        with self._lock:
            self._stopping = True
        self.sync_subscriptions()
        self.publish_status("offline")
