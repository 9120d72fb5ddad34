"""The reconcile loop of ``moe2ctl serve``.

Each tick: hold the lease (or stand by), look at the fleet view, list what changed since the
last optimisation that matters (``changes``), and once the changes have settled
(``debounce_s``) and the last optimisation is old enough (``min_interval_s``), sync the
registry, re-optimise over the eligible experts and push what differs from the fleet's
desired state. Every decision — pushed, unchanged, infeasible, failed, scored, dry-run — is
recorded in the registry with its reason.

An expert is *eligible* when it is online, has a profile, has scored the policy's dataset and
(with a trained gate) is known to the gate. Agents that join are scored in the background and
become eligible when done. The measured delay the gateways report (``AppStats``) is checked
against each app's promise once a full window has passed since the last push; when it is
above the limit, that app's limit is tightened by measured / predicted for the next
optimisation, so the optimiser's model is corrected by reality.

    reconciler = Reconciler(settings, policy, registry_url, holder="serve-1")
    reconciler.run(stop_event)
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from moe2.controller.optimize.fromregistry import gate_delay_of, scored_set
from moe2.controller.optimize.solution import Solution
from moe2.controller.optimize.solvers import solve
from moe2.controller.push import record
from moe2.controller.registry.db import Registry
from moe2.controller.registry.schema import Decision
from moe2.controller.registry.sync import store
from moe2.controller.serve.policy import ServePolicy
from moe2.shared import protocol as p
from moe2.shared.desired import DesiredState
from moe2.shared.errors import BrokerError, Moe2Error
from moe2.shared.fleet import FleetState, FleetView
from moe2.shared.mqtt import BrokerConfig, Connection
from moe2.shared.signing import Signer

log = logging.getLogger(__name__)

LEASE = "serve"
REF_TOKENS = 256  # prompt length at which profiles are compared, tokens


@dataclass(frozen=True)
class Basis:
    """The fleet as the last optimisation saw it."""

    eligible: frozenset[str]
    token_s: dict[str, float]  # expert -> seconds per token at REF_TOKENS
    token_j: dict[str, float]  # expert -> joules per token at REF_TOKENS
    rtt_s: dict[str, float]  # expert -> the gateways' measured round trip
    predicted: dict[str, float]  # app -> predicted seconds per step of the chosen subset
    at: float  # unix seconds
    # app -> the subset on the broker (or pushed) then: a broker restarted without
    # persistence forgets its retained assignments, the basis does not
    assigned: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class Look:
    """One look at the fleet: who is eligible and what changed that matters."""

    eligible: set[str]
    reasons: list[str] = field(default_factory=list)
    factors: dict[str, float] = field(default_factory=dict)  # app -> measured / predicted


def _figures(prof: p.AgentProfile) -> tuple[float, float]:
    c = prof.curves
    return c.token_seconds.at(REF_TOKENS), c.token_joules.at(REF_TOKENS)


def measured_delay(state: FleetState, app: str, since: float, min_answers: int) -> float | None:
    """Seconds per step of ``app``'s answers over the gateways whose figures were published
    after ``since`` and cover at least ``min_answers`` answers (answer-weighted mean)."""
    total = weight = 0.0
    for stats in state.stats.values():
        fig = stats.apps.get(app)
        if stats.at <= since or fig is None or fig.delay_s_per_step is None:
            continue
        if fig.answers >= min_answers:
            total += fig.delay_s_per_step * fig.answers
            weight += fig.answers
    return total / weight if weight else None


def changes(
    basis: Basis | None,
    state: FleetState,
    eligible: set[str],
    policy: ServePolicy,
    stats_window_s: float,
) -> Look:
    """What changed since ``basis`` that matters to the assignments (pure)."""
    look = Look(eligible)
    if basis is None:
        look.reasons.append("first look at the fleet")
        return look
    assigned = {e for a in state.desired_app.values() for e in a.subset}
    assigned |= {e for subset in basis.assigned.values() for e in subset}
    for app in sorted(basis.assigned):
        if app not in state.desired_app:
            look.reasons.append(f"{app}: its assignment is no longer on the broker")
    for e in sorted(basis.eligible - eligible):
        if e in assigned:
            look.reasons.append(f"assigned expert {e} is offline or no longer eligible")
    for e in sorted(eligible - basis.eligible):
        look.reasons.append(f"expert {e} is online and eligible")
    links = state.best_links()
    for e in sorted(eligible & basis.eligible):
        prof = state.profile.get(e)
        if prof is not None:
            s, j = _figures(prof)
            for name, now, then in (
                ("delay", s, basis.token_s.get(e)),
                ("energy", j, basis.token_j.get(e)),
            ):
                if then and abs(now - then) / then > policy.profile_threshold:
                    look.reasons.append(f"profile of {e}: per-token {name} {then:.4g} -> {now:.4g}")
        rtt = links[e].rtt_s if e in links else None
        if rtt is not None and abs(rtt - basis.rtt_s.get(e, rtt)) > policy.link_threshold_s:
            look.reasons.append(f"link to {e}: round trip {basis.rtt_s[e]:.4f} -> {rtt:.4f} s")
    # Promises checked against reality, once the gateways' windows hold only answers given
    # with the current assignment.
    for app, limit in policy.apps.items():
        got = measured_delay(state, app, basis.at + stats_window_s, policy.min_answers)
        predicted = basis.predicted.get(app)
        if got is not None and got > limit * (1 + policy.delay_tolerance):
            look.reasons.append(
                f"{app}: measured {got:.4f} s per step is above its limit of {limit:g}"
            )
            if predicted:
                look.factors[app] = max(1.0, got / predicted)
    return look


class Reconciler:
    def __init__(
        self,
        broker: BrokerConfig,
        registry_url: str,
        policy: ServePolicy,
        *,
        holder: str | None = None,
        dry_run: bool = False,
        stats_window_s: float = 60.0,
        echo: Callable[[dict[str, Any]], None] | None = None,
        signer: Signer | None = None,
    ) -> None:
        self.broker = broker
        self.signer = signer  # the fleet key: every push is signed with it
        self.registry_url = registry_url
        self.policy = policy
        self.holder = holder or f"serve-{uuid.uuid4().hex[:8]}"
        self.dry_run = dry_run
        self.stats_window_s = stats_window_s
        self.echo = echo or (lambda _d: None)
        self.reg = Registry.open(registry_url)
        self.conn = Connection(broker, f"moe2ctl-{self.holder}")
        self.view = FleetView(self.conn)
        self.basis: Basis | None = None
        self.factors: dict[str, float] = {}  # app -> correction of its delay limit
        self.holding = False
        self.pending_since: float | None = None  # monotonic time of the first unacted change
        self.last_run = float("-inf")  # monotonic time of the last optimisation
        self.scored: set[str] = set()
        self.out_of_gate: set[str] = set()
        self._scoring: dict[str, Future[Any]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="score")
        self._gate_experts: set[str] | None = None
        self._gate_ref: p.GateRef | None = None
        self.optimisations = 0

    # ------------------------------------------------------------------ lifecycle

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: connect (retrying), then tick."""
        self._refresh_scored()
        self._load_gate()
        while not stop.is_set():
            try:
                self.conn.start()
                break
            except BrokerError as exc:
                log.warning("broker unreachable (%s); retrying", exc.message)
                stop.wait(2.0)
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # a bad tick is logged; the loop goes on
                log.exception("reconcile tick failed")
            stop.wait(self.policy.tick_s)
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.holding:
            try:
                self.reg.release_lease(LEASE, self.holder)
            except Exception:
                log.warning("could not release the lease; it expires by itself")
        self.conn.stop()
        self.reg.close()

    # ------------------------------------------------------------------ one tick

    def tick(self) -> None:
        if not self._hold_lease():
            return
        if not self.conn.connected or not self.view.synced.is_set():
            return  # (re)connecting: what we hold may be stale, the fleet's state is arriving
        if time.monotonic() - self.view.synced_at < self.policy.settle_s:
            return  # agents are still reconnecting and announcing themselves
        state = self.view.copy()
        self._score_newcomers(state)
        look = changes(self.basis, state, self._eligible(state), self.policy, self.stats_window_s)
        if not look.reasons:
            self.pending_since = None
            return
        now = time.monotonic()
        if self.pending_since is None:
            self.pending_since = now
        if now - self.pending_since < self.policy.debounce_s:
            return
        if now - self.last_run < self.policy.min_interval_s:
            return
        self.factors.update(look.factors)
        self.optimise(state, look)

    def _hold_lease(self) -> bool:
        try:
            held = self.reg.acquire_lease(LEASE, self.holder, self.policy.lease_ttl_s)
        except Exception as exc:  # the database is down: stand by until it is back
            if self.holding:
                log.warning("lost the registry (%s); standing by", exc)
            held = False
        if held and not self.holding:
            log.info("%s holds the serve lease", self.holder)
            self.basis = None  # take over with a fresh look
            self.last_run = float("-inf")
        elif not held and self.holding:
            log.warning("%s lost the serve lease", self.holder)
        self.holding = held
        return held

    # ------------------------------------------------------------------ eligibility

    def _refresh_scored(self) -> None:
        samples = self.reg.samples(self.policy.dataset)  # ConfigError: no such dataset
        needed = sum(len(s.targets) for s in samples)
        counts = self.reg.score_count(self.policy.dataset)
        self.scored = {e for e, n in counts.items() if n >= needed and needed > 0}

    def _load_gate(self) -> None:
        if self.policy.gate == "uniform":
            self._gate_experts = None
            return
        row = self.reg.gate_version(self.policy.gate)
        if row.sha256 is None:
            raise Moe2Error(f"gate {row.version} is not exported: run `moe2ctl export` first")
        self._gate_ref = p.GateRef(version=row.version, sha256=row.sha256)
        self._gate_experts = set(json.loads(row.experts_json))

    def _eligible(self, state: FleetState) -> set[str]:
        out = set()
        for e in state.online_agents():
            if e not in state.profile or e not in self.scored:
                continue
            if self._gate_experts is not None and e not in self._gate_experts:
                if e not in self.out_of_gate:
                    self.out_of_gate.add(e)
                    self._decide(
                        None,
                        "skipped",
                        f"expert {e} is scored but the gate does not know it; train and push "
                        "a gate with it to consider it",
                    )
                continue
            out.add(e)
        return out

    def _score_newcomers(self, state: FleetState) -> None:
        if not self.policy.score_new_agents:
            return
        for e, info in state.online_agents().items():
            if e in self.scored or e in self._scoring:
                continue
            self._scoring[e] = self._pool.submit(self._score, e, info)

    def _score(self, expert: str, info: p.AgentInfo) -> None:
        from moe2.controller.collect import collect
        from moe2.shared.mqtt import RpcClient

        reg = Registry.open(self.registry_url)
        try:
            with RpcClient(self.broker) as rpc:
                report = collect(reg, rpc, self.policy.dataset, {expert: info}, self.policy.scoring)
            done = report.complete and not report.failed
            self._decide(
                None,
                "scored" if done else "failed",
                f"agent {expert} scored {self.policy.dataset}: "
                + ("complete" if done else report.what_is_missing()),
                detail=report.as_dict(),
            )
            if done:
                self.scored.add(expert)
        except Moe2Error as exc:
            self._decide(None, "failed", f"scoring {expert}: {exc.message}")
        finally:
            reg.close()
            self._scoring.pop(expert, None)  # a later sighting retries a failed one

    # ------------------------------------------------------------------ acting

    def optimise(self, state: FleetState, look: Look) -> None:
        self.last_run = time.monotonic()
        self.pending_since = None
        self.optimisations += 1
        reason = "; ".join(look.reasons)
        # What this optimisation sees becomes the basis the next changes are measured from,
        # whatever its outcome (a failed push resets it, so the next tick tries again).
        self._set_basis(state, look.eligible, {})
        try:
            store(self.reg, state)
            if not look.eligible:
                raise Moe2Error("no eligible expert (online, profiled and scored) yet")
            data = scored_set(
                self.reg,
                self.policy.dataset,
                gate_version=self.policy.gate,
                links=state.best_links(),
                online_only=False,
                experts=sorted(look.eligible),
            )
            limits = {a: lim / self.factors.get(a, 1.0) for a, lim in self.policy.apps.items()}
            # Until a gateway has run the gate and announced its delay (the first push of
            # a new gate), the promise goes without it; the announcement is a change that
            # the next look sees.
            delay = gate_delay_of(state, data.gate.version, self.policy.gate_delay, required=False)
            problem = data.problem(
                limits, self.policy.energy, gate_delay=delay, energy_per=self.policy.energy_per
            )
            result = solve(problem, solver=self.policy.solver)
        except Moe2Error as exc:
            self._decide(None, "failed", f"{reason}: {exc.message}")
            return
        if not isinstance(result, Solution):
            self._decide(None, "infeasible", f"{reason}: {result.reason}", detail=result.to_json())
            return
        self._set_basis(state, look.eligible, result.delay)
        self._apply(state, result, reason, limits)

    def _set_basis(
        self, state: FleetState, eligible: set[str], predicted: Mapping[str, float]
    ) -> None:
        token_s, token_j = {}, {}
        for e in eligible:
            if e in state.profile:
                token_s[e], token_j[e] = _figures(state.profile[e])
        links = state.best_links()
        self.basis = Basis(
            frozenset(eligible),
            token_s,
            token_j,
            {e: links[e].rtt_s for e in eligible if e in links},
            dict(predicted),
            time.time(),
            {
                app: tuple(a.subset)
                for app, a in state.desired_app.items()
                if app in self.policy.apps
            },
        )

    def _apply(
        self, state: FleetState, result: Solution, reason: str, limits: Mapping[str, float]
    ) -> None:
        subset = list(result.subset)
        k = min(self.policy.k, len(subset))
        gate = self._gate_ref
        detail = {
            "delay": result.delay,
            "energy": result.energy,
            "limits": dict(limits),
            "energy_limit": self.policy.energy,
        }
        for app in sorted(self.policy.apps):
            current = state.desired_app.get(app)
            previous = list(current.subset) if current else None
            if current and current.subset == subset and current.k == k and current.gate == gate:
                self._decide(app, "unchanged", reason, subset, previous, current.version, detail)
                continue
            if self.dry_run:
                self._decide(app, "dry-run", reason, subset, previous, None, detail)
                continue
            try:
                with DesiredState(self.broker, signer=self.signer) as desired:
                    pushed = desired.push_assignment(
                        app, subset, k, gate=gate, wait_s=self.policy.push_wait_s
                    )
            except Moe2Error as exc:
                self._decide(app, "failed", f"{reason}: push failed: {exc.message}", subset)
                self.basis = None  # try again on the next tick
                continue
            record(self.reg, [pushed])
            if self.basis is not None:
                self.basis.assigned[app] = tuple(subset)
            self._decide(
                app,
                "pushed",
                reason,
                subset,
                previous,
                pushed.assignment.version,
                detail | pushed.summary(),
            )

    def _decide(
        self,
        app: str | None,
        action: str,
        reason: str,
        subset: list[str] | None = None,
        previous: list[str] | None = None,
        version: int | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        row = Decision(
            controller=self.holder,
            app=app,
            action=action,
            reason=reason,
            subset_json=json.dumps(subset) if subset is not None else None,
            previous_json=json.dumps(previous) if previous is not None else None,
            version=version,
            detail_json=json.dumps(detail or {}, default=str),
        )
        try:
            self.reg.add_decision(row)
        except Exception as exc:  # the database is down: say so, keep going
            log.warning("could not record the decision (%s)", exc)
        self.echo(
            {
                "at": row.at,
                "app": app,
                "action": action,
                "reason": reason,
                "subset": subset,
                "previous": previous,
                "version": version,
            }
        )
