"""Build an optimisation problem from the registry: scores and gate for the objective, stored
profiles (and measured links) for the costs, and a record of where each came from.

    data = scored_set(reg, "tiny", gate_version=None)        # newest gate; "uniform" for none
    problem = data.problem({"qa": 2.0}, 20.0)                 # every fully scored sample
    problem = data.select(positions).problem(...)             # a split of them

Objective data: for each sample, the correct target's log-probabilities per expert in the units
of the one mixing rule (``moe2.controller.mixing``: per token when the experts share a
tokenizer hash, else per sequence), never exponentiated. Costs: ``optimize.costs`` (a prompt
step and a decode step per sample × expert, T = the answer's length in steps). The problem's
``meta`` names the dataset, the gate (version, training datasets, ONNX or torch) and each
expert's cost sources; ``optimize`` prints them with the answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from moe2.controller.gate.weights import GateWeights, gate_weights
from moe2.controller.mixing import Mixed, mix
from moe2.controller.optimize.costs import Costs, load_profiles, profile_costs
from moe2.controller.optimize.problem import Problem
from moe2.controller.registry.db import Registry
from moe2.shared import protocol as p
from moe2.shared.errors import ConfigError


@dataclass(frozen=True)
class ScoredSet:
    """A dataset's fully scored samples with the gate's weights and the experts' costs,
    sample-aligned: what an optimisation or an evaluation needs from the registry."""

    dataset: str
    mixed: Mixed
    gate: GateWeights
    costs: Costs

    @property
    def experts(self) -> list[str]:
        return self.mixed.experts

    def select(self, positions: Sequence[int] | np.ndarray) -> ScoredSet:
        """The samples at ``positions`` (into this set's order)."""
        ix = np.asarray(positions, dtype=np.int64)
        if ix.size == 0:
            raise ConfigError(f"no samples of {self.dataset!r} left in this selection")
        c = self.costs
        return ScoredSet(
            self.dataset,
            self.mixed.select(ix),
            replace(self.gate, values=self.gate.values[ix]),
            replace(
                c,
                prompt_delay=c.prompt_delay[ix],
                decode_delay=c.decode_delay[ix],
                steps=c.steps[ix],
                energy=c.energy[ix],
            ),
        )

    def positions(self, sample_idx: set[int], *, inside: bool) -> np.ndarray:
        """Positions of the samples whose dataset position is (not) in ``sample_idx``."""
        hit = np.array([int(i) in sample_idx for i in self.mixed.sample_idx], dtype=bool)
        return np.flatnonzero(hit if inside else ~hit)

    def provenance(self) -> dict[str, Any]:
        m = self.mixed
        return {
            "dataset": self.dataset,
            "samples": m.n_samples,
            "mixing": {"token": int(m.per_token.sum()), "sequence": int((~m.per_token).sum())},
            "gate": self.gate.provenance(),
            "costs": self.costs.provenance(),
        }

    def problem(
        self,
        delay_limits: Mapping[str, float],
        energy_limit: float | None,
        *,
        gate_delay: float = 0.004,
        epsilon: float = 0.0,
    ) -> Problem:
        m = self.mixed
        unknown = sorted(set(delay_limits) - set(m.apps))
        if unknown:
            raise ConfigError(
                f"no samples of application(s) {unknown} in {self.dataset!r}; it has "
                f"{sorted(set(m.apps))}"
            )
        where = self.provenance()
        meta: dict[str, Any] = {
            "source": "registry",
            "dataset": self.dataset,
            "samples": where["samples"],
            "mixing": where["mixing"],
            "gate": self.gate.version,  # the version alone, as the first format had it
            "gate_provenance": where["gate"],
            "costs": where["costs"],
            "meters": {e: s.meter for e, s in self.costs.sources.items()},
        }
        return Problem(
            experts=m.experts,
            gate=self.gate.values,
            logp=[m.target(i) for i in range(m.n_samples)],
            app=m.apps,
            prompt_delay=self.costs.prompt_delay,
            decode_delay=self.costs.decode_delay,
            steps=self.costs.steps,
            energy=self.costs.energy,
            gate_delay=gate_delay,
            delay_limits=dict(delay_limits),
            energy_limit=energy_limit,
            epsilon=epsilon,
            meta=meta,
        )


def scored_set(
    reg: Registry,
    dataset: str,
    *,
    gate_version: str | None,
    links: Mapping[str, p.LinkFigures] | None = None,
    online_only: bool = True,
    experts: Sequence[str] | None = None,
    apps: Sequence[str] | None = None,
) -> ScoredSet:
    """Every sample of ``dataset`` (of ``apps``, default all) that all chosen experts scored;
    the experts are ``experts`` or every one with complete scores, a stored profile and
    (``online_only``) an online status."""
    if experts is None:
        agents = {a.id: a for a in reg.agents()}
        table = reg.score_table(dataset)
        chosen = [
            e
            for e in table.experts
            if e in agents
            and (not online_only or agents[e].state == "online")
            and agents[e].profile_json
        ]
    else:
        chosen = list(experts)
    if not chosen:
        raise ConfigError(
            f"no expert has complete scores for {dataset!r}, a stored profile and (unless "
            "--include-offline) an online status; run `moe2ctl collect` and `moe2ctl sync`"
        )
    table = reg.score_table(dataset, chosen, apps)
    if not table.samples:
        raise ConfigError(f"dataset {dataset!r} has no samples scored by all of {chosen}")
    mixed = mix(table, dataset)
    answer_steps = mixed.steps[np.arange(mixed.n_samples), mixed.answer]
    costs = profile_costs(load_profiles(reg, chosen), chosen, mixed.prompts, answer_steps, links)
    gate = gate_weights(reg, chosen, mixed.prompts, gate_version)
    return ScoredSet(dataset, mixed, gate, costs)


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
    data = scored_set(reg, dataset, gate_version=gate_version, links=links, online_only=online_only)
    return data.problem(delay_limits, energy_limit, gate_delay=gate_delay, epsilon=epsilon)
