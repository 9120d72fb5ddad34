"""One optimisation from the registry: sync the fleet's state, build the problem, write it
to a file (so the run can be replayed offline), solve, record, and optionally push."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from moe2.controller.assignments import push_assignment
from moe2.controller.fleet import read_retained
from moe2.controller.optimize.fromregistry import problem_from_registry
from moe2.controller.optimize.problem import Problem
from moe2.controller.optimize.solution import Infeasible, Solution
from moe2.controller.optimize.solvers import solve
from moe2.controller.registry.db import Registry, default_url
from moe2.controller.registry.sync import sync_once
from moe2.shared import protocol as p
from moe2.shared.errors import BrokerError, ConfigError, Moe2Error
from moe2.shared.mqtt import BrokerConfig


def problems_dir(db_url: str) -> Path:
    if db_url.startswith("sqlite:///"):
        base = Path(db_url[len("sqlite:///") :]).parent
    else:
        base = Path.home() / ".local" / "share" / "moe2"
    out = base / "problems"
    out.mkdir(parents=True, exist_ok=True)
    return out


def measured_links(broker: BrokerConfig) -> dict[str, p.LinkFigures]:
    """The most recent link figures any gateway measured to each expert."""
    links: dict[str, p.LinkFigures] = {}
    for payload in read_retained(broker, [p.topics.ALL_GATEWAY_LINKS], 1.5).values():
        try:
            report = p.decode_message(p.LinkReport, payload)
        except Moe2Error:
            continue
        for expert, fig in report.links.items():
            if expert not in links or fig.measured_at > links[expert].measured_at:
                links[expert] = fig
    return links


def run_from_registry(
    db_url: str | None,
    broker: BrokerConfig,
    dataset: str,
    delay_limits: Mapping[str, float],
    energy_limit: float | None,
    *,
    k: int,
    gate_version: str | None,
    gate_delay: float,
    solver: str,
    epsilon: float | None,
    time_limit: float | None,
    push: bool,
    echo: Callable[[str], None] | None = None,
) -> tuple[Problem, Solution | Infeasible]:
    say = echo or (lambda _line: None)
    url = db_url or default_url()
    reg = Registry.open(url)
    try:
        links: dict[str, p.LinkFigures] = {}
        try:
            counts = sync_once(reg, broker, 2.0)
            links = measured_links(broker)
            say(f"synced the fleet's state: {counts}; links measured to {len(links)} expert(s)")
        except BrokerError as exc:
            if push:
                raise
            say(f"broker unreachable ({exc.message}); using the registry's stored state")
        problem = problem_from_registry(
            reg,
            dataset,
            delay_limits,
            energy_limit,
            gate_version=gate_version,
            gate_delay=gate_delay,
            links=links,
            epsilon=epsilon or 0.0,
        )
        path = problems_dir(url) / f"problem-{time.strftime('%Y%m%d-%H%M%S')}-{dataset}.json"
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
            for app in sorted(set(problem.app)):
                assignment, acks = push_assignment(
                    broker,
                    app,
                    list(result.subset),
                    min(k, len(result.subset)),
                    gate=gate_ref,
                    wait_s=3.0,
                )
                reg.add_assignment(assignment)
                for ack in acks.values():
                    reg.record_assignment_ack(ack)
                say(
                    f"pushed {app} v{assignment.version}: {json.dumps(list(result.subset))}, "
                    f"k={assignment.k}; acknowledged by {sorted(acks) or 'no gateway yet'}"
                )
        return problem, result
    finally:
        reg.close()
