"""What one answer costs (paper eqs. 6-11): the delay and energy of the experts that answer,
from their profiles' curves and the tokens each one really evaluates. The optimiser's promise,
the evaluation's "promised" figures and the gateway's per-application figures all come from
``answer_cost``, so a measured answer is held against exactly what was promised for it.

Two kinds of answer, as the gateway gives them:

- **generated** (T steps, one fused token each): expert n's step 1 processes its prompt (L_n
  tokens as its own tokenizer counts them), step t > 1 evaluates one token after a history of
  L_n + t - 1; every step crosses the link once (eq. 6).
- **scored** (a multiple-choice prompt): one request per expert: the prompt once, then every
  option's tokens but its last in one pass with a distribution read after each (Σ_o (len_o - 1)
  tokens, the profile's ``score`` curves), branched from the prompt's KV cache; one round trip.
  The answer still counts T steps (the chosen option's length, as a generation of it would),
  so step 1 carries all of the work and steps 2..T none.

Every request an expert serves costs, besides its model's work (the curves) and its link
(round trip and payload, eqs. 5-6), the agent's own handling of it beyond what a ping's round
trip already holds (``CostCurves.overhead``: decoding, scheduling, encoding the reply): per
step for a generated answer (every step is a request), once for a scored one. The gateway's
own time per answer (``gateway_s``: intake, fusion, sampling, bookkeeping; neither the gate
nor the waits on the experts) falls on the answer once. On tiny models these are most of an
answer's time; on large ones a rounding error. With τ_n(t) and E_n(t) each expert's step
costs, an answer by S costs (eqs. 7-11)::

    τ(x, S) = (1/T) (Σ_t max_{n∈S} τ_n(t) + τ_gw) + τ_gate      seconds per step
    E(x, S) = (1/T) Σ_t Σ_{n∈S} E_n(t)                           joules per step; × T per prompt

    cost = answer_cost({"a": curves_a, "b": curves_b},
                       {"a": Work(12, (3, 2, 4, 1)), "b": Work(14, (3, 3, 4, 1))},
                       steps=3, kind=SCORED, links={"a": 0.0008, "b": 0.0009}, gate_s=0.003,
                       gateway_s=0.002)
    cost.delay_s_per_step, cost.energy_j_per_step, cost.energy_j

The gate runs once per prompt and eq. 8 adds τ_gate once to the mean step: a latency measured
end to end compares with ``measured_delay_per_step(latency, gate_s, T)``, the same quantity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from moe2.shared.costmodel import CostCurve, CostCurves, step_costs

AnswerKind = Literal["generated", "scored"]
GENERATED: AnswerKind = "generated"
SCORED: AnswerKind = "scored"

# Bytes a step moves over a link beyond the round trip: a top-64 distribution with its pieces
# (a scored answer's reply, some hundred log-probabilities, is smaller still).
REPLY_BYTES = 1200

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class Work:
    """The tokens one expert evaluates for one answer, as its own tokenizer counts them."""

    prompt_tokens: int  # L_n, BOS included when the model adds one
    options_tokens: tuple[int, ...] = ()  # scored: each option's token count

    @property
    def branch_tokens(self) -> int:
        """Tokens evaluated after the prompt when scoring: each option's but its last (the
        last token's probability is read from the row before it; the first from the prompt's)."""
        return sum(max(0, n - 1) for n in self.options_tokens)


def link_seconds(rtt_s: float, bytes_per_s: float, payload_bytes: float = REPLY_BYTES) -> float:
    """Seconds one step spends on a link (eqs. 5-6): the round trip and the payload."""
    return rtt_s + payload_bytes / bytes_per_s


def score_curve(curves: CostCurves, unit: Literal["s", "J"]) -> CostCurve:
    """The scoring curve, or the prompt curve for a profile that predates it (it leaves out
    the distributions' own cost, so such a promise is optimistic)."""
    if unit == "s":
        return curves.score_seconds or curves.prompt_seconds
    return curves.score_joules or curves.prompt_joules


def request_overhead(curves: CostCurves, op: str) -> float:
    """Seconds the expert's agent spends on one ``op`` request beyond its model and a ping
    (0 for a profile that does not say)."""
    return 0.0 if curves.overhead is None else curves.overhead.of(op)


def expert_steps(
    curves: CostCurves, work: Work, steps: int, kind: AnswerKind, link_s: float = 0.0
) -> tuple[FloatArray, FloatArray]:
    """((T,) seconds, (T,) joules) of one expert's steps of an answer of ``steps`` steps,
    ``link_s`` seconds of transmission per request; each request also costs the agent's
    own handling of it (``curves.overhead``)."""
    if steps < 1:
        raise ValueError(f"an answer has at least 1 step, got {steps}")
    if work.prompt_tokens < 1:
        raise ValueError(f"a prompt has at least 1 token, got {work.prompt_tokens}")
    if kind == GENERATED:
        seconds, joules = step_costs(curves, work.prompt_tokens, steps)
        seconds[0] += request_overhead(curves, "open")
        seconds[1:] += request_overhead(curves, "step")
        return seconds + link_s, joules
    if not work.options_tokens:
        raise ValueError("a scored answer needs its options' token counts")
    seconds = np.zeros(steps)
    joules = np.zeros(steps)
    length = work.prompt_tokens
    seconds[0] = (
        curves.prompt_seconds.at(length) + link_s + request_overhead(curves, "score_choices")
    )
    joules[0] = curves.prompt_joules.at(length)
    branch = work.branch_tokens
    if branch:
        seconds[0] += score_curve(curves, "s").at(branch)
        joules[0] += score_curve(curves, "J").at(branch)
    return seconds, joules


@dataclass(frozen=True)
class AnswerCost:
    """One answer's cost: its wall seconds by the experts, the gate's, the gateway's own,
    and its joules."""

    steps: int  # T
    seconds: float  # Σ_t max_{n∈S} τ_n(t): the experts' part of the answer's time
    gate_s: float  # τ_gate, once per prompt
    energy_j: float  # Σ_t Σ_{n∈S} E_n(t): joules per prompt
    gateway_s: float = 0.0  # the gateway's own seconds for the answer (once per prompt)

    @property
    def delay_s_per_step(self) -> float:
        """Eq. 8: the mean step over the slowest expert of each step (the gateway's own time
        spread over them), plus the gate."""
        return (self.seconds + self.gateway_s) / self.steps + self.gate_s

    @property
    def energy_j_per_step(self) -> float:
        """Eq. 11."""
        return self.energy_j / self.steps


def answer_cost(
    curves: Mapping[str, CostCurves],
    works: Mapping[str, Work],
    *,
    steps: int,
    kind: AnswerKind,
    links: Mapping[str, float] | None = None,
    gate_s: float = 0.0,
    gateway_s: float = 0.0,
) -> AnswerCost:
    """The cost of one answer by the experts of ``works`` (each with its profile's curves in
    ``curves`` and its link's seconds per request in ``links``, none when absent); the gate
    takes ``gate_s`` and the gateway ``gateway_s`` of its own."""
    if not works:
        raise ValueError("an answer needs at least one expert")
    links = links or {}
    per_step = []
    joules = 0.0
    for name, work in works.items():
        sec, j = expert_steps(curves[name], work, steps, kind, links.get(name, 0.0))
        per_step.append(sec)
        joules += float(j.sum())
    slowest = np.max(np.vstack(per_step), axis=0)  # (T,) eq. 7
    return AnswerCost(steps, float(slowest.sum()), gate_s, joules, gateway_s)


def measured_delay_per_step(latency_s: float, gate_s: float, steps: int) -> float:
    """Eq. 8's quantity from a measured answer: the latency less the gate's part, over the
    steps, plus the gate once (the gate runs once per prompt, not once per step)."""
    return max(0.0, latency_s - gate_s) / max(1, steps) + gate_s


def power_w(curves: CostCurves, prompt_tokens: int) -> float:
    """Watts per second of a request's reported model time (``compute_ms``): a modelled
    profile's busy power (its joules are that power times model time), else the profile's
    joules over its seconds at a prompt of ``prompt_tokens``."""
    if curves.model_watts is not None:
        return curves.model_watts
    seconds = curves.prompt_seconds.at(prompt_tokens)
    if seconds > 0:
        return curves.prompt_joules.at(prompt_tokens) / seconds
    per_token = curves.token_seconds.at(prompt_tokens)
    return curves.token_joules.at(prompt_tokens) / per_token if per_token > 0 else 0.0
