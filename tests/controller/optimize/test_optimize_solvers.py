"""The exact solver equals brute force on hundreds of random problems, monotone J or not."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optimize_cases import (
    random_problem,
    ref_delays,
    ref_energy,
    ref_feasible,
    ref_objective,
    ref_optimum,
)

from moe2.controller.optimize import SOLVERS, Infeasible, Problem, Solution, solve
from moe2.controller.optimize.objective import Evaluator
from moe2.controller.optimize.synthetic import synthetic_problem
from moe2.shared.errors import ConfigError


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


def _monotone(pr: Problem) -> bool:
    """Whether J never rises when an expert is added (checked on the whole lattice)."""
    ev = Evaluator(pr)
    n = pr.n_experts
    value = {
        s: ev.objective(s) for r in range(1, n + 1) for s in itertools.combinations(range(n), r)
    }
    return all(
        value[s] <= value[s[:k] + s[k + 1 :]] + 1e-12
        for s in value
        if len(s) > 1
        for k in range(len(s))
    )


@pytest.mark.parametrize("block", range(6))
def test_smo_equals_brute_force(block: int) -> None:
    infeasible = 0
    for seed in range(block * 50, block * 50 + 50):
        pr = random_problem(seed)
        exact, brute = solve(pr), solve(pr, "brute")
        assert exact.feasible == brute.feasible, seed
        if isinstance(exact, Infeasible):
            infeasible += 1
            continue
        assert isinstance(brute, Solution)
        assert _close(exact.objective, brute.objective), (seed, exact, brute)
        assert exact.optimal and exact.stats["gap"] == 0.0
        assert ref_feasible(pr, exact.indices), seed
    assert 0 < infeasible < 50  # both kinds are covered in every block


def test_the_random_problems_cover_monotone_and_non_monotone_objectives() -> None:
    kinds = [_monotone(random_problem(seed, n=6)) for seed in range(40)]
    assert 8 <= sum(kinds) <= 32


def test_smo_is_exact_where_j_is_not_monotone() -> None:
    # The gate likes x2 most, but x2 gives the answers almost no probability: adding it to
    # any subset raises the loss, so the best subset is not the largest one.
    pr = Problem(
        experts=["x0", "x1", "x2"],
        gate=[[0.3, 0.2, 0.5], [0.2, 0.3, 0.5]],
        p=[[[0.9, 0.8], [0.3, 0.4], [1e-6, 1e-6]], [[0.4], [0.9], [1e-6]]],
        app=["qa", "qa"],
        delay=[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
        energy=[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
    )
    assert not _monotone(pr)
    result = solve(pr)
    assert isinstance(result, Solution)
    assert result.subset == ("x0", "x1")
    assert _close(result.objective, ref_optimum(pr)[0])


@pytest.mark.parametrize("seed", range(40))
def test_evaluator_matches_the_definition(seed: int) -> None:
    pr = random_problem(seed, n=5)
    ev = Evaluator(pr)
    rng = np.random.default_rng(seed)
    for _ in range(4):
        subset = sorted(rng.choice(5, size=int(rng.integers(1, 6)), replace=False).tolist())
        assert _close(ev.objective(subset), ref_objective(pr, subset))
        delays = dict(zip(ev.apps, ev.app_delays(subset), strict=True))
        for app, value in ref_delays(pr, subset).items():
            assert _close(delays[app], value)
        assert _close(ev.energy(subset), ref_energy(pr, subset))
        assert ev.feasible(subset) == ref_feasible(pr, subset)


@pytest.mark.parametrize("seed", range(0, 60, 2))
def test_brute_force_matches_the_reference(seed: int) -> None:
    pr = random_problem(seed, n=int(np.random.default_rng(seed).integers(1, 7)))
    best, _ = ref_optimum(pr)
    result = solve(pr, "brute")
    if math.isinf(best):
        assert isinstance(result, Infeasible)
    else:
        assert isinstance(result, Solution) and _close(result.objective, best)


@pytest.mark.parametrize("seed", range(30))
def test_epsilon_optimal(seed: int) -> None:
    pr = random_problem(seed, n=12)
    brute = solve(pr, "brute")
    if isinstance(brute, Infeasible):
        return
    result = solve(pr, epsilon=0.05)
    assert isinstance(result, Solution)
    assert brute.objective - 1e-9 <= result.objective <= brute.objective + 0.05 + 1e-9
    assert 0.0 <= result.stats["gap"] <= 0.05 + 1e-9
    assert result.optimal == (result.stats["gap"] == 0.0)
    assert result.stats["lower_bound"] <= brute.objective + 1e-9


def test_time_limit_returns_the_best_so_far_with_its_gap() -> None:
    pr = synthetic_problem(64, n_samples=200, seed=5)
    result = solve(pr, time_limit=0.3)
    assert isinstance(result, Solution)
    assert result.stats["timed_out"]
    assert not result.optimal and result.stats["gap"] > 0
    assert result.stats["lower_bound"] == pytest.approx(result.objective - result.stats["gap"])
    assert Evaluator(pr).feasible(result.indices)
    assert result.objective <= result.stats["greedy_objective"]


@pytest.mark.parametrize("seed", range(0, 90, 3))
def test_baselines_are_feasible_and_never_beat_the_optimum(seed: int) -> None:
    pr = random_problem(seed)
    exact = solve(pr)
    for name in ("greedy", "random"):
        result = solve(pr, name)
        assert result.feasible == exact.feasible
        if isinstance(result, Solution):
            assert isinstance(exact, Solution)
            assert ref_feasible(pr, result.indices)
            assert result.objective >= exact.objective - 1e-9
            assert not result.optimal and result.stats["gap"] is None


def test_random_is_seeded_and_maximal() -> None:
    pr = synthetic_problem(20, n_samples=60, seed=3)
    a, b = solve(pr, "random", seed=7), solve(pr, "random", seed=7)
    assert isinstance(a, Solution) and isinstance(b, Solution)
    assert a.subset == b.subset
    ev = Evaluator(pr)
    singles = np.flatnonzero(ev.feasible_singletons())
    assert all(not ev.feasible(sorted({*a.indices, int(n)})) for n in singles if n not in a.indices)
    seen = {solve(pr, "random", seed=s).subset for s in range(8)}  # type: ignore[union-attr]
    assert len(seen) > 1


def test_registry_names_the_four_solvers() -> None:
    assert set(SOLVERS) == {"smo", "brute", "greedy", "random"}
    with pytest.raises(ConfigError, match="unknown solver 'simplex'; expected one of smo"):
        solve(random_problem(1), "simplex")


def test_brute_force_cut_short_still_answers_feasibly() -> None:
    pr = synthetic_problem(20, n_samples=100, seed=1)
    result = solve(pr, "brute", time_limit=0.01)
    assert isinstance(result, Solution) and result.stats["timed_out"]
    assert not result.optimal and result.stats["gap"] is None
    assert Evaluator(pr).feasible(result.indices)


def test_brute_force_refuses_too_many_experts() -> None:
    pr = synthetic_problem(23, n_samples=10, seed=0, energy_fraction=None)
    with pytest.raises(ConfigError, match=r"refuses N = 23 experts .* --solver smo"):
        solve(pr, "brute")


def _single_app(delay: list[list[float]], energy: list[list[float]], **kw: object) -> Problem:
    n = len(delay[0])
    return Problem(
        experts=[f"e{k}" for k in range(n)],
        gate=[[1.0 / n] * n] * len(delay),
        p=[[[0.5]] * n] * len(delay),
        app=["qa"] * len(delay),
        delay=delay,
        energy=energy,
        **kw,  # type: ignore[arg-type]
    )


def test_infeasible_names_the_delay_that_cannot_be_met() -> None:
    pr = _single_app(
        [[2.2, 3.0], [2.4, 3.0]],
        [[1.0, 1.0], [1.0, 1.0]],
        gate_delay=0.01,
        delay_limits={"qa": 2.0},
    )
    result = solve(pr)
    assert isinstance(result, Infeasible)
    assert result.reason == (
        "delay of app 'qa' is at least 2.31 s with the cheapest expert (e0), over the limit 2 s"
    )
    assert result.to_json() == {"feasible": False, "reason": result.reason}


def test_infeasible_names_the_energy_that_cannot_be_met() -> None:
    pr = _single_app([[1.0, 1.0]], [[30.0, 25.0]], energy_limit=20.0)
    result = solve(pr, "greedy")
    assert isinstance(result, Infeasible)
    assert result.reason == (
        "energy is at least 25 J with the cheapest expert (e1), over the limit 20 J"
    )


def test_infeasible_when_each_limit_is_met_only_by_a_different_expert() -> None:
    pr = _single_app([[1.0, 3.0]], [[30.0, 5.0]], delay_limits={"qa": 2.0}, energy_limit=20.0)
    result = solve(pr)
    assert isinstance(result, Infeasible)
    assert result.reason.startswith("no single expert meets every limit (e0: energy 30 J > 20 J")


def test_a_single_feasible_expert_is_the_answer() -> None:
    pr = _single_app([[1.0, 3.0]], [[1.0, 1.0]], delay_limits={"qa": 2.0})
    for name in SOLVERS:
        result = solve(pr, name)
        assert isinstance(result, Solution) and result.subset == ("e0",)


def test_probabilities_of_zero_give_a_finite_objective() -> None:
    pr = Problem(
        experts=["a", "b"],
        gate=[[0.0, 1.0]],
        p=[[[0.0, 1.0], [0.0, 0.5]]],
        app=["qa"],
        delay=[[1.0, 1.0]],
        energy=[[1.0, 1.0]],
    )
    result = solve(pr)
    assert isinstance(result, Solution) and math.isfinite(result.objective)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n=st.integers(1, 9))
def test_every_answer_is_feasible_and_optimal(seed: int, n: int) -> None:
    pr = random_problem(seed, n=n)
    result = solve(pr)
    best, _ = ref_optimum(pr)
    if isinstance(result, Infeasible):
        assert math.isinf(best)
    else:
        assert ref_feasible(pr, result.indices) and _close(result.objective, best)
        assert _close(result.objective, ref_objective(pr, result.indices))
