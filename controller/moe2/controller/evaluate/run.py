"""The evaluation: MoE² against its baselines on held-out questions, for one setting or a grid
of delay and energy limits (paper Fig. 3 and Tables II–IV).

    result = evaluate(selection, test, ScoreAnswerer(test), Grid((0.02,), (1.0, 2.0)))
    result.to_json()

Per cell (τ_max for every app, E_max): SMO picks S on the *selection* samples (never the test
ones) with the gate's weights; **MoE²** answers every test question with the top-k of S by
gate weight, fused; **SMO M. V.** lets every member of S answer alone and takes the majority;
**Rand. M. V.** does the same over a random maximal feasible subset, for several seeds (the
mean). Without limits: every single expert (S. A.), their average (A. E. A.), the majority of
all experts (M. V.) and MoE² over all experts. Every accuracy comes with its spread
(``MethodResult.spread``), and next to it what the answers cost per step against the cell's
limits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe2.controller.evaluate.answerer import Answer, Answerer, Question, Route
from moe2.controller.evaluate.metrics import (
    AnswerCosts,
    accuracy,
    answer_costs,
    majority_vote,
    measured_costs,
)
from moe2.controller.optimize import Infeasible, solve
from moe2.controller.optimize.costs import summary
from moe2.controller.optimize.fromregistry import ScoredSet
from moe2.shared.errors import ConfigError

# Methods of a cell, in the order of the paper's tables.
MOE2, SMO_MV, RANDOM_MV = "moe2", "smo_mv", "random_mv"
LABELS = {MOE2: "MoE²", SMO_MV: "SMO M. V.", RANDOM_MV: "Rand. M. V."}
# Methods without limits (Fig. 3).
SINGLE, AVERAGE, VOTE_ALL, MOE2_ALL = "single", "average", "vote_all", "moe2_all"


@dataclass(frozen=True)
class Grid:
    """Delay limits (seconds per step, for every app) × energy limits (joules per step);
    None leaves that limit off."""

    delays: tuple[float | None, ...] = (None,)
    energies: tuple[float | None, ...] = (None,)

    def cells(self) -> list[tuple[float | None, float | None]]:
        return [(d, e) for d in self.delays for e in self.energies]


@dataclass(frozen=True)
class EvalSettings:
    k: int = 2  # experts fused per question (top-k of S by gate weight)
    seeds: int = 5  # random subsets per cell for Rand. M. V.
    gate_delay: float = 0.004  # seconds the gate adds per step (as the optimizer assumes)
    solver: str = "smo"


@dataclass
class MethodResult:
    """One method's accuracy with its spread, and what its answers cost.

    ``spread`` is the 1σ uncertainty of ``accuracy`` as an estimate of the method's accuracy:
    the binomial standard error on the held-out questions, combined for random subsets with
    the standard deviation over seeds (``seed_std``)."""

    label: str
    accuracy: float  # share of questions answered right; the mean over seeds for random
    stderr: float | None  # binomial standard error, sqrt(acc (1 - acc) / questions)
    costs: AnswerCosts | None  # per step, from the profiles or measured by the answerer
    within_limits: bool | None  # the answers' costs meet the cell's limits (every seed)
    subsets: list[list[str]] = field(default_factory=list)
    seed_std: float | None = None  # standard deviation over seeds (random subsets)
    # What the profiles say the same answers cost (what the optimiser held to the limits),
    # beside measured ``costs``; None when ``costs`` already come from the profiles.
    promised: AnswerCosts | None = None

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

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "answerer": self.answerer,
            "answers_measured": self.answerer_measures,
            "answerer_info": self.answerer_info,
            "k": self.settings.k,
            "seeds": self.settings.seeds,
            "gate_delay": self.settings.gate_delay,
            "solver": self.settings.solver,
            "test": self.test,
            "selection": self.selection,
            "example": self.example,
            "provenance": self.provenance,
            "grid": {"delay": list(self.grid.delays), "energy": list(self.grid.energies)},
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
        self.gold = m.answer
        self._cache: dict[Route, list[Answer]] = {}

    def answers(self, route: Route) -> list[Answer]:
        if route not in self._cache:
            self._cache[route] = self.answerer.answer(self.questions, route)
        return self._cache[route]

    def alone(self, expert: str) -> list[Answer]:
        return self.answers(Route((expert,), 1, "gate"))

    def measured(self, answers: Sequence[Answer]) -> bool:
        return self.answerer.measures_costs and all(a.delay_s is not None for a in answers)

    def costs(
        self, answers: Sequence[Answer], used: Sequence[Sequence[str]], gated: bool
    ) -> AnswerCosts:
        """What the answers cost: measured when the answerer measured every one, else what
        the profiles say (``promised``)."""
        apps = [q.app for q in self.questions]
        if self.measured(answers):
            return measured_costs(apps, answers)
        return self.promised(used, gated)

    def promised(self, used: Sequence[Sequence[str]], gated: bool) -> AnswerCosts:
        """The answers' costs from the experts' profiles, as the optimiser computes them."""
        apps = [q.app for q in self.questions]
        experts = sorted({e for u in used for e in u})
        kind = summary({e: self.test.costs.sources[e] for e in experts})
        return answer_costs(
            self.test.costs,
            apps,
            used,
            gate_delay=self.settings.gate_delay if gated else 0.0,
            basis=f"profiles ({kind})",
        )

    def vote(self, subset: Sequence[str]) -> tuple[list[int], list[Answer]]:
        alone = [self.alone(e) for e in subset]  # (voters, questions)
        votes = np.array(
            [[-1 if a.choice is None else a.choice for a in answers] for answers in alone]
        ).T  # (questions, voters)
        n_options = self.test.mixed.n_options
        picks = majority_vote(votes, n_options, [q.position for q in self.questions])
        # Every member of the subset answers every question, at once: the vote takes as long
        # as its slowest voter and costs the energy of all of them.
        answers = []
        for i, c in enumerate(picks):
            each = [a[i] for a in alone]
            if self.measured(each):
                energies = [a.energy_j for a in each]
                answers.append(
                    Answer(
                        int(c),
                        tuple(subset),
                        delay_s=max(float(a.delay_s or 0.0) for a in each),
                        energy_j=None
                        if any(e is None for e in energies)
                        else float(sum(e or 0.0 for e in energies)),
                        energy_measured=all(a.energy_measured for a in each),
                        spread=max(a.spread for a in each),
                    )
                )
            else:
                answers.append(Answer(int(c), tuple(subset)))
        return picks.tolist(), answers

    def method(
        self,
        label: str,
        choices: Sequence[int | None],
        answers: Sequence[Answer],
        *,
        gated: bool,
        limits: tuple[float | None, float | None] = (None, None),
        subsets: Sequence[Sequence[str]] = (),
    ) -> MethodResult:
        used = [a.experts for a in answers]
        cost = self.costs(answers, used, gated)
        acc = accuracy(choices, self.gold)
        return MethodResult(
            label,
            acc,
            stderr(acc, len(choices)),
            cost,
            cost.within(*limits),
            [list(s) for s in subsets],
            promised=self.promised(used, gated) if self.measured(answers) else None,
        )


def evaluate(
    selection: ScoredSet,
    test: ScoredSet,
    answerer: Answerer,
    grid: Grid,
    settings: EvalSettings | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    test_note: str = "",
    selection_note: str = "",
) -> Evaluation:
    """Every method in every cell of ``grid``; ``progress(n)`` is told each unit of work."""
    settings = settings or EvalSettings()
    if selection.experts != test.experts:
        raise ConfigError(
            f"the selection and test samples were scored by different experts "
            f"({selection.experts} vs {test.experts})"
        )
    tick = progress or (lambda _n: None)
    h = _Harness(test, answerer, settings)
    experts = test.experts

    baselines: dict[str, MethodResult] = {}
    singles = []
    for e in experts:
        a = h.alone(e)
        r = h.method(f"S. A. {e}", [x.choice for x in a], a, gated=False, subsets=[[e]])
        baselines[f"{SINGLE}:{e}"] = r
        singles.append(r.accuracy)
    tick(1)
    average = float(np.mean(singles))
    baselines[AVERAGE] = MethodResult("A. E. A.", average, None, None, None)
    picks, voted = h.vote(experts)
    baselines[VOTE_ALL] = h.method("M. V.", picks, voted, gated=False, subsets=[experts])
    every = h.answers(Route(tuple(experts), settings.k, "gate"))
    baselines[MOE2_ALL] = h.method(
        f"MoE² (all {len(experts)}, top-{settings.k})",
        [a.choice for a in every],
        every,
        gated=True,
        subsets=[experts],
    )
    tick(1)

    apps = sorted(set(selection.mixed.apps))
    base = selection.problem({}, None, gate_delay=settings.gate_delay)
    cells: list[Cell] = []
    for delay_limit, energy_limit in grid.cells():
        limits = (delay_limit, energy_limit)
        problem = base.with_limits(
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
        moe = h.answers(Route(subset, min(settings.k, len(subset)), "gate"))
        cell.methods[MOE2] = h.method(
            LABELS[MOE2], [a.choice for a in moe], moe, gated=True, limits=limits, subsets=[subset]
        )
        picks, voted = h.vote(subset)
        cell.methods[SMO_MV] = h.method(
            LABELS[SMO_MV], picks, voted, gated=False, limits=limits, subsets=[subset]
        )
        tick(1)
        runs: list[MethodResult] = []
        for seed in range(settings.seeds):
            rand = solve(problem, "random", seed=seed)
            assert not isinstance(rand, Infeasible)  # SMO found a feasible subset
            picks, voted = h.vote(rand.subset)
            runs.append(
                h.method(
                    LABELS[RANDOM_MV],
                    picks,
                    voted,
                    gated=False,
                    limits=limits,
                    subsets=[rand.subset],
                )
            )
            tick(1)
        cell.methods[RANDOM_MV] = _pooled(LABELS[RANDOM_MV], runs)
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
            "costs": test.costs.provenance(),
            "cost_basis": summary(test.costs.sources),
        },
        example={"prompt": m.prompts[0], "options": list(m.choices[0])} if m.n_samples else {},
        grid=grid,
        answerer_measures=answerer.measures_costs,
        answerer_info=answerer.describe(),
    )


def work_units(grid: Grid, settings: EvalSettings) -> int:
    """How many ``progress`` ticks ``evaluate`` gives: for a progress bar's length."""
    return 2 + len(grid.cells()) * (1 + settings.seeds)


def _pooled(label: str, runs: Sequence[MethodResult]) -> MethodResult:
    """Mean and standard deviation over the seeds' runs; costs averaged, limits met by all."""
    acc = [r.accuracy for r in runs]
    pooled = _mean_costs([r.costs for r in runs if r.costs is not None])
    promised = _mean_costs([r.promised for r in runs if r.promised is not None])
    errors = [r.stderr or 0.0 for r in runs]
    return MethodResult(
        label,
        float(np.mean(acc)),
        float(np.sqrt(np.mean(np.square(errors)))),
        pooled,
        all(bool(r.within_limits) for r in runs),
        [s for r in runs for s in r.subsets],
        seed_std=float(np.std(acc)),
        promised=promised,
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
    )


def stderr(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` questions."""
    return float(np.sqrt(acc * (1 - acc) / n)) if n else float("nan")
