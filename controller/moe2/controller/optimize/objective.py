"""J(S) and the costs of a subset, precomputed once per problem for fast repeated evaluation.

J(S) = (1/samples) Σ_i −Σ_u log Σ_{n∈S} ω_{i,n} p_{i,n,u},  ω_{i,n} = g_{i,n} / Σ_{n'∈S} g_{i,n'}

u runs over the sample's mixing units (tokens, or the whole target; ``moe2.controller.mixing``).
Every unit of every sample weighs 1/samples, so the samples' ragged unit lists are flattened
into one unit axis (no padding, no mask).

Log space end to end. ``objective`` is exact: a logsumexp over S of log ω + log p, whatever the
magnitude of log p (an answer of −5,000 nats is as exact as one of −0.1). The solvers need sums
over subsets, hence linear probabilities; they get each unit's probabilities relative to the
best expert on that unit, p̃_{n,u} = exp(log p_{n,u} − max_m log p_{m,u}) ∈ (0, 1], so that
J(S) = offset + J̃(S) with the constant offset = −(1/samples) Σ_u max_m log p_{m,u}. Comparisons,
differences and bounds are the same for J and J̃. Only an expert more than ``-LOG_CLIP`` nats
below the best on a unit would underflow; its p̃ is clipped up there (``clipped`` says whether
that happened), which can only make J̃ optimistic, so bounds stay valid, and the solvers settle
any candidate that beats the incumbent with the exact value (``settle``).

Arrays are stored expert-major ((experts, units)) so that a subset's sums read whole rows.

Costs (eqs. 7-11, docs/method.md): a sample's delay under S is (1/T) Σ_t max_{n∈S} τ_n(t)
with step 1 the prompt and steps 2..T decode steps, = max_S prompt/T + max_S decode·(T−1)/T.
Both terms are "delay columns" (two per sample; one when every T is 1), so an app's delay is
one weighted sum of the column-wise maximum over S, plus the gate's delay: the expectation over
prompts of the per-prompt maximum, never the maximum of expectations. Energy is the mean over
all samples of the chosen experts' sum, i.e. Σ_{n∈S} ē_n, per step or per prompt as the limit
is stated.
Both grow with S, so feasibility is closed under subsets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from moe2.controller.mixing import GATE_FLOOR
from moe2.controller.optimize.problem import FloatArray, Problem

# Relative log-probabilities below this are clipped for the solvers' linear sums: exp(-575)
# ≈ 1e-250 times a gate of GATE_FLOOR stays a normal float64.
LOG_CLIP = -575.0

# Limits are met up to this relative slack, so that sums taken in a different order (an
# incremental search, a brute-force table) agree on a subset that sits exactly on a limit.
LIMIT_RTOL = 1e-9

Indices = Sequence[int] | NDArray[np.intp]


def _logsumexp0(z: FloatArray) -> FloatArray:
    top = z.max(axis=0)
    return np.asarray(np.log(np.exp(z - top).sum(axis=0)) + top)


class Evaluator:
    """The problem's arrays in the shapes the solvers need, and J and the costs of subsets."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.n_experts = problem.n_experts
        self.n_samples = problem.n_samples
        unit_sample = np.repeat(np.arange(self.n_samples), problem.units)  # (units,) sample
        logp = np.concatenate(problem.logp, axis=1)  # (experts, units) nats
        top = logp.max(axis=0)  # (units,) the best expert's log-probability
        self.rel: FloatArray = np.ascontiguousarray(logp - top)  # (experts, units) ≤ 0, exact
        self.offset = float(-top.sum() / self.n_samples)  # J = offset + J̃
        self.clipped = bool((self.rel < LOG_CLIP).any())
        p = np.exp(np.maximum(self.rel, LOG_CLIP))  # (experts, units) in (0, 1]
        g = np.maximum(problem.gate, GATE_FLOOR).T[:, unit_sample]  # (experts, units)
        self.q: FloatArray = np.ascontiguousarray(g * p)  # (experts, units) gate · p̃
        self.g: FloatArray = np.ascontiguousarray(g)  # (experts, units) gate of the unit's sample
        self.p: FloatArray = np.ascontiguousarray(p)  # (experts, units) p̃
        self.log_g: FloatArray = np.log(self.g)
        # (experts,) joules in the limit's unit (per step, or per prompt)
        self.mean_energy: FloatArray = problem.sample_energy.mean(axis=0)

        # Delay columns: (experts, columns) seconds; app a's delay is
        # app_weights[a] @ (max over S of the columns) + gate_delay.
        steps = problem.steps.astype(np.float64)  # (samples,)
        prompt = problem.prompt_delay / steps[:, None]  # (samples, experts)
        member = np.array(problem.app)[None, :] == np.array(self._app_order(problem))[:, None]
        per_sample = member / member.sum(axis=1, keepdims=True)  # (apps, samples)
        if np.all(problem.steps == 1):
            self.delay: FloatArray = np.ascontiguousarray(prompt.T)
            self.app_weights: FloatArray = per_sample
        else:
            decode = problem.decode_delay * ((steps - 1) / steps)[:, None]
            self.delay = np.ascontiguousarray(np.vstack([prompt, decode]).T)
            self.app_weights = np.hstack([per_sample, per_sample])  # (apps, columns)

        self.apps: tuple[str, ...] = self._app_order(problem)
        self.gate_delay = problem.gate_delay
        limited = [a for a in self.apps if a in problem.delay_limits]
        self.limited_apps: tuple[str, ...] = tuple(limited)
        rows = [self.apps.index(a) for a in limited]
        self.limit_weights: FloatArray = self.app_weights[rows]  # (limited apps, columns)
        limits = np.array([problem.delay_limits[a] for a in limited], dtype=np.float64)
        self.delay_limits: FloatArray = limits  # (limited apps,) seconds
        self.delay_allowed: FloatArray = limits * (1 + LIMIT_RTOL) + LIMIT_RTOL
        e_max = problem.energy_limit
        self.energy_limit = np.inf if e_max is None else float(e_max)
        self.energy_allowed = self.energy_limit * (1 + LIMIT_RTOL) + LIMIT_RTOL

    @staticmethod
    def _app_order(problem: Problem) -> tuple[str, ...]:
        return tuple(dict.fromkeys(problem.app))

    # -- objective --------------------------------------------------------------------

    def objective(self, subset: Indices) -> float:
        """J(S), nats per sample, exact (log space)."""
        return self.offset + self.relative(subset)

    def relative(self, subset: Indices) -> float:
        """J̃(S) = J(S) − offset, exact: the solvers' unit."""
        idx = np.asarray(subset, dtype=np.intp)
        if idx.size == 0:
            raise ValueError("J is defined for non-empty subsets only")
        log_g = self.log_g[idx]  # (|S|, units)
        log_w = log_g - _logsumexp0(log_g)  # log ω, renormalised over S
        return float(-_logsumexp0(log_w + self.rel[idx]).sum() / self.n_samples)

    def fast_relative(self, subset: Indices) -> float:
        """J̃(S) from the linear sums: exact unless ``clipped``, then never above J̃(S)."""
        idx = np.asarray(subset, dtype=np.intp)
        mix = self.q[idx].sum(axis=0) / self.g[idx].sum(axis=0)  # (units,) fused p̃
        return float(-np.log(mix).sum() / self.n_samples)

    def settle(
        self, values: FloatArray, subset_of: Callable[[int], Sequence[int]], best: float
    ) -> tuple[float, int] | None:
        """The best candidate that beats ``best`` (J̃ units), as (value, position), or None.

        ``values`` are candidates' J̃ from the linear sums; where clipping happened they may
        be optimistic, so every candidate below ``best`` is re-evaluated exactly, smallest
        first, until the next fast value cannot beat the best exact one.
        """
        if values.size == 0:
            return None
        if not self.clipped:
            k = int(np.argmin(values))
            return (float(values[k]), k) if values[k] < best else None
        found: tuple[float, int] | None = None
        for k in np.argsort(values, kind="stable"):
            if values[k] >= best:
                break
            exact = self.relative(subset_of(int(k)))
            if exact < best:
                best, found = exact, (exact, int(k))
        return found

    # -- costs --------------------------------------------------------------------------

    def app_delays(self, subset: Indices) -> FloatArray:
        """(apps,) seconds: every app's expected delay, in ``self.apps`` order."""
        slowest = self.delay[np.asarray(subset, dtype=np.intp)].max(axis=0)  # (columns,)
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
