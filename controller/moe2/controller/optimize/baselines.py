"""Baselines behind the solver interface: brute force (the reference), greedy removal, random."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from moe2.controller.optimize.objective import Evaluator
from moe2.controller.optimize.solver import Deadline, Found, Solver
from moe2.shared.errors import ConfigError

IntArray = NDArray[np.intp]

MAX_BRUTE_EXPERTS = 22  # 4 M subsets; beyond that brute force takes hours

# Brute force enumerates the low experts as a table of this many (subset, token) sums at most.
_BRUTE_TABLE_CELLS = 1 << 21


class BruteForce(Solver):
    """Every non-empty subset of every expert: exact, and exponential."""

    name = "brute"

    def search(self, ev: Evaluator, epsilon: float, deadline: Deadline) -> Found:
        n = ev.n_experts
        if n > MAX_BRUTE_EXPERTS:
            raise ConfigError(
                f"brute force enumerates 2^N subsets and refuses N = {n} experts (the most is "
                f"{MAX_BRUTE_EXPERTS}); use the exact branch and bound: --solver smo"
            )
        tokens = ev.q.shape[1]
        low = max(1, min(n, int(math.log2(max(2, _BRUTE_TABLE_CELLS // tokens)))))
        # Tables over all subsets of the first `low` experts (row r = the subset with bits r),
        # built by doubling: the subsets with expert j are those without it, plus j.
        q_tab = np.zeros((1, tokens))
        g_tab = np.zeros((1, tokens))
        d_tab = np.zeros((1, ev.delay.shape[1]))  # slowest expert per delay column; ≥ 0
        e_tab = np.zeros(1)
        for j in range(low):
            q_tab = np.vstack([q_tab, q_tab + ev.q[j]])
            g_tab = np.vstack([g_tab, g_tab + ev.g[j]])
            d_tab = np.vstack([d_tab, np.maximum(d_tab, ev.delay[j])])
            e_tab = np.concatenate([e_tab, e_tab + ev.mean_energy[j]])
        # Start from the best feasible single expert, so that even a search cut short by the
        # time limit answers with a feasible subset.
        # Objective values are J̃ = J − ev.offset (see objective.py).
        singles = np.flatnonzero(ev.feasible_singletons())
        j_singles = np.array([ev.relative([int(s)]) for s in singles])
        best, best_j = 1 << int(singles[np.argmin(j_singles)]), float(j_singles.min())
        feasible, timed_out = 0, False
        for high in range(1 << (n - low)):
            if deadline.expired():
                timed_out = True
                break
            members = [low + j for j in range(n - low) if high >> j & 1]
            q_h = ev.q[members].sum(axis=0)
            g_h = ev.g[members].sum(axis=0)
            d_h = ev.delay[members].max(axis=0) if members else 0.0
            e_h = ev.mean_energy[members].sum()
            ok = e_tab + e_h <= ev.energy_allowed  # (2^low,)
            if ev.limited_apps:
                delays = np.maximum(d_tab, d_h) @ ev.limit_weights.T + ev.gate_delay
                ok &= np.all(delays <= ev.delay_allowed, axis=1)
            if high == 0:
                ok[0] = False  # the empty set
            rows = np.flatnonzero(ok)
            if rows.size == 0:
                continue
            feasible += rows.size
            j_rows = -np.log((q_tab[rows] + q_h) / (g_tab[rows] + g_h)).sum(axis=1)

            def chosen(k: int, high: int = high, rows: IntArray = rows) -> list[int]:
                mask = (high << low) | int(rows[k])
                return [i for i in range(n) if mask >> i & 1]

            better = ev.settle(j_rows / ev.n_samples, chosen, best_j)
            if better is not None:
                best_j = better[0]
                best = (high << low) | int(rows[better[1]])
        indices = tuple(i for i in range(n) if best >> i & 1)
        stats = {"subsets": (1 << n) - 1, "feasible_subsets": feasible, "timed_out": timed_out}
        return Found(indices, None if timed_out else 0.0, stats)


class Greedy(Solver):
    """Greedy removal from the full set: drop the expert that costs least objective per unit of
    limit violation until feasible, then keep dropping while that lowers J."""

    name = "greedy"

    def search(self, ev: Evaluator, epsilon: float, deadline: Deadline) -> Found:
        indices = greedy_removal(ev, np.flatnonzero(ev.feasible_singletons()))
        return Found(indices, None, {})


class RandomFeasible(Solver):
    """A random maximal feasible subset: experts in a seeded random order, each kept if the
    subset stays feasible (the paper's "Rand." baseline)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def search(self, ev: Evaluator, epsilon: float, deadline: Deadline) -> Found:
        rng = np.random.default_rng(self.seed)
        chosen: list[int] = []
        slowest = np.zeros(ev.delay.shape[1])  # (delay columns,) seconds
        energy = 0.0
        for n in rng.permutation(np.flatnonzero(ev.feasible_singletons())):
            s = np.maximum(slowest, ev.delay[n])
            e = energy + ev.mean_energy[n]
            delays = ev.limit_weights @ s + ev.gate_delay
            if e <= ev.energy_allowed and np.all(delays <= ev.delay_allowed):
                chosen.append(int(n))
                slowest, energy = s, e
        return Found(tuple(sorted(chosen)), None, {"seed": self.seed})


def _leave_one_out(rows: NDArray[np.float64]) -> NDArray[np.float64]:
    """(m, k) sums of all rows but row i, from prefix and suffix sums (no cancellation)."""
    prefix = np.zeros_like(rows)  # prefix[i]: rows before i
    suffix = np.zeros_like(rows)  # suffix[i]: rows after i
    np.cumsum(rows[:-1], axis=0, out=prefix[1:])
    np.cumsum(rows[:0:-1], axis=0, out=suffix[-2::-1])
    return prefix + suffix


def _violation(
    ev: Evaluator, delays: NDArray[np.float64], energy: NDArray[np.float64]
) -> NDArray[np.float64]:
    # Relative excess over each limit, summed: 0 exactly when feasible. (m, apps), (m,) -> (m,)
    lim = np.maximum(ev.delay_limits, 1e-12)
    excess = np.where(delays <= ev.delay_allowed, 0.0, delays / lim - 1.0)
    over = np.maximum(excess, 0.0).sum(axis=-1)
    if math.isfinite(ev.energy_limit):
        e_over = np.maximum(energy / max(ev.energy_limit, 1e-12) - 1.0, 0.0)
        over = over + np.where(energy <= ev.energy_allowed, 0.0, e_over)
    return over


def greedy_removal(ev: Evaluator, candidates: IntArray) -> tuple[int, ...]:
    """Greedy removal from ``candidates`` (experts feasible alone; at least one)."""
    current = np.array(sorted(candidates), dtype=np.intp)
    best: tuple[int, ...] | None = None
    best_j = math.inf
    while True:
        q, g = ev.q[current], ev.g[current]  # (m, tokens)
        j_now = float(-np.log(q.sum(axis=0) / g.sum(axis=0)).sum() / ev.n_samples)
        feasible = ev.feasible(current)
        if feasible and j_now < best_j:
            best, best_j = tuple(int(i) for i in current), j_now
        if current.size == 1:
            break
        j_without = -np.log(_leave_one_out(q) / _leave_one_out(g)).sum(axis=1) / ev.n_samples
        if feasible:
            k = int(np.argmin(j_without))
            if j_without[k] >= j_now:
                break
        else:
            # Delays without expert k: the slowest other expert per sample (top-2 trick).
            d = ev.delay[current]  # (m, samples)
            top = np.argmax(d, axis=0)
            first = d.max(axis=0)
            second = np.partition(d, -2, axis=0)[-2]
            slowest = np.where(np.arange(current.size)[:, None] == top, second, first)
            delays = slowest @ ev.limit_weights.T + ev.gate_delay  # (m, limited apps)
            energy = ev.mean_energy[current].sum() - ev.mean_energy[current]
            now = _violation(
                ev, ev.limited_delays(current)[None, :], np.array([ev.energy(current)])
            )[0]
            relief = now - _violation(ev, delays, energy)
            if np.any(relief > 0):
                per_relief = (j_without - j_now) / np.maximum(relief, 1e-300)
                cost = np.where(relief > 0, per_relief, np.inf)
                k = int(np.argmin(cost))
            else:
                k = int(np.argmin(j_without))
        current = np.delete(current, k)
    if best is None:  # removal ended on an infeasible singleton: take the best feasible one
        singles = -np.log(ev.p[candidates]).sum(axis=1) / ev.n_samples
        best = (int(candidates[int(np.argmin(singles))]),)
    return best
