"""Accuracy, the plurality vote, paired differences, and what answers cost against the limits.

    acc = accuracy([a.choice for a in answers], gold)
    picks = plurality_vote(votes, n_options, salt=positions)     # votes: (questions, voters)
    diff = paired_difference(correct_moe2, correct_mv)          # Δ with its 95% interval
    cost = promised_costs(costs, apps, [a.experts for a in answers], steps, gate_s=gate)
    cost.worst_delay, cost.energy, cost.energy_per_prompt        # against τ_max and E_max

Every cost is one answer's by the one cost function (``moe2.shared.answercost``, through
``Costs.answer``): eq. 8's delay per step (the slowest answering expert at each step, plus the
gate once when a gate routed it) and eq. 11's energy per step, or per prompt (the whole
answer). An app's delay is the mean over its questions; a cell shows the worst app's.
``measured_costs`` does the same with what an answerer measured on each answer
(``evaluate/gateway.py``), held to the limits within the spread the answering experts'
profiles state; answers the fleet failed to give are counted apart and enter no mean.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from moe2.controller.evaluate.answerer import Answer
from moe2.controller.optimize.costs import Costs
from moe2.controller.optimize.objective import LIMIT_RTOL

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]
EnergyPer = Literal["step", "prompt"]

# Resamples of the paired bootstrap; its seed, so a report is the same every run.
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 0


def correct(choices: Sequence[int | None], gold: Sequence[int] | IntArray) -> FloatArray:
    """(questions,) 1.0 where the choice is the correct option (None counts as wrong)."""
    return np.array(
        [1.0 if c is not None and c == int(g) else 0.0 for c, g in zip(choices, gold, strict=True)]
    )


def accuracy(choices: Sequence[int | None], gold: Sequence[int] | IntArray) -> float:
    """Share of questions answered with the correct option (None counts as wrong)."""
    if len(choices) == 0:
        return float("nan")
    return float(correct(choices, gold).mean())


def plurality_vote(votes: IntArray, n_options: IntArray, salt: Sequence[int]) -> IntArray:
    """(questions,) the option most voters picked, each voter answering alone; ties are broken
    uniformly at random, by a hash of the question's ``salt`` (its position), so that a tie
    never favours the first option and every run breaks it the same way. votes: (questions,
    voters), -1 = no vote. (Not the paper's majority voting, which fuses the voters' outputs
    with equal weights: this is the extra row it is compared with.)"""
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
class Difference:
    """A's accuracy minus B's on the same questions, with a paired bootstrap 95% interval
    (questions resampled together, so what both get right or wrong cancels)."""

    delta: float  # share of questions
    low: float
    high: float

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, float]:
        return {"delta": self.delta, "low": self.low, "high": self.high}


def paired_difference(
    a: FloatArray,
    b: FloatArray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Difference:
    """mean(a) − mean(b) with the 2.5 and 97.5 percentiles over ``resamples`` paired
    resamples of the questions; a, b: (questions,) per-question scores (1/0, or a mean over
    seeds)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size == 0:
        return Difference(float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 500):  # bounded memory: 500 × questions at a time
        n = min(500, resamples - start)
        idx = rng.integers(0, d.size, size=(n, d.size))
        means[start : start + n] = d[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Difference(float(d.mean()), float(low), float(high))


@dataclass(frozen=True)
class AnswerCosts:
    """What a method's answers cost against the limits of a cell.

    ``delay_source`` and ``energy_source`` say where each figure came from ("measured",
    "modelled" or "mixed"). Measured figures meet a limit when they exceed it by no more than
    ``tolerance``, the relative spread the answering experts' profiles state (a measurement
    repeated on the same box varies that much); figures from the profiles themselves are what
    the optimiser held to the limit, so they get none."""

    delay_by_app: dict[str, float]  # seconds per step (eq. 8), mean over the app's questions
    energy: float  # joules per step (eq. 11), mean over all questions
    basis: str  # "profiles (modelled|measured|mixed)" | "answers (...)"
    delay_source: str = ""
    energy_source: str = ""
    tolerance: float = 0.0  # relative
    worst_answer_delay: float | None = None  # the slowest single answer, seconds per step
    energy_per_prompt: float = float("nan")  # joules per answer, mean over all questions
    gate_s: float = 0.0  # the gate's seconds per prompt, mean (part of every delay)
    failed: int = 0  # answers the fleet did not give: in no figure above

    @property
    def worst_delay(self) -> float:
        return max(self.delay_by_app.values()) if self.delay_by_app else float("nan")

    def energy_in(self, per: EnergyPer) -> float:
        return self.energy if per == "step" else self.energy_per_prompt

    def within(
        self, delay_limit: float | None, energy_limit: float | None, per: EnergyPer = "step"
    ) -> bool:
        slack = 1 + LIMIT_RTOL + self.tolerance
        ok = True
        if delay_limit is not None:
            ok &= self.worst_delay <= delay_limit * slack + LIMIT_RTOL
        if energy_limit is not None:
            ok &= self.energy_in(per) <= energy_limit * slack + LIMIT_RTOL
        return bool(ok)

    def as_dict(self) -> dict[str, Any]:
        return {
            "delay": self.worst_delay,
            "delay_by_app": dict(self.delay_by_app),
            "energy": self.energy,
            "energy_per_prompt": self.energy_per_prompt,
            "gate_s": self.gate_s,
            "basis": self.basis,
            "delay_source": self.delay_source,
            "energy_source": self.energy_source,
            "tolerance": self.tolerance,
            "worst_answer_delay": self.worst_answer_delay,
            "failed": self.failed,
        }


def _by_app(apps: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for app, v in zip(apps, values, strict=True):
        by.setdefault(app, []).append(float(v))
    return {a: float(np.mean(v)) for a, v in by.items()}


def summary(kinds: set[str]) -> str:
    """ "measured", "modelled" or "mixed" for a set of sources."""
    return kinds.pop() if len(kinds) == 1 else "mixed"


def promised_costs(
    costs: Costs,
    apps: Sequence[str],
    experts_used: Sequence[Sequence[str]],
    steps: Sequence[int] | IntArray,
    *,
    gate_s: Sequence[float] | FloatArray,
    basis: str,
    gateway_s: Sequence[float] | FloatArray | None = None,
) -> AnswerCosts:
    """What the profiles say the answers cost: question i answered by ``experts_used[i]``
    in ``steps[i]`` steps, the gate adding ``gate_s[i]`` once (0 when ungated) and the
    gateway ``gateway_s[i]`` of its own (none when not given)."""
    own = np.zeros(len(steps)) if gateway_s is None else gateway_s
    answers = [
        costs.answer(i, used, steps=int(t), gate_s=float(g), gateway_s=float(o))
        for i, (used, t, g, o) in enumerate(zip(experts_used, steps, gate_s, own, strict=True))
    ]
    delay = [a.delay_s_per_step for a in answers]
    return AnswerCosts(
        _by_app(apps, delay),
        float(np.mean([a.energy_j_per_step for a in answers])),
        basis,
        delay_source=summary({costs.sources[e].delay for u in experts_used for e in u}),
        energy_source=summary({costs.sources[e].energy for u in experts_used for e in u}),
        worst_answer_delay=max(delay) if delay else None,
        energy_per_prompt=float(np.mean([a.energy_j for a in answers])),
        gate_s=float(np.mean(gate_s)) if len(gate_s) else 0.0,
    )


def measured_costs(apps: Sequence[str], answers: Sequence[Answer]) -> AnswerCosts:
    """Costs the answerer measured (eq. 8's delay per step of each answer; joules from the
    answering experts' power times their measured model time), within the answers' stated
    spread; failed answers are counted, not averaged."""
    given = [(app, a) for app, a in zip(apps, answers, strict=True) if a.failed is None]
    failed = len(answers) - len(given)
    if not given:
        nan = float("nan")
        return AnswerCosts({}, nan, "answers (none given)", failed=failed, energy_per_prompt=nan)
    delays = [float(a.delay_s or 0.0) for _, a in given]
    known = [a for _, a in given if a.energy_j is not None]
    complete = len(known) == len(given)
    energy_source = summary({"measured" if a.energy_measured else "modelled" for _, a in given})
    return AnswerCosts(
        _by_app([app for app, _ in given], delays),
        float(np.mean([a.energy_j or 0.0 for a in known])) if complete else float("nan"),
        f"answers (delay measured, energy {energy_source})",
        delay_source="measured",
        energy_source=energy_source,
        tolerance=max(a.spread for _, a in given),
        worst_answer_delay=max(delays),
        energy_per_prompt=(
            float(np.mean([(a.energy_j or 0.0) * a.steps for a in known]))
            if complete
            else float("nan")
        ),
        gate_s=float(np.mean([a.gate_s for _, a in given])),
        failed=failed,
    )
