"""The lemmas the branch and bound rests on, checked exhaustively on small random cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moe2.controller.optimize.smo import (
    _gain_bounds,
    _ratio_caps,
    _signed_gains,
    knapsack_bounds,
)


def _case(seed: int) -> tuple[np.ndarray, ...]:
    # I of 1-3 experts, U of 1-6, a few tokens; gates and probabilities of any shape.
    rng = np.random.default_rng(seed)
    n_i, n_u, tokens = int(rng.integers(1, 4)), int(rng.integers(1, 7)), int(rng.integers(1, 6))
    g = rng.dirichlet(np.full(n_i + n_u, rng.uniform(0.2, 3.0)), size=tokens).T
    p = rng.beta(rng.uniform(0.3, 3.0), rng.uniform(0.3, 3.0), size=(n_i + n_u, tokens))
    p = np.maximum(p, 1e-12)
    return g[:n_i] * p[:n_i], g[:n_i], g[n_i:] * p[n_i:], g[n_i:], p[n_i:]


def _subsets(m: int) -> list[tuple[int, ...]]:
    return [s for r in range(m + 1) for s in itertools.combinations(range(m), r)]


@pytest.mark.parametrize("seed", range(200))
def test_per_token_gain_is_bounded_by_cap_and_signed_sum(seed: int) -> None:
    q_in, g_in, q, g, p = _case(seed)
    q_i, g_i = q_in.sum(axis=0), g_in.sum(axis=0)
    ratio = (q_i + q) / (g_i + g)
    gains, caps = _signed_gains(q_i, g_i, ratio, np.log(ratio), q, g, p)
    base = np.log(q_i / g_i)
    for x in _subsets(q.shape[0]):
        idx = list(x)
        gain = np.log((q_i + q[idx].sum(axis=0)) / (g_i + g[idx].sum(axis=0))) - base
        assert np.all(gain <= caps + 1e-12)
        assert np.all(gain <= gains[idx].sum(axis=0) + 1e-12)


@pytest.mark.parametrize("seed", range(100))
def test_ratio_cap_is_the_exact_maximum(seed: int) -> None:
    q_in, g_in, q, g, p = _case(seed)
    q_i, g_i = q_in.sum(axis=0), g_in.sum(axis=0)
    best = np.max(
        [(q_i + q[list(x)].sum(axis=0)) / (g_i + g[list(x)].sum(axis=0)) for x in _subsets(len(q))],
        axis=0,
    )
    assert np.allclose(_ratio_caps(q_i, g_i, q, g, p), best, rtol=1e-12)


@pytest.mark.parametrize("seed", range(100))
def test_subtree_gain_bounds_hold_for_node_and_children(seed: int) -> None:
    q_in, g_in, q, g, p = _case(seed)
    rng = np.random.default_rng(seed + 1)
    q_i, g_i = q_in.sum(axis=0), g_in.sum(axis=0)
    ratio = (q_i + q) / (g_i + g)
    gains, caps = _signed_gains(q_i, g_i, ratio, np.log(ratio), q, g, p)
    costs = rng.uniform(0.0, 3.0, size=len(q))
    budget = float(rng.choice([np.inf, rng.uniform(0.0, costs.sum())]))
    tokens = q.shape[1]
    node, child = _gain_bounds(gains, caps, costs, budget, tokens)
    base = np.log(q_i / g_i)
    for x in _subsets(len(q)):
        if costs[list(x)].sum() > budget:
            continue
        idx = list(x)
        gain = (np.log((q_i + q[idx].sum(axis=0)) / (g_i + g[idx].sum(axis=0))) - base).sum()
        gain /= tokens
        assert gain <= node + 1e-12
        if x:  # in the subtree of child x[0]: it holds x[0] and only experts after it
            assert gain <= child[x[0]] + 1e-12


@pytest.mark.parametrize("seed", range(100))
def test_knapsack_bound_is_at_least_every_integral_packing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 8))
    values, costs = rng.uniform(0, 2, size=m), rng.uniform(0, 2, size=m)
    costs[rng.random(m) < 0.2] = 0.0
    available = rng.random((4, m)) < 0.7
    budgets = rng.uniform(-0.1, 4.0, size=4)
    bounds = knapsack_bounds(values, costs, available, budgets)
    for r in range(4):
        items = np.flatnonzero(available[r])
        budget = max(budgets[r], 0.0)  # a budget overdrawn by rounding counts as empty
        best = max(
            values[list(x)].sum()
            for k in range(len(items) + 1)
            for x in itertools.combinations(items, k)
            if costs[list(x)].sum() <= budget
        )
        assert best <= bounds[r] + 1e-12
        assert bounds[r] <= best + values[items].max(initial=0.0) + 1e-12  # LP: one item split
