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


# -- the reference: DESIGN.md §2 written out loop by loop --------------------------------

FLOOR = 1e-30


def ref_objective(pr: Problem, subset: Sequence[int]) -> float:
    total = 0.0
    for i in range(pr.n_samples):
        g = [max(float(pr.gate[i][n]), FLOOR) for n in subset]
        for t in range(pr.p[i].shape[1]):
            mix = sum(gn / sum(g) * max(float(pr.p[i][n][t]), FLOOR) for gn, n in zip(g, subset))
            total -= math.log(mix)
    return total / pr.n_samples


def ref_delays(pr: Problem, subset: Sequence[int]) -> dict[str, float]:
    out = {}
    for a in dict.fromkeys(pr.app):
        rows = [i for i in range(pr.n_samples) if pr.app[i] == a]
        out[a] = sum(max(pr.delay[i][n] for n in subset) for i in rows) / len(rows) + pr.gate_delay
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
