"""Decomposition by application: each application gets a subset of its own candidates.

The paper chooses one subset S for every application. A fleet of hundreds of experts and
dozens of applications instead gives each application m its own candidates C_m (the experts
scored on its prompts) and its own subset S_m ⊆ C_m. With w_m the application's share of the
samples, the whole objective and energy are Σ_m w_m J_m(S_m) and Σ_m w_m E_m(S_m); each delay
limit concerns one application. Only the energy budget couples them:

1. Relaxation: solve each application alone, its energy capped at the whole budget over its
   weight (a necessary condition). When the chosen subsets fit the budget together, they are
   optimal for the whole (each is optimal for a relaxation) and the gap is Σ_m w_m gap_m.
2. When they do not (the budget binds across applications), the budget is split: every
   application first gets the energy of its cheapest feasible expert, the rest in proportion
   to what each wanted beyond that; each is solved again under its share, and what is left
   over goes to the applications that lost most, one more solve each. The answer is feasible
   but not proven optimal: its gap is measured against the relaxation's lower bound
   Σ_m w_m LB_m, and reported.

    parts = split_by_app(problem)                        # every expert a candidate everywhere
    result = solve_by_app(parts, problem.energy_limit, time_limit=60)
    result.solutions["qa"].subset, result.gap, result.coupled
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe2.controller.optimize.objective import LIMIT_RTOL, Evaluator
from moe2.controller.optimize.problem import Problem
from moe2.controller.optimize.solution import Infeasible, Solution
from moe2.controller.optimize.solver import Deadline
from moe2.controller.optimize.solvers import DEFAULT_SOLVER, solve
from moe2.shared.errors import ConfigError

# The least time one application's solve is given when the budget is nearly spent: the
# exact solvers still return their incumbent (greedy removal) with its gap.
_MIN_SOLVE_S = 0.05


@dataclass(frozen=True)
class AppPart:
    """One application's sub-problem: its samples, its candidates, its delay limit."""

    app: str
    weight: float  # its share of the samples: the whole's J and energy weigh its own by this
    problem: Problem  # its energy_limit is ignored: the budget is shared (solve_by_app)


@dataclass(frozen=True)
class ByApp:
    """Every application's subset, and what they make together."""

    solutions: dict[str, Solution]
    infeasible: dict[str, Infeasible]
    weights: dict[str, float]
    objective: float  # Σ_m w_m J_m over the feasible applications, nats per sample
    energy: float  # Σ_m w_m E_m plus the energy used elsewhere, joules per sample
    energy_limit: float | None
    # Proven: objective − optimum of the whole (0 when proven optimal); None when a solver
    # proved nothing (greedy, random).
    gap: float | None
    lower_bound: float | None  # of the whole's optimum, when every application has one
    coupled: bool  # the budget bound across applications and was split between them
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return not self.infeasible

    @property
    def optimal(self) -> bool:
        return self.gap == 0.0 and self.feasible

    def to_json(self) -> dict[str, Any]:
        return {
            "by_app": {a: s.to_json() for a, s in sorted(self.solutions.items())},
            "infeasible_apps": {a: i.reason for a, i in sorted(self.infeasible.items())},
            "weights": dict(sorted(self.weights.items())),
            "objective": self.objective,
            "energy": self.energy,
            "feasible": self.feasible,
            "optimal": self.optimal,
            "stats": {
                "gap": self.gap,
                "lower_bound": self.lower_bound,
                "coupled": self.coupled,
                "energy_limit": self.energy_limit,
                **self.stats,
            },
        }


def split_by_app(problem: Problem) -> list[AppPart]:
    """One part per application of ``problem``: its samples, every expert a candidate, its
    own delay limit; the weight is its share of the samples."""
    apps = list(dict.fromkeys(problem.app))
    names = np.array(problem.app)
    parts = []
    for app in apps:
        rows = np.flatnonzero(names == app)
        limits = {app: problem.delay_limits[app]} if app in problem.delay_limits else {}
        sub = Problem(
            experts=problem.experts,
            gate=problem.gate[rows],
            logp=[problem.logp[i] for i in rows],
            app=[app] * rows.size,
            prompt_delay=problem.prompt_delay[rows],
            decode_delay=problem.decode_delay[rows],
            steps=problem.steps[rows],
            energy=problem.energy[rows],
            gate_delay=problem.gate_delay,
            delay_limits=limits,
            energy_limit=None,
            energy_per=problem.energy_per,  # the shared budget's unit
            epsilon=problem.epsilon,
            meta=dict(problem.meta) | {"app": app},
        )
        parts.append(AppPart(app, rows.size / problem.n_samples, sub))
    return parts


def _lower(s: Solution) -> float | None:
    gap = s.stats.get("gap")
    return None if gap is None else s.objective - float(gap)


def _cheapest(part: AppPart) -> float | None:
    """Joules per sample of the app's cheapest expert that meets its delay limit alone."""
    ev = Evaluator(part.problem.with_limits(part.problem.delay_limits, None))
    ok = ev.feasible_singletons()
    return float(ev.mean_energy[ok].min()) if ok.any() else None


class _Clock:
    """Shares a time budget between solves: each gets what is left over the solves left."""

    def __init__(self, seconds: float | None, solves: int) -> None:
        self.deadline = Deadline(seconds)
        self.left = max(1, solves)
        self.solves = 0  # solves started

    def share(self) -> float | None:
        self.solves += 1
        if self.deadline.seconds is None:
            return None
        rest = self.deadline.seconds - self.deadline.elapsed()
        share = max(_MIN_SOLVE_S, rest / self.left)
        self.left = max(1, self.left - 1)
        return share


def solve_by_app(
    parts: Sequence[AppPart],
    energy_limit: float | None,
    *,
    solver: str = DEFAULT_SOLVER,
    epsilon: float | None = None,
    time_limit: float | None = None,
    energy_elsewhere: float = 0.0,
    **options: Any,
) -> ByApp:
    """Solve every application (see the module docstring). ``energy_elsewhere`` (joules per
    sample of the whole) is spent by applications not in ``parts`` (their subsets stay);
    ``time_limit`` is shared by every solve."""
    if not parts:
        raise ConfigError("no application to optimise")
    if len({p.app for p in parts}) != len(parts):
        raise ConfigError("an application is listed twice")
    weights = {p.app: p.weight for p in parts}
    # Half the time is kept for a second pass when the budget may have to be split.
    clock = _Clock(time_limit, len(parts) * (1 if energy_limit is None else 2))
    budget = None if energy_limit is None else energy_limit - energy_elsewhere

    def run(part: AppPart, cap: float | None) -> Solution | Infeasible:
        prob = part.problem.with_limits(part.problem.delay_limits, cap)
        return solve(prob, solver=solver, epsilon=epsilon, time_limit=clock.share(), **options)

    def cap_of(part: AppPart, joules: float | None) -> float | None:
        return None if joules is None else max(0.0, joules) / part.weight

    solved: dict[str, Solution] = {}
    infeasible: dict[str, Infeasible] = {}
    for part in parts:
        result = run(part, cap_of(part, budget))
        if isinstance(result, Solution):
            solved[part.app] = result
        else:
            infeasible[part.app] = result
    relaxed = dict(solved)
    lows = {a: _lower(s) for a, s in relaxed.items()}

    def total_energy(sols: Mapping[str, Solution]) -> float:
        return sum(weights[a] * s.energy for a, s in sols.items())

    coupled = False
    fits = budget is None or total_energy(solved) <= budget * (1 + LIMIT_RTOL) + LIMIT_RTOL
    live = [p for p in parts if p.app in solved]  # an app infeasible alone stays so
    if not fits and budget is not None:
        coupled = True
        needs = {p.app: _cheapest(p) for p in live}
        need = sum(weights[a] * (n or 0.0) for a, n in needs.items())
        if need > budget * (1 + LIMIT_RTOL) + LIMIT_RTOL:
            reason = (
                f"the energy budget of {energy_limit:.4g} J cannot cover every application's "
                f"cheapest expert together: they need {need + energy_elsewhere:.4g} J"
            )
            everyone = infeasible | {p.app: Infeasible(reason) for p in live}
            return _result(
                {}, everyone, weights, energy_limit, energy_elsewhere, lows, coupled, clock
            )
        wanted = {
            a: max(0.0, weights[a] * (sol.energy - (needs[a] or 0.0))) for a, sol in solved.items()
        }
        spare = budget - need
        total_wanted = sum(wanted.values())
        shares = {
            a: weights[a] * (needs[a] or 0.0)
            + (spare * wanted[a] / total_wanted if total_wanted > 0 else 0.0)
            for a in solved
        }
        for part in live:
            result = run(part, cap_of(part, shares[part.app]))
            if isinstance(result, Solution):
                solved[part.app] = result
            else:  # cannot happen (the share covers the cheapest expert): say so if it does
                del solved[part.app]
                infeasible[part.app] = result
        # What is left over goes to the applications that lost most to the split.
        left = budget - total_energy(solved)
        losers = sorted(
            solved, key=lambda a: weights[a] * (relaxed[a].objective - solved[a].objective)
        )
        by_part = {p.app: p for p in parts}
        for app in losers:
            if left <= LIMIT_RTOL * max(1.0, budget) or app in infeasible:
                break
            if solved[app].objective <= relaxed[app].objective:
                continue
            mine = weights[app] * solved[app].energy
            again = run(by_part[app], cap_of(by_part[app], mine + left))
            if isinstance(again, Solution) and again.objective < solved[app].objective:
                left -= weights[app] * again.energy - mine
                solved[app] = again
    return _result(
        solved, infeasible, weights, energy_limit, energy_elsewhere, lows, coupled, clock
    )


def _result(
    solved: dict[str, Solution],
    infeasible: dict[str, Infeasible],
    weights: dict[str, float],
    energy_limit: float | None,
    elsewhere: float,
    lows: Mapping[str, float | None],
    coupled: bool,
    clock: _Clock,
) -> ByApp:
    objective = sum(weights[a] * s.objective for a, s in solved.items())
    energy = elsewhere + sum(weights[a] * s.energy for a, s in solved.items())
    lower: float | None = None
    gap: float | None = None
    known = [lows.get(a) for a in solved]
    if solved and all(x is not None for x in known):
        lower = sum(weights[a] * float(x or 0.0) for a, x in zip(solved, known))
        gap = max(0.0, objective - lower)
        if gap <= 1e-9 * max(1.0, abs(objective)):
            gap = 0.0
    return ByApp(
        solutions=solved,
        infeasible=infeasible,
        weights=weights,
        objective=objective,
        energy=energy,
        energy_limit=energy_limit,
        gap=gap,
        lower_bound=lower,
        coupled=coupled,
        stats={
            "time_s": clock.deadline.elapsed(),
            "apps": len(weights),
            "timed_out": any(s.stats.get("timed_out") for s in solved.values()),
            "energy_elsewhere": elsewhere,
            "solves": clock.solves,
        },
    )


def allowed(gap: float | None, max_gap: float) -> bool:
    """Whether a result with this proven gap may be pushed: proven optimal, or within
    ``max_gap`` (nats per sample); a result that proves nothing only with ``max_gap = inf``."""
    if gap is None:
        return math.isinf(max_gap)
    return gap <= max_gap
