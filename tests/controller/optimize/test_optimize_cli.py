"""``moe2ctl optimize --problem FILE``: the fixed JSON output, the table, the exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from optimize_cases import random_problem, ref_feasible, ref_objective, ref_optimum

from moe2.controller.cli import main
from moe2.controller.optimize import Problem, Solution, solve
from moe2.controller.optimize.synthetic import synthetic_problem
from moe2.controller.options import EXIT_INFEASIBLE

SOLVED_KEYS = [
    "subset",
    "objective",
    "delay",
    "energy",
    "feasible",
    "optimal",
    "stats",
    "provenance",
]


def _write(tmp_path: Path, pr: Problem, name: str = "problem.json") -> Path:
    path = tmp_path / name
    pr.to_file(path)
    return path


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["optimize", *args])
    return result.exit_code, result.output


@pytest.fixture
def problem() -> Problem:
    return synthetic_problem(10, n_samples=40, seed=11)


def test_json_output_has_the_fixed_format(tmp_path: Path, problem: Problem) -> None:
    code, out = _run("--problem", str(_write(tmp_path, problem)), "--json")
    assert code == 0, out
    data = json.loads(out)
    assert list(data) == SOLVED_KEYS
    assert data["feasible"] is True and data["optimal"] is True
    names = list(problem.experts)
    indices = [names.index(e) for e in data["subset"]]
    assert indices == sorted(indices)
    assert data["objective"] == pytest.approx(ref_objective(problem, indices), rel=1e-9)
    assert data["objective"] == pytest.approx(ref_optimum(problem)[0], rel=1e-9)
    assert ref_feasible(problem, indices)
    assert set(data["delay"]) == set(problem.app)
    assert all(isinstance(v, float) for v in data["delay"].values())
    assert isinstance(data["energy"], float)
    stats = data["stats"]
    assert stats["solver"] == "smo" and stats["gap"] == 0.0
    assert {"nodes", "evaluated", "time_s", "lower_bound"} <= set(stats)


@pytest.mark.parametrize("solver", ["smo", "brute", "greedy", "random"])
def test_every_solver_answers_in_the_same_format(
    tmp_path: Path, problem: Problem, solver: str
) -> None:
    code, out = _run("--problem", str(_write(tmp_path, problem)), "--json", "--solver", solver)
    assert code == 0, out
    data = json.loads(out)
    assert list(data) == SOLVED_KEYS and data["stats"]["solver"] == solver
    assert data["optimal"] is (solver in ("smo", "brute"))


def test_epsilon_and_time_limit_flags(tmp_path: Path) -> None:
    path = _write(tmp_path, synthetic_problem(14, n_samples=40, seed=2))
    code, out = _run("--problem", str(path), "--json", "--epsilon", "0.2", "--time-limit", "30")
    assert code == 0, out
    data = json.loads(out)
    assert data["stats"]["epsilon"] == 0.2
    assert data["optimal"] is (data["stats"]["gap"] == 0.0)
    assert data["stats"]["gap"] <= 0.2


def test_epsilon_flag_overrides_the_file(tmp_path: Path, problem: Problem) -> None:
    data = problem.to_dict()
    data["epsilon"] = 0.5
    path = tmp_path / "eps.json"
    path.write_text(json.dumps(data))
    _, out = _run("--problem", str(path), "--json")
    assert json.loads(out)["stats"]["epsilon"] == 0.5
    _, out = _run("--problem", str(path), "--json", "--epsilon", "0")
    assert json.loads(out)["stats"]["epsilon"] == 0.0 and json.loads(out)["optimal"] is True


def test_table_shows_subset_objective_limits_and_stats(tmp_path: Path, problem: Problem) -> None:
    code, out = _run("--problem", str(_write(tmp_path, problem)))
    assert code == 0, out
    result = solve(problem)
    assert isinstance(result, Solution)
    assert f"subset      {', '.join(result.subset)}" in out
    assert f"objective   {result.objective:.6f} nats per sample (optimal)" in out
    for app, limit in problem.delay_limits.items():
        assert f"delay {app!r}" in out and f"{limit:.4g} s" in out
    assert f"{problem.energy_limit:.4g} J" in out
    assert "solver smo" in out and "nodes" in out


def test_infeasible_exits_3_with_the_reason(tmp_path: Path) -> None:
    pr = synthetic_problem(6, n_samples=20, seed=1, energy_fraction=0.001)
    path = _write(tmp_path, pr)
    code, out = _run("--problem", str(path), "--json")
    assert code == EXIT_INFEASIBLE
    data = json.loads(out)
    assert list(data) == ["feasible", "reason", "provenance"] and data["feasible"] is False
    assert data["reason"].startswith("energy is at least") and "over the limit" in data["reason"]
    code, out = _run("--problem", str(path))
    assert code == EXIT_INFEASIBLE and out.startswith("infeasible: energy is at least")


@pytest.mark.parametrize("seed", range(8))
def test_random_files_agree_with_the_reference(tmp_path: Path, seed: int) -> None:
    pr = random_problem(seed, n=7)
    code, out = _run("--problem", str(_write(tmp_path, pr)), "--json")
    data = json.loads(out)
    best, _ = ref_optimum(pr)
    if best == float("inf"):
        assert code == EXIT_INFEASIBLE and data["feasible"] is False
    else:
        assert code == 0 and data["objective"] == pytest.approx(best, rel=1e-9)


def test_bad_file_exits_2_naming_the_field(tmp_path: Path, problem: Problem) -> None:
    data = problem.to_dict()
    data["delay"][3][1] = -1.0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    code, out = _run("--problem", str(path), "--json")
    assert code == 2
    assert "delay[3][1] = -1 is negative" in out
    code, out = _run("--problem", str(tmp_path / "missing.json"))
    assert code == 2 and "cannot read problem file" in out


def test_missing_problem_is_a_usage_error() -> None:
    code, out = _run("--json")
    assert code == 2 and "--problem FILE" in out


def test_brute_force_on_too_many_experts_fails_clearly(tmp_path: Path) -> None:
    pr = synthetic_problem(23, n_samples=8, seed=0)
    code, out = _run("--problem", str(_write(tmp_path, pr)), "--solver", "brute")
    assert code == 1 and "refuses N = 23 experts" in out


def test_the_real_command(tmp_path: Path, problem: Problem) -> None:
    # The installed entry point when there is one, else the same `main` in a fresh process.
    script = Path(sys.executable).with_name("moe2ctl")
    cmd = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "from moe2.controller.cli import main; main()"]
    )
    path = _write(tmp_path, problem)
    done = subprocess.run(
        [*cmd, "optimize", "--problem", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert list(data) == SOLVED_KEYS and data["optimal"] is True
    infeasible = _write(tmp_path, synthetic_problem(6, n_samples=20, energy_fraction=0.001), "x")
    done = subprocess.run(
        [*cmd, "optimize", "--problem", str(infeasible), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == EXIT_INFEASIBLE
    assert json.loads(done.stdout)["feasible"] is False
