"""What an operator wants to see of the fleet, in one typed summary: the fleet page, its
JSON (``/fleet.json``) and the fleet gauges of ``/metrics`` are all drawn from it.

- agents, from their retained announcements: online, model, backend, device class, energy
  meter, sessions, the applications a gateway serves (at the version it acknowledged) and
  its capacity, and the profile's cost curves sampled over the prompt lengths they were
  fitted on;
- applications: the desired assignment (subset, k, version, gate), the gateways serving
  them, what their real answers cost per step over the gateways' recent window (delay mean
  and p95, energy, answers and errors) against the limits the last ``moe2ctl serve``
  decision optimised for;
- the last ``serve`` decisions with their reasons, from the registry (``db_url``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

from moe2.controller.agents import backend_cell, served_versions
from moe2.shared import protocol as p
from moe2.shared.costmodel import CostCurve
from moe2.shared.fleet import FleetState

log = logging.getLogger(__name__)

CURVE_SAMPLES = 12  # points drawn per cost curve
DECISIONS_SHOWN = 20
_REGISTRY_CACHE_S = 5.0  # the registry is read at most this often, seconds
_DECISIONS_SINCE_S = 30 * 86400.0  # decisions older than this are not looked at, seconds


@dataclass(frozen=True)
class Curve:
    name: str  # a field of CostCurves: prompt_seconds, token_seconds, score_seconds, ..._joules
    unit: str  # s or J
    points: list[tuple[int, float]]  # (prompt tokens, value)


@dataclass(frozen=True)
class AgentRow:
    agent: str
    online: bool
    model: str | None
    adapter: str | None
    backend: str  # "CPU", "CUDA 31/31 0.1G", "-"
    device_class: str | None
    meter: str | None  # the profile's energy source
    energy_measured: bool | None
    max_sessions: int | None
    serves: dict[str, int] | None  # as a gateway: app -> version served (0: local)
    capacity: int | None  # as a gateway: prompts taken at once
    curves: list[Curve] = field(default_factory=list)


@dataclass(frozen=True)
class AppRow:
    app: str
    gateways: dict[str, int]  # online gateway -> version it serves
    version: int | None  # the desired assignment's
    subset: list[str]
    k: int | None
    gate: str | None  # gate version; None: uniform weights
    answers: int  # over the gateways' stats windows
    errors: int
    delay_s_per_step: float | None  # answers' mean, weighted by answers
    delay_s_per_step_p95: float | None  # the highest gateway's p95
    energy_j_per_step: float | None
    energy_measured: bool
    delay_limit: float | None  # s per step, what serve optimised for
    energy_limit: float | None  # J per step

    @property
    def over_delay(self) -> bool:
        return _over(self.delay_s_per_step, self.delay_limit)

    @property
    def over_energy(self) -> bool:
        return _over(self.energy_j_per_step, self.energy_limit)


def _over(value: float | None, limit: float | None) -> bool:
    return value is not None and limit is not None and value > limit


@dataclass(frozen=True)
class DecisionRow:
    at: float  # unix seconds
    app: str | None
    action: str
    reason: str
    subset: list[str] | None
    version: int | None


@dataclass(frozen=True)
class RegistryFigures:
    """What the registry adds: decisions (latest first) and the limits they used."""

    decisions: list[DecisionRow] = field(default_factory=list)
    delay_limits: dict[str, float] = field(default_factory=dict)  # app -> s per step
    energy_limits: dict[str, float] = field(default_factory=dict)  # app -> J per step
    status: str = "not configured"  # "ok", "not configured", or why it could not be read


@dataclass(frozen=True)
class FleetSummary:
    at: float  # unix seconds
    broker_connected: bool
    synced: bool  # the broker's retained state is in
    in_flight: int  # requests this front holds
    capacity: int | None  # what the online gateways take at once (None: not announced)
    agents: list[AgentRow]
    apps: list[AppRow]
    decisions: list[DecisionRow]
    registry: str


def curves_of(profile: p.AgentProfile) -> list[Curve]:
    """Every curve the profile has (an older agent's has no scoring pass), sampled."""
    out = []
    for name in type(profile.curves).model_fields:
        curve = getattr(profile.curves, name)
        if not isinstance(curve, CostCurve):  # an absent scoring curve, the power, overheads
            continue
        lo, hi = max(1, curve.min_tokens), max(curve.max_tokens, curve.min_tokens + 1)
        xs = sorted({round(lo + (hi - lo) * i / (CURVE_SAMPLES - 1)) for i in range(CURVE_SAMPLES)})
        out.append(Curve(name, curve.unit, [(x, curve.at(x)) for x in xs]))
    return out


def agent_rows(state: FleetState) -> list[AgentRow]:
    rows = []
    for agent in sorted(set(state.info) | set(state.status)):
        info, status = state.info.get(agent), state.status.get(agent)
        prof, gw = state.profile.get(agent), state.gateway.get(agent)
        serves = served_versions(state, agent)
        rows.append(
            AgentRow(
                agent=agent,
                online=status is not None and status.state == "online",
                model=info.model if info else None,
                adapter=info.adapter.name if info and info.adapter else None,
                backend=backend_cell(info.backend.model_dump() if info and info.backend else None),
                device_class=info.device_class if info else None,
                meter=prof.meter_source if prof else None,
                energy_measured=prof.energy_measured if prof else None,
                max_sessions=info.max_sessions if info else None,
                serves=serves,
                capacity=gw.capacity if gw is not None and serves is not None else None,
                curves=curves_of(prof) if prof else [],
            )
        )
    return rows


def app_rows(state: FleetState, reg: RegistryFigures) -> list[AppRow]:
    gateways = state.online_gateways()
    stats = [s for g, s in state.stats.items() if g in gateways]
    names = set(state.desired_app) | {a for g in gateways.values() for a in g.apps}
    names |= {a for s in stats for a in s.apps}
    rows = []
    for app in sorted(names):
        desired = state.desired_app.get(app)
        if desired is not None and desired.revert:
            desired = None
        serving: dict[str, int] = {}
        for g in gateways:
            versions = served_versions(state, g) or {}
            if app in versions:
                serving[g] = versions[app]
        figures = [s.apps[app] for s in stats if app in s.apps]
        answers = sum(f.answers for f in figures)
        delays = [
            (f.delay_s_per_step, f.answers) for f in figures if f.delay_s_per_step is not None
        ]
        energies = [
            (f.energy_j_per_step, f.answers) for f in figures if f.energy_j_per_step is not None
        ]
        p95s = [f.delay_s_per_step_p95 for f in figures if f.delay_s_per_step_p95 is not None]
        rows.append(
            AppRow(
                app=app,
                gateways=serving,
                version=desired.version if desired else None,
                subset=list(desired.subset) if desired else [],
                k=desired.k if desired else None,
                gate=desired.gate.version if desired and desired.gate else None,
                answers=answers,
                errors=sum(f.errors for f in figures),
                delay_s_per_step=_weighted(delays),
                delay_s_per_step_p95=max(p95s, default=None),
                energy_j_per_step=_weighted(energies),
                energy_measured=bool(figures) and all(f.energy_measured for f in figures),
                delay_limit=reg.delay_limits.get(app),
                energy_limit=reg.energy_limits.get(app),
            )
        )
    return rows


def _weighted(pairs: list[tuple[float, int]]) -> float | None:
    """The mean of values weighted by their answer counts (plain mean when none counted)."""
    if not pairs:
        return None
    weight = sum(n for _, n in pairs)
    if weight <= 0:
        return sum(v for v, _ in pairs) / len(pairs)
    return sum(v * n for v, n in pairs) / weight


def fleet_capacity(state: FleetState) -> int | None:
    caps = [g.capacity for g in state.online_gateways().values()]
    if not caps or any(c is None for c in caps):
        return None
    return sum(c for c in caps if c is not None)


class RegistryReader:
    """Reads decisions and limits from the controller's registry (read-only, cached), from
    worker threads; a registry that cannot be read is reported, never raised."""

    def __init__(self, db_url: str | None) -> None:
        self.db_url = db_url
        self._lock = threading.Lock()
        self._cached: tuple[float, RegistryFigures] | None = None

    def figures(self) -> RegistryFigures:
        if self.db_url is None:
            return RegistryFigures()
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < _REGISTRY_CACHE_S:
                return self._cached[1]
            try:
                figures = self._read(self.db_url)
            except Exception as exc:  # a database away must not take the page down
                log.warning("could not read the registry: %s", exc)
                figures = RegistryFigures(status=f"unreadable: {type(exc).__name__}: {exc}")
            self._cached = (now, figures)
            return figures

    @staticmethod
    def _read(url: str) -> RegistryFigures:
        from moe2.controller.registry import Registry

        reg = Registry.open(url, upgrade=False)
        try:
            rows = reg.decisions(since=time.time() - _DECISIONS_SINCE_S)
        finally:
            reg.close()
        delay: dict[str, float] = {}
        energy: dict[str, float] = {}
        for row in rows:  # oldest first: later decisions overwrite
            if row.app is None:
                continue
            try:
                detail = json.loads(row.detail_json or "{}")
            except ValueError:
                continue
            limits = detail.get("limits") if isinstance(detail, dict) else None
            if isinstance(limits, dict) and isinstance(limits.get(row.app), int | float):
                delay[row.app] = float(limits[row.app])
            e = detail.get("energy_limit") if isinstance(detail, dict) else None
            # The page compares joules per step: a limit per prompt (energy_per) is not one.
            per_step = isinstance(detail, dict) and detail.get("energy_per", "step") == "step"
            if isinstance(e, int | float) and per_step:
                energy[row.app] = float(e)
        decisions = [
            DecisionRow(
                at=row.at,
                app=row.app,
                action=row.action,
                reason=row.reason,
                subset=json.loads(row.subset_json) if row.subset_json else None,
                version=row.version,
            )
            for row in reversed(rows[-DECISIONS_SHOWN:])
        ]
        return RegistryFigures(decisions, delay, energy, "ok")


def summarise(
    state: FleetState,
    reg: RegistryFigures,
    *,
    broker_connected: bool,
    synced: bool,
    in_flight: int,
) -> FleetSummary:
    return FleetSummary(
        at=time.time(),
        broker_connected=broker_connected,
        synced=synced,
        in_flight=in_flight,
        capacity=fleet_capacity(state),
        agents=agent_rows(state),
        apps=app_rows(state, reg),
        decisions=reg.decisions,
        registry=reg.status,
    )
