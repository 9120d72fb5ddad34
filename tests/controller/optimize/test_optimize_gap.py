"""The gap an optimisation reports is proven: cut short by a tight time limit, SMO's answer is
never further from brute force's optimum than the gap it states; a decomposition by
application states a gap that holds against brute force over every application's subsets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moe2.controller.optimize import Problem, Solution, solve
from moe2.controller.optimize.decompose import allowed, solve_by_app, split_by_app
from moe2.controller.optimize.objective import Evaluator
from moe2.controller.optimize.synthetic import synthetic_problem

TOL = 1e-9


@pytest.mark.parametrize("time_limit", [1e-9, 0.002, 0.02])
def test_a_time_limited_gap_holds_against_brute_force(time_limit: float) -> None:
    unproven = 0
    for seed in range(12):
        pr = synthetic_problem(12, n_samples=60, seed=500 + seed)
        smo = solve(pr, time_limit=time_limit)
        brute = solve(pr, "brute")
        assert isinstance(smo, Solution) and isinstance(brute, Solution)
        gap = smo.stats["gap"]
        assert gap is not None and gap >= 0.0
        # What it claims: J(answer) - optimum <= gap, and its lower bound is below the optimum.
        assert smo.objective - brute.objective <= gap + TOL * max(1.0, abs(brute.objective))
        assert smo.stats["lower_bound"] <= brute.objective + TOL * max(1.0, abs(brute.objective))
        assert smo.optimal == (gap == 0.0)
        if smo.optimal:
            assert abs(smo.objective - brute.objective) <= TOL * max(1.0, abs(brute.objective))
        unproven += not smo.optimal
    if time_limit == 1e-9:
        # Stopped before the first node: the greedy incumbent and the root bound, every time.
        assert unproven > 0


def _brute_by_app(pr: Problem) -> float:
    """min over every application's subset of Σ w J, with Σ w E within the budget."""
    parts = split_by_app(pr)
    choices = []
    for part in parts:
        ev = Evaluator(part.problem)
        n = part.problem.n_experts
        rows = [
            (part.weight * ev.objective(s), part.weight * ev.energy(s))
            for k in range(1, n + 1)
            for s in itertools.combinations(range(n), k)
            if ev.feasible(s)
        ]
        choices.append(rows)
    limit = pr.energy_limit if pr.energy_limit is not None else np.inf
    best = np.inf
    for combo in itertools.product(*choices):
        if sum(c[1] for c in combo) <= limit * (1 + 1e-9) + 1e-9:
            best = min(best, sum(c[0] for c in combo))
    return float(best)


@pytest.mark.parametrize("energy_fraction", [None, 0.3, 0.12, 0.08])
def test_a_decomposition_states_a_gap_that_holds(energy_fraction: float | None) -> None:
    for seed in range(4):
        pr = synthetic_problem(6, n_samples=45, seed=seed, energy_fraction=energy_fraction)
        by = solve_by_app(split_by_app(pr), pr.energy_limit, time_limit=5.0)
        best = _brute_by_app(pr)
        if not by.feasible:
            assert best == np.inf
            continue
        assert by.energy <= (pr.energy_limit or np.inf) * (1 + 1e-9) + 1e-9
        assert by.gap is not None and by.objective - best <= by.gap + 1e-9
        assert by.lower_bound is not None and by.lower_bound <= best + 1e-9
        if not by.coupled:  # the relaxation fits the budget: optimal for the whole
            assert by.optimal and abs(by.objective - best) <= 1e-9


def test_a_subset_per_application_is_never_worse_than_one_for_all() -> None:
    pr = synthetic_problem(8, n_samples=60, seed=3, energy_fraction=None)
    one = solve(pr)
    by = solve_by_app(split_by_app(pr), None)
    assert isinstance(one, Solution) and by.optimal and not by.coupled
    assert by.objective <= one.objective + 1e-9


def test_only_a_proven_answer_may_be_pushed() -> None:
    assert allowed(0.0, 0.0) and allowed(0.01, 0.02) and not allowed(0.03, 0.02)
    assert not allowed(None, 1e9) and allowed(None, float("inf"))
