"""`moe2ctl optimize` from the registry: real agents (profiles, scores), the problem file it
writes replays to the same answer, and --push reaches a gateway, recorded in the registry."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from moe2.controller import datasets as ds
from moe2.controller.cli import main
from moe2.controller.collect import CollectSettings, collect
from moe2.controller.localfleet import LocalFleet
from moe2.controller.options import EXIT_INFEASIBLE
from moe2.controller.registry import Registry
from moe2.controller.registry.sync import online_experts, sync_once
from moe2.shared.mqtt import BrokerConfig, RpcClient

DOMAINS = ("animals", "cooking")


def test_optimize_from_the_registry_writes_a_replayable_problem_and_pushes(
    broker_config: BrokerConfig,
    tiny_models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MOE2_DATA_DIR", str(tmp_path))  # problem files go to its problems/
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    ids = {d: f"{d[:3]}-{uuid.uuid4().hex[:6]}" for d in DOMAINS}
    gw = f"gw-{uuid.uuid4().hex[:6]}"
    with LocalFleet(broker_config, tmp_path / "fleet") as fleet:
        for d, agent_id in ids.items():
            fleet.start(agent_id, tiny_models[d], "--n-threads", "1")
        fleet.start(
            gw,
            tiny_models["code"],
            "--n-threads",
            "1",
            "--no-profile-on-start",
            "--gateway-enabled",
        )
        fleet.wait_online([*ids.values(), gw], 60)
        reg = Registry.open(url)
        reg.add_dataset(
            "opt", "multiple-choice", "tiny", ds.tiny_domains(DOMAINS, 8, seed=5, choices=2)
        )
        # profiles are published once the start-up profiling ends
        for _ in range(20):
            sync_once(reg, broker_config, 1.0)
            if all(a.profile_json for a in reg.agents() if a.id in ids.values()):
                break
        online = {k: v for k, v in online_experts(reg).items() if k in ids.values()}
        with RpcClient(broker_config, timeout=30) as rpc:
            report = collect(reg, rpc, "opt", online, CollectSettings())
        assert not report.failed
        reg.close()

        flags = ["--db", url, "--broker-port", str(broker_config.port)]
        run = CliRunner().invoke(
            main,
            [
                "optimize",
                "--dataset",
                "opt",
                "--app",
                "animals=30",
                "--app",
                "cooking=30",
                "--energy",
                "1000",
                "--k",
                "1",
                "--gate",
                "uniform",
                "--push",
                "--json",
                *flags,
            ],
        )
        assert run.exit_code == 0, run.output
        out = json.loads(run.output.strip().splitlines()[-1])
        assert set(out) == {
            "subset",
            "objective",
            "delay",
            "energy",
            "feasible",
            "optimal",
            "stats",
            "pushed",
            "provenance",
        }
        assert all(r["accepted"] == [gw] for r in out["pushed"]), out["pushed"]
        assert out["feasible"] and set(out["subset"]) <= set(ids.values()) and out["subset"]

        problems = sorted((tmp_path / "problems").glob("problem-*-opt.json"))
        assert len(problems) == 1
        replay = CliRunner().invoke(main, ["optimize", "--problem", str(problems[0]), "--json"])
        again = json.loads(replay.output)
        assert again["subset"] == out["subset"]
        assert abs(again["objective"] - out["objective"]) < 1e-9

        reg = Registry.open(url)
        for app in DOMAINS:
            assert gw in {a.gateway for a in reg.assignment_acks(app)}
        versions = {app: len(reg.assignments(app)) for app in DOMAINS}
        reg.close()

        # A heuristic proves no gap: its answer is shown, never silently pushed.
        base = ["optimize", "--dataset", "opt", "--app", "animals=30", "--app", "cooking=30",
                "--gate", "uniform", *flags]  # fmt: skip
        refused = CliRunner().invoke(main, [*base, "--solver", "greedy", "--push"])
        assert refused.exit_code == 1 and "not pushed" in refused.output, refused.output
        reg = Registry.open(url)
        assert {app: len(reg.assignments(app)) for app in DOMAINS} == versions
        reg.close()
        allowed = CliRunner().invoke(
            main, [*base, "--solver", "greedy", "--push", "--max-gap", "inf", "--json"]
        )
        assert allowed.exit_code == 0, allowed.output

        # A subset per application, each pushed to its own application.
        by_app = CliRunner().invoke(main, [*base, "--by-app", "--push", "--json"])
        assert by_app.exit_code == 0, by_app.output
        got = json.loads(by_app.output.strip().splitlines()[-1])
        assert got["optimal"] and set(got["by_app"]) == set(DOMAINS)
        pushed_subsets = {r["app"]: r["subset"] for r in got["pushed"]}
        assert pushed_subsets == {a: got["by_app"][a]["subset"] for a in DOMAINS}

        infeasible = CliRunner().invoke(
            main,
            [
                "optimize",
                "--dataset",
                "opt",
                "--app",
                "animals=0.000001",
                "--gate",
                "uniform",
                "--json",
                *flags,
            ],
        )
        assert infeasible.exit_code == EXIT_INFEASIBLE, infeasible.output
        assert "animals" in json.loads(infeasible.output.strip().splitlines()[-1])["reason"]
