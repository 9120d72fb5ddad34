"""The reconcile loop of ``moe2ctl serve``.

Each tick: hold the lease (or stand by), look at the fleet view, list what changed since the
last optimisation that matters (``changes``) and which applications it concerns, and once the
changes have settled (``debounce_s``) and the last optimisation is old enough
(``min_interval_s``), store what changed in the registry, re-optimise those applications
alone over their eligible candidates and push what differs from the fleet's desired state.
Every decision — pushed, unchanged, infeasible, refused, failed, scored, dry-run — is recorded
in the registry with its reason.

An expert is *eligible* when it is online, has a profile, has scored the policy's dataset and
(with a trained gate) is known to the gate; it is a *candidate* of the applications whose
every sample it scored, and each application gets a subset of its own candidates
(``optimize.decompose``: the energy budget is the only thing applications share). So an
expert going offline re-optimises only the applications it served, a fleet of thousands of
agents costs one application's solve per event, not every application's. Agents that join
are scored in the background and become eligible when done. The measured delay the gateways
report (``AppStats``) is checked against each app's promise once a full window has passed
since its last push; when it is above the limit, that app's limit is tightened by measured /
predicted for the next optimisation, so the optimiser's model is corrected by reality.

A subset that is not proven optimal (a time limit, a split energy budget, a heuristic
solver) is pushed only within the policy's ``max_gap``; otherwise the decision is
``refused``, with the gap, and the fleet keeps what it has.

    reconciler = Reconciler(settings, policy, registry_url, holder="serve-1")
    reconciler.run(stop_event)
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from moe2.controller.gate.weights import UNIFORM
from moe2.controller.optimize.decompose import AppPart, ByApp, allowed, solve_by_app
from moe2.controller.optimize.fromregistry import gate_delay_of, scored_set
from moe2.controller.push import record
from moe2.controller.registry.db import Registry
from moe2.controller.registry.schema import Decision
from moe2.controller.registry.sync import RegistryWriter
from moe2.controller.serve.policy import ServePolicy
from moe2.shared import protocol as p
from moe2.shared.desired import DesiredState
from moe2.shared.errors import BrokerError, ConfigError, Moe2Error
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
    app_at: dict[str, float] = field(default_factory=dict)  # app -> when it was last optimised


@dataclass
class Look:
    """One look at the fleet: who is eligible, what changed that matters, and which
    applications it concerns (each with its reasons)."""

    eligible: set[str]
    reasons: list[str] = field(default_factory=list)
    factors: dict[str, float] = field(default_factory=dict)  # app -> measured / predicted
    apps: dict[str, list[str]] = field(default_factory=dict)  # app -> its reasons

    def add(self, reason: str, apps: Iterable[str]) -> None:
        self.reasons.append(reason)
        for app in apps:
            self.apps.setdefault(app, []).append(reason)


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
    candidates: Mapping[str, set[str]] | None = None,
) -> Look:
    """What changed since ``basis`` that matters, and to which applications (pure).
    ``candidates``: app -> its eligible candidates (None: every eligible expert serves every
    application, so every change concerns them all)."""
    look = Look(eligible)
    apps = sorted(policy.apps)

    def of(expert: str) -> list[str]:
        if candidates is None:
            return apps
        return [a for a in apps if expert in candidates.get(a, ())]

    if basis is None:
        look.add("first look at the fleet", apps)
        return look
    assigned: dict[str, set[str]] = {}  # expert -> the apps it is assigned to
    for app, a in state.desired_app.items():
        for e in a.subset:
            assigned.setdefault(e, set()).add(app)
    for app, subset in basis.assigned.items():
        for e in subset:
            assigned.setdefault(e, set()).add(app)
    for app in sorted(basis.assigned):
        if app not in state.desired_app:
            look.add(f"{app}: its assignment is no longer on the broker", [app])
    for e in sorted(basis.eligible - eligible):
        if e in assigned:
            served = sorted(assigned[e] & set(apps))
            look.add(f"assigned expert {e} is offline or no longer eligible", served)
    for e in sorted(eligible - basis.eligible):
        look.add(f"expert {e} is online and eligible", of(e))
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
                    look.add(f"profile of {e}: per-token {name} {then:.4g} -> {now:.4g}", of(e))
        rtt = links[e].rtt_s if e in links else None
        if rtt is not None and abs(rtt - basis.rtt_s.get(e, rtt)) > policy.link_threshold_s:
            look.add(f"link to {e}: round trip {basis.rtt_s[e]:.4f} -> {rtt:.4f} s", of(e))
    # Promises checked against reality, once the gateways' windows hold only answers given
    # with the current assignment.
    for app, limit in policy.apps.items():
        since = basis.app_at.get(app, basis.at) + stats_window_s
        got = measured_delay(state, app, since, policy.min_answers)
        predicted = basis.predicted.get(app)
        if got is not None and got > limit * (1 + policy.delay_tolerance):
            look.add(f"{app}: measured {got:.4f} s per step is above its limit of {limit:g}", [app])
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
        self.writer = RegistryWriter(self.reg)  # writes only what changed
        self.conn = Connection(broker, f"moe2ctl-{self.holder}")
        self.view = FleetView(self.conn)
        self.basis: Basis | None = None
        self.factors: dict[str, float] = {}  # app -> correction of its delay limit
        self.holding = False
        self.pending_since: float | None = None  # monotonic time of the first unacted change
        self.last_run = float("-inf")  # monotonic time of the last optimisation
        self.scored: dict[str, set[str]] = {}  # expert -> apps whose every sample it scored
        self.weights: dict[str, float] = {}  # app -> its share of the policy's samples
        self._targets: dict[str, int] = {}  # app -> targets of its samples in the dataset
        self.app_energy: dict[str, float] = {}  # app -> weight x energy of its current subset
        self.retry: set[str] = set()  # apps whose push failed: optimised again next time
        self.out_of_gate: set[str] = set()
        # app -> the gate version its last promise went without a measured delay of (no
        # gateway had announced running it yet): the announcement re-optimises it
        self.gate_unmeasured: dict[str, str] = {}
        self._scoring: dict[str, Future[Any]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="score")
        self._gate_experts: set[str] | None = None
        self._gate_ref: p.GateRef | None = None
        self.optimisations = 0  # times it optimised (each for one or more applications)
        self.solves = 0  # applications solved, over every optimisation

    # ------------------------------------------------------------------ lifecycle

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: connect (retrying), then tick."""
        self._load_dataset()
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
        eligible = self._eligible(state)
        look = changes(
            self.basis,
            state,
            eligible,
            self.policy,
            self.stats_window_s,
            self.candidates(eligible),
        )
        for app in sorted(self.retry):
            look.add(f"{app}: its last push failed", [app])
        announced = sorted(a for a, v in self.gate_unmeasured.items() if state.gate_latency(v))
        for app in announced:
            version = self.gate_unmeasured.pop(app)
            look.add(f"{app}: a gateway announced gate {version}'s measured delay", [app])
        if not look.apps:
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

    def _load_dataset(self) -> None:
        """The applications' shares of the samples, and who scored which application."""
        sizes = self.reg.targets_by_app(self.policy.dataset)  # ConfigError: no such dataset
        missing = sorted(set(self.policy.apps) - set(sizes))
        if missing:
            raise ConfigError(
                f"dataset {self.policy.dataset!r} has no samples of application(s) "
                f"{', '.join(missing)}; it has {', '.join(sorted(sizes)) or 'none'}"
            )
        total = sum(sizes[a][0] for a in self.policy.apps)
        self.weights = {a: sizes[a][0] / total for a in self.policy.apps}
        self._targets = {a: t for a, (_, t) in sizes.items()}
        self.scored = {}
        self._refresh_scored()

    def _refresh_scored(self, experts: list[str] | None = None) -> None:
        counts = self.reg.score_counts_by_app(self.policy.dataset, experts)
        for (expert, app), n in counts.items():
            if n >= self._targets.get(app, 0) > 0:
                self.scored.setdefault(expert, set()).add(app)

    def candidates(self, eligible: set[str]) -> dict[str, set[str]]:
        """App -> its eligible candidates (the experts that scored every sample of it)."""
        out: dict[str, set[str]] = {a: set() for a in self.policy.apps}
        for e in eligible:
            for app in self.scored.get(e, ()):
                if app in out:
                    out[app].add(e)
        return out

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
            if e not in state.profile or not self.scored.get(e):
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
                self._refresh_scored([expert])
        except Moe2Error as exc:
            self._decide(None, "failed", f"scoring {expert}: {exc.message}")
        finally:
            reg.close()
            self._scoring.pop(expert, None)  # a later sighting retries a failed one

    # ------------------------------------------------------------------ acting

    def optimise(self, state: FleetState, look: Look) -> None:
        """Re-optimise the applications ``look`` names, alone; push what changed."""
        self.last_run = time.monotonic()
        self.pending_since = None
        self.optimisations += 1
        apps = sorted(look.apps)
        self.retry -= set(apps)
        cands = self.candidates(look.eligible)
        # What this optimisation sees becomes the basis the next changes are measured from,
        # whatever its outcome (a failed push is optimised again on the next tick).
        self._set_basis(state, look.eligible, {}, [])
        limits = {a: self.policy.apps[a] / self.factors.get(a, 1.0) for a in apps}
        parts: list[AppPart] = []
        links = state.best_links()
        try:
            self.writer.store(state)
        except Exception as exc:  # the registry is down: the next optimisation stores it
            log.warning("could not store the fleet's state (%s)", exc)
        for app in apps:
            reason = "; ".join(look.apps[app])
            try:
                parts.append(self._part(state, app, cands[app], limits[app], links))
            except Moe2Error as exc:
                self._decide(app, "failed", f"{reason}: {exc.message}")
        if not parts:
            return
        elsewhere = sum(e for a, e in self.app_energy.items() if a not in look.apps)
        max_gap = self.policy.max_gap
        try:
            result = solve_by_app(
                parts,
                self.policy.energy,
                solver=self.policy.solver,
                epsilon=max_gap if max_gap < float("inf") else None,
                time_limit=self.policy.time_limit_s,
                energy_elsewhere=elsewhere,
            )
        except Moe2Error as exc:
            for part in parts:
                self._decide(part.app, "failed", f"{'; '.join(look.apps[part.app])}: {exc.message}")
            return
        self.solves += int(result.stats.get("solves", len(parts)))
        predicted = {a: s.delay[a] for a, s in result.solutions.items() if a in s.delay}
        self._set_basis(state, look.eligible, predicted, apps)
        self._apply(state, look, result, limits)

    def _part(
        self,
        state: FleetState,
        app: str,
        candidates: set[str],
        limit: float,
        links: Mapping[str, p.LinkFigures],
    ) -> AppPart:
        """App's problem: its samples, scored by its eligible candidates, its costs by the one
        cost function on their prompts' token counts, the gate's delay as the gateways
        measured it."""
        if not candidates:
            raise Moe2Error(f"no eligible expert for {app} (online, profiled and scored on it)")
        data = scored_set(
            self.reg,
            self.policy.dataset,
            gate_version=self.policy.gate,
            links=links,
            online_only=False,
            experts=sorted(candidates),
            apps=[app],
        )
        rows = [i for i, a in enumerate(data.mixed.apps) if a == app]
        if not rows:
            raise Moe2Error(f"no sample of {app} is scored by all of its candidates")
        # Until a gateway has run the gate and announced its delay (the first push of a new
        # gate), the promise goes without it; the announcement is a change the next look sees.
        version = data.gate.version
        delay = gate_delay_of(state, version, self.policy.gate_delay, required=False)
        if delay.curve is None and self.policy.gate_delay is None and version != UNIFORM:
            self.gate_unmeasured[app] = version
        else:
            self.gate_unmeasured.pop(app, None)
        problem = data.select(rows).problem(
            {app: limit}, None, gate_delay=delay, energy_per=self.policy.energy_per
        )
        return AppPart(app, self.weights[app], problem)

    def _set_basis(
        self,
        state: FleetState,
        eligible: set[str],
        predicted: Mapping[str, float],
        apps: list[str],
    ) -> None:
        token_s, token_j = {}, {}
        for e in eligible:
            if e in state.profile:
                token_s[e], token_j[e] = _figures(state.profile[e])
        links = state.best_links()
        old = self.basis
        now = time.time()
        self.basis = Basis(
            frozenset(eligible),
            token_s,
            token_j,
            {e: links[e].rtt_s for e in eligible if e in links},
            (dict(old.predicted) if old else {}) | dict(predicted),
            now,
            {
                app: tuple(a.subset)
                for app, a in state.desired_app.items()
                if app in self.policy.apps
            },
            (dict(old.app_at) if old else {}) | {a: now for a in apps},
        )

    def _apply(
        self, state: FleetState, look: Look, result: ByApp, limits: Mapping[str, float]
    ) -> None:
        gate = self._gate_ref
        shared_gap = result.gap if result.coupled else None
        desired: DesiredState | None = None  # one connection for every push of this look
        with contextlib.ExitStack() as stack:
            for app in sorted(look.apps):
                reason = "; ".join(look.apps[app])
                if app in result.infeasible:
                    self._decide(app, "infeasible", f"{reason}: {result.infeasible[app].reason}")
                    continue
                sol = result.solutions.get(app)
                if sol is None:
                    continue  # failed before solving: recorded
                subset = list(sol.subset)
                k = min(self.policy.k, len(subset))
                gap = shared_gap if result.coupled else sol.stats.get("gap")
                detail: dict[str, Any] = {
                    "delay": sol.delay,
                    "energy": sol.energy,
                    "limits": {app: limits[app]},
                    "energy_limit": self.policy.energy,
                    "energy_per": self.policy.energy_per,
                    "gap": gap,
                    "optimal": gap == 0.0,
                    "coupled": result.coupled,
                    "solver": sol.stats,
                }
                current = state.desired_app.get(app)
                previous = list(current.subset) if current else None
                if not allowed(gap, self.policy.max_gap):
                    shown = "nothing proven" if gap is None else f"gap {gap:.4g} nats"
                    self._decide(
                        app,
                        "refused",
                        f"{reason}: not proven within max_gap={self.policy.max_gap:g} of the "
                        f"optimum ({shown}; raise time_limit_s or max_gap)",
                        subset,
                        previous,
                        None,
                        detail,
                    )
                    continue
                self.app_energy[app] = self.weights[app] * sol.energy
                if current and (current.subset, current.k, current.gate) == (subset, k, gate):
                    version = current.version
                    self._decide(app, "unchanged", reason, subset, previous, version, detail)
                    continue
                if self.dry_run:
                    self._decide(app, "dry-run", reason, subset, previous, None, detail)
                    continue
                try:
                    if desired is None:
                        desired = stack.enter_context(DesiredState(self.broker, signer=self.signer))
                    pushed = desired.push_assignment(
                        app, subset, k, gate=gate, wait_s=self.policy.push_wait_s
                    )
                except Moe2Error as exc:
                    self._decide(app, "failed", f"{reason}: push failed: {exc.message}", subset)
                    self.retry.add(app)
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
