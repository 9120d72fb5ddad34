"""One optimisation from the registry: sync the fleet's state, build the problem, write it
to a file (so the run can be replayed offline), solve, record, and optionally push."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from moe2.controller.gate.weights import UNIFORM
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
from moe2.shared.errors import BrokerError, ConfigError
from moe2.shared.fleet import FleetState, FleetView
from moe2.shared.mqtt import BrokerConfig


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
) -> tuple[Problem, Solution | Infeasible, list[PushResult]]:
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
        result = solve(problem, solver=solver, epsilon=epsilon, time_limit=time_limit)
        used_gate = str(problem.meta.get("gate"))
        reg.add_optimisation_run(
            result.to_json(), None if used_gate == "uniform" else used_gate, str(path)
        )
        if push and isinstance(result, Solution):
            gate_ref = None
            if used_gate != "uniform":
                gv = reg.gate_version(used_gate)
                if gv.sha256 is None:
                    raise ConfigError(f"gate {used_gate} was never exported; run moe2ctl export")
                gate_ref = p.GateRef(version=gv.version, sha256=gv.sha256)
            apps = sorted(set(problem.app))
            k_used = min(k, len(result.subset))
            with desired_state(broker) as desired:
                for app in apps:
                    pushed.append(
                        desired.push_assignment(
                            app, list(result.subset), k_used, gate=gate_ref, wait_s=3.0
                        )
                    )
            record(reg, pushed)
            for r in pushed:
                say(describe(r))
        return problem, result, pushed
    finally:
        reg.close()
