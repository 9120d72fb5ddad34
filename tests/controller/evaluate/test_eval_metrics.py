"""Accuracy, the plurality vote (ties broken without favouring an option), paired differences
with their bootstrap interval, and the costs of answers (the one cost function per answer,
per app) against limits."""

from __future__ import annotations

import numpy as np
import pytest

from moe2.controller.evaluate.answerer import Answer
from moe2.controller.evaluate.metrics import (
    accuracy,
    measured_costs,
    paired_difference,
    plurality_vote,
    promised_costs,
)
from moe2.controller.evaluate.run import stderr
from moe2.controller.optimize.costs import Costs, CostSource
from moe2.shared.answercost import GENERATED, SCORED, Work, answer_cost
from moe2.shared.costmodel import CostCurve, CostCurves


def test_accuracy_counts_none_as_wrong() -> None:
    assert accuracy([0, 1, None, 2], [0, 1, 1, 0]) == 0.5
    assert stderr(0.5, 100) == pytest.approx(0.05)


def test_plurality_vote_takes_the_most_frequent_answer_and_breaks_ties_evenly() -> None:
    votes = np.array([[0, 0, 1], [2, 1, 2], [3, -1, 3]])
    assert plurality_vote(votes, np.array([4, 4, 4]), [0, 1, 2]).tolist() == [0, 2, 3]
    # Two voters disagreeing on 4,000 questions: each tied option wins about half the time,
    # and the same question always breaks the same way.
    n = 4000
    ties = np.tile([[1, 3]], (n, 1))
    picks = plurality_vote(ties, np.full(n, 4), list(range(n)))
    assert set(picks.tolist()) == {1, 3}
    assert abs((picks == 1).mean() - 0.5) < 0.03
    again = plurality_vote(ties, np.full(n, 4), list(range(n)))
    assert np.array_equal(picks, again)


def test_a_paired_difference_cancels_what_both_methods_share() -> None:
    rng = np.random.default_rng(3)
    n = 400
    both = rng.random(n) < 0.5  # questions both get right
    a = (both | (rng.random(n) < 0.2)).astype(float)  # a gets some more right
    b = both.astype(float)
    d = paired_difference(a, b)
    assert d.delta == pytest.approx(a.mean() - b.mean())
    assert d.low <= d.delta <= d.high and d.significant
    # unpaired, two binomial proportions near 0.5 would give about ±0.07; pairing removes the
    # shared questions' variance
    assert d.high - d.low < 0.1
    same = paired_difference(a, a)
    assert (same.delta, same.low, same.high) == (0.0, 0.0, 0.0) and not same.significant
    coin = paired_difference(rng.random(n) < 0.5, rng.random(n) < 0.5)
    assert coin.low < 0 < coin.high  # two coin flips: no difference to claim
    assert paired_difference(a, b) == d  # seeded: the same interval every run


def _line(a: float, b: float, unit: str) -> CostCurve:
    return CostCurve(
        unit=unit, coef=[a, b], residual_std=0, rel_residual_std=0, n_points=2,
        min_tokens=1, max_tokens=64,
    )  # fmt: skip


def _curves(scale: float) -> CostCurves:
    """An expert whose prompt costs 0.01 + 0.001 L s, a token 0.02 s, a scored token 0.002 s
    (× scale), at 50 W."""
    return CostCurves(
        prompt_seconds=_line(0.01 * scale, 0.001 * scale, "s"),
        token_seconds=_line(0.02 * scale, 0.0, "s"),
        prompt_joules=_line(0.5 * scale, 0.05 * scale, "J"),
        token_joules=_line(1.0 * scale, 0.0, "J"),
        score_seconds=_line(0.0, 0.002 * scale, "s"),
        score_joules=_line(0.0, 0.1 * scale, "J"),
    )


def _costs(kind: str = SCORED) -> Costs:
    source = CostSource("measured", "modelled", "modelled", "rtx4090", "measured")
    works = [
        {"gpu": Work(10, (3, 2)), "cpu": Work(12, (4, 2))},
        {"gpu": Work(30, (1, 1)), "cpu": Work(31, (1, 1))},
    ]
    if kind == GENERATED:
        works = [{e: Work(w.prompt_tokens) for e, w in row.items()} for row in works]
    zeros = np.zeros((2, 2))
    return Costs(
        experts=["gpu", "cpu"],
        prompt_delay=zeros,
        decode_delay=zeros,
        steps=np.array([4, 1]),
        energy=zeros,
        sources={"gpu": source, "cpu": source},
        kind=SCORED if kind == SCORED else GENERATED,
        curves={"gpu": _curves(1.0), "cpu": _curves(3.0)},
        link_s={"gpu": 0.001, "cpu": 0.002},
        works=works,
    )


@pytest.mark.parametrize("kind", [SCORED, GENERATED])
def test_the_promise_is_the_cost_function_on_the_same_profiles_and_token_counts(
    kind: str,
) -> None:
    costs = _costs(kind)
    gate = np.array([0.004, 0.006])
    used = [("gpu", "cpu"), ("gpu",)]
    got = promised_costs(costs, ["qa", "chat"], used, [4, 1], gate_s=gate, basis="x")
    want = [
        answer_cost(
            costs.curves,
            {e: costs.works[i][e] for e in used[i]},
            steps=t,
            kind=costs.kind,
            links=costs.link_s,
            gate_s=float(gate[i]),
        )
        for i, t in enumerate([4, 1])
    ]
    assert got.delay_by_app == {"qa": want[0].delay_s_per_step, "chat": want[1].delay_s_per_step}
    assert got.energy == pytest.approx(np.mean([w.energy_j_per_step for w in want]))
    assert got.energy_per_prompt == pytest.approx(np.mean([w.energy_j for w in want]))
    if kind == SCORED:
        # by hand: cpu is the slower; its prompt (0.03 + 0.036 s), the options but their last
        # token (3 + 1 scored tokens, 0.024 s) and its link, all in step 1 of 4
        assert want[0].seconds == pytest.approx(0.03 + 0.036 + 0.024 + 0.002)
        assert want[0].delay_s_per_step == pytest.approx(0.092 / 4 + 0.004)
        # energy: both experts' prompt and scored tokens, per prompt
        gpu = 0.5 + 0.5 + 0.1 * 3
        cpu = 1.5 + 1.5 * 12 / 10 + 0.3 * 4
        assert want[0].energy_j == pytest.approx(gpu + cpu)
    worst = max(w.delay_s_per_step for w in want)  # the worst app's
    assert got.worst_delay == worst
    assert got.within(worst, None) and not got.within(worst * 0.99, None)
    assert got.within(None, got.energy_per_prompt, "prompt")
    assert not got.within(None, got.energy_per_prompt * 0.99, "prompt")


def test_measured_costs_leave_failed_answers_out_and_count_them() -> None:
    answers = [
        Answer(0, ("a",), delay_s=0.02, energy_j=1.0, steps=4, gate_s=0.003, spread=0.1),
        Answer(None, ("a",), failed="timeout"),
        Answer(1, ("a",), delay_s=0.04, energy_j=3.0, steps=2, gate_s=0.005, spread=0.2),
    ]
    cost = measured_costs(["qa", "qa", "qa"], answers)
    assert cost.failed == 1
    assert cost.delay_by_app == {"qa": pytest.approx(0.03)}  # not (0.02 + ? + 0.04) / 3
    assert cost.energy == pytest.approx(2.0)
    assert cost.energy_per_prompt == pytest.approx((4 * 1.0 + 2 * 3.0) / 2)
    assert cost.gate_s == pytest.approx(0.004) and cost.tolerance == 0.2
    # within the stated spread of the limit
    assert cost.within(0.03 / 1.15, None) and not cost.within(0.03 / 1.25, None)
