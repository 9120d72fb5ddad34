"""The numbers made exact (issue 16 §1): log-probabilities end to end, eq. 8's delay with a
prompt step and decode steps, and the original file forms still solving the same."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from optimize_cases import random_problem, ref_delays, ref_objective, ref_optimum

from moe2.controller.optimize import Problem, Solution, solve
from moe2.controller.optimize.objective import Evaluator
from moe2.shared.errors import ConfigError


def _one_of(experts: list[str], samples: int, **kw: object) -> Problem:
    # Every expert costs one joule; a budget of 1.5 J lets exactly one expert serve.
    n = len(experts)
    return Problem(
        experts=experts,
        gate=[[1.0 / n] * n] * samples,
        app=["qa"] * samples,
        delay=[[1.0] * n] * samples,
        energy=[[1.0] * n] * samples,
        energy_limit=1.5,
        **kw,  # type: ignore[arg-type]
    )


def test_answers_below_69_nats_pick_brute_forces_subset_where_the_floor_picked_wrong() -> None:
    # Sample 0: a's answer is at -70 nats, b's at -500; sample 1: a -10, b -9. The old
    # registry path wrote exp(Σ log p) as "p" and the objective floored it at 1e-30 (-69.08
    # nats): both of sample 0's answers became the floor, so b looked better by 1 nat. In log
    # space a is better by 214.5 nats per sample.
    logp = [[[-70.0], [-500.0]], [[-10.0], [-9.0]]]
    old = _one_of(["a", "b"], 2, p=[np.exp(np.array(x)).tolist() for x in logp])
    new = _one_of(["a", "b"], 2, logp=logp)
    old_answer, new_answer, brute = solve(old), solve(new), solve(new, "brute")
    assert isinstance(old_answer, Solution) and old_answer.subset == ("b",)  # the floor's pick
    assert isinstance(new_answer, Solution) and isinstance(brute, Solution)
    assert new_answer.subset == brute.subset == ("a",)
    assert new_answer.objective == pytest.approx((70 + 10) / 2, abs=1e-12)
    assert Evaluator(new).objective([1]) == pytest.approx((500 + 9) / 2, abs=1e-12)
    assert new_answer.objective == pytest.approx(ref_optimum(new)[0], abs=1e-9)


def test_deep_answers_are_exact_for_every_subset() -> None:
    # Three experts, answers from -0.5 to -3,000 nats; one is ~2,500 nats below the best on a
    # unit, beyond the solvers' linear range, so its probability is clipped there and every
    # candidate is settled with the exact value.
    logp = [
        [[-3000.0, -2.0], [-400.0, -0.5], [-10.0, -800.0]],
        [[-1.0], [-90.0], [-2500.0]],
    ]
    pr = Problem(
        experts=["a", "b", "c"],
        gate=[[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]],
        logp=logp,
        app=["qa", "qa"],
        delay=[[1.0, 2.0, 3.0]] * 2,
        energy=[[1.0, 1.0, 1.0]] * 2,
    )
    ev = Evaluator(pr)
    assert ev.clipped
    for subset in ([0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2]):
        assert ev.objective(subset) == pytest.approx(ref_objective(pr, subset), rel=1e-12)
    for limit in (1.5, 2.5, 3.5):
        limited = pr.with_limits({"qa": limit + 0.004}, None)
        best, _ = ref_optimum(limited)
        for solver in ("smo", "brute"):
            result = solve(limited, solver)
            assert isinstance(result, Solution)
            assert result.objective == pytest.approx(best, rel=1e-12), (solver, limit)


def test_two_regime_delay_is_the_mean_over_steps_of_the_slowest() -> None:
    # A GPU box processes prompts fast and decodes slowly; a CPU box the other way round.
    # T = 8: the prompt step is the slowest on the CPU (0.9 s), every decode step on the GPU
    # (0.12 s): (0.9 + 7 × 0.12) / 8 = 0.2175 s per step. The maximum over S of each expert's
    # mean step would say max((0.1 + 7 × 0.12) / 8, (0.9 + 7 × 0.05) / 8) = 0.15625: 28% low.
    pr = Problem(
        experts=["gpu", "cpu"],
        gate=[[0.5, 0.5]],
        logp=[[[-0.1, -5.0], [-5.0, -0.1]]],  # each knows one of the two tokens: both best
        app=["qa"],
        prompt_delay=[[0.1, 0.9]],
        decode_delay=[[0.12, 0.05]],
        steps=[8],
        energy=[[2.0, 1.0]],
        gate_delay=0.004,
    )
    ev = Evaluator(pr)
    both = (0.9 + 7 * 0.12) / 8 + 0.004
    assert ev.app_delays([0, 1])[0] == pytest.approx(both, abs=1e-15)
    assert ev.app_delays([0])[0] == pytest.approx((0.1 + 7 * 0.12) / 8 + 0.004, abs=1e-15)
    assert ev.app_delays([1])[0] == pytest.approx((0.9 + 7 * 0.05) / 8 + 0.004, abs=1e-15)
    assert ref_delays(pr, [0, 1])["qa"] == pytest.approx(both, abs=1e-15)
    # The exact delay decides feasibility: 0.2 s admits each expert alone, not both.
    limited = pr.with_limits({"qa": 0.2}, None)
    result = solve(limited)
    assert isinstance(result, Solution) and len(result.subset) == 1
    assert result.delay["qa"] <= 0.2
    both_ok = solve(pr.with_limits({"qa": 0.225}, None))
    assert isinstance(both_ok, Solution) and both_ok.subset == ("gpu", "cpu")
    assert both_ok.delay["qa"] == pytest.approx(both, abs=1e-15)


def test_the_original_forms_load_and_solve_the_same(tmp_path: Path) -> None:
    # p and delay (the first file format) against logp = log p and prompt = decode = delay,
    # T = 1: the same subsets and objectives on a hundred random problems.
    for seed in range(100):
        pr = random_problem(seed * 16)  # the form cycle puts these in the original form
        data = pr.to_dict()
        assert "p" in data and "delay" in data
        exact = dict(data)
        exact["logp"] = [np.log(np.maximum(np.array(a), 1e-30)).tolist() for a in exact.pop("p")]
        d = exact.pop("delay")
        exact |= {"prompt_delay": d, "decode_delay": d, "steps": [3] * pr.n_samples}
        exact["decode_delay"] = d
        a, b = solve(Problem.from_dict(data)), solve(Problem.from_dict(exact))
        assert a.feasible == b.feasible, seed
        if isinstance(a, Solution):
            assert isinstance(b, Solution)
            assert a.subset == b.subset, seed
            assert a.objective == pytest.approx(b.objective, rel=1e-12, abs=1e-12)
    path = tmp_path / "old.json"
    pr.to_file(path)
    assert Problem.from_file(path).to_dict() == pr.to_dict()


def test_p_keeps_its_floor_and_logp_has_none() -> None:
    deep = math.exp(-100.0)  # 3.7e-44, below the floor of the original form
    old = _one_of(["a"], 1, p=[[[deep]]])
    new = _one_of(["a"], 1, logp=[[[-100.0]]])
    assert solve(old).objective == pytest.approx(-math.log(1e-30))  # type: ignore[union-attr]
    assert solve(new).objective == pytest.approx(100.0)  # type: ignore[union-attr]


def test_the_exact_forms_round_trip(tmp_path: Path) -> None:
    pr = random_problem(3 * 4 * 16 + 12)  # deep logp and exact delays
    data = pr.to_dict()
    assert {"logp", "prompt_delay", "decode_delay", "steps"} <= set(data)
    assert not {"p", "delay"} & set(data)
    path = tmp_path / "exact.json"
    pr.to_file(path)
    again = Problem.from_file(path)
    assert again.to_dict() == data
    assert solve(again).to_json()["subset"] == solve(pr).to_json()["subset"]


BASE = {
    "experts": ["a", "b"],
    "gate": [[0.5, 0.5]],
    "app": ["qa"],
    "energy": [[1.0, 1.0]],
}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"delay": [[1.0, 1.0]]}, "missing key(s) 'logp (or p)'"),
        ({"logp": [[[-1.0], [-2.0]]]}, "'prompt_delay, decode_delay and steps (or delay)'"),
        (
            {"logp": [[[-1.0], [-2.0]]], "p": [[[0.3], [0.1]]], "delay": [[1.0, 1.0]]},
            "give the target scores once",
        ),
        ({"logp": [[[0.5], [-2.0]]], "delay": [[1.0, 1.0]]}, "logp[0][0][0] = 0.5 is above 0"),
        (
            {"logp": [[[-1.0], [-2.0]]], "delay": [[1.0, 1.0]], "steps": [2]},
            "give the delays once",
        ),
        (
            {"logp": [[[-1.0], [-2.0]]], "prompt_delay": [[1.0, 1.0]], "steps": [2]},
            "missing key(s) 'decode_delay'",
        ),
        (
            {
                "logp": [[[-1.0], [-2.0]]],
                "prompt_delay": [[1.0, 1.0]],
                "decode_delay": [[1.0, 1.0]],
                "steps": [0],
            },
            "steps[0] = 0 must be a whole number of steps ≥ 1",
        ),
        (
            {
                "logp": [[[-1.0], [-2.0]]],
                "prompt_delay": [[1.0, -1.0]],
                "decode_delay": [[1.0, 1.0]],
                "steps": [2],
            },
            "prompt_delay[0][1] = -1 is negative",
        ),
    ],
)
def test_bad_exact_forms_name_the_field(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Problem.from_dict(BASE | extra)
    assert message in info.value.message
