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
    power_w,
)
from moe2.shared.costmodel import CostCurve, CostCurves, RequestOverhead


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


def test_each_request_costs_the_agents_own_time_and_the_answer_the_gateways() -> None:
    """By hand: the agent's own time per request (beyond a ping, which the link's round trip
    holds) falls on every step of a generated answer (each step is a request) and once on a
    scored one; the gateway's own time once per answer, spread over its T steps with the
    experts' time; the gate once on the mean step. Energy is the models' alone."""
    own = RequestOverhead(
        seconds={"open": 0.003, "step": 0.002, "score_choices": 0.004}, requests=9
    )
    busy = CURVES.model_copy(update={"overhead": own})
    cost = answer_cost(
        {"a": busy},
        {"a": Work(10)},
        steps=3,
        kind=GENERATED,
        links={"a": 0.001},
        gate_s=0.005,
        gateway_s=0.006,
    )
    # step 1: prompt 0.02 + open 0.003 + link 0.001; steps 2, 3: token 0.0211 / 0.0212 (history
    # 11, 12) + step 0.002 + link 0.001
    experts = 0.024 + 0.0241 + 0.0242
    assert cost.seconds == pytest.approx(experts)
    assert cost.delay_s_per_step == pytest.approx((experts + 0.006) / 3 + 0.005)
    assert cost.energy_j == pytest.approx(6.0)  # as without any overhead

    scored = answer_cost(
        {"a": busy}, {"a": Work(10, (3, 1, 2))}, steps=2, kind=SCORED, gateway_s=0.002
    )
    # one request: prompt 0.02 + 3 tokens scored 0.009 + score_choices 0.004; step 2 nothing
    assert scored.seconds == pytest.approx(0.033)
    assert scored.delay_s_per_step == pytest.approx((0.033 + 0.002) / 2)
    # a profile that states no overhead: none added
    plain = answer_cost({"a": CURVES}, {"a": Work(10, (3, 1, 2))}, steps=2, kind=SCORED)
    assert plain.seconds == pytest.approx(0.029)


def test_a_modelled_profile_charges_its_busy_power_per_second_of_model_time() -> None:
    # a real meter's power: the profile's joules over its seconds at that prompt length
    assert power_w(CURVES, 10) == pytest.approx(2.0 / 0.02)
    # modelled: joules = busy power x model time, whatever the wall time was when profiling
    assert power_w(CURVES.model_copy(update={"model_watts": 95.0}), 10) == 95.0
