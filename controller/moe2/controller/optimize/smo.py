"""Subset Monotonic Optimization as an exact best-first branch and bound (paper Algorithm 2,
with the corrections of docs/method.md: the vertex expanded is the most promising one, feasibility
is the intersection of every limit, and nothing assumes J monotone).

Tree. A node is (I, U): the subset I, already evaluated, and the experts U that may still join.
Its subtree is every S with I ⊆ S ⊆ I ∪ U. Expanding it orders U (the experts that could help
most first) and makes the children I ∪ {u_k} with U' = the experts after u_k, so every subset
appears exactly once (a set-enumeration tree, re-ordered per node). The root's children are the
singletons, experts with the most gate mass first.

Feasibility (down-closure). Costs grow with S: an expert u with I ∪ {u} infeasible can join no
descendant, so it leaves U before the children are made; an infeasible subset is never a node.
Experts infeasible alone never enter the tree.

Bounds. R_t(S) is the fused probability of token t under S (a g-weighted average of the p's);
J(S) = −(1/samples) Σ_t log R_t(S). For every S = I ∪ X, X ⊆ U:

  (a)  Helpful experts (p_u > R_t(I)): R_t(S) − R_t(I) = Σ_X g_u (p_u − R_t(I)) / G(S), and
       each positive term is at most δ_u = R_t(I ∪ {u}) − R_t(I) (shrink G(S) to G(I) + g_u).
  (a') Harmful experts (p_u < R_t(I)) pull the average down by at least
       ν_u = g_u (R_t(I) − p_u) / (G(I) + Σ_U g) each (grow G(S) to its largest value).
       With P = Σ_{X+} δ/R, N = Σ_{X−} ν/R: log(1 + P − N) ≤ Σ_{X+} log(1 + δ_u/R) −
       N / (1 + P_max), as (1+a)(1+b) ≥ 1 + a + b and log(1 − y) ≤ −y. So the per-token gain
       is at most Σ_{u∈X} e_{u,t}, e = log(R(I∪{u})/R(I)) for helpful u, −ν/(R(1+P_max)) else.
  (b)  R_t(S) ≤ ψ_t, the largest ratio of sums over I ⊆ S' ⊆ I ∪ U (Dinkelbach: add exactly
       the experts with p above the current ratio until the set settles), cap_t = log ψ_t/R_t.
  (c)  Energy is additive: X must fit the joules left (fractional knapsack, Dantzig's bound).

Gain(X) ≤ (1/samples) Σ_t min(cap_t, Σ_X e_{u,t}) over X within the budget; for any
λ ∈ [0, 1]^tokens, min(c, s) ≤ λc + (1−λ)s makes that a knapsack over per-expert values (see
``_gain_bounds``). J(S) ≥ J(I) − that. For children the same sums run over U' with u_k forced
in, from the parent's arrays in one vectorised pass. At the root the bound is
mean_i −Σ_t log max_{u∈U} p_{u,t}. Subtrees of at most ``_ENUMERATE`` experts are enumerated.

Search. Best-first on the bound (the smallest first), the incumbent seeded by greedy removal and
improved by every evaluated child. A subtree is cut when its bound ≥ incumbent − ε (with a 1e-9
relative slack for rounding, on the side of exploring), so the answer is within ε of the
optimum; the search ends when the smallest open bound cannot beat the incumbent. The gap
reported is incumbent − the smallest bound of anything cut thanks to ε or left open at a time
limit: 0 means proven optimal.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from moe2.controller.optimize.baselines import greedy_removal
from moe2.controller.optimize.objective import Evaluator
from moe2.controller.optimize.solver import Deadline, Found, Solver

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.intp]

_RTOL = 1e-9  # rounding slack of the bounds, relative to the objective
_LAMBDA_ROUNDS = 2
# A subtree with this many experts left or fewer is cheaper to enumerate than to bound.
_ENUMERATE = 4


def _bits(mask: int) -> IntArray:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return np.array(out, dtype=np.intp)


def knapsack_bounds(
    values: FloatArray, costs: FloatArray, available: NDArray[np.bool_], budgets: FloatArray
) -> FloatArray:
    """Fractional-knapsack optimum for each row r: items with available[r], budget budgets[r].

    values, costs: (m,) ≥ 0; available: (r, m); budgets: (r,). Dantzig: take items by value
    per cost until the budget runs out, the last one in part.
    """
    if values.size == 0:
        return np.zeros(available.shape[0])
    density = np.divide(values, costs, out=np.full_like(values, np.inf), where=costs > 0)
    order = np.argsort(-density, kind="stable")
    v = values[order] * available[:, order]  # (r, m)
    c = costs[order] * available[:, order]
    cv = np.cumsum(v, axis=1)
    cc = np.cumsum(c, axis=1)
    budgets = np.maximum(budgets, 0.0)
    over = cc > budgets[:, None]
    first = np.argmax(over, axis=1)  # first item that no longer fits whole
    rows = np.arange(v.shape[0])
    prev_v = np.where(first > 0, cv[rows, first - 1], 0.0)
    prev_c = np.where(first > 0, cc[rows, first - 1], 0.0)
    c_first = c[rows, first]
    part = (
        np.divide(budgets - prev_c, c_first, out=np.zeros_like(budgets), where=c_first > 0)
        * v[rows, first]
    )
    return np.where(over.any(axis=1), prev_v + part, cv[:, -1])


def _ratio_caps(
    q_i: FloatArray, g_i: FloatArray, q: FloatArray, g: FloatArray, p: FloatArray
) -> FloatArray:
    """(tokens,) ψ_t: the largest fused probability over I ⊆ S ⊆ I ∪ U, per token.

    q_i, g_i: (tokens,) sums over I; q, g, p: (|U|, tokens) rows of U. Dinkelbach's iteration
    for a ratio of sums: from λ = R(I), add exactly the experts with p > λ and recompute λ; it
    rises to the optimum and stops once that set no longer changes (a handful of rounds).
    """
    take = p > q_i / g_i  # (|U|, tokens)
    lam = (q_i + (q * take).sum(axis=0)) / (g_i + (g * take).sum(axis=0))
    cols = np.arange(p.shape[1])  # the tokens whose set may still change
    for _ in range(64):
        again = p[:, cols] > lam[cols]
        moved = (again != take[:, cols]).any(axis=0)
        if not moved.any():
            return lam
        cols, again = cols[moved], again[:, moved]
        take[:, cols] = again
        lam[cols] = (q_i[cols] + (q[:, cols] * again).sum(axis=0)) / (
            g_i[cols] + (g[:, cols] * again).sum(axis=0)
        )
    # Not settled (rounding ping-pong): the exact prefix maximum over the p-sorted order.
    order = np.argsort(-p, axis=0)
    cq = np.cumsum(np.take_along_axis(q, order, axis=0), axis=0)
    cg = np.cumsum(np.take_along_axis(g, order, axis=0), axis=0)
    return np.maximum(((q_i + cq) / (g_i + cg)).max(axis=0), q_i / g_i)


def _knapsack_solution(values: FloatArray, costs: FloatArray, budget: float) -> FloatArray:
    """(m,) in [0, 1]: Dantzig's fractional-knapsack solution (see ``knapsack_bounds``)."""
    density = np.divide(values, costs, out=np.full_like(values, np.inf), where=costs > 0)
    order = np.argsort(-density, kind="stable")
    spent = np.cumsum(costs[order])
    before = spent - costs[order]
    share = np.clip(
        np.divide(budget - before, costs[order], out=np.ones_like(spent), where=costs[order] > 0),
        0.0,
        1.0,
    )
    x = np.empty_like(values)
    x[order] = share
    return x


def _signed_gains(
    q_i: FloatArray,
    g_i: FloatArray,
    ratio: FloatArray,
    log_ratio: FloatArray,
    q: FloatArray,
    g: FloatArray,
    p: FloatArray,
) -> tuple[FloatArray, FloatArray]:
    """(|U|, tokens) e_{u,t}, additive bounds on the per-token gain, and (tokens,) cap_t.

    q_i, g_i: (tokens,) sums over I; ratio, log_ratio: (|U|, tokens) R_t(I ∪ {u}) and its log;
    q, g, p: (|U|, tokens) rows of U. For every X ⊆ U:
    log R_t(I ∪ X) − log R_t(I) ≤ min(cap_t, Σ_{u∈X} e_{u,t}); see bounds (a), (a'), (b).
    """
    r = q_i / g_i  # (tokens,) R_t(I)
    up = np.maximum(log_ratio - np.log(r), 0.0)  # d_{u,t}, bound (a)
    p_max = np.maximum(ratio, r).sum(axis=0) / r - ratio.shape[0]  # (tokens,) Σ_U δ / R
    # (a'): an expert with p < R(I) pulls the average down by at least this much.
    scale = 1.0 / ((g_i + g.sum(axis=0)) * r * (1.0 + np.maximum(p_max, 0.0)))
    down = g * np.maximum(r - p, 0.0) * scale
    caps = np.log(_ratio_caps(q_i, g_i, q, g, p) / r)
    return up - down, np.maximum(caps, 0.0)


def _gain_bounds(
    gains: FloatArray, caps: FloatArray, costs: FloatArray, budget: float, ns: int
) -> tuple[float, FloatArray]:
    """Upper bounds on J(I) − J(S): over the node's subtree, and over each child's.

    gains: (|U|, tokens) signed e_{u,t}; caps: (tokens,); costs: (|U|,) joules; budget: joules
    left (inf: no energy limit). Child k forces u_k in and may add the experts after it.

    The gain of X is at most (1/ns) Σ_t min(cap_t, Σ_{u∈X} e_{u,t}) with X within the budget.
    For any λ ∈ [0, 1]^tokens, min(c, s) ≤ λc + (1−λ)s makes that Σ_t λ_t cap_t plus a
    knapsack over w_u = Σ_t (1−λ_t) e_{u,t} (experts with w_u ≤ 0 are never worth taking):
    every λ gives a valid bound. We start from λ = 0 and then set λ_t = 1 on the tokens that
    the last maximiser saturates. A second family uses only the positive parts d = max(e, 0)
    and no budget, where the best λ is explicit: Σ_t min(cap_t, Σ_{u∈U} d_{u,t}).
    """
    m = gains.shape[0]
    positive = np.maximum(gains, 0.0)
    suffix = np.cumsum(positive[::-1], axis=0)[::-1]  # row k: Σ over U from u_k on
    child = np.minimum(suffix, caps).sum(axis=1) / ns  # (|U|,)
    node = float(child[0])
    limited = math.isfinite(budget)
    later = np.arange(m)[None, :] > np.arange(m)[:, None]  # (child, item): item after u_k
    lam = np.zeros_like(caps)
    for _ in range(_LAMBDA_ROUNDS):
        w = gains @ (1.0 - lam) / ns  # (|U|,)
        worth = np.maximum(w, 0.0)
        base = float(lam @ caps) / ns
        if limited:
            x = _knapsack_solution(worth, costs, budget) * (w > 0)
            after = knapsack_bounds(worth, costs, later, budget - costs)
        else:
            x = (w > 0).astype(np.float64)
            after = np.append(np.cumsum(worth[::-1])[::-1][1:], 0.0)
        node = min(node, base + float(worth @ x))
        child = np.minimum(child, base + w + after)
        saturated = (x @ gains > caps).astype(np.float64)
        if np.array_equal(saturated, lam):
            break
        lam = saturated
    return node, child


class SMO(Solver):
    """Exact (ε-optimal) best-first branch and bound; see the module docstring."""

    name = "smo"

    def search(self, ev: Evaluator, epsilon: float, deadline: Deadline) -> Found:
        return _Search(ev, epsilon).run(deadline)


class _Search:
    """One run of the branch and bound. Experts are addressed by position in ``perm``;
    a node is (bound, tie-breaker, bitmask of I, bitmask of U) on a heap."""

    def __init__(self, ev: Evaluator, epsilon: float) -> None:
        self.ev, self.epsilon, self.ns = ev, epsilon, ev.n_samples
        candidates = np.flatnonzero(ev.feasible_singletons())  # nothing else can ever join
        # Objective values are J̃ = J − ev.offset throughout (see objective.py).
        self.incumbent = greedy_removal(ev, candidates)
        self.best = ev.relative(self.incumbent)
        self.greedy = self.best
        singles = -np.log(ev.p[candidates]).sum(axis=1) / self.ns  # J̃({n})
        better = ev.settle(singles, lambda k: [int(candidates[k])], self.best)
        if better is not None:
            self.best = better[0]
            self.incumbent = (int(candidates[better[1]]),)
        # Root order: the experts with the most gate mass first. The late root subtrees lack
        # them, and without them the fused probabilities (and the bounds) are poor.
        self.perm = candidates[np.argsort(-ev.g[candidates].mean(axis=1), kind="stable")]
        perm = self.perm
        self.q, self.g, self.p = ev.q[perm], ev.g[perm], ev.p[perm]  # (m, tokens)
        self.delay = ev.delay[perm]  # (m, samples) seconds
        self.energy = ev.mean_energy[perm]  # (m,) joules
        self.heap: list[tuple[float, int, int, int]] = []
        self.counter = 0
        self.eps_bound = math.inf  # smallest bound among subtrees cut only thanks to ε
        self.expanded = self.evaluated = self.pruned = 0

    def threshold(self) -> float:
        # Cut a subtree whose bound reaches this. The slack covers rounding in the bounds and
        # errs on the side of exploring.
        return self.best - self.epsilon + _RTOL * max(1.0, abs(self.best))

    def cut(self, bound: float) -> bool:
        if bound < self.threshold():
            return False
        self.pruned += 1
        if bound < self.best:  # cut only thanks to ε: remember for the reported gap
            self.eps_bound = min(self.eps_bound, bound)
        return True

    def push(self, bound: float, i_mask: int, u_mask: int) -> None:
        heapq.heappush(self.heap, (bound, self.counter, i_mask, u_mask))
        self.counter += 1

    def run(self, deadline: Deadline) -> Found:
        m = self.perm.size
        # Root children {k} with U = {k+1, ...}: the root's bound over V = {k, ...}, max p.
        suffix_max = np.maximum.accumulate(np.log(self.p)[::-1], axis=0)[::-1]  # (m, tokens)
        root_bounds = -suffix_max.sum(axis=1) / self.ns
        full = (1 << m) - 1
        for k in range(m - 1):
            self.push(float(root_bounds[k]), 1 << k, full & ~((2 << k) - 1))
        open_bound, timed_out = math.inf, False
        while self.heap:
            if self.heap[0][0] >= self.threshold():
                open_bound = self.heap[0][0]  # nothing left can beat the incumbent by ε
                break
            if deadline.expired():
                open_bound, timed_out = self.heap[0][0], True
                break
            key, _, i_mask, u_mask = heapq.heappop(self.heap)
            self.expand(key, i_mask, u_mask)
        lower = min(self.best, self.eps_bound, open_bound)
        gap = max(0.0, self.best - lower)
        if gap <= _RTOL * max(1.0, abs(self.best)):
            gap = 0.0
        stats: dict[str, Any] = {
            "greedy_objective": self.greedy + self.ev.offset,
            "nodes": self.expanded,
            "evaluated": self.evaluated + m,
            "pruned": self.pruned,
            "open": len(self.heap),
            "lower_bound": lower + self.ev.offset,
            "timed_out": timed_out,
        }
        return Found(tuple(sorted(self.incumbent)), gap, stats)

    def expand(self, key: float, i_mask: int, u_mask: int) -> None:
        """Evaluate every child of (I, U), update the incumbent, bound and push the children."""
        ev, ns = self.ev, self.ns
        self.expanded += 1
        members, rest = _bits(i_mask), _bits(u_mask)
        q_i, g_i = self.q[members].sum(axis=0), self.g[members].sum(axis=0)  # (tokens,)
        j_i = float(-np.log(q_i / g_i).sum() / ns)
        e_i = float(self.energy[members].sum())
        # Down-closure: drop every u with I ∪ {u} infeasible from the whole subtree.
        ok = self.energy[rest] + e_i <= ev.energy_allowed
        if ev.limited_apps:
            slowest = np.maximum(self.delay[rest], self.delay[members].max(axis=0))
            ok &= np.all(slowest @ ev.limit_weights.T + ev.gate_delay <= ev.delay_allowed, axis=1)
        rest = rest[ok]
        if rest.size == 0:
            return
        if rest.size <= _ENUMERATE:
            self.enumerate_subtree(members, q_i, g_i, e_i, rest)
            return
        q_u, g_u = self.q[rest], self.g[rest]  # (|U|, tokens)
        ratio = (q_i + q_u) / (g_i + g_u)  # (|U|, tokens) R_t(I ∪ {u})
        log_ratio = np.log(ratio)
        j_children = -log_ratio.sum(axis=1) / ns  # J̃(I ∪ {u})
        self.evaluated += rest.size
        better = ev.settle(
            j_children, lambda k: self.perm[np.append(members, rest[k])].tolist(), self.best
        )
        if better is not None:
            self.best = better[0]
            self.incumbent = tuple(int(i) for i in self.perm[np.append(members, rest[better[1]])])
        gains, caps = _signed_gains(q_i, g_i, ratio, log_ratio, q_u, g_u, self.p[rest])
        # This node's child order: the experts that could help most first, so the later
        # children, which lack them, get tight bounds.
        order = np.argsort(-np.maximum(gains, 0.0).sum(axis=1), kind="stable")
        rest, gains = rest[order], gains[order]
        node_gain, child_gain = _gain_bounds(
            gains, caps, self.energy[rest], ev.energy_allowed - e_i, ns
        )
        node_bound = max(key, j_i - node_gain)
        if self.cut(node_bound):
            return
        child_bounds = np.maximum(node_bound, j_i - child_gain)
        tail = 0  # mask of the experts after child k in this node's order
        for k in range(rest.size - 1, -1, -1):
            if k < rest.size - 1 and not self.cut(float(child_bounds[k])):
                self.push(float(child_bounds[k]), i_mask | 1 << int(rest[k]), tail)
            tail |= 1 << int(rest[k])

    def enumerate_subtree(
        self, members: IntArray, q_i: FloatArray, g_i: FloatArray, e_i: float, rest: IntArray
    ) -> None:
        """Evaluate every I ∪ X, X ⊆ U non-empty: tables over the subsets of U by doubling."""
        ev = self.ev
        size = 1 << rest.size
        q_tab = np.empty((size, q_i.size))  # (subsets, tokens); row r = I ∪ (bits of r)
        g_tab = np.empty((size, q_i.size))
        d_tab = np.empty((size, self.delay.shape[1]))  # (subsets, samples) slowest expert
        e_tab = np.empty(size)
        q_tab[0], g_tab[0], e_tab[0] = q_i, g_i, e_i
        d_tab[0] = self.delay[members].max(axis=0)
        for j, u in enumerate(rest):  # doubling: the subsets with u are those without, plus u
            lo, hi = 1 << j, 2 << j
            np.add(q_tab[:lo], self.q[u], out=q_tab[lo:hi])
            np.add(g_tab[:lo], self.g[u], out=g_tab[lo:hi])
            np.add(e_tab[:lo], self.energy[u], out=e_tab[lo:hi])
            np.maximum(d_tab[:lo], self.delay[u], out=d_tab[lo:hi])
        ok = e_tab <= ev.energy_allowed
        if ev.limited_apps:
            delays = d_tab @ ev.limit_weights.T + ev.gate_delay
            ok &= np.all(delays <= ev.delay_allowed, axis=1)
        ok[0] = False  # I itself was evaluated by its parent
        rows = np.flatnonzero(ok)
        if rows.size == 0:
            return
        values = -np.log(q_tab[rows] / g_tab[rows]).sum(axis=1) / self.ns

        def chosen(k: int) -> list[int]:
            extra = [int(rest[j]) for j in range(rest.size) if int(rows[k]) >> j & 1]
            return [int(i) for i in self.perm[[*members.tolist(), *extra]]]

        self.evaluated += rows.size
        better = ev.settle(values, chosen, self.best)
        if better is not None:
            self.best = better[0]
            self.incumbent = tuple(chosen(better[1]))
