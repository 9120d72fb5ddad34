"""The one cost function (paper eqs. 6-11): an answer's delay and energy from the profiles and
the tokens each expert really evaluates."""

from __future__ import annotations

import pytest

from moe2.shared.answercost import (
    GENERATED,
    SCORED,
    Work,
    answer_cost,
    expert_steps,
    measured_delay_per_step,
)
from moe2.shared.costmodel import CostCurve, CostCurves


def _line(a: float, b: float, unit: str) -> CostCurve:
    return CostCurve(
        unit=unit, coef=[a, b], residual_std=0, rel_residual_std=0, n_points=2,
        min_tokens=1, max_tokens=64,
    )  # fmt: skip


CURVES = CostCurves(
    prompt_seconds=_line(0.01, 0.001, "s"),
    token_seconds=_line(0.02, 0.0001, "s"),
    prompt_joules=_line(1.0, 0.1, "J"),
    token_joules=_line(2.0, 0.0, "J"),
    score_seconds=_line(0.0, 0.003, "s"),
    score_joules=_line(0.0, 0.3, "J"),
)


def test_a_generated_answer_is_its_prompt_then_one_token_a_step() -> None:
    sec, joules = expert_steps(CURVES, Work(10), 3, GENERATED, link_s=0.001)
    assert sec.tolist() == pytest.approx([0.021, 0.0221, 0.0222])  # history 10, then 11, 12
    assert joules.tolist() == pytest.approx([2.0, 2.0, 2.0])


def test_a_scored_answer_is_one_request_the_prompt_once_and_the_options_branched() -> None:
    # options of 3, 1 and 2 tokens: 2 + 0 + 1 tokens scored after the prompt
    work = Work(10, (3, 1, 2))
    assert work.branch_tokens == 3
    sec, joules = expert_steps(CURVES, work, 3, SCORED, link_s=0.001)
    assert sec.tolist() == pytest.approx([0.02 + 0.009 + 0.001, 0.0, 0.0])
    assert joules.tolist() == pytest.approx([2.0 + 0.9, 0.0, 0.0])
    # a profile without score curves (an older agent): the prompt curve prices them
    old = CURVES.model_copy(update={"score_seconds": None, "score_joules": None})
    sec, _ = expert_steps(old, work, 3, SCORED)
    assert sec[0] == pytest.approx(0.02 + 0.013)


def test_the_slowest_expert_per_step_the_gate_once_and_every_experts_energy() -> None:
    slow = CURVES.model_copy(update={"prompt_seconds": _line(0.05, 0.001, "s")})
    cost = answer_cost(
        {"fast": CURVES, "slow": slow},
        {"fast": Work(10), "slow": Work(12)},
        steps=2,
        kind=GENERATED,
        gate_s=0.005,
    )
    # step 1: slow's prompt (0.062); step 2: either's token (0.0211 vs 0.0213)
    assert cost.seconds == pytest.approx(0.062 + 0.0213)
    assert cost.delay_s_per_step == pytest.approx((0.062 + 0.0213) / 2 + 0.005)
    assert cost.energy_j == pytest.approx((2.0 + 2.0) + (2.2 + 2.0))
    assert cost.energy_j_per_step == pytest.approx(cost.energy_j / 2)
    with pytest.raises(ValueError, match="at least one expert"):
        answer_cost({}, {}, steps=1, kind=GENERATED)


def test_a_measured_latency_gives_the_same_quantity() -> None:
    # 0.1 s end to end, of which 0.02 s the gate, over 4 steps: eq. 8's mean step + gate
    assert measured_delay_per_step(0.1, 0.02, 4) == pytest.approx(0.08 / 4 + 0.02)
    assert measured_delay_per_step(0.1, 0.0, 0) == pytest.approx(0.1)  # no steps: one
