"""What each expert costs on each sample, from its stored profile (and measured links), and
where every figure came from (measured or modelled).

The cost model's curves (``moe2.shared.costmodel.step_costs``) give the delay and energy of
every step of an answer: step 1 processes the prompt, steps 2..T decode one token each. Per
sample × expert we keep what DESIGN.md §2's delay needs exactly, the prompt step and the decode
step (each plus the gateway's measured transmission per step, where a link report exists), and
the energy as the mean over the answer's steps (eq. 11)::

    costs = profile_costs(profiles, ["a", "b"], prompts, steps, links)
    costs.prompt_delay, costs.decode_delay, costs.energy     # (samples, experts)
    costs.sources["a"].as_dict()                             # {"delay": "measured", ...}

A decode step's cost grows with the history (L + t − 1), slightly; ``decode_delay`` is the mean
of steps 2..T, so the per-step maximum over S is exact while the slowest decoder stays the same
within one answer (the curves are affine in the history: two cross at most once).

Prompt length is estimated from the text (about 1.3 tokens per word) since tokenisers differ
per expert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from moe2.controller.registry.db import Registry
from moe2.shared import protocol as p
from moe2.shared.costmodel import step_costs
from moe2.shared.errors import ConfigError

TOKENS_PER_WORD = 1.3
REPLY_BYTES = 1200  # a top-64 step reply with pieces, the bytes a step moves over a link

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

    def provenance(self) -> dict[str, dict[str, str]]:
        return {e: self.sources[e].as_dict() for e in self.experts}


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


def prompt_tokens(prompt: str) -> int:
    return max(1, round(len(prompt.split()) * TOKENS_PER_WORD))


def profile_costs(
    profiles: Mapping[str, p.AgentProfile],
    experts: Sequence[str],
    prompts: Sequence[str],
    steps: Sequence[int] | NDArray[np.int64],
    links: Mapping[str, p.LinkFigures] | None = None,
) -> Costs:
    """Costs of answering each prompt with an answer of ``steps[i]`` steps, per expert."""
    links = links or {}
    t = np.asarray(steps, dtype=np.int64)
    prompt = np.zeros((len(prompts), len(experts)))
    decode = np.zeros_like(prompt)
    energy = np.zeros_like(prompt)
    for j, e in enumerate(experts):
        curves = profiles[e].curves
        link = links.get(e)
        per_step_link = link.rtt_s + REPLY_BYTES / link.bytes_per_s if link else 0.0
        for i, text in enumerate(prompts):
            length = prompt_tokens(text)
            sec, joules = step_costs(curves, length, int(t[i]))  # (T,), (T,)
            prompt[i, j] = float(sec[0]) + per_step_link
            later = sec[1:] if t[i] > 1 else np.array([curves.token_seconds.at(length)])
            decode[i, j] = float(later.mean()) + per_step_link
            energy[i, j] = float(joules.mean())
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
    return Costs(list(experts), prompt, decode, t, energy, sources)


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
