"""J(S) and the costs of a subset, precomputed once per problem for fast repeated evaluation.

J(S) = (1/samples) Σ_i −Σ_t log Σ_{n∈S} ω_{i,n} p_{i,n,t},  ω_{i,n} = g_{i,n} / Σ_{n'∈S} g_{i,n'}

Every token of every sample weighs 1/samples, so the samples' ragged token lists are flattened
into one token axis (no padding, no mask): with q = g·p per token,

    J(S) = −(1/samples) Σ_k log( Σ_{n∈S} q_{k,n} / Σ_{n∈S} g_{k,n} )      k over all tokens

Arrays are stored expert-major ((experts, tokens)) so that a subset's sums read whole rows.

Costs (DESIGN.md §2): an app's delay is the mean over its samples of the slowest chosen expert
plus the gate's delay (the expectation of the max); energy is the mean over all samples of the
chosen experts' sum, i.e. Σ_{n∈S} ē_n. Both grow with S, so feasibility is closed under subsets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from moe2.controller.optimize.problem import FloatArray, Problem

# A probability or gate value of exactly 0 would make a token's loss infinite (or a singleton's
# weights 0/0); floor both, which caps one token's loss near 69 nats.
FLOOR = 1e-30

# Limits are met up to this relative slack, so that sums taken in a different order (an
# incremental search, a brute-force table) agree on a subset that sits exactly on a limit.
LIMIT_RTOL = 1e-9

Indices = Sequence[int] | NDArray[np.intp]


class Evaluator:
    """The problem's arrays in the shapes the solvers need, and J and the costs of subsets."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.n_experts = problem.n_experts
        self.n_samples = problem.n_samples
        tokens = problem.tokens
        token_sample = np.repeat(np.arange(self.n_samples), tokens)  # (tokens,) sample index
        p = np.maximum(np.concatenate(problem.p, axis=1), FLOOR)  # (experts, tokens)
        g = np.maximum(problem.gate, FLOOR).T[:, token_sample]  # (experts, tokens)
        self.q: FloatArray = np.ascontiguousarray(g * p)  # (experts, tokens) gate · probability
        self.g: FloatArray = np.ascontiguousarray(g)  # (experts, tokens) gate of the token's sample
        self.p: FloatArray = np.ascontiguousarray(p)  # (experts, tokens)
        self.mean_energy: FloatArray = problem.energy.mean(axis=0)  # (experts,) joules
        self.delay: FloatArray = np.ascontiguousarray(problem.delay.T)  # (experts, samples) s

        # App a's delay is app_weights[a] @ (max over S of delay) + gate_delay.
        self.apps: tuple[str, ...] = tuple(dict.fromkeys(problem.app))
        member = np.array(problem.app)[None, :] == np.array(self.apps)[:, None]
        self.app_weights: FloatArray = member / member.sum(axis=1, keepdims=True)  # (apps, samples)
        self.gate_delay = problem.gate_delay
        limited = [a for a in self.apps if a in problem.delay_limits]
        self.limited_apps: tuple[str, ...] = tuple(limited)
        rows = [self.apps.index(a) for a in limited]
        self.limit_weights: FloatArray = self.app_weights[rows]  # (limited apps, samples)
        limits = np.array([problem.delay_limits[a] for a in limited], dtype=np.float64)
        self.delay_limits: FloatArray = limits  # (limited apps,) seconds
        self.delay_allowed: FloatArray = limits * (1 + LIMIT_RTOL) + LIMIT_RTOL
        e_max = problem.energy_limit
        self.energy_limit = np.inf if e_max is None else float(e_max)
        self.energy_allowed = self.energy_limit * (1 + LIMIT_RTOL) + LIMIT_RTOL

    # -- objective --------------------------------------------------------------------

    def objective(self, subset: Indices) -> float:
        idx = np.asarray(subset, dtype=np.intp)
        if idx.size == 0:
            raise ValueError("J is defined for non-empty subsets only")
        mix = self.q[idx].sum(axis=0) / self.g[idx].sum(axis=0)  # (tokens,) fused probability
        return float(-np.log(mix).sum() / self.n_samples)

    # -- costs --------------------------------------------------------------------------

    def app_delays(self, subset: Indices) -> FloatArray:
        """(apps,) seconds: every app's expected delay, in ``self.apps`` order."""
        slowest = self.delay[np.asarray(subset, dtype=np.intp)].max(axis=0)  # (samples,)
        return self.app_weights @ slowest + self.gate_delay

    def limited_delays(self, subset: Indices) -> FloatArray:
        """(limited apps,) seconds: the delays that have a limit, in ``self.limited_apps`` order."""
        slowest = self.delay[np.asarray(subset, dtype=np.intp)].max(axis=0)
        return self.limit_weights @ slowest + self.gate_delay

    def energy(self, subset: Indices) -> float:
        return float(self.mean_energy[np.asarray(subset, dtype=np.intp)].sum())

    def feasible(self, subset: Indices) -> bool:
        if len(subset) == 0:
            return False
        return bool(
            np.all(self.limited_delays(subset) <= self.delay_allowed)
            and self.energy(subset) <= self.energy_allowed
        )

    def feasible_singletons(self) -> NDArray[np.bool_]:
        """(experts,) whether each expert alone meets every limit."""
        delays = self.delay @ self.limit_weights.T + self.gate_delay  # (experts, limited apps)
        ok_delay = np.all(delays <= self.delay_allowed, axis=1)
        return ok_delay & (self.mean_energy <= self.energy_allowed)

    def infeasibility(self) -> str | None:
        """Why no subset is feasible, or None when some expert alone meets every limit.

        Costs grow with S, so if no single expert is feasible, nothing is.
        """
        if self.feasible_singletons().any():
            return None
        delays = self.delay @ self.limit_weights.T + self.gate_delay  # (experts, limited apps)
        for a, app in enumerate(self.limited_apps):
            best = int(np.argmin(delays[:, a]))
            if delays[best, a] > self.delay_allowed[a]:
                return (
                    f"delay of app {app!r} is at least {delays[best, a]:.4g} s with the cheapest "
                    f"expert ({self.problem.experts[best]}), over the limit "
                    f"{self.delay_limits[a]:.4g} s"
                )
        best = int(np.argmin(self.mean_energy))
        if self.mean_energy[best] > self.energy_allowed:
            return (
                f"energy is at least {self.mean_energy[best]:.4g} J with the cheapest expert "
                f"({self.problem.experts[best]}), over the limit {self.energy_limit:.4g} J"
            )
        # Each limit alone can be met, but by different experts.
        parts = []
        for n, name in enumerate(self.problem.experts):
            broken = [
                f"delay of app {app!r} {delays[n, a]:.4g} s > {self.delay_limits[a]:.4g} s"
                for a, app in enumerate(self.limited_apps)
                if delays[n, a] > self.delay_allowed[a]
            ]
            if self.mean_energy[n] > self.energy_allowed:
                broken.append(f"energy {self.mean_energy[n]:.4g} J > {self.energy_limit:.4g} J")
            parts.append(f"{name}: {', '.join(broken)}")
        return "no single expert meets every limit (" + "; ".join(parts) + ")"
