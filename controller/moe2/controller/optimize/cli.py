"""``moe2ctl optimize``: choose the experts that serve, under every delay and energy limit.

    moe2ctl optimize --problem problem.json --json
    moe2ctl optimize --problem problem.json --solver greedy
    moe2ctl optimize --problem big.json --epsilon 0.01 --time-limit 60
    moe2ctl optimize --problem fleet.json --by-app --time-limit 60   # a subset per app
    moe2ctl optimize --dataset tiny --app qa=0.05 --energy 2.0 --k 2 --push
    moe2ctl optimize --dataset big --app qa=0.05 --time-limit 30 --max-gap 0.01 --push

A push happens only when the answer is proven optimal, or within ``--max-gap`` (nats per
sample) of the optimum; otherwise nothing is pushed and the command fails (exit 1) saying
what the gap is.

Exit status: 0 solved, 1 failed (e.g. brute force on too many experts), 2 bad flags or a bad
problem file, 3 infeasible (the reason names the limit that cannot be met).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from moe2.controller.optimize.costs import summary
from moe2.controller.optimize.decompose import ByApp, solve_by_app, split_by_app
from moe2.controller.optimize.problem import Problem
from moe2.controller.optimize.solution import Infeasible, Solution
from moe2.controller.optimize.solvers import DEFAULT_SOLVER, SOLVERS, solve
from moe2.controller.options import (
    EXIT_INFEASIBLE,
    broker_from_flags,
    broker_options,
    db_option,
    emit,
    json_option,
    registry_url,
    settings,
)
from moe2.shared.desired import PushResult
from moe2.shared.errors import ConfigError, NotAcknowledged


def _status(solution: Solution) -> str:
    gap = solution.stats.get("gap")
    if solution.optimal:
        return "optimal"
    if gap is None:
        return "not proven optimal"
    return f"within {gap:.4g} of the optimum"


def provenance(problem: Problem) -> dict[str, Any]:
    """Which gate and which cost figures the problem was built from (its ``meta``)."""
    meta = problem.meta
    gate = meta.get("gate_provenance")
    if gate is None:
        gate = {"version": meta["gate"]} if "gate" in meta else NOT_RECORDED
    return {
        "dataset": meta.get("dataset", NOT_RECORDED),
        "gate": gate,
        "gate_delay": meta.get("gate_delay", NOT_RECORDED),
        "costs": meta.get("costs", NOT_RECORDED),
    }


NOT_RECORDED = "not recorded in the problem file"


def _provenance_lines(problem: Problem) -> list[str]:
    where = provenance(problem)
    gate = where["gate"]
    if isinstance(gate, dict):
        shown = str(gate.get("version"))
        if gate.get("datasets"):
            shown += f" (trained on {', '.join(gate['datasets'])}"
            shown += f"; weights via {gate['source']})" if gate.get("source") else ")"
    else:
        shown = gate
    lines = [f"gate        {shown}", f"dataset     {where['dataset']}"]
    delay = problem.meta.get("gate_delay")
    if isinstance(delay, dict):
        lines.append(f"gate delay  {delay.get('seconds', 0.0):.4g} s ({delay.get('source')})")
    costs = where["costs"]
    if isinstance(costs, dict):
        lines.append(f"costs       {summary(costs)} figures:")
        for expert, src in costs.items():
            lines.append(
                f"  {expert:<18} delay {src['delay']}, energy {src['energy']} "
                f"({src['meter']}), {src['device_class'] or 'unknown device'}, "
                f"link {src['link']}"
            )
    else:
        lines.append(f"costs       {costs}")
    return lines


def render(result: Solution | Infeasible, problem: Problem) -> str:
    """The human-readable report: subset, objective, each limit, solver statistics, and
    where the gate and the costs came from."""
    if isinstance(result, Infeasible):
        return "\n".join([f"infeasible: {result.reason}", "", *_provenance_lines(problem)])
    lines = [
        f"subset      {', '.join(result.subset)}  ({len(result.subset)} of "
        f"{problem.n_experts} experts)",
        f"objective   {result.objective:.6f} nats per sample ({_status(result)})",
        "",
        f"{'constraint':<24} {'value':>12} {'limit':>12}",
    ]
    for app, value in result.delay.items():
        limit = problem.delay_limits.get(app)
        shown = "-" if limit is None else f"{limit:.4g} s"
        lines.append(f"{'delay ' + repr(app):<24} {value:>10.4g} s {shown:>12}")
    e_lim = problem.energy_limit
    unit = "J" if problem.energy_per == "step" else "J/prompt"
    shown = "-" if e_lim is None else f"{e_lim:.4g} {unit}"
    label = "energy per step" if problem.energy_per == "step" else "energy per prompt"
    lines.append(f"{label:<24} {result.energy:>10.4g} {unit} {shown:>12}")
    stats = result.stats
    parts = [f"solver {stats.get('solver')}"]
    for key, label in (
        ("nodes", "nodes"),
        ("evaluated", "subsets evaluated"),
        ("subsets", "subsets"),
        ("pruned", "pruned"),
    ):
        if key in stats:
            parts.append(f"{stats[key]} {label}")
    if stats.get("timed_out"):
        parts.append("stopped at the time limit")
    lower = stats.get("lower_bound")
    if isinstance(lower, float) and math.isfinite(lower):
        parts.append(f"lower bound {lower:.6f}")
    parts.append(f"{stats.get('time_s', 0.0):.3f} s")
    lines += ["", ", ".join(parts), "", *_provenance_lines(problem)]
    return "\n".join(lines)


def render_by_app(result: ByApp, problem: Problem) -> str:
    """The report of a decomposition: every application's subset, then the whole."""
    lines = [f"{'app':<16} {'weight':>6} {'objective':>10} {'delay':>10} {'limit':>8}  subset"]
    for app in sorted(set(result.solutions) | set(result.infeasible)):
        w = result.weights[app]
        if app in result.infeasible:
            lines.append(f"{app:<16} {w:>6.3f}  infeasible: {result.infeasible[app].reason}")
            continue
        s = result.solutions[app]
        limit = problem.delay_limits.get(app)
        shown = "-" if limit is None else f"{limit:.4g} s"
        lines.append(
            f"{app:<16} {w:>6.3f} {s.objective:>10.5f} {s.delay[app]:>8.4g} s {shown:>8}  "
            f"{', '.join(s.subset)} ({_status(s)})"
        )
    gap = result.gap
    status = (
        "optimal"
        if result.optimal
        else ("not proven optimal" if gap is None else f"within {gap:.4g} of the optimum")
    )
    e_lim = result.energy_limit
    unit = "J" if problem.energy_per == "step" else "J/prompt"
    lines += [
        "",
        f"objective   {result.objective:.6f} nats per sample ({status})",
        f"energy      {result.energy:.4g} {unit}"
        + ("" if e_lim is None else f" of {e_lim:.4g} {unit}")
        + (" (the budget bound: split between the applications)" if result.coupled else ""),
        f"{result.stats.get('solves', 0)} solves, {result.stats.get('time_s', 0.0):.3f} s",
        "",
        *_provenance_lines(problem),
    ]
    return "\n".join(lines)


def report_by_app(
    result: ByApp, problem: Problem, as_json: bool, pushed: Sequence[PushResult] = ()
) -> None:
    """As ``report``, for a decomposition by application."""
    out = result.to_json() | {"provenance": provenance(problem)}
    if pushed:
        out["pushed"] = [r.summary() for r in pushed]
    emit(out, as_json, lambda _: render_by_app(result, problem))
    if not result.feasible:
        raise click.exceptions.Exit(EXIT_INFEASIBLE)
    unacked = [r.assignment.app for r in pushed if not r.accepted]
    if unacked:
        raise NotAcknowledged(
            f"no gateway accepted the assignment of {', '.join(unacked)} (it stays retained)"
        )


def report(
    result: Solution | Infeasible,
    problem: Problem,
    as_json: bool,
    pushed: Sequence[PushResult] = (),
) -> None:
    """Print ``result`` (JSON or the table); exit with EXIT_INFEASIBLE if infeasible, and
    with EXIT_NOT_ACKED when a pushed assignment was accepted by no gateway."""
    out = result.to_json() | {"provenance": provenance(problem)}
    if pushed:
        out["pushed"] = [r.summary() for r in pushed]
    emit(out, as_json, lambda _: render(result, problem))
    if isinstance(result, Infeasible):
        raise click.exceptions.Exit(EXIT_INFEASIBLE)
    unacked = [r.assignment.app for r in pushed if not r.accepted]
    if unacked:
        raise NotAcknowledged(
            f"no gateway accepted the assignment of {', '.join(unacked)} (it stays retained)"
        )


PROBLEM_FILE_HELP = """\b
Problem file (JSON; every key below, all arrays per sample in one order):
  experts       ["e0", "e1", ...]
  gate          sample × expert gate values, rows sum to 1
  logp          sample × expert × unit target log-probabilities, nats (a unit is
                a token, or the whole target across vocabularies); or "p":
                probabilities, the original form, floored at 1e-30
  app           application of each sample
  prompt_delay  sample × expert seconds of step 1 (processing the prompt)
  decode_delay  sample × expert seconds of each later step
  steps         T of each sample: its answer's length in steps
                (or "delay": sample × expert seconds of a mean step, the original
                form, read as prompt_delay = decode_delay = delay, T = 1)
  energy        sample × expert joules per step (mean over the answer's steps)
  gate_delay    seconds the gate adds (optional, 0)
  limits        {"delay": {"app": seconds}, "energy": joules} (optional)
  epsilon       accepted optimality gap, nats per sample (optional, 0)
  meta          free-form; the registry path records the dataset, the gate and
                each expert's cost sources here (optional)
A sample's delay under S is (max_S prompt_delay + (T-1) max_S decode_delay) / T.
"""


@click.command("optimize", epilog=PROBLEM_FILE_HELP)
@click.option(
    "--problem",
    "problem_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Solve this problem file offline, without broker or registry (format below and in "
    "docs/method.md, 'The problem file').",
)
@click.option(
    "--solver",
    type=click.Choice(list(SOLVERS)),
    default=DEFAULT_SOLVER,
    show_default=True,
    help="smo: exact branch and bound; brute: every subset (N ≤ 22); greedy: greedy removal; "
    "random: a random maximal feasible subset.",
)
@click.option(
    "--epsilon",
    type=click.FloatRange(min=0.0),
    default=None,
    help="Accept a subset within this much of the optimum (nats per sample); overrides the "
    "file's epsilon.",
)
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    help="Stop after this many seconds with the best subset found and its proven gap.",
)
@click.option(
    "--by-app",
    is_flag=True,
    help="A subset per application (each over every expert), the energy budget shared: "
    "exact when the budget does not bind across applications, else split with its gap.",
)
@click.option(
    "--max-gap",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="With --push: push only an answer proven within this of the optimum (nats per "
    "sample; 'inf' also pushes a heuristic's); the larger of this and --epsilon counts.",
)
@click.option(
    "--dataset", default=None, help="Registry path: the scored dataset that defines the objective."
)
@click.option(
    "--app",
    "app_limits",
    multiple=True,
    metavar="NAME=SECONDS",
    help="Registry path: an application's delay limit, seconds per step (the mean over an "
    "answer's steps of the slowest chosen expert, plus the gate; repeatable).",
)
@click.option(
    "--energy",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    help="Registry path: energy budget, joules per step of an answer (eq. 11: the chosen "
    "experts' energy, mean over the steps), averaged over the prompts; per prompt with "
    "--energy-per prompt.",
)
@click.option(
    "--energy-per",
    type=click.Choice(["step", "prompt"]),
    default="step",
    show_default=True,
    help="Registry path: the unit of --energy: joules per step (eq. 11) or per prompt (the "
    "whole answer, as the paper's Tables II-IV state it).",
)
@click.option(
    "--k",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Registry path: experts fused per prompt, pushed with the subset.",
)
@click.option(
    "--gate",
    "gate_version",
    default=None,
    help="Gate version for the weights [default: the newest; an error if none was trained]; "
    "'uniform' weighs every expert equally.",
)
@click.option(
    "--gate-delay",
    type=click.FloatRange(min=0.0),
    default=None,
    help="Seconds the gate adds to every prompt [default: what the gateways measured running "
    "the gate and announced; 0 with --gate uniform].",
)
@click.option("--push", is_flag=True, help="Publish the chosen subset to the gateways.")
@db_option
@broker_options
@json_option
def optimize(
    problem_path: Path | None,
    solver: str,
    epsilon: float | None,
    time_limit: float | None,
    by_app: bool,
    max_gap: float,
    dataset: str | None,
    app_limits: tuple[str, ...],
    energy: float | None,
    energy_per: str,
    k: int,
    gate_version: str | None,
    gate_delay: float | None,
    push: bool,
    db_url: str | None,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Choose the experts that serve, under every delay and energy limit (SMO).

    Offline: --problem FILE. From the registry: --dataset D --app qa=2.0 --energy 20 [--push];
    the problem is also written to a file, so the run can be replayed with --problem."""
    if problem_path is None and dataset is None:
        raise click.UsageError(
            "give the problem: --problem FILE, or --dataset NAME (with --app/--energy limits)"
        )
    if problem_path is not None:
        if dataset or app_limits or energy is not None or push or gate_delay is not None:
            raise click.UsageError(
                "--problem is offline: drop --dataset/--app/--energy/--gate-delay/--push"
            )
        try:
            problem = Problem.from_file(problem_path)
        except ConfigError as exc:
            raise click.BadParameter(exc.message, param_hint="'--problem'") from None
        if by_app:
            parts = split_by_app(problem)
            by = solve_by_app(
                parts, problem.energy_limit, solver=solver, epsilon=epsilon, time_limit=time_limit
            )
            report_by_app(by, problem, as_json)
            return
        result = solve(problem, solver=solver, epsilon=epsilon, time_limit=time_limit)
        report(result, problem, as_json)
        return
    from moe2.controller.optimize.registryrun import run_from_registry

    limits = _parse_limits(app_limits)
    broker = broker_from_flags(kwargs)
    problem, found, pushed = run_from_registry(
        registry_url(db_url),
        settings().problems_dir,
        broker,
        dataset or "",
        limits,
        energy,
        energy_per="prompt" if energy_per == "prompt" else "step",
        k=k,
        gate_version=gate_version,
        gate_delay=gate_delay,
        solver=solver,
        epsilon=epsilon,
        time_limit=time_limit,
        push=push,
        echo=None if as_json else (lambda line: click.echo(line, err=True)),
        by_app=by_app,
        max_gap=max_gap,
    )
    if isinstance(found, ByApp):
        report_by_app(found, problem, as_json, pushed)
    else:
        report(found, problem, as_json, pushed)


def _parse_limits(specs: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not sep or not name or seconds <= 0:
            raise click.BadParameter(
                f"{spec!r}: expected NAME=SECONDS with SECONDS > 0, e.g. qa=2.0", param_hint="--app"
            )
        out[name] = seconds
    return out
