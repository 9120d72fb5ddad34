"""The problem file (docs/method.md): round trip, and a clear error for every kind of bad file."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moe2.controller.optimize import Problem
from moe2.shared.errors import ConfigError

GOOD: dict[str, Any] = {
    "experts": ["e0", "e1", "e2"],
    "gate": [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]],
    "p": [
        [[0.9, 0.8], [0.2, 0.4], [0.5, 0.5]],  # sample 0: two target tokens
        [[0.3], [0.6], [0.7]],  # sample 1: one
    ],
    "app": ["qa", "code"],
    "delay": [[1.0, 0.5, 2.0], [1.5, 0.7, 2.5]],
    "energy": [[10.0, 4.0, 20.0], [12.0, 5.0, 22.0]],
    "gate_delay": 0.004,
    "limits": {"delay": {"qa": 2.0, "code": 3.0}, "energy": 20.0},
    "epsilon": 0.0,
}


def test_round_trip(tmp_path: Path) -> None:
    pr = Problem.from_dict(GOOD)
    assert pr.n_samples == 2 and pr.n_experts == 3
    assert pr.units.tolist() == [2, 1]
    assert pr.to_dict() == GOOD
    path = tmp_path / "problem.json"
    pr.to_file(path)
    assert json.loads(path.read_text()) == GOOD
    again = Problem.from_file(path)
    assert again.to_dict() == GOOD


def test_optional_keys_default_to_no_limits() -> None:
    data = {k: GOOD[k] for k in ("experts", "gate", "p", "app", "delay", "energy")}
    pr = Problem.from_dict(data)
    assert pr.delay_limits == {} and pr.energy_limit is None
    assert pr.gate_delay == 0.0 and pr.epsilon == 0.0


def test_built_from_arrays() -> None:
    # The registry path: numpy arrays, p as one padded-free list per sample.
    pr = Problem(
        experts=("a", "b"),
        gate=np.array([[0.7, 0.3]]),
        p=[np.array([[0.9, 0.8], [0.2, 0.4]])],
        app=("qa",),
        delay=np.array([[1.2, 0.4]]),
        energy=np.array([[9.0, 3.0]]),
        delay_limits={"qa": 2.0},
        energy_limit=20.0,
    )
    assert Problem.from_dict(pr.to_dict()).to_dict() == pr.to_dict()


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(GOOD)
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


_DELETE = object()

BAD = [
    (("gate",), _DELETE, "missing key(s) 'gate'"),
    (("limit",), {}, "unknown key(s) 'limit'"),
    (("limits", "latency"), 1.0, "unknown key(s) 'latency' in limits"),
    (("experts",), [], "experts is empty"),
    (("experts",), ["e0", "e1", "e0"], "expert 'e0' is listed twice"),
    (("experts", 1), 7, "experts[1] = 7 must be a non-empty string"),
    (("gate", 1), [0.1, 0.1, 0.7], "gate[1] sums to 0.9, expected 1"),
    (("gate", 1, 2), math.nan, "gate[1][2] is nan"),
    (("gate", 0, 1), "0.3", "gate[0][1] = '0.3' is not a number"),
    (("gate", 1), [0.5, 0.5], "rows of gate have different lengths"),
    (("gate",), [[0.5, 0.5], [0.5, 0.5]], "gate has shape (2, 2), expected (2, 3)"),
    (("gate", 0), [1.2, -0.1, -0.1], "gate[0][0] = 1.2 is outside [0, 1]"),
    (("p", 0, 2, 1), 1.5, "p[0][2][1] = 1.5 is outside [0, 1]"),
    (("p", 1, 0, 0), -0.5, "p[1][0][0] = -0.5 is outside [0, 1]"),
    (("p", 1, 2), [0.7, 0.1], "rows of p[1] have different lengths"),
    (("p", 1, 1), [], "rows of p[1] have different lengths"),
    (("p", 1), [[0.3], [0.6]], "p[1] has shape (2, 1), expected (3, units ≥ 1)"),
    (("p", 0, 0, 0), math.inf, "p[0][0][0] is inf"),
    (("p",), [GOOD["p"][0]], "p has 1 samples, expected 2"),
    (("app",), ["qa"], "app has 1 entries, expected 2"),
    (("app", 1), None, "app[1] = None must be a non-empty string"),
    (("delay", 1, 1), -0.7, "delay[1][1] = -0.7 is negative"),
    (("delay", 0, 2), math.nan, "delay[0][2] is nan"),
    (("energy",), [[1.0, 2.0, 3.0]], "energy has shape (1, 3), expected (2, 3)"),
    (("energy", 0, 0), -1.0, "energy[0][0] = -1 is negative"),
    (("limits", "delay", "chat"), 1.0, "limits.delay names app 'chat', but no sample has"),
    (("limits", "delay", "qa"), -2.0, "limits.delay['qa'] = -2.0 must be a finite number ≥ 0"),
    (("limits", "energy"), "20", "limits.energy must be a number, got '20'"),
    (("gate_delay",), math.nan, "gate_delay = nan must be a finite number"),
    (("epsilon",), -0.1, "epsilon = -0.1 must be a finite number ≥ 0"),
    (("meta",), [1], "meta must be an object"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[m for _, _, m in BAD])
def test_bad_problem_names_the_field(path: tuple[Any, ...], value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Problem.from_dict(_with(path, value))
    assert message in info.value.message


def test_not_an_object() -> None:
    with pytest.raises(ConfigError, match="a problem is a JSON object, got list"):
        Problem.from_dict([1, 2])


def test_no_samples() -> None:
    data = _with(("gate",), [])
    with pytest.raises(ConfigError, match="there are no samples"):
        Problem.from_dict(data)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read problem file"):
        Problem.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"experts": [}')
    with pytest.raises(ConfigError, match=r"is not valid JSON: .* line 1 column 14"):
        Problem.from_file(bad)


def test_an_energy_limit_per_prompt_counts_every_step_of_the_answer(tmp_path: Path) -> None:
    data = copy.deepcopy(GOOD)
    del data["delay"]
    data |= {
        "prompt_delay": [[1.0, 0.5, 2.0], [1.5, 0.7, 2.5]],
        "decode_delay": [[0.1, 0.1, 0.1], [0.1, 0.1, 0.1]],
        "steps": [4, 2],
        "limits": {"delay": {}, "energy_per_prompt": 20.0},
    }
    pr = Problem.from_dict(data)
    assert pr.energy_per == "prompt" and pr.energy_limit == 20.0
    assert pr.to_dict()["limits"] == {"delay": {}, "energy_per_prompt": 20.0}
    from moe2.controller.optimize.objective import Evaluator

    ev = Evaluator(pr)
    # e1 alone: (4 steps × 4 J + 2 × 5 J) / 2 samples per prompt, against 4.5 J per step
    assert ev.energy([1]) == pytest.approx((4 * 4.0 + 2 * 5.0) / 2)
    assert ev.energy([0]) == pytest.approx((4 * 10.0 + 2 * 12.0) / 2)  # 32 J per prompt
    assert not ev.feasible([0]) and ev.feasible([1])
    per_step = pr.with_limits({}, 20.0, "step")
    assert Evaluator(per_step).energy([1]) == pytest.approx(4.5)
    both = {**data, "limits": {"energy": 1.0, "energy_per_prompt": 20.0}}
    with pytest.raises(ConfigError, match="not both"):
        Problem.from_dict(both)
