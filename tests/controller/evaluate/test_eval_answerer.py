"""The stored-scores answerer: the option of highest fused log-likelihood under the gate's
weights renormalised over the top-k of the subset."""

from __future__ import annotations

import numpy as np
import pytest

from moe2.controller.evaluate.answerer import Question, Route, ScoreAnswerer
from moe2.controller.gate.weights import GateWeights
from moe2.controller.mixing import Mixed
from moe2.controller.optimize.costs import Costs, CostSource
from moe2.controller.optimize.fromregistry import ScoredSet
from moe2.shared.errors import ConfigError


def _set() -> ScoredSet:
    # One question, two options, three experts with one unit each: a prefers option 0 a
    # little, b prefers option 1 strongly, c is unsure.
    logp = np.log(
        np.array([[[[0.6], [0.01], [0.5]], [[0.4], [0.99], [0.5]]]])
    )  # (1 sample, 2 options, 3 experts, 1 unit)
    mixed = Mixed(
        experts=["a", "b", "c"],
        sample_idx=np.array([0]),
        prompts=["q"],
        choices=[("x", "y")],
        apps=["qa"],
        logp=logp,
        mask=np.ones((1, 2, 1), bool),
        n_options=np.array([2]),
        answer=np.array([0]),
        per_token=np.array([True]),
        steps=np.array([[1, 1]]),
    )
    gate = GateWeights("g", ["d"], "torch", np.array([[0.7, 0.2, 0.1]]))
    src = CostSource("modelled", "modelled", "modelled", "cpu-generic", "none")
    zeros = np.zeros((1, 3))
    costs = Costs(["a", "b", "c"], zeros, zeros, np.array([1]), zeros, dict.fromkeys("abc", src))
    return ScoredSet("d", mixed, gate, costs)


Q = [Question(0, "q", ("x", "y"), 0, "qa")]


def test_top_1_answers_with_the_gates_favourite() -> None:
    answerer = ScoreAnswerer(_set())
    (ans,) = answerer.answer(Q, Route(("a", "b", "c"), 1))
    assert ans.choice == 0 and ans.experts == ("a",)
    (ans,) = answerer.answer(Q, Route(("b", "c"), 1))  # a left out: b is the favourite
    assert ans.choice == 1 and ans.experts == ("b",)


def test_top_2_fuses_with_renormalised_weights() -> None:
    # ω = (0.7, 0.2) / 0.9: option 0: 0.778·0.6 + 0.222·0.01 = 0.469; option 1: 0.531
    (ans,) = ScoreAnswerer(_set()).answer(Q, Route(("a", "b", "c"), 2))
    assert ans.choice == 1 and ans.experts == ("a", "b")


def test_uniform_weights_ignore_the_gate() -> None:
    # (0.6 + 0.01 + 0.5) / 3 = 0.37 against (0.4 + 0.99 + 0.5) / 3 = 0.63
    (ans,) = ScoreAnswerer(_set()).answer(Q, Route(("a", "b", "c"), 3, "uniform"))
    assert ans.choice == 1 and ans.experts == ("a", "b", "c")


def test_unknown_experts_and_bad_routes_are_refused() -> None:
    with pytest.raises(ConfigError, match="no stored scores of expert"):
        ScoreAnswerer(_set()).answer(Q, Route(("z",), 1))
    with pytest.raises(ConfigError, match="k must be at least 1"):
        Route(("a",), 0)
