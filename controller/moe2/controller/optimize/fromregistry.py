"""Build an optimisation problem from the registry: scores and gate for the objective,
stored profiles (and measured links) for the costs.

Objective data: for each sample of the dataset, the correct target's token probabilities per
expert (``score_table``). Experts of one vocabulary are mixed per token (eq. 13); a sample
whose experts tokenised the target differently is mixed per sequence (one "token" holding the
target's whole probability), which is the only alignment scores across vocabularies allow.

Costs: each expert's profile curves give the delay and energy of every step (step 1 processes
the prompt; ``costmodel.step_costs``); the per-sample figure is the mean over the answer's
steps plus the gateway's measured transmission delay per step, where a link report exists.
The problem takes a (samples, experts) delay, so the expected per-step maximum over S becomes
the maximum over S of each expert's mean step: equal for one-token answers (multiple choice,
the paper's tables), a slight underestimate for longer ones. Prompt length is estimated from
the text (about 1.3 tokens per word) since tokenisers differ per expert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moe2.controller.optimize.problem import Problem
from moe2.controller.registry.db import Registry
from moe2.shared import protocol as p
from moe2.shared.costmodel import step_costs
from moe2.shared.errors import ConfigError

TOKENS_PER_WORD = 1.3
REPLY_BYTES = 1200  # a top-64 step reply with pieces, the bytes a step moves over a link


def _gate_values(
    reg: Registry, experts: Sequence[str], prompts: Sequence[str], version: str | None
) -> tuple[np.ndarray, str]:
    """(samples, experts) gate values renormalised over ``experts``; uniform without a gate."""
    if version == "uniform":
        return np.full((len(prompts), len(experts)), 1.0 / len(experts)), "uniform"
    try:
        gate = reg.gate_version(version)
    except ConfigError:
        if version is not None:
            raise
        return np.full((len(prompts), len(experts)), 1.0 / len(experts)), "uniform"
    import json
    from pathlib import Path

    from moe2.controller.gate.export import gate_files, onnx_values

    gate_experts: list[str] = json.loads(gate.experts_json)
    missing = [e for e in experts if e not in gate_experts]
    if missing:
        raise ConfigError(
            f"gate {gate.version} does not know experts {missing}; train a new gate or pass "
            "--gate uniform"
        )
    values = onnx_values(gate_files(Path(gate.artefact_dir)), list(prompts))
    cols = [gate_experts.index(e) for e in experts]
    sub = np.maximum(values[:, cols], 1e-12)
    return sub / sub.sum(axis=1, keepdims=True), gate.version


def problem_from_registry(
    reg: Registry,
    dataset: str,
    delay_limits: Mapping[str, float],
    energy_limit: float | None,
    *,
    gate_version: str | None = None,
    gate_delay: float = 0.004,
    links: Mapping[str, p.LinkFigures] | None = None,
    epsilon: float = 0.0,
    online_only: bool = True,
) -> Problem:
    table = reg.score_table(dataset)
    agents = {a.id: a for a in reg.agents()}
    experts = [
        e
        for e in table.experts
        if e in agents
        and (not online_only or agents[e].state == "online")
        and agents[e].profile_json
    ]
    if not experts:
        raise ConfigError(
            f"no expert has complete scores for {dataset!r}, a stored profile and (unless "
            "--include-offline) an online status; run `moe2ctl collect` and `moe2ctl sync`"
        )
    if not table.samples:
        raise ConfigError(f"dataset {dataset!r} has no fully scored samples")
    idx = [table.experts.index(e) for e in experts]
    profiles = {
        e: p.decode_message(p.AgentProfile, (agents[e].profile_json or "").encode())
        for e in experts
    }

    probs: list[np.ndarray] = []
    delay = np.zeros((len(table.samples), len(experts)))
    energy = np.zeros_like(delay)
    for i, (smp, options) in enumerate(zip(table.samples, table.logp)):
        logp = options[smp.answer][idx]  # (experts, tokens), NaN-padded across vocabularies
        if np.isnan(logp).any():
            probs.append(np.exp(np.nansum(logp, axis=1, keepdims=True)))  # sequence level
        else:
            probs.append(np.exp(logp))
        prompt_tokens = max(1, round(len(smp.prompt.split()) * TOKENS_PER_WORD))
        for j, e in enumerate(experts):
            answer_tokens = max(1, int(np.count_nonzero(~np.isnan(logp[j]))))
            sec, joules = step_costs(profiles[e].curves, prompt_tokens, answer_tokens)
            link = (links or {}).get(e)
            per_step_link = link.rtt_s + REPLY_BYTES / link.bytes_per_s if link else 0.0
            delay[i, j] = float(sec.mean()) + per_step_link
            energy[i, j] = float(joules.mean())
    gate, used_gate = _gate_values(reg, experts, [s.prompt for s in table.samples], gate_version)
    apps = [s.app for s in table.samples]
    unknown = sorted(set(delay_limits) - set(apps))
    if unknown:
        raise ConfigError(
            f"no samples of application(s) {unknown} in {dataset!r}; it has {sorted(set(apps))}"
        )
    meta: dict[str, Any] = {
        "dataset": dataset,
        "gate": used_gate,
        "source": "registry",
        "meters": {e: profiles[e].meter_source for e in experts},
    }
    return Problem(
        experts=experts,
        gate=gate,
        p=probs,
        app=apps,
        delay=delay,
        energy=energy,
        gate_delay=gate_delay,
        delay_limits=dict(delay_limits),
        energy_limit=energy_limit,
        epsilon=epsilon,
        meta=meta,
    )
