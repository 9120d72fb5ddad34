"""Accuracy, majority voting and what answers cost against the limits.

    acc = accuracy([a.choice for a in answers], gold)
    picks = majority_vote(votes, n_options, salt=positions)  # votes: (questions, voters)
    cost = answer_costs(costs, positions, [a.experts for a in answers], gate_delay=0.004)
    cost.worst_delay, cost.energy                             # against τ_max and E_max

Costs follow DESIGN.md §2 per answer: the mean over the answer's steps of the slowest expert
that took part (the prompt step, then decode steps), plus the gate's delay when a gate
routed it; the energy is the sum over the experts that took part, per step. An app's delay is
the mean over its questions; the cell shows the worst app's. ``measured_costs`` does the same
with what an answerer measured on each answer (``evaluate/gateway.py``), held to the limits
within the spread the answering experts' profiles state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from moe2.controller.evaluate.answerer import Answer
from moe2.controller.optimize.costs import Costs
from moe2.controller.optimize.objective import LIMIT_RTOL

IntArray = NDArray[np.int64]


def accuracy(choices: Sequence[int | None], gold: Sequence[int] | IntArray) -> float:
    """Share of questions answered with the correct option (None counts as wrong)."""
    if len(choices) == 0:
        return float("nan")
    right = sum(1 for c, g in zip(choices, gold, strict=True) if c is not None and c == int(g))
    return right / len(choices)


def majority_vote(votes: IntArray, n_options: IntArray, salt: Sequence[int]) -> IntArray:
    """(questions,) the option most voters picked; ties are broken uniformly at random, by a
    hash of the question's ``salt`` (its position), so that a tie never favours the first
    option and every run breaks it the same way. votes: (questions, voters), -1 = no vote."""
    out = np.empty(votes.shape[0], dtype=np.int64)
    for i, row in enumerate(votes):
        counts = np.bincount(row[row >= 0], minlength=int(n_options[i]))
        tied = np.flatnonzero(counts == counts.max())
        if tied.size == 1:
            out[i] = int(tied[0])
        else:
            h = hashlib.sha256(f"vote:{int(salt[i])}".encode()).digest()
            out[i] = int(tied[int.from_bytes(h[:8], "little") % tied.size])
    return out


@dataclass(frozen=True)
class AnswerCosts:
    """What a method's answers cost, per step, against the limits of a cell.

    ``delay_source`` and ``energy_source`` say where each figure came from ("measured",
    "modelled" or "mixed"). Measured figures meet a limit when they exceed it by no more than
    ``tolerance``, the relative spread the answering experts' profiles state (a measurement
    repeated on the same box varies that much); figures from the profiles themselves are what
    the optimiser held to the limit, so they get none."""

    delay_by_app: dict[str, float]  # seconds per step, mean over the app's questions
    energy: float  # joules per step, mean over all questions
    basis: str  # "profiles (modelled|measured|mixed)" | "answers (...)"
    delay_source: str = ""
    energy_source: str = ""
    tolerance: float = 0.0  # relative
    worst_answer_delay: float | None = None  # the slowest single answer, seconds per step

    @property
    def worst_delay(self) -> float:
        return max(self.delay_by_app.values())

    def within(self, delay_limit: float | None, energy_limit: float | None) -> bool:
        slack = 1 + LIMIT_RTOL + self.tolerance
        ok = True
        if delay_limit is not None:
            ok &= self.worst_delay <= delay_limit * slack + LIMIT_RTOL
        if energy_limit is not None:
            ok &= self.energy <= energy_limit * slack + LIMIT_RTOL
        return bool(ok)

    def as_dict(self) -> dict[str, Any]:
        return {
            "delay": self.worst_delay,
            "delay_by_app": dict(self.delay_by_app),
            "energy": self.energy,
            "basis": self.basis,
            "delay_source": self.delay_source,
            "energy_source": self.energy_source,
            "tolerance": self.tolerance,
            "worst_answer_delay": self.worst_answer_delay,
        }


def answer_costs(
    costs: Costs,
    apps: Sequence[str],
    experts_used: Sequence[Sequence[str]],
    *,
    gate_delay: float,
    basis: str,
) -> AnswerCosts:
    """Costs of answers from the profiles: question i was answered by ``experts_used[i]``."""
    index = {e: j for j, e in enumerate(costs.experts)}
    n = len(experts_used)
    delay = np.empty(n)
    energy = np.empty(n)
    for i, used in enumerate(experts_used):
        cols = [index[e] for e in used]
        t = float(costs.steps[i])
        slowest_prompt = costs.prompt_delay[i, cols].max()
        slowest_decode = costs.decode_delay[i, cols].max()
        delay[i] = (slowest_prompt + (t - 1) * slowest_decode) / t + gate_delay
        energy[i] = costs.energy[i, cols].sum()
    by_app: dict[str, list[float]] = {}
    for app, d in zip(apps, delay, strict=True):
        by_app.setdefault(app, []).append(float(d))
    return AnswerCosts(
        {a: float(np.mean(v)) for a, v in by_app.items()},
        float(energy.mean()),
        basis,
        delay_source=summary({costs.sources[e].delay for u in experts_used for e in u}),
        energy_source=summary({costs.sources[e].energy for u in experts_used for e in u}),
        worst_answer_delay=float(delay.max()) if n else None,
    )


def summary(kinds: set[str]) -> str:
    """ "measured", "modelled" or "mixed" for a set of sources."""
    return kinds.pop() if len(kinds) == 1 else "mixed"


def measured_costs(apps: Sequence[str], answers: Sequence[Answer]) -> AnswerCosts:
    """Costs the answerer measured (seconds per step of each answer; joules per step from the
    answering experts' figures times their measured time), within the answers' stated spread."""
    by_app: dict[str, list[float]] = {}
    for app, a in zip(apps, answers, strict=True):
        by_app.setdefault(app, []).append(float(a.delay_s or 0.0))
    known = [a.energy_j for a in answers if a.energy_j is not None]
    energy = float(np.mean(known)) if len(known) == len(answers) else float("nan")
    energy_source = summary({"measured" if a.energy_measured else "modelled" for a in answers})
    return AnswerCosts(
        {a: float(np.mean(v)) for a, v in by_app.items()},
        energy,
        f"answers (delay measured, energy {energy_source})",
        delay_source="measured",
        energy_source=energy_source,
        tolerance=max((a.spread for a in answers), default=0.0),
        worst_answer_delay=max(float(a.delay_s or 0.0) for a in answers) if answers else None,
    )
