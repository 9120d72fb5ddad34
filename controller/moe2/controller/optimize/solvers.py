"""The solver registry and ``solve``, the one entry point for the CLI and the registry path::

solution = solve(problem)                                  # exact SMO, the file's ε
solution = solve(problem, solver="greedy")
solution = solve(problem, epsilon=0.01, time_limit=30.0)   # ε-optimal, or best in 30 s
if solution.feasible: print(solution.subset, solution.objective)
else: print(solution.reason)
"""

from __future__ import annotations

from typing import Any

from moe2.controller.optimize.baselines import BruteForce, Greedy, RandomFeasible
from moe2.controller.optimize.objective import Evaluator
from moe2.controller.optimize.problem import Problem
from moe2.controller.optimize.smo import SMO
from moe2.controller.optimize.solution import Infeasible, Solution
from moe2.controller.optimize.solver import Deadline, Solver
from moe2.shared.errors import ConfigError

SOLVERS: dict[str, type[Solver]] = {
    SMO.name: SMO,
    BruteForce.name: BruteForce,
    Greedy.name: Greedy,
    RandomFeasible.name: RandomFeasible,
}

DEFAULT_SOLVER = SMO.name


def solve(
    problem: Problem,
    solver: str = DEFAULT_SOLVER,
    epsilon: float | None = None,
    time_limit: float | None = None,
    **options: Any,
) -> Solution | Infeasible:
    """Solve ``problem``; ``epsilon`` (default: the problem's) and ``time_limit`` (seconds)
    bound the exact solvers; ``options`` go to the solver's constructor (e.g. ``seed``)."""
    try:
        cls = SOLVERS[solver]
    except KeyError:
        raise ConfigError(
            f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}"
        ) from None
    eps = problem.epsilon if epsilon is None else float(epsilon)
    if not eps >= 0:
        raise ConfigError(f"epsilon must be ≥ 0, got {epsilon}")
    if time_limit is not None and not time_limit > 0:
        raise ConfigError(f"the time limit must be > 0 seconds, got {time_limit}")
    deadline = Deadline(time_limit)
    ev = Evaluator(problem)
    reason = ev.infeasibility()
    if reason is not None:
        return Infeasible(reason, {"solver": solver, "time_s": deadline.elapsed()})
    found = cls(**options).search(ev, eps, deadline)
    indices = found.indices
    stats: dict[str, Any] = {"solver": solver, "epsilon": eps}
    stats.update(found.stats)
    stats["gap"] = found.gap
    stats["time_s"] = deadline.elapsed()
    delays = ev.app_delays(indices)
    return Solution(
        subset=tuple(problem.experts[i] for i in indices),
        indices=indices,
        objective=ev.objective(indices),
        delay={app: float(d) for app, d in zip(ev.apps, delays, strict=True)},
        energy=ev.energy(indices),
        optimal=found.gap == 0.0,
        stats=stats,
    )
