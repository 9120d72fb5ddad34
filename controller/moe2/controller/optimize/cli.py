"""``moe2ctl optimize``: choose the experts that serve, under every delay and energy limit.

    moe2ctl optimize --problem problem.json --json
    moe2ctl optimize --problem problem.json --solver greedy
    moe2ctl optimize --problem big.json --epsilon 0.01 --time-limit 60

Exit status: 0 solved, 1 failed (e.g. brute force on too many experts), 2 bad flags or a bad
problem file, 3 infeasible (the reason names the limit that cannot be met).
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from moe2.controller.optimize.problem import Problem
from moe2.controller.optimize.solution import Infeasible, Solution
from moe2.controller.optimize.solvers import DEFAULT_SOLVER, SOLVERS, solve
from moe2.controller.options import EXIT_INFEASIBLE, emit, json_option
from moe2.shared.errors import ConfigError


def _status(solution: Solution) -> str:
    gap = solution.stats.get("gap")
    if solution.optimal:
        return "optimal"
    if gap is None:
        return "not proven optimal"
    return f"within {gap:.4g} of the optimum"


def render(result: Solution | Infeasible, problem: Problem) -> str:
    """The human-readable report: subset, objective, each limit, solver statistics."""
    if isinstance(result, Infeasible):
        return f"infeasible: {result.reason}"
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
    shown = "-" if e_lim is None else f"{e_lim:.4g} J"
    lines.append(f"{'energy':<24} {result.energy:>10.4g} J {shown:>12}")
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
    lines += ["", ", ".join(parts)]
    return "\n".join(lines)


def report(result: Solution | Infeasible, problem: Problem, as_json: bool) -> None:
    """Print ``result`` (JSON or the table) and exit with EXIT_INFEASIBLE if infeasible."""
    emit(result.to_json(), as_json, lambda _: render(result, problem))
    if isinstance(result, Infeasible):
        raise click.exceptions.Exit(EXIT_INFEASIBLE)


@click.command("optimize")
@click.option(
    "--problem",
    "problem_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Solve this problem file (DESIGN.md §3) offline, without broker or registry.",
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
@json_option
def optimize(
    problem_path: Path | None,
    solver: str,
    epsilon: float | None,
    time_limit: float | None,
    as_json: bool,
) -> None:
    """Choose the experts that serve, under every delay and energy limit (SMO)."""
    if problem_path is None:
        raise click.UsageError("give the problem to solve: --problem FILE")
    try:
        problem = Problem.from_file(problem_path)
    except ConfigError as exc:
        raise click.BadParameter(exc.message, param_hint="'--problem'") from None
    result = solve(problem, solver=solver, epsilon=epsilon, time_limit=time_limit)
    report(result, problem, as_json)
