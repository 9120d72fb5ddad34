"""Build an optimisation problem from the registry: scores and gate for the objective, stored
profiles (and measured links) for the costs, and a record of where each came from.

    data = scored_set(reg, "tiny", gate_version=None)        # newest gate; "uniform" for none
    problem = data.problem({"qa": 2.0}, 20.0)                 # every fully scored sample
    problem = data.select(positions).problem(...)             # a split of them

Objective data: for each sample, the correct target's log-probabilities per expert in the units
of the one mixing rule (``moe2.controller.mixing``: per token when the experts share a
tokenizer hash, else per sequence), never exponentiated. Costs: ``optimize.costs`` (the one
cost function on each expert's real token counts: a multiple-choice dataset's answers scored,
a free-answer dataset's generated; T = the answer's length in steps); the gate's delay is what
the gateways measured and announced for that gate (``gate_delay``), 0 without a gate, and the
gateway's own time per answer what they announced in their status (it falls on step 1 of
every expert alike, so it moves every subset's delay by the same amount, exactly). The
problem's ``meta`` names the dataset, the gate (version, training datasets, ONNX or torch),
where the gate's delay came from and each expert's cost sources; ``optimize`` prints them
with the answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from moe2.controller import datasets as ds
from moe2.controller.gate.weights import UNIFORM, GateWeights, gate_weights
from moe2.controller.mixing import Mixed, mix
from moe2.controller.optimize.costs import GENERATED, SCORED, Costs, load_profiles, profile_costs
from moe2.controller.optimize.problem import EnergyPer, Problem
from moe2.controller.registry.db import Registry
from moe2.shared import protocol as p
from moe2.shared.costmodel import CostCurve
from moe2.shared.errors import ConfigError
from moe2.shared.fleet import FleetState


@dataclass(frozen=True)
class GateDelay:
    """What a gateway adds to an answer beyond its experts: τ_gate, the seconds a gate adds
    to a prompt (eq. 8), a curve in the prompt's length in the gate's tokens, as the gateways
    measured running the gate and announced it, or a constant (given by hand; 0 without a
    gate); and the gateway's own time per answer (``own``: taking the prompt, fusing,
    sampling, bookkeeping), as the gateways announced it, gated or not (None: none did)."""

    curve: CostCurve | None = None
    constant: float = 0.0
    source: str = "given"
    own: p.GatewayOverhead | None = None

    def seconds(self, tokens: NDArray[np.int64]) -> NDArray[np.float64]:
        """(prompts,) seconds of the gate for prompts of ``tokens`` gate tokens."""
        if self.curve is None:
            return np.full(len(tokens), self.constant)
        return np.array([self.curve.at(float(n)) for n in tokens])

    def own_seconds(self, kind: str, steps: NDArray[np.int64]) -> NDArray[np.float64]:
        """(answers,) the gateway's own seconds for answers of ``kind`` of ``steps`` steps."""
        if self.own is None:
            return np.zeros(len(steps))
        return np.array([self.own.seconds(kind, int(t)) for t in steps])

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "constant": None if self.curve is not None else self.constant,
            "curve": None if self.curve is None else self.curve.model_dump(),
            "gateway_own": None if self.own is None else self.own.model_dump(),
        }


NO_GATE = GateDelay(None, 0.0, "no gate: uniform weights")


def gate_delay_of(
    state: FleetState | None,
    version: str,
    given: float | None = None,
    *,
    required: bool = True,
) -> GateDelay:
    """τ_gate of gate ``version``: ``given`` when given, else what the gateways measured
    running it and announced (none without a gate). Nobody announced it: an error, or (not
    ``required``) 0 with a source that says so. With it, the gateways' own time per answer
    as they announced it (none when none did)."""
    own = None if state is None else state.gateway_overhead()
    if given is not None:
        return GateDelay(None, given, "given", own)
    if version == UNIFORM:
        return replace(NO_GATE, own=own)
    found = None if state is None else state.gate_latency(version)
    if found is None:
        if not required:
            return GateDelay(None, 0.0, "not measured: no gateway announced running this gate", own)
        raise ConfigError(
            f"no gateway announced how long gate {version} takes: push it first (`moe2ctl "
            "push-gate`), or give --gate-delay SECONDS"
        )
    curve, prompts = found
    source = f"measured by a gateway: {curve.n_points} runs, {prompts} prompts"
    return GateDelay(curve, 0.0, source, own)


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
        tokens = self.gate.tokens[ix] if len(self.gate.tokens) else self.gate.tokens
        return ScoredSet(
            self.dataset,
            self.mixed.select(ix),
            replace(self.gate, values=self.gate.values[ix], tokens=tokens),
            self.costs.select(ix),
        )

    def gateway_seconds(self, delay: GateDelay) -> NDArray[np.float64]:
        """(samples,) the gateway's own seconds for each sample's answer."""
        return delay.own_seconds(self.costs.kind, self.costs.steps)

    def gate_seconds(self, delay: GateDelay) -> NDArray[np.float64]:
        """(samples,) τ_gate of each sample's prompt."""
        tokens = self.gate.tokens
        if len(tokens) != self.mixed.n_samples:
            tokens = np.zeros(self.mixed.n_samples, dtype=np.int64)
        return delay.seconds(tokens)

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
        gate_delay: float | GateDelay = 0.0,
        epsilon: float = 0.0,
        energy_per: EnergyPer = "step",
    ) -> Problem:
        """The optimisation problem on these samples; the gate's delay is the mean over them
        of what the gate takes on each prompt (``GateDelay``) or a constant."""
        m = self.mixed
        unknown = sorted(set(delay_limits) - set(m.apps))
        if unknown:
            raise ConfigError(
                f"no samples of application(s) {unknown} in {self.dataset!r}; it has "
                f"{sorted(set(m.apps))}"
            )
        where = self.provenance()
        delay = gate_delay if isinstance(gate_delay, GateDelay) else GateDelay(None, gate_delay)
        seconds = float(self.gate_seconds(delay).mean())
        # The gateway's own time falls once on each answer, whoever answers: on step 1 of
        # every expert alike, it adds exactly own / T to each subset's mean step.
        own = self.gateway_seconds(delay)
        meta: dict[str, Any] = {
            "source": "registry",
            "dataset": self.dataset,
            "samples": where["samples"],
            "mixing": where["mixing"],
            "gate": self.gate.version,  # the version alone, as the first format had it
            "gate_provenance": where["gate"],
            "costs": where["costs"],
            "meters": {e: s.meter for e, s in self.costs.sources.items()},
            "gate_delay": {"seconds": seconds, **delay.as_dict()},
            "gateway_own_s": float(own.mean()) if own.size else 0.0,
            "answers": self.costs.kind,
        }
        return Problem(
            experts=m.experts,
            gate=self.gate.values,
            logp=[m.target(i) for i in range(m.n_samples)],
            app=m.apps,
            prompt_delay=self.costs.prompt_delay + own[:, None],
            decode_delay=self.costs.decode_delay,
            steps=self.costs.steps,
            energy=self.costs.energy,
            gate_delay=seconds,
            delay_limits=dict(delay_limits),
            energy_limit=energy_limit,
            energy_per=energy_per,
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
    kind = SCORED if reg.dataset(dataset).kind == ds.CHOICE else GENERATED
    costs = profile_costs(load_profiles(reg, chosen), chosen, mixed, kind, links, dataset)
    gate = gate_weights(reg, chosen, mixed.prompts, gate_version)
    return ScoredSet(dataset, mixed, gate, costs)


def problem_from_registry(
    reg: Registry,
    dataset: str,
    delay_limits: Mapping[str, float],
    energy_limit: float | None,
    *,
    gate_version: str | None = None,
    gate_delay: float | GateDelay = 0.0,
    links: Mapping[str, p.LinkFigures] | None = None,
    epsilon: float = 0.0,
    online_only: bool = True,
    energy_per: EnergyPer = "step",
) -> Problem:
    data = scored_set(reg, dataset, gate_version=gate_version, links=links, online_only=online_only)
    return data.problem(
        delay_limits, energy_limit, gate_delay=gate_delay, epsilon=epsilon, energy_per=energy_per
    )
