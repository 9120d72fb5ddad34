"""The evaluation: MoE² against its baselines on held-out questions, for one setting or a grid
of delay and energy limits (paper Fig. 3 and Tables II–IV), the baselines as the paper defines
them (§V-C, §VI-B).

    result = evaluate(selection, test, ScoreAnswerer(test), Grid((0.02,), (1.0, 2.0)))
    result.to_json()

Per cell (τ_max for every app, E_max per step or per prompt): SMO picks S on the *selection*
samples (never the test ones) with the gate's weights; **MoE²** answers every test question
with the top-k of S by gate weight, fused; **SMO M. V.** fuses all of S with equal weights
(eq. 3 with ω = 1/|S|, through the same mixing code as MoE²); **Rand. M. V.** does the same
over a random maximal feasible subset, for several seeds (the mean); **SMO plurality vote**,
an extra row, lets every member of S answer alone and takes the most frequent answer.

Without limits: each expert alone (an **S. A.** when the experts are original models; when
they are adapters of one base, **S. A.** is that base model, evaluated alone too), their mean
(**A. E. A.**), all experts fused with equal weights (**M. V.**), their plurality vote, and
MoE² over all experts. Every accuracy comes with its 1σ spread, every baseline with its
difference from MoE² on the same questions and a paired bootstrap 95% interval, and next to
it what the answers cost against the cell's limits: measured when the answerer measures, and
always what the one cost function promised for the same answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from moe2.controller.evaluate.answerer import Answer, Answerer, Question, Route
from moe2.controller.evaluate.metrics import (
    AnswerCosts,
    Difference,
    EnergyPer,
    FloatArray,
    correct,
    measured_costs,
    paired_difference,
    plurality_vote,
    promised_costs,
)
from moe2.controller.optimize import Infeasible, solve
from moe2.controller.optimize.costs import summary
from moe2.controller.optimize.fromregistry import GateDelay, ScoredSet
from moe2.shared.errors import ConfigError

# Methods of a cell, in the order of the paper's tables (the plurality vote an extra row).
MOE2, SMO_MV, RANDOM_MV, SMO_PLURALITY = "moe2", "smo_mv", "random_mv", "smo_plurality"
LABELS = {
    MOE2: "MoE²",
    SMO_MV: "SMO M. V.",
    RANDOM_MV: "Rand. M. V.",
    SMO_PLURALITY: "SMO plurality vote",
}
CELL_METHODS = (MOE2, SMO_MV, RANDOM_MV, SMO_PLURALITY)
# Methods without limits (Fig. 3); experts alone are "alone:<expert>".
ALONE, BASE, AVERAGE, VOTE_ALL, PLURALITY_ALL, MOE2_ALL = (
    "alone",
    "base",
    "average",
    "vote_all",
    "plurality_all",
    "moe2_all",
)


@dataclass(frozen=True)
class Grid:
    """Delay limits (seconds per step, for every app) × energy limits (joules per step, or per
    prompt with ``energy_per="prompt"``); None leaves that limit off."""

    delays: tuple[float | None, ...] = (None,)
    energies: tuple[float | None, ...] = (None,)
    energy_per: EnergyPer = "step"

    def cells(self) -> list[tuple[float | None, float | None]]:
        return [(d, e) for d in self.delays for e in self.energies]


class LazyGateDelay(Protocol):
    """τ_gate as the gateways announce it once the evaluation pushed the gate (with its first
    gated route): ``required`` raises when none did yet; not required, 0 for the gate, and
    the gateways' own time per answer as they announce it now."""

    def __call__(self, *, required: bool = True) -> GateDelay: ...


@dataclass(frozen=True)
class EvalSettings:
    k: int = 2  # experts fused per question (top-k of S by gate weight)
    seeds: int = 5  # random subsets per cell for Rand. M. V.
    # τ_gate of a gated answer, per prompt: the gateways' measured curve, as the optimiser
    # promises it (a constant when given by hand); or how to find it once the first gated
    # answers were asked (a gate a gateway loads only then)
    gate: GateDelay | LazyGateDelay = field(default_factory=GateDelay)
    solver: str = "smo"


@dataclass(frozen=True)
class SingleAgent:
    """The original model the experts were made from (they are adapters of it), scored on
    the same test questions, in the same order, and who answers for it."""

    expert: str
    data: ScoredSet
    answerer: Answerer


@dataclass
class MethodResult:
    """One method's accuracy with its spread, its difference from MoE², and its costs.

    ``spread`` is the 1σ uncertainty of ``accuracy`` as an estimate of the method's accuracy:
    the binomial standard error on the held-out questions, combined for random subsets with
    the standard deviation over seeds (``seed_std``)."""

    label: str
    accuracy: float  # share of questions answered right; the mean over seeds for random
    stderr: float | None  # binomial standard error, sqrt(acc (1 - acc) / questions)
    costs: AnswerCosts | None  # measured by the answerer, else what the profiles promise
    within_limits: bool | None  # the answers' costs meet the cell's limits (every seed)
    subsets: list[list[str]] = field(default_factory=list)
    seed_std: float | None = None  # standard deviation over seeds (random subsets)
    # What the one cost function promised for the same answers (what the optimiser held to
    # the limits), beside measured ``costs``; None when ``costs`` are the promise.
    promised: AnswerCosts | None = None
    per_question: FloatArray | None = None  # (questions,) 1/0 right, a mean over seeds
    vs_moe2: Difference | None = None  # MoE² minus this method, same questions

    @property
    def spread(self) -> float | None:
        if self.stderr is None:
            return None
        return float(np.hypot(self.stderr, self.seed_std or 0.0))

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "accuracy": self.accuracy,
            "spread": self.spread,
            "stderr": self.stderr,
            "seed_std": self.seed_std,
            "costs": None if self.costs is None else self.costs.as_dict(),
            "promised": None if self.promised is None else self.promised.as_dict(),
            "within_limits": self.within_limits,
            "subsets": self.subsets,
            "moe2_minus_this": None if self.vs_moe2 is None else self.vs_moe2.as_dict(),
        }


@dataclass
class Cell:
    delay_limit: float | None
    energy_limit: float | None
    feasible: bool
    reason: str | None = None  # why no subset meets the limits
    objective: float | None = None  # J(S) of SMO's subset on the selection samples
    methods: dict[str, MethodResult] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "delay_limit": self.delay_limit,
            "energy_limit": self.energy_limit,
            "feasible": self.feasible,
            "reason": self.reason,
            "objective": self.objective,
            "methods": {k: m.as_dict() for k, m in self.methods.items()},
        }


@dataclass
class Evaluation:
    dataset: str
    answerer: str
    settings: EvalSettings
    test: dict[str, Any]  # what was held out and how many questions
    selection: dict[str, Any]  # what SMO chose subsets on
    baselines: dict[str, MethodResult]
    cells: list[Cell]
    provenance: dict[str, Any]  # gate and cost sources
    example: dict[str, Any]  # one question as the experts saw it
    grid: Grid
    answerer_measures: bool = False  # costs of answers measured (else from the profiles)
    answerer_info: dict[str, Any] = field(default_factory=dict)  # how the answers were given
    single_agent: dict[str, Any] = field(default_factory=dict)  # what S. A. is, or why absent

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "answerer": self.answerer,
            "answers_measured": self.answerer_measures,
            "answerer_info": self.answerer_info,
            "k": self.settings.k,
            "seeds": self.settings.seeds,
            "gate_delay": self.provenance.get("gate_delay"),
            "solver": self.settings.solver,
            "test": self.test,
            "selection": self.selection,
            "example": self.example,
            "provenance": self.provenance,
            "grid": {
                "delay": list(self.grid.delays),
                "energy": list(self.grid.energies),
                "energy_per": self.grid.energy_per,
            },
            "single_agent": self.single_agent,
            "baselines": {k: m.as_dict() for k, m in self.baselines.items()},
            "cells": [c.as_dict() for c in self.cells],
        }


class _Harness:
    """One evaluation's questions, answers cached per route, and their costs."""

    def __init__(self, test: ScoredSet, answerer: Answerer, settings: EvalSettings) -> None:
        self.test, self.answerer, self.settings = test, answerer, settings
        m = test.mixed
        self.questions = [
            Question(i, m.prompts[i], m.choices[i], int(m.answer[i]), m.apps[i])
            for i in range(m.n_samples)
        ]
        self.apps = [q.app for q in self.questions]
        self.gold = m.answer
        self._gate = settings.gate
        self._cache: dict[Route, list[Answer]] = {}

    @property
    def gate(self) -> GateDelay:
        """τ_gate (found at its first use: after the first gated answers, when lazy)."""
        if not isinstance(self._gate, GateDelay):
            self._gate = self._gate()
        return self._gate

    def gateway_s(self, steps: Sequence[int] | np.ndarray) -> FloatArray:
        """(questions,) the gateway's own seconds for answers of ``steps`` steps, as the
        gateways announced it: with the gate's delay once that is found; before that (the
        ungated baselines, asked before the gate is pushed), as they announce it now."""
        gate = self._gate if isinstance(self._gate, GateDelay) else self._gate(required=False)
        return gate.own_seconds(self.test.costs.kind, np.asarray(steps, dtype=np.int64))

    @property
    def gate_s(self) -> FloatArray:
        """(questions,) τ_gate of each prompt."""
        return self.test.gate_seconds(self.gate)

    def answers(self, route: Route) -> list[Answer]:
        if route not in self._cache:
            self._cache[route] = self.answerer.answer(self.questions, route)
        return self._cache[route]

    def alone(self, expert: str) -> list[Answer]:
        return self.answers(Route((expert,), 1, "uniform"))  # no gate: nothing to weigh

    def fused(self, subset: Sequence[str]) -> list[Answer]:
        """Equal weights over all of ``subset`` (eq. 3 with ω = 1/|S|): majority voting as
        the paper defines it."""
        if len(subset) == 1:
            return self.alone(subset[0])
        return self.answers(Route(tuple(subset), len(subset), "uniform"))

    def measured(self, answers: Sequence[Answer]) -> bool:
        given = [a for a in answers if a.failed is None]
        return self.answerer.measures_costs and all(a.delay_s is not None for a in given)

    def promised(self, used: Sequence[Sequence[str]], gated: bool) -> AnswerCosts:
        """The answers' costs by the one cost function, from the experts' profiles and the
        tokens each really evaluates (T: the correct option's, by the experts that answer)."""
        experts = self.test.experts
        taking = np.array([[e in u for e in experts] for u in used], dtype=bool)
        steps = self.test.mixed.answer_steps(taking, self.gold)
        kind = summary({e: self.test.costs.sources[e] for u in used for e in u})
        return promised_costs(
            self.test.costs,
            self.apps,
            used,
            steps,
            gate_s=self.gate_s if gated else np.zeros(len(self.questions)),
            gateway_s=self.gateway_s(steps),
            basis=f"profiles ({kind})",
        )

    def plurality(self, subset: Sequence[str]) -> tuple[list[int], list[Answer]]:
        """Every member answers alone, the most frequent answer wins (an extra row: not the
        paper's majority voting)."""
        alone = [self.alone(e) for e in subset]  # (voters, questions)
        votes = np.array(
            [[-1 if a.choice is None else a.choice for a in answers] for answers in alone]
        ).T  # (questions, voters)
        n_options = self.test.mixed.n_options
        picks = plurality_vote(votes, n_options, [q.position for q in self.questions])
        # Every member answers every question at once: the vote takes as long as its slowest
        # voter and costs the energy of all of them.
        answers = []
        for i, c in enumerate(picks):
            each = [a[i] for a in alone]
            failed = next((a.failed for a in each if a.failed is not None), None)
            if self.measured(each) and failed is None:
                energies = [a.energy_j for a in each]
                t = max(a.steps for a in each)
                answers.append(
                    Answer(
                        int(c),
                        tuple(subset),
                        delay_s=max(float(a.delay_s or 0.0) * a.steps for a in each) / t,
                        energy_j=None
                        if any(e is None for e in energies)
                        else float(sum((a.energy_j or 0.0) * a.steps for a in each)) / t,
                        energy_measured=all(a.energy_measured for a in each),
                        spread=max(a.spread for a in each),
                        steps=t,
                    )
                )
            else:
                answers.append(Answer(int(c), tuple(subset), failed=failed))
        return picks.tolist(), answers

    def method(
        self,
        label: str,
        answers: Sequence[Answer],
        *,
        gated: bool,
        choices: Sequence[int | None] | None = None,
        limits: tuple[float | None, float | None] = (None, None),
        energy_per: EnergyPer = "step",
        subsets: Sequence[Sequence[str]] = (),
    ) -> MethodResult:
        picked = [a.choice for a in answers] if choices is None else list(choices)
        used = [a.experts for a in answers]
        promised = self.promised(used, gated)
        measured = self.measured(answers)
        cost = measured_costs(self.apps, answers) if measured else promised
        right = correct(picked, self.gold)
        acc = float(right.mean()) if right.size else float("nan")
        return MethodResult(
            label,
            acc,
            stderr(acc, len(picked)),
            cost,
            cost.within(*limits, energy_per),
            [list(s) for s in subsets],
            promised=promised if measured else None,
            per_question=right,
        )


def evaluate(
    selection: ScoredSet,
    test: ScoredSet,
    answerer: Answerer,
    grid: Grid,
    settings: EvalSettings | None = None,
    *,
    base: SingleAgent | None = None,
    adapters: bool = False,
    progress: Callable[[int], None] | None = None,
    test_note: str = "",
    selection_note: str = "",
    base_note: str = "",
) -> Evaluation:
    """Every method in every cell of ``grid``; ``progress(n)`` is told each unit of work.
    ``adapters``: the experts are adapters of one base model (S. A. is then ``base``, or
    reported missing with ``base_note``)."""
    settings = settings or EvalSettings()
    if selection.experts != test.experts:
        raise ConfigError(
            f"the selection and test samples were scored by different experts "
            f"({selection.experts} vs {test.experts})"
        )
    tick = progress or (lambda _n: None)
    h = _Harness(test, answerer, settings)
    experts = test.experts
    per = grid.energy_per

    baselines: dict[str, MethodResult] = {}
    singles = []
    for e in experts:
        label = f"{e} alone" if adapters else f"S. A. {e}"
        r = h.method(label, h.alone(e), gated=False, subsets=[[e]])
        baselines[f"{ALONE}:{e}"] = r
        singles.append(r)
    single_agent: dict[str, Any] = {"experts_are": "adapters" if adapters else "original models"}
    if base is not None:
        if list(base.data.mixed.sample_idx) != list(test.mixed.sample_idx):
            raise ConfigError(f"the base model {base.expert} was scored on other questions")
        hb = _Harness(base.data, base.answerer, settings)
        baselines[BASE] = hb.method(
            f"S. A. {base.expert} (base model)", hb.alone(base.expert), gated=False
        )
        single_agent["base"] = base.expert
    elif adapters:
        single_agent["missing"] = base_note or "no agent serves the experts' base model"
    tick(1)
    per_question = np.mean([r.per_question for r in singles if r.per_question is not None], 0)
    baselines[AVERAGE] = MethodResult(
        "A. E. A.", float(np.mean([r.accuracy for r in singles])), None, None, None,
        per_question=per_question,
    )  # fmt: skip
    baselines[VOTE_ALL] = h.method(
        "M. V. (equal weights)", h.fused(experts), gated=False, subsets=[experts]
    )
    picks, voted = h.plurality(experts)
    baselines[PLURALITY_ALL] = h.method(
        "Plurality vote", voted, choices=picks, gated=False, subsets=[experts]
    )
    every = h.answers(Route(tuple(experts), settings.k, "gate"))
    baselines[MOE2_ALL] = h.method(
        f"MoE² (all {len(experts)}, top-{settings.k})", every, gated=True, subsets=[experts]
    )
    _compare(baselines[MOE2_ALL], [m for k, m in baselines.items() if k != MOE2_ALL])
    tick(1)

    apps = sorted(set(selection.mixed.apps))
    base_problem = selection.problem({}, None, gate_delay=h.gate, energy_per=per)
    cells: list[Cell] = []
    for delay_limit, energy_limit in grid.cells():
        limits = (delay_limit, energy_limit)
        problem = base_problem.with_limits(
            {a: delay_limit for a in apps} if delay_limit is not None else {}, energy_limit
        )
        found = solve(problem, settings.solver)
        if isinstance(found, Infeasible):
            cells.append(Cell(delay_limit, energy_limit, False, found.reason))
            tick(1 + settings.seeds)
            continue
        cell = Cell(delay_limit, energy_limit, True, objective=found.objective)
        subset = found.subset

        # a subset smaller than k fuses all of it: the same route as k = |S| (cached)
        def run(
            key: str,
            answers: list[Answer],
            members: Sequence[str],
            gated: bool = False,
            choices: list[int] | None = None,
            limits: tuple[float | None, float | None] = limits,
        ) -> MethodResult:
            return h.method(
                LABELS[key],
                answers,
                gated=gated,
                choices=choices,
                limits=limits,
                energy_per=per,
                subsets=[members],
            )

        moe = h.answers(Route(subset, min(settings.k, len(subset)), "gate"))
        cell.methods[MOE2] = run(MOE2, moe, subset, gated=True)
        cell.methods[SMO_MV] = run(SMO_MV, h.fused(subset), subset)
        picks, voted = h.plurality(subset)
        cell.methods[SMO_PLURALITY] = run(SMO_PLURALITY, voted, subset, choices=picks)
        tick(1)
        runs: list[MethodResult] = []
        for seed in range(settings.seeds):
            rand = solve(problem, "random", seed=seed)
            assert not isinstance(rand, Infeasible)  # SMO found a feasible subset
            runs.append(run(RANDOM_MV, h.fused(rand.subset), rand.subset))
            tick(1)
        cell.methods[RANDOM_MV] = _pooled(LABELS[RANDOM_MV], runs)
        _compare(cell.methods[MOE2], [cell.methods[k] for k in (SMO_MV, RANDOM_MV, SMO_PLURALITY)])
        cells.append(cell)

    m = test.mixed
    return Evaluation(
        dataset=test.dataset,
        answerer=answerer.name,
        settings=settings,
        test={"dataset": test.dataset, "questions": m.n_samples, "held_out": test_note},
        selection={
            "dataset": selection.dataset,
            "samples": selection.mixed.n_samples,
            "note": selection_note,
        },
        baselines=baselines,
        cells=cells,
        provenance={
            "gate": selection.gate.provenance(),
            "gate_delay": {
                "seconds": float(h.gate_s.mean()) if h.gate_s.size else 0.0,
                **h.gate.as_dict(),
            },
            "costs": test.costs.provenance(),
            "cost_basis": summary(test.costs.sources),
            "answers": test.costs.kind,
        },
        example={"prompt": m.prompts[0], "options": list(m.choices[0])} if m.n_samples else {},
        grid=grid,
        answerer_measures=answerer.measures_costs,
        answerer_info=answerer.describe(),
        single_agent=single_agent,
    )


def _compare(moe2: MethodResult, others: Sequence[MethodResult]) -> None:
    """Each method's paired difference from MoE² on the same questions."""
    assert moe2.per_question is not None
    for m in others:
        if m.per_question is not None:
            m.vs_moe2 = paired_difference(moe2.per_question, m.per_question)


def work_units(grid: Grid, settings: EvalSettings) -> int:
    """How many ``progress`` ticks ``evaluate`` gives: for a progress bar's length."""
    return 2 + len(grid.cells()) * (1 + settings.seeds)


def _pooled(label: str, runs: Sequence[MethodResult]) -> MethodResult:
    """Mean and standard deviation over the seeds' runs; costs averaged, limits met by all."""
    acc = [r.accuracy for r in runs]
    pooled = _mean_costs([r.costs for r in runs if r.costs is not None])
    promised = _mean_costs([r.promised for r in runs if r.promised is not None])
    errors = [r.stderr or 0.0 for r in runs]
    rows = [r.per_question for r in runs if r.per_question is not None]
    return MethodResult(
        label,
        float(np.mean(acc)),
        float(np.sqrt(np.mean(np.square(errors)))),
        pooled,
        all(bool(r.within_limits) for r in runs),
        [s for r in runs for s in r.subsets],
        seed_std=float(np.std(acc)),
        promised=promised,
        per_question=np.mean(rows, axis=0) if rows else None,
    )


def _mean_costs(costs: Sequence[AnswerCosts]) -> AnswerCosts | None:
    """The seeds' costs averaged (sources and basis of the first, the largest tolerance)."""
    if not costs:
        return None
    first = costs[0]
    apps = first.delay_by_app
    worst = [c.worst_answer_delay for c in costs if c.worst_answer_delay is not None]
    return AnswerCosts(
        {a: float(np.mean([c.delay_by_app[a] for c in costs])) for a in apps},
        float(np.mean([c.energy for c in costs])),
        first.basis,
        delay_source=first.delay_source,
        energy_source=first.energy_source,
        tolerance=max(c.tolerance for c in costs),
        worst_answer_delay=max(worst) if worst else None,
        energy_per_prompt=float(np.mean([c.energy_per_prompt for c in costs])),
        gate_s=float(np.mean([c.gate_s for c in costs])),
        failed=sum(c.failed for c in costs),
    )


def stderr(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` questions."""
    return float(np.sqrt(acc * (1 - acc) / n)) if n else float("nan")
