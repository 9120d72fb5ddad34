"""What each expert costs on each sample, from its stored profile (and measured links), and
where every figure came from (measured or modelled).

Every figure comes from the one cost function, ``moe2.shared.answercost`` (paper eqs. 6-11),
with the work each expert really does on the sample: the prompt's length in *its* tokens and
each option's (stored with its scores), a multiple-choice dataset's answers scored (the prompt
once, the options branched from its cache), a free-answer dataset's generated (step 1 the
prompt, steps 2..T one token each; T the answer's tokens). Per sample × expert we keep what
the optimiser's delay needs exactly, the first step and the mean of the later steps (each with
the gateway's measured transmission per request, where a link report exists, and the agent's
own time per request, where its profile states it), and the energy per step (eq. 11)::

    costs = profile_costs(profiles, ["a", "b"], mixed, SCORED, links)
    costs.prompt_delay, costs.decode_delay, costs.energy     # (samples, experts)
    costs.answer(3, ["a", "b"], gate_s=0.003)                # AnswerCost of sample 3 by a and b
    costs.sources["a"].as_dict()                             # {"delay": "measured", ...}

A scored answer's steps 2..T cost nothing (all its work is one request), so the optimiser's
delay (max_S first + (T − 1) max_S later) / T is the function's exactly. A generated answer's
decode step grows with the history (L + t − 1), slightly; ``decode_delay`` is the mean of steps
2..T, so the per-step maximum over S is exact while the slowest decoder stays the same within
one answer (the curves are affine in the history: two cross at most once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from moe2.controller.mixing import Mixed
from moe2.controller.registry.db import Registry
from moe2.shared import protocol as p
from moe2.shared.answercost import (
    GENERATED,
    SCORED,
    AnswerCost,
    AnswerKind,
    Work,
    answer_cost,
    expert_steps,
    link_seconds,
)
from moe2.shared.costmodel import CostCurves
from moe2.shared.errors import ConfigError

__all__ = [
    "GENERATED",
    "MEASURED",
    "MODELLED",
    "SCORED",
    "CostSource",
    "Costs",
    "load_profiles",
    "profile_costs",
    "summary",
    "works_of",
]

MEASURED = "measured"
MODELLED = "modelled"


@dataclass(frozen=True)
class CostSource:
    """Where one expert's cost figures came from."""

    delay: str  # "measured" (profiled runs) | "modelled" (eq. 4 from device figures)
    energy: str  # "measured" (a real meter) | "modelled"
    meter: str  # the profile's meter_source
    device_class: str
    link: str  # "measured" (a gateway's link report) | "none" (no transmission added)

    def as_dict(self) -> dict[str, str]:
        return {
            "delay": self.delay,
            "energy": self.energy,
            "meter": self.meter,
            "device_class": self.device_class,
            "link": self.link,
        }

    def short(self) -> str:
        return (
            f"delay {self.delay}, energy {self.energy} ({self.meter}), "
            f"{self.device_class or 'unknown device'}, link {self.link}"
        )


@dataclass(frozen=True)
class Costs:
    experts: list[str]
    prompt_delay: NDArray[np.float64]  # (samples, experts) seconds of step 1
    decode_delay: NDArray[np.float64]  # (samples, experts) seconds per step 2..T
    steps: NDArray[np.int64]  # (samples,) T
    energy: NDArray[np.float64]  # (samples, experts) joules per step, mean over the T steps
    sources: dict[str, CostSource]
    kind: AnswerKind = SCORED
    curves: dict[str, CostCurves] = field(default_factory=dict)  # each expert's profile
    link_s: dict[str, float] = field(default_factory=dict)  # seconds per request on its link
    works: list[dict[str, Work]] = field(default_factory=list)  # per sample, each expert's

    def provenance(self) -> dict[str, dict[str, str]]:
        return {e: self.sources[e].as_dict() for e in self.experts}

    def select(self, ix: NDArray[np.int64]) -> Costs:
        """The samples at positions ``ix``."""
        return replace(
            self,
            prompt_delay=self.prompt_delay[ix],
            decode_delay=self.decode_delay[ix],
            steps=self.steps[ix],
            energy=self.energy[ix],
            works=[self.works[i] for i in ix] if self.works else [],
        )

    def answer(
        self,
        i: int,
        experts: Sequence[str],
        *,
        steps: int | None = None,
        gate_s: float = 0.0,
        gateway_s: float = 0.0,
    ) -> AnswerCost:
        """What answering sample ``i`` with ``experts`` costs (``steps``: its T, default the
        sample's; the gate's and the gateway's own seconds given), by the one cost function."""
        if not self.works:
            raise ConfigError("these costs were built without the experts' work per sample")
        return answer_cost(
            self.curves,
            {e: self.works[i][e] for e in experts},
            steps=int(self.steps[i]) if steps is None else steps,
            kind=self.kind,
            links=self.link_s,
            gate_s=gate_s,
            gateway_s=gateway_s,
        )


def load_profiles(reg: Registry, experts: Sequence[str]) -> dict[str, p.AgentProfile]:
    """The stored profile of every expert, or an error naming the ones without."""
    rows = {a.id: a for a in reg.agents(experts)}
    missing = [e for e in experts if e not in rows or not rows[e].profile_json]
    if missing:
        raise ConfigError(
            f"no stored profile for expert(s) {', '.join(missing)}: start them (they profile "
            "themselves) and run `moe2ctl sync`, or `moe2ctl profile`"
        )
    return {
        e: p.decode_message(p.AgentProfile, (rows[e].profile_json or "").encode()) for e in experts
    }


def works_of(mixed: Mixed, kind: AnswerKind, dataset: str = "") -> list[dict[str, Work]]:
    """Each sample's work per expert, from the real token counts stored with the scores."""
    if mixed.prompt_tokens is None or mixed.n_tokens is None:
        raise ConfigError("no token counts: build the scores with `moe2.controller.mixing.mix`")
    unknown = sorted({mixed.experts[j] for j in np.flatnonzero((mixed.prompt_tokens < 0).any(0))})
    if unknown:
        raise ConfigError(
            f"the scores of {', '.join(unknown)} on {dataset or 'this dataset'} were stored "
            "without the prompt's length in tokens (collected by an older moe2ctl): run "
            f"`moe2ctl collect {dataset or 'DATASET'}` with them online to add it"
        )
    out = []
    for i in range(mixed.n_samples):
        options = range(int(mixed.n_options[i]))
        out.append(
            {
                e: Work(
                    int(mixed.prompt_tokens[i, j]),
                    tuple(int(mixed.n_tokens[i, o, j]) for o in options) if kind == SCORED else (),
                )
                for j, e in enumerate(mixed.experts)
            }
        )
    return out


def profile_costs(
    profiles: Mapping[str, p.AgentProfile],
    experts: Sequence[str],
    mixed: Mixed,
    kind: AnswerKind,
    links: Mapping[str, p.LinkFigures] | None = None,
    dataset: str = "",
) -> Costs:
    """Costs of answering each sample of ``mixed`` (T: its correct option's steps), per expert."""
    links = links or {}
    works = works_of(mixed, kind, dataset)
    t = mixed.steps[np.arange(mixed.n_samples), mixed.answer].astype(np.int64)
    curves = {e: profiles[e].curves for e in experts}
    link_s = {e: link_seconds(lk.rtt_s, lk.bytes_per_s) for e, lk in links.items() if e in curves}
    prompt = np.zeros((mixed.n_samples, len(experts)))
    decode = np.zeros_like(prompt)
    energy = np.zeros_like(prompt)
    for j, e in enumerate(experts):
        for i in range(mixed.n_samples):
            sec, joules = expert_steps(curves[e], works[i][e], int(t[i]), kind, link_s.get(e, 0.0))
            prompt[i, j] = float(sec[0])
            decode[i, j] = float(sec[1:].mean()) if t[i] > 1 else 0.0
            energy[i, j] = float(joules.sum()) / int(t[i])
    sources = {
        e: CostSource(
            delay=MEASURED if profiles[e].delay_measured else MODELLED,
            energy=MEASURED if profiles[e].energy_measured else MODELLED,
            meter=profiles[e].meter_source,
            device_class=profiles[e].device_class,
            link=MEASURED if e in links else "none",
        )
        for e in experts
    }
    return Costs(list(experts), prompt, decode, t, energy, sources, kind, curves, link_s, works)


def summary(sources: Mapping[str, CostSource] | Mapping[str, Any]) -> str:
    """ "measured", "modelled" or "mixed" over every expert's delay and energy figures."""
    kinds = set()
    for src in sources.values():
        d = src.as_dict() if isinstance(src, CostSource) else src
        kinds |= {d.get("delay"), d.get("energy")}
    if kinds == {MEASURED}:
        return MEASURED
    if kinds == {MODELLED}:
        return MODELLED
    return "mixed"
