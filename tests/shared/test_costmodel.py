"""The cost model: eq. 4 against hand-computed figures, curve fitting, transmission."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from moe2.shared.costmodel import (
    CostCurve,
    CostCurves,
    DeviceFigures,
    Link,
    ModelFigures,
    estimate_decode_token,
    estimate_prompt,
    fit_curve,
    fit_link,
    step_costs,
    transmission_delay,
)

# Round numbers so every term can be checked by hand.
DEVICE = DeviceFigures(
    compute_flops_per_s=1e12,
    memory_bytes_per_s=1e11,
    idle_power_w=10,
    peak_power_w=50,
    overhead_s=0.001,
)
MODEL = ModelFigures(
    n_params=1e9,
    weight_bytes=5e8,
    n_layers=10,
    n_embd=1000,
    kv_dim=1000,
    kv_bytes_per_value=2,
    n_ubatch=512,
)


def test_decode_token_matches_the_hand_computed_example() -> None:
    # FLOPs: 2 * 1e9 (weights) + 4 * 10 layers * 1000 * 100 context = 2.004e9 -> 2.004 ms
    # bytes: 5e8 (weights) + 2 (K,V) * 10 * 1000 * 2 B * 100 = 5.04e8      -> 5.04 ms
    # overhead 1 ms; total 8.044 ms; at 50 W: 0.4022 J
    cost = estimate_decode_token(MODEL, DEVICE, context=100)
    assert cost.seconds == pytest.approx(0.008044, rel=1e-12)
    assert cost.joules == pytest.approx(0.4022, rel=1e-12)


def test_prompt_matches_the_hand_computed_example() -> None:
    # FLOPs: 2 * 1e9 * 1000 + 2 * 10 * 1000 * 1000 * 1001 = 2.02002e12 -> 2.02002 s
    # bytes: 5e8 * ceil(1000 / 512) = 1e9, + KV written 2 * 10 * 1000 * 2 * 1000 = 4e7
    #        -> 1.04e9 / 1e11 = 0.0104 s; overhead 0.001 s; total 2.03142 s; 101.571 J
    cost = estimate_prompt(MODEL, DEVICE, prompt_tokens=1000)
    assert cost.seconds == pytest.approx(2.03142, rel=1e-12)
    assert cost.joules == pytest.approx(101.571, rel=1e-12)


def test_decode_cost_grows_with_history_through_attention() -> None:
    short = estimate_decode_token(MODEL, DEVICE, context=10)
    long = estimate_decode_token(MODEL, DEVICE, context=10_000)
    assert long.seconds > short.seconds
    flat = ModelFigures(n_params=1e9, weight_bytes=5e8)  # no shape given: no attention term
    assert estimate_decode_token(flat, DEVICE, 10) == estimate_decode_token(flat, DEVICE, 10_000)


def test_estimates_reject_empty_inputs() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        estimate_prompt(MODEL, DEVICE, 0)
    with pytest.raises(ValueError, match="at least 1"):
        estimate_decode_token(MODEL, DEVICE, 0)


def test_device_figures_are_validated() -> None:
    with pytest.raises(ValidationError, match="peak_power_w"):
        DeviceFigures(compute_flops_per_s=1, memory_bytes_per_s=1, idle_power_w=20, peak_power_w=10)
    with pytest.raises(ValidationError):
        DeviceFigures(compute_flops_per_s=0, memory_bytes_per_s=1, idle_power_w=0, peak_power_w=10)


def test_fit_recovers_an_exact_line() -> None:
    lengths = [16, 64, 256, 1024]
    values = [0.05 + 0.002 * n for n in lengths]
    curve = fit_curve(lengths, values, unit="s")
    assert curve.coef == pytest.approx([0.05, 0.002])
    assert curve.residual_std == pytest.approx(0.0, abs=1e-12)
    assert (curve.min_tokens, curve.max_tokens, curve.n_points) == (16, 1024, 4)
    assert curve.at(500) == pytest.approx(1.05)


def test_fit_reports_the_spread_of_repeats() -> None:
    rng = np.random.default_rng(0)
    lengths = np.repeat([16, 128, 512, 2048], 5)
    values = 0.01 + 1e-5 * lengths
    noisy = values * (1 + 0.05 * rng.standard_normal(len(values)))
    curve = fit_curve(lengths.tolist(), noisy.tolist(), unit="s")
    assert curve.coef[1] == pytest.approx(1e-5, rel=0.1)
    assert 0.02 < curve.rel_residual_std < 0.1  # the 5 % noise shows up
    assert curve.n_points == 20


def test_fit_needs_enough_distinct_lengths() -> None:
    with pytest.raises(ValueError, match="2 distinct"):
        fit_curve([100, 100, 100], [1.0, 1.1, 0.9], unit="s")
    quad = fit_curve([1, 2, 3, 4], [1, 4, 9, 16], unit="s", degree=2)
    assert quad.coef == pytest.approx([0, 0, 1], abs=1e-9)


def test_curve_is_clamped_at_zero() -> None:
    curve = CostCurve(
        unit="J",
        coef=[-1.0, 0.01],
        residual_std=0,
        rel_residual_std=0,
        n_points=2,
        min_tokens=0,
        max_tokens=1000,
    )
    assert curve.at(50) == 0.0
    assert curve.at(300) == pytest.approx(2.0)


def test_below_its_range_a_curve_with_a_negative_intercept_is_proportional() -> None:
    # a scoring pass profiled at 16-1024 tokens on a loaded box: negative intercept
    score = CostCurve(
        unit="s",
        coef=[-0.0045, 0.00035],
        residual_std=0,
        rel_residual_std=0,
        n_points=4,
        min_tokens=16,
        max_tokens=1024,
    )
    at_16 = -0.0045 + 0.00035 * 16
    assert score.at(8) == pytest.approx(at_16 / 2)  # not 0: slowing it still costs
    assert score.at(16) == pytest.approx(at_16) and score.at(100) == pytest.approx(0.0305)
    slowed = score.model_copy(update={"coef": [c * 10_000 for c in score.coef]})
    assert slowed.at(10) == pytest.approx(10_000 * score.at(10))
    overhead = score.model_copy(update={"coef": [0.0068, 0.00016]})  # a positive one: the line
    assert overhead.at(4) == pytest.approx(0.0068 + 0.00016 * 4)


def _line(a: float, b: float, unit: str) -> CostCurve:
    return CostCurve(
        unit=unit,
        coef=[a, b],
        residual_std=0,
        rel_residual_std=0,
        n_points=4,
        min_tokens=1,
        max_tokens=2048,
    )


def test_step_costs_follow_eqs_6_and_10() -> None:
    curves = CostCurves(
        prompt_seconds=_line(0.1, 0.001, "s"),
        token_seconds=_line(0.01, 1e-5, "s"),
        prompt_joules=_line(1.0, 0.01, "J"),
        token_joules=_line(0.1, 1e-4, "J"),
    )
    seconds, joules = step_costs(curves, prompt_tokens=100, answer_tokens=3)
    # step 1: the prompt; steps 2 and 3: one token after a history of 101 and 102
    assert seconds == pytest.approx([0.2, 0.01 + 1e-5 * 101, 0.01 + 1e-5 * 102])
    assert joules == pytest.approx([2.0, 0.1 + 1e-4 * 101, 0.1 + 1e-4 * 102])


def test_transmission_delay_is_rtt_plus_payload_over_rate() -> None:
    link = Link(rtt_s=0.002, bytes_per_s=1e6)
    assert transmission_delay(0, link) == pytest.approx(0.002)
    assert transmission_delay(50_000, link) == pytest.approx(0.052)
    with pytest.raises(ValueError):
        transmission_delay(-1, link)


def test_link_is_fitted_from_round_trips() -> None:
    sizes = [100, 10_000, 100_000, 1_000_000]
    seconds = [0.0004 + s / 12.5e6 for s in sizes]
    link = fit_link(sizes, seconds)
    assert link.rtt_s == pytest.approx(0.0004)
    assert link.bytes_per_s == pytest.approx(12.5e6)
    flat = fit_link([100, 200], [0.001, 0.001])  # too fast to see: infinite rate
    assert math.isinf(flat.bytes_per_s)
