"""One optimisation from the registry: sync the fleet's state, build the problem, write it
to a file (so the run can be replayed offline), solve (one subset for every application, or
``by_app``: a subset each), record, and optionally push: only an answer proven within
``max_gap`` (or the ε asked for) of the optimum, else ``NotProven``."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, overload

from moe2.controller.gate.weights import UNIFORM
from moe2.controller.optimize.decompose import ByApp, allowed, solve_by_app, split_by_app
from moe2.controller.optimize.fromregistry import gate_delay_of, problem_from_registry
from moe2.controller.optimize.problem import EnergyPer, Problem
from moe2.controller.optimize.solution import Infeasible, Solution
from moe2.controller.optimize.solvers import solve
from moe2.controller.options import desired_state
from moe2.controller.push import describe, record
from moe2.controller.registry.db import Registry
from moe2.controller.registry.sync import KINDS, store
from moe2.shared import protocol as p
from moe2.shared.desired import PushResult
from moe2.shared.errors import BrokerError, ConfigError, NotProven
from moe2.shared.fleet import FleetState, FleetView
from moe2.shared.mqtt import BrokerConfig


@overload
def run_from_registry(
    db_url: str,
    problems_dir: Path,
    broker: BrokerConfig,
    dataset: str,
    delay_limits: Mapping[str, float],
    energy_limit: float | None,
    *,
    energy_per: EnergyPer = "step",
    k: int,
    gate_version: str | None,
    gate_delay: float | None,
    solver: str,
    epsilon: float | None,
    time_limit: float | None,
    push: bool,
    echo: Callable[[str], None] | None = None,
    by_app: Literal[False] = False,
    max_gap: float = 0.0,
) -> tuple[Problem, Solution | Infeasible, list[PushResult]]: ...


@overload
def run_from_registry(
    db_url: str,
    problems_dir: Path,
    broker: BrokerConfig,
    dataset: str,
    delay_limits: Mapping[str, float],
    energy_limit: float | None,
    *,
    energy_per: EnergyPer = "step",
    k: int,
    gate_version: str | None,
    gate_delay: float | None,
    solver: str,
    epsilon: float | None,
    time_limit: float | None,
    push: bool,
    echo: Callable[[str], None] | None = None,
    by_app: Literal[True],
    max_gap: float = 0.0,
) -> tuple[Problem, ByApp, list[PushResult]]: ...


@overload
def run_from_registry(
    db_url: str,
    problems_dir: Path,
    broker: BrokerConfig,
    dataset: str,
    delay_limits: Mapping[str, float],
    energy_limit: float | None,
    *,
    energy_per: EnergyPer = "step",
    k: int,
    gate_version: str | None,
    gate_delay: float | None,
    solver: str,
    epsilon: float | None,
    time_limit: float | None,
    push: bool,
    echo: Callable[[str], None] | None = None,
    by_app: bool,
    max_gap: float = 0.0,
) -> tuple[Problem, Solution | Infeasible | ByApp, list[PushResult]]: ...


def run_from_registry(
    db_url: str,
    problems_dir: Path,
    broker: BrokerConfig,
    dataset: str,
    delay_limits: Mapping[str, float],
    energy_limit: float | None,
    *,
    energy_per: EnergyPer = "step",
    k: int,
    gate_version: str | None,
    gate_delay: float | None,
    solver: str,
    epsilon: float | None,
    time_limit: float | None,
    push: bool,
    echo: Callable[[str], None] | None = None,
    by_app: bool = False,
    max_gap: float = 0.0,
) -> tuple[Problem, Solution | Infeasible | ByApp, list[PushResult]]:
    say = echo or (lambda _line: None)
    reg = Registry.open(db_url)
    pushed: list[PushResult] = []
    try:
        links: dict[str, p.LinkFigures] = {}
        state: FleetState | None = None
        try:
            state = FleetView.snapshot(broker, (*KINDS, "links", "gateway", "gate_ack"), 2.0)
            counts = store(reg, state)
            links = state.best_links()
            say(f"synced the fleet's state: {counts}; links measured to {len(links)} expert(s)")
        except BrokerError as exc:
            if push:
                raise
            say(f"broker unreachable ({exc.message}); using the registry's stored state")
        version = reg.gate_version(gate_version).version if gate_version != UNIFORM else UNIFORM
        # A push promises what the gateways will do: it needs the gate's measured delay; an
        # inspection goes without it, saying so.
        delay = gate_delay_of(state, version, gate_delay, required=push)
        say(f"gate delay: {delay.source}")
        problem = problem_from_registry(
            reg,
            dataset,
            delay_limits,
            energy_limit,
            gate_version=gate_version,
            gate_delay=delay,
            links=links,
            epsilon=epsilon or 0.0,
            energy_per=energy_per,
        )
        path = problems_dir / f"problem-{time.strftime('%Y%m%d-%H%M%S')}-{dataset}.json"
        problem.to_file(path)
        say(f"problem written to {path} (replay: moe2ctl optimize --problem {path})")
        result: Solution | Infeasible | ByApp
        if by_app:
            result = solve_by_app(
                split_by_app(problem),
                problem.energy_limit,
                solver=solver,
                epsilon=epsilon,
                time_limit=time_limit,
            )
            subsets = {a: list(s.subset) for a, s in result.solutions.items()}
            gap = result.gap
        else:
            result = solve(problem, solver=solver, epsilon=epsilon, time_limit=time_limit)
            whole = list(result.subset) if isinstance(result, Solution) else []
            subsets = {a: whole for a in sorted(set(problem.app))} if whole else {}
            gap = result.stats.get("gap") if isinstance(result, Solution) else None
        used_gate = str(problem.meta.get("gate"))
        reg.add_optimisation_run(
            result.to_json(), None if used_gate == "uniform" else used_gate, str(path)
        )
        accepted_gap = max(max_gap, epsilon or 0.0)
        if push and result.feasible and not allowed(gap, accepted_gap):
            shown = "a heuristic proves no gap" if gap is None else f"its gap is {gap:.4g} nats"
            raise NotProven(
                f"not pushed: the answer is not proven within {accepted_gap:g} of the optimum "
                f"({shown}); give it more --time-limit, or accept the gap with --max-gap "
                f"(replay: moe2ctl optimize --problem {path})"
            )
        if push and result.feasible:
            gate_ref = None
            if used_gate != "uniform":
                gv = reg.gate_version(used_gate)
                if gv.sha256 is None:
                    raise ConfigError(f"gate {used_gate} was never exported; run moe2ctl export")
                gate_ref = p.GateRef(version=gv.version, sha256=gv.sha256)
            with desired_state(broker) as desired:
                for app, subset in sorted(subsets.items()):
                    k_used = min(k, len(subset))
                    pushed.append(
                        desired.push_assignment(app, subset, k_used, gate=gate_ref, wait_s=3.0)
                    )
            record(reg, pushed)
            for r in pushed:
                say(describe(r))
        return problem, result, pushed
    finally:
        reg.close()
