"""Random but realistic problems, for tests, benchmarks and demos without a fleet.

Experts specialise in one domain (a few are generalists), bigger models score better and cost
more, devices differ in speed and power, and the gate knows the experts only roughly (some it
overrates, which makes J non-monotone). Samples are prompts of a domain and an application;
multiple-choice apps have one target token, generative ones up to eight::

    problem = synthetic_problem(32, n_samples=300, seed=7)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moe2.controller.optimize.problem import Problem

# Device classes: decode and prefill seconds per token per billion parameters, busy watts.
_DEVICES = (
    ("orin-30w", 0.030, 0.0020, 30.0),
    ("orin-60w", 0.018, 0.0012, 55.0),
    ("rtx4090", 0.004, 0.0002, 300.0),
    ("cpu", 0.060, 0.0040, 65.0),
)
_SIZES = np.array([0.5, 1.0, 1.5, 3.0])  # billions of parameters
# (app, fewest tokens, most tokens) of the target answers
_APPS = (("qa", 1, 1), ("code", 3, 8), ("chat", 2, 6))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def synthetic_problem(
    n_experts: int,
    *,
    n_samples: int = 300,
    seed: int = 0,
    apps: Sequence[str] = ("qa", "code", "chat"),
    energy_fraction: float | None = 0.3,
    delay_quantile: float | None = 0.7,
    overrated: float = 0.15,
    gate_delay: float = 0.004,
) -> Problem:
    """A problem with ``n_experts`` experts; the energy limit is ``energy_fraction`` of all
    experts' energy together, each app's delay limit the ``delay_quantile`` of the experts'
    delays on it (None: no such limit)."""
    rng = np.random.default_rng(seed)
    n = n_experts
    n_domains = int(np.clip(n // 4, 2, 12))
    home = rng.integers(n_domains, size=n)
    size = rng.choice(_SIZES, size=n)
    # skill[n, d]: logit of expert n's per-token probability on domain d.
    skill = rng.normal(-1.0, 0.5, size=(n, n_domains))
    skill[np.arange(n), home] = rng.normal(1.5, 0.6, size=n)
    generalist = rng.random(n) < 0.2
    skill[generalist] = rng.normal(0.4, 0.4, size=(int(generalist.sum()), n_domains))
    skill += 0.3 * np.log2(size)[:, None]
    gate_bias = np.where(rng.random(n) < overrated, 2.0, 0.0)  # experts the gate overrates

    device = rng.integers(len(_DEVICES), size=n)
    decode = np.array([_DEVICES[k][1] for k in device]) * size  # seconds per token
    prefill = np.array([_DEVICES[k][2] for k in device]) * size  # seconds per prompt token
    watts = np.array([_DEVICES[k][3] for k in device])
    rtt = rng.uniform(0.005, 0.05, size=n)  # seconds, network round trip

    table = {name: (lo, hi) for name, lo, hi in _APPS}
    app_names = list(apps)
    domain = rng.integers(n_domains, size=n_samples)
    app = [app_names[k] for k in rng.integers(len(app_names), size=n_samples)]
    gate = np.empty((n_samples, n))
    delay = np.empty((n_samples, n))
    energy = np.empty((n_samples, n))
    p = []
    for i in range(n_samples):
        lo, hi = table.get(app[i], (1, 8))
        tokens = int(rng.integers(lo, hi + 1))
        level = skill[:, domain[i]] + rng.normal(0.0, 0.5)  # (experts,) this prompt's difficulty
        p.append(_sigmoid(level[:, None] + rng.normal(0.0, 0.6, size=(n, tokens))))
        logits = 2.0 * (skill[:, domain[i]] + rng.normal(0.0, 0.5, size=n)) + gate_bias
        w = np.exp(logits - logits.max())
        gate[i] = w / w.sum()
        prompt = rng.lognormal(np.log(80), 0.5)  # prompt tokens
        compute = prompt * prefill + tokens * decode  # (experts,) seconds
        compute = compute * rng.lognormal(0.0, 0.1, size=n)
        delay[i] = compute + rtt
        energy[i] = compute * watts
    limits: dict[str, float] = {}
    if delay_quantile is not None:
        for name in dict.fromkeys(app):
            rows = [i for i in range(n_samples) if app[i] == name]
            per_expert = delay[rows].mean(axis=0)
            limits[name] = float(np.quantile(per_expert, delay_quantile)) + gate_delay
    e_max = None
    if energy_fraction is not None:
        e_max = float(energy_fraction * energy.mean(axis=0).sum())
    return Problem(
        experts=tuple(f"e{k}" for k in range(n)),
        gate=gate,
        p=p,
        app=app,
        delay=delay,
        energy=energy,
        gate_delay=gate_delay,
        delay_limits=limits,
        energy_limit=e_max,
        meta={"generator": "synthetic", "seed": seed},
    )
