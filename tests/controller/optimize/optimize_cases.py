"""Random problems and a from-the-definition reference, shared by the optimizer tests."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from moe2.controller.optimize import Problem
from moe2.controller.optimize.synthetic import synthetic_problem

APPS = ("qa", "code", "chat")


def random_problem(seed: int, n: int | None = None) -> Problem:
    """``_family_problem`` in one of the file's forms (by seed): as written (``p``, ``delay``),
    with exact delays (a prompt step and decode steps that rank the experts differently, T up
    to 9), with deep log-probabilities (answers of hundreds to thousands of nats, some experts
    beyond the solvers' clipping range), or both."""
    pr = _family_problem(seed, n)
    rng = np.random.default_rng(seed + 7919)
    form = (seed // 4) % 4
    if form == 0:
        return pr
    kw = pr.to_dict()
    kw.pop("limits")
    if form in (1, 3):
        del kw["delay"]
        samples, experts = pr.n_samples, pr.n_experts
        base = np.asarray(pr.prompt_delay)
        kw["steps"] = rng.integers(1, 10, size=samples).tolist()
        kw["prompt_delay"] = (base * rng.uniform(0.2, 3.0, size=experts)).tolist()
        kw["decode_delay"] = (base * rng.uniform(0.05, 1.0, size=experts)).tolist()
    if form in (2, 3):
        del kw["p"]
        depth = rng.uniform(30.0, 400.0, size=(pr.n_experts, 1))
        kw["logp"] = [(a * depth).tolist() for a in pr.logp]
    shape = Problem(**kw)
    # Limits again, for the new costs: some problems stay infeasible.
    limits: dict[str, float] = {}
    from moe2.controller.optimize.objective import Evaluator

    ev = Evaluator(shape)
    delays = np.array([ev.app_delays([k]) for k in range(shape.n_experts)])  # (experts, apps)
    for a, app in enumerate(ev.apps):
        if app in pr.delay_limits:
            limits[app] = float(np.quantile(delays[:, a], max(0.0, rng.uniform(-0.2, 1.0))) * 1.05)
    return shape.with_limits(limits, pr.energy_limit)


def _family_problem(seed: int, n: int | None = None) -> Problem:
    """A small random problem of one of four families (by seed): realistic synthetic,
    arbitrary random, adversarial (experts the gate likes that are nearly always wrong, so J
    is far from monotone) and coverage (each sample's gate is one-hot on the one expert that
    answers it well, the rest answer alike: J is monotone). Limits are drawn so that some
    problems are infeasible."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 15)) if n is None else n
    family = seed % 4
    if family == 0:
        return synthetic_problem(
            n,
            n_samples=int(rng.integers(6, 40)),
            seed=seed,
            energy_fraction=[None, 0.15, 0.3, 0.6][int(rng.integers(4))],
            delay_quantile=[None, 0.0, 0.3, 0.7, 1.0][int(rng.integers(5))],
            overrated=float(rng.choice([0.0, 0.3])),
        )
    samples = int(rng.integers(3, 25))
    apps = APPS[: int(rng.integers(1, 4))]
    app = [apps[k] for k in rng.integers(len(apps), size=samples)]
    tokens = rng.integers(1, 6, size=samples)
    gate = rng.dirichlet(np.full(n, float(rng.uniform(0.2, 3.0))), size=samples)
    quality = rng.uniform(0.5, 4.0, size=n)
    p = [rng.beta(quality[:, None], 1.0, size=(n, int(t))) for t in tokens]
    if family == 3:
        favourite = rng.integers(n, size=samples)
        gate = np.zeros((samples, n))
        gate[np.arange(samples), favourite] = 1.0
        for i in range(samples):
            low = rng.uniform(0.01, 0.4, size=int(tokens[i]))
            p[i] = np.tile(low, (n, 1))
            p[i][favourite[i]] = rng.uniform(0.5, 1.0, size=int(tokens[i]))
    if family == 2:
        bad = rng.random(n) < 0.4
        for i in range(samples):
            p[i][bad] = rng.uniform(1e-4, 0.02, size=(int(bad.sum()), int(tokens[i])))
            gate[i, bad] *= 5.0
            gate[i] /= gate[i].sum()
    speed = rng.uniform(0.1, 2.0, size=n)
    delay = speed * rng.lognormal(0.0, 0.3, size=(samples, n))
    energy = rng.uniform(1.0, 10.0, size=n) * rng.lognormal(0.0, 0.2, size=(samples, n))
    limits: dict[str, float] = {}
    for a in dict.fromkeys(app):
        if rng.random() < 0.7:
            rows = [i for i in range(samples) if app[i] == a]
            per_expert = delay[rows].mean(axis=0)
            limits[a] = float(np.quantile(per_expert, max(0.0, rng.uniform(-0.2, 1.0))) * 1.05)
    e_max = None
    if rng.random() < 0.7:
        e_max = float(energy.mean(axis=0).sum() * rng.uniform(0.02, 0.8))
    return Problem(
        experts=[f"x{k}" for k in range(n)],
        gate=gate,
        p=p,
        app=app,
        delay=delay,
        energy=energy,
        gate_delay=float(rng.uniform(0.0, 0.01)),
        delay_limits=limits,
        energy_limit=e_max,
    )


# -- the reference: docs/method.md's equations written out loop by loop ------------------

FLOOR = 1e-30


def ref_objective(pr: Problem, subset: Sequence[int]) -> float:
    # Exact in log space: log Σ_n ω_n p_n = log Σ_n exp(log ω_n + log p_n), shifted by the max.
    total = 0.0
    for i in range(pr.n_samples):
        g = [max(float(pr.gate[i][n]), FLOOR) for n in subset]
        for u in range(pr.logp[i].shape[1]):
            terms = [math.log(gn / sum(g)) + float(pr.logp[i][n][u]) for gn, n in zip(g, subset)]
            top = max(terms)
            total -= top + math.log(sum(math.exp(t - top) for t in terms))
    return total / pr.n_samples


def ref_sample_delay(pr: Problem, i: int, subset: Sequence[int]) -> float:
    # Eq. 8 (docs/method.md): the mean over the answer's steps of the slowest chosen expert at
    # that step; step 1 processes the prompt, steps 2..T decode.
    steps = int(pr.steps[i])
    per_step = [
        max(float(pr.prompt_delay[i][n] if t == 0 else pr.decode_delay[i][n]) for n in subset)
        for t in range(steps)
    ]
    return sum(per_step) / steps


def ref_delays(pr: Problem, subset: Sequence[int]) -> dict[str, float]:
    out = {}
    for a in dict.fromkeys(pr.app):
        rows = [i for i in range(pr.n_samples) if pr.app[i] == a]
        out[a] = sum(ref_sample_delay(pr, i, subset) for i in rows) / len(rows) + pr.gate_delay
    return out


def ref_energy(pr: Problem, subset: Sequence[int]) -> float:
    return sum(sum(pr.energy[i][n] for n in subset) for i in range(pr.n_samples)) / pr.n_samples


def ref_feasible(pr: Problem, subset: Sequence[int]) -> bool:
    delays = ref_delays(pr, subset)
    ok = all(delays[a] <= lim * (1 + 1e-9) + 1e-9 for a, lim in pr.delay_limits.items())
    e_max = pr.energy_limit
    return ok and (e_max is None or ref_energy(pr, subset) <= e_max * (1 + 1e-9) + 1e-9)


def ref_optimum(pr: Problem) -> tuple[float, tuple[int, ...] | None]:
    best, arg = math.inf, None
    for r in range(1, pr.n_experts + 1):
        for subset in itertools.combinations(range(pr.n_experts), r):
            if ref_feasible(pr, subset):
                j = ref_objective(pr, subset)
                if j < best:
                    best, arg = j, subset
    return best, arg
