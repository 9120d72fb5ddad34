"""Accuracy, majority voting (ties broken without favouring an option) and the costs of
answers (DESIGN.md §2 per answer, per app) against limits."""

from __future__ import annotations

import numpy as np
import pytest

from moe2.controller.evaluate.metrics import accuracy, answer_costs, majority_vote
from moe2.controller.evaluate.run import stderr
from moe2.controller.optimize.costs import Costs, CostSource


def test_accuracy_counts_none_as_wrong() -> None:
    assert accuracy([0, 1, None, 2], [0, 1, 1, 0]) == 0.5
    assert stderr(0.5, 100) == pytest.approx(0.05)


def test_majority_vote_takes_the_majority_and_breaks_ties_evenly() -> None:
    votes = np.array([[0, 0, 1], [2, 1, 2], [3, -1, 3]])
    assert majority_vote(votes, np.array([4, 4, 4]), [0, 1, 2]).tolist() == [0, 2, 3]
    # Two voters disagreeing on 4,000 questions: each tied option wins about half the time,
    # and the same question always breaks the same way.
    n = 4000
    ties = np.tile([[1, 3]], (n, 1))
    picks = majority_vote(ties, np.full(n, 4), list(range(n)))
    assert set(picks.tolist()) == {1, 3}
    assert abs((picks == 1).mean() - 0.5) < 0.03
    again = majority_vote(ties, np.full(n, 4), list(range(n)))
    assert np.array_equal(picks, again)


def _costs() -> Costs:
    source = CostSource("modelled", "modelled", "modelled", "rtx4090", "none")
    return Costs(
        experts=["gpu", "cpu"],
        prompt_delay=np.array([[0.1, 0.9], [0.1, 0.9]]),
        decode_delay=np.array([[0.12, 0.05], [0.12, 0.05]]),
        steps=np.array([8, 1]),
        energy=np.array([[2.0, 1.0], [3.0, 1.5]]),
        sources={"gpu": source, "cpu": source},
    )


def test_answer_costs_take_the_slowest_per_step_and_the_sum_of_energy() -> None:
    cost = answer_costs(
        _costs(), ["qa", "chat"], [("gpu", "cpu"), ("gpu",)], gate_delay=0.004, basis="x"
    )
    assert cost.delay_by_app["qa"] == pytest.approx((0.9 + 7 * 0.12) / 8 + 0.004)
    assert cost.delay_by_app["chat"] == pytest.approx(0.1 + 0.004)  # T = 1: the prompt step
    assert cost.worst_delay == cost.delay_by_app["qa"]
    assert cost.energy == pytest.approx((3.0 + 3.0) / 2)
    assert cost.within(0.2215, 3.0) and not cost.within(0.2, 3.0) and not cost.within(None, 2.9)
    assert cost.within(None, None)
