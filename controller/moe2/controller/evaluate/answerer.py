"""Where an evaluation's answers come from: the seam between the harness and a way of
answering multiple-choice questions with a subset of experts.

    answerer = ScoreAnswerer(test_set)                       # from the registry's scores
    answers = answerer.answer(questions, Route(("a", "b"), k=2, weights="gate"))
    answers[0].choice, answers[0].experts                     # 1, ("b",)

``ScoreAnswerer`` answers from the teacher-forced scores the registry stores: the option with
the highest fused log-likelihood (the one mixing rule, ``moe2.controller.mixing``) under the
gate's weights renormalised over the top-k of the route's subset. ``GatewayAnswerer``
(``evaluate/gateway.py``) asks the live fleet the same questions through a gateway, with the
route pushed as an application's subset and gate, and measures what each answer cost. Another
answerer plugs in beside them: implement ``answer`` and add the class to ``ANSWERERS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from moe2.controller.optimize.fromregistry import ScoredSet
from moe2.shared.errors import ConfigError

Weights = Literal["gate", "uniform"]


@dataclass(frozen=True)
class Question:
    position: int  # the sample's position in the evaluation set (ScoredSet order)
    prompt: str  # exactly the text the experts scored or will answer
    choices: tuple[str, ...]  # the options' texts
    answer: int  # index of the correct choice: for scoring, never for answering
    app: str


@dataclass(frozen=True)
class Route:
    """Who answers: the subset S, of which the k members with the largest weights are fused
    (all of S when k ≥ |S|), weighted by the gate renormalised over them, or equally (then
    the first k in the route's order)."""

    experts: tuple[str, ...]
    k: int
    weights: Weights = "gate"

    def __post_init__(self) -> None:
        if not self.experts:
            raise ConfigError("a route needs at least one expert")
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}")


@dataclass(frozen=True)
class Answer:
    choice: int | None  # the option picked; None when the answer matched no option
    experts: tuple[str, ...]  # the experts whose outputs were fused into this answer
    delay_s: float | None = None  # eq. 8 measured, seconds per step, when the answerer measures
    energy_j: float | None = None  # joules per step, when the answerer measures the time
    energy_measured: bool = False  # energy_j from a real meter's figures (else modelled)
    spread: float = 0.0  # relative spread the answering experts' profiles state for their costs
    steps: int = 1  # T the per-step figures divide by (× energy_j: joules per prompt)
    gate_s: float = 0.0  # the gate's seconds on this prompt (part of delay_s, once)
    failed: str | None = None  # the error code when the fleet gave no answer (choice None)


class Answerer(ABC):
    name: ClassVar[str]
    measures_costs: ClassVar[bool] = False  # whether answers carry measured delay / energy

    @abstractmethod
    def answer(self, questions: Sequence[Question], route: Route) -> list[Answer]:
        """One answer per question, in order, by the route's experts."""

    def describe(self) -> dict[str, Any]:
        """How the answers were given, for the report (e.g. the routes pushed)."""
        return {}

    def close(self) -> None:  # noqa: B027 (optional hook: most answerers hold nothing)
        """Release what answering set up (connections, pushed routes); nothing by default."""


class ScoreAnswerer(Answerer):
    """Answers from stored teacher-forced scores: no broker, no model runs."""

    name = "scores"

    def __init__(self, data: ScoredSet) -> None:
        self.data = data

    def answer(self, questions: Sequence[Question], route: Route) -> list[Answer]:
        experts = self.data.experts
        unknown = [e for e in route.experts if e not in experts]
        if unknown:
            raise ConfigError(f"no stored scores of expert(s) {unknown}; scored: {experts}")
        pos = np.array([q.position for q in questions], dtype=np.int64)
        cols = np.array([experts.index(e) for e in route.experts], dtype=np.int64)
        if route.weights == "gate":
            g = self.data.gate.values[pos][:, cols]  # (questions, |S|)
        else:
            g = np.ones((pos.size, cols.size))
        k = min(route.k, cols.size)
        top = np.argsort(-g, axis=1, kind="stable")[:, :k]  # (questions, k) positions in S
        rows = np.arange(pos.size)[:, None]
        chosen = g[rows, top]
        log_w = np.full((pos.size, len(experts)), -np.inf)  # left-out experts weigh nothing
        log_w[rows, cols[top]] = np.log(chosen / chosen.sum(axis=1, keepdims=True))
        ll = self.data.mixed.select(pos).option_loglik(log_w)  # (questions, options)
        picks = ll.argmax(axis=1)
        return [
            Answer(int(picks[i]), tuple(route.experts[j] for j in sorted(top[i])))
            for i in range(pos.size)
        ]


# Every answerer by name; ``GatewayAnswerer`` (its own module: it needs the broker client) is
# added by the package's __init__.
ANSWERERS: dict[str, type[Answerer]] = {ScoreAnswerer.name: ScoreAnswerer}
