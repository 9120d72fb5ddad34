"""``moe2ctl eval`` on the tiny fleet: four domain experts (scores of real llama.cpp runs,
modelled profiles of a Table I-like placement), a gate trained with a held-out test split.
MoE² beats the best single expert and majority voting; in every cell of a small grid MoE² ≥
SMO M. V. ≥ Rand. M. V. within the stated spread; the table and the JSON agree; the PNG is
valid; the user's own JSONL questions are scored through the live fleet and evaluated."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image
from tinyfleet import PLACEMENT, register_experts, score_directly

from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend
from moe2.controller import datasets as ds
from moe2.controller.cli import main
from moe2.controller.gate.cli import train_gate
from moe2.controller.gate.config import TrainConfig
from moe2.controller.registry import Registry
from moe2.shared.mqtt import BrokerConfig

DOMAINS = ("animals", "code", "cooking", "arithmetic")
# A small grid over the modelled costs of PLACEMENT (seconds and joules per step): the
# fastest expert alone takes ~3 ms and 1.2 J, the slowest ~21 ms; all four ~5.3 J.
DELAYS = "0.012,0.03"
ENERGIES = "1,2,4,none"


@pytest.fixture(scope="module")
def fleet(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("eval")
    old = os.environ.get("MOE2_DATA_DIR")
    os.environ["MOE2_DATA_DIR"] = str(tmp / "data")
    url = f"sqlite:///{tmp / 'registry.db'}"
    reg = Registry.open(url)
    ids = {d: f"{d}-{uuid.uuid4().hex[:6]}" for d in DOMAINS}
    backends = {
        ids[d]: LlamaCppBackend(AgentConfig(model=tiny_models[d], n_threads=1)) for d in DOMAINS
    }
    reg.add_dataset("tiny-mc", ds.CHOICE, "tiny", ds.tiny_domains(DOMAINS, 75, 1, choices=4))
    score_directly(reg, "tiny-mc", backends)
    register_experts(
        reg,
        {ids[d]: backends[ids[d]].info for d in DOMAINS},
        {ids[d]: PLACEMENT[d] for d in DOMAINS},
    )
    row, _ = train_gate(reg, "tiny-mc", None, TrainConfig(), version="g-eval")
    for b in backends.values():
        b.close()
    reg.close()
    yield {"url": url, "ids": ids, "gate": row.version, "tmp": tmp, "models": tiny_models}
    if old is None:
        os.environ.pop("MOE2_DATA_DIR", None)
    else:
        os.environ["MOE2_DATA_DIR"] = old


def _eval(fleet: dict[str, Any], *args: str) -> tuple[int, str]:
    run = CliRunner().invoke(main, ["eval", "--db", fleet["url"], *args])
    return run.exit_code, run.output


def _json(output: str) -> dict[str, Any]:
    return dict(json.loads(output.strip().splitlines()[-1]))


def _at_least(a: dict[str, Any], b: dict[str, Any], z: float = 2.0) -> bool:
    # a's accuracy is not below b's by more than z combined spreads (1σ each)
    margin = z * math.hypot(a["spread"] or 0.0, b["spread"] or 0.0)
    return bool(a["accuracy"] >= b["accuracy"] - margin)


def test_moe2_beats_the_best_single_expert_and_majority_voting(fleet: dict[str, Any]) -> None:
    code, out = _eval(fleet, "--no-plot", "--json")
    assert code == 0, out
    data = _json(out)
    assert data["test"]["questions"] == 60  # the gate's 20% test split of 300
    assert data["selection"]["samples"] == 240
    assert data["provenance"]["gate"] == {
        "version": "g-eval",
        "datasets": ["tiny-mc"],
        "source": "torch",
    }
    assert data["provenance"]["cost_basis"] == "modelled"
    base = data["baselines"]
    singles = [m for k, m in base.items() if k.startswith("alone:")]
    best = max(singles, key=lambda m: m["accuracy"])
    for moe2 in (base["moe2_all"], data["cells"][0]["methods"]["moe2"]):
        assert moe2["accuracy"] - 2 * moe2["spread"] > best["accuracy"] + 2 * best["spread"]
        assert (
            moe2["accuracy"] - 2 * moe2["spread"]
            > base["vote_all"]["accuracy"] + 2 * (base["vote_all"]["spread"])
        )
    assert base["average"]["accuracy"] == pytest.approx(
        sum(m["accuracy"] for m in singles) / len(singles)
    )


@pytest.fixture(scope="module")
def grid_run(fleet: dict[str, Any]) -> dict[str, Any]:
    tmp = fleet["tmp"]
    md, png = tmp / "eval.md", tmp / "eval.png"
    code, out = _eval(
        fleet,
        "--delay",
        DELAYS,
        "--energy",
        ENERGIES,
        "--seeds",
        "5",
        "--plot",
        str(png),
        "--markdown",
        str(md),
        "--json",
    )
    assert code == 0, out
    return {"json": _json(out), "markdown": md.read_text(), "png": png}


def test_in_every_cell_moe2_then_smo_vote_then_random_vote(grid_run: dict[str, Any]) -> None:
    cells = grid_run["json"]["cells"]
    assert len(cells) == 8
    feasible = [c for c in cells if c["feasible"]]
    assert len(feasible) >= 6, [c["reason"] for c in cells if not c["feasible"]]
    for c in feasible:
        m = c["methods"]
        where = (c["delay_limit"], c["energy_limit"])
        assert _at_least(m["moe2"], m["smo_mv"]), (where, m)
        assert _at_least(m["smo_mv"], m["random_mv"]), (where, m)
        # the subset SMO chose meets the limits on the selection samples; the answers on the
        # held-out questions cost what the profiles say, shown against the same limits
        assert m["moe2"]["costs"]["basis"] == "profiles (modelled)"
        assert m["moe2"]["within_limits"] in (True, False)
    for c in cells:
        if not c["feasible"]:
            assert "1 J" in c["reason"] or "0.012" in c["reason"]


def test_the_table_and_the_json_agree(grid_run: dict[str, Any]) -> None:
    data, md = grid_run["json"], grid_run["markdown"]
    for key, m in data["baselines"].items():
        row = re.search(rf"^\| {re.escape(m['label'])} \| ([0-9.]+) \| ([0-9.]*) \|", md, re.M)
        assert row, key
        assert float(row.group(1)) == round(100 * m["accuracy"], 1)
        if m["spread"] is not None:
            assert float(row.group(2)) == round(100 * m["spread"], 1)
    for delay in data["grid"]["delay"]:
        shown = "none" if delay is None else f"{delay:g} s"
        section = md.split(f"τ_max = {shown} per step")[1].split("###")[0]
        cells = [c for c in data["cells"] if c["delay_limit"] == delay]
        for key in ("moe2", "smo_mv", "random_mv"):
            label = cells[0]["methods"][key]["label"] if cells[0]["feasible"] else None
            label = (
                label or {"moe2": "MoE²", "smo_mv": "SMO M. V.", "random_mv": "Rand. M. V."}[key]
            )
            row = re.search(rf"^\| {re.escape(label)} \| (.*) \|$", section, re.M)
            assert row, (delay, key)
            texts = [t.strip() for t in row.group(1).split(" | ")]
            assert len(texts) == len(cells)
            for text, c in zip(texts, cells, strict=True):
                if not c["feasible"]:
                    assert text == "infeasible"
                    continue
                m = c["methods"][key]
                acc, spread, delay_s, energy = re.match(
                    r"([0-9.]+) ± ([0-9.]+) \(≈([0-9.e-]+) s, ≈([0-9.e-]+) J(, over)?\)", text
                ).groups()[:4]  # type: ignore[union-attr]
                assert float(acc) == round(100 * m["accuracy"], 1)
                assert float(spread) == round(100 * m["spread"], 1)
                assert delay_s == f"{m['costs']['delay']:.3g}"
                assert energy == f"{m['costs']['energy']:.3g}"
                assert text.endswith(", over)") == (m["within_limits"] is False)


def test_the_plot_is_a_valid_png(grid_run: dict[str, Any]) -> None:
    assert grid_run["json"]["plot"] == str(grid_run["png"])
    with Image.open(grid_run["png"]) as img:
        assert img.format == "PNG" and img.size == (800, 500)
        img.verify()


def test_provenance_of_optimize_names_the_gate_and_the_cost_sources(
    fleet: dict[str, Any],
) -> None:
    with socket.socket() as s:  # a port where no broker listens: the registry's state is used
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    apps = [f"--app={d}=0.03" for d in DOMAINS]
    run = CliRunner().invoke(
        main,
        [
            "optimize",
            "--db",
            fleet["url"],
            "--dataset",
            "tiny-mc",
            *apps,
            "--energy",
            "4",
            "--broker-port",
            str(port),
            "--json",
        ],
    )
    assert run.exit_code == 0, run.output
    out = _json(run.output)
    assert out["provenance"]["gate"] == {
        "version": "g-eval",
        "datasets": ["tiny-mc"],
        "source": "torch",
    }
    # no gateway has run this gate: the promise goes without its delay, and says so
    assert out["provenance"]["gate_delay"]["seconds"] == 0.0
    assert "not measured" in out["provenance"]["gate_delay"]["source"]
    costs = out["provenance"]["costs"]
    assert set(costs) == set(fleet["ids"].values())
    for d, expert in fleet["ids"].items():
        assert costs[expert]["delay"] == costs[expert]["energy"] == "modelled"
        assert costs[expert]["device_class"] == PLACEMENT[d][0]
    table = CliRunner().invoke(
        main,
        [
            "optimize",
            "--db",
            fleet["url"],
            "--dataset",
            "tiny-mc",
            *apps,
            "--energy",
            "4",
            "--broker-port",
            str(port),
        ],
    )
    assert "gate        g-eval (trained on tiny-mc; weights via torch)" in table.output
    assert "costs       modelled figures:" in table.output


def test_a_missing_gate_is_an_error_unless_uniform_is_asked_for(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'nogate.db'}"
    reg = Registry.open(fleet["url"])
    table = reg.score_table("tiny-mc")
    agents = reg.agents()
    reg.close()
    fresh = Registry.open(url)
    samples = [ds.Sample(s.app, s.prompt, tuple(s.targets), s.answer) for s in table.samples]
    fresh.add_dataset("tiny-mc", ds.CHOICE, "copy", samples)
    src = Registry.open(fleet["url"])
    rows = []
    for new, old in zip(fresh.samples("tiny-mc"), table.samples, strict=True):
        for e in table.experts:
            for o in range(len(old.targets)):
                rows.append(
                    {
                        "sample_id": new.id,
                        "expert": e,
                        "option": o,
                        "tokenizer_hash": next(iter(table.tokenizers[0][0])),
                        "tokens": [0],
                        "prompt_tokens": 5,
                        "logprobs": [
                            float(x) for x in table.logp[old.idx][o][table.experts.index(e)]
                        ],
                    }
                )
    src.close()
    fresh.add_scores(rows)
    for a in agents:
        fresh.upsert_agent_info(json_info(a))
        fresh.set_agent_state(a.id, "online")
        fresh.set_agent_profile(json_profile(a))
    fresh.close()
    code, out = _eval({"url": url}, "tiny-mc", "--no-plot")
    assert code == 1 and "no gate trained yet" in out and "--gate uniform" in out
    code, out = _eval({"url": url}, "tiny-mc", "--gate", "uniform", "--no-plot", "--json")
    assert code == 0, out
    data = _json(out)
    assert data["provenance"]["gate"]["source"] == "uniform"
    assert data["test"]["questions"] == 60


def json_info(agent: Any) -> Any:
    from moe2.shared import protocol as p

    return p.AgentInfo.model_validate_json(agent.info_json)


def json_profile(agent: Any) -> Any:
    from moe2.shared import protocol as p

    return p.decode_message(p.AgentProfile, agent.profile_json.encode())


def test_the_users_own_questions_are_scored_by_the_fleet_and_evaluated(
    fleet: dict[str, Any], start_agent: Any, broker_config: BrokerConfig, tmp_path: Path
) -> None:
    for d, agent_id in fleet["ids"].items():
        start_agent(fleet["models"][d], agent_id, "--no-profile-on-start")
    questions = tmp_path / "mine.jsonl"
    with questions.open("w") as f:
        for s in ds.tiny_domains(DOMAINS, 8, seed=9, choices=4):
            f.write(
                json.dumps(
                    {
                        "question": s.prompt,
                        "choices": [t.strip() for t in s.targets],
                        "answer": s.answer,
                        "subject": s.app,
                    }
                )
                + "\n"
            )
    code, out = _eval(
        fleet,
        "--jsonl",
        str(questions),
        "--prompt-format",
        "{question}",
        "--option-format",
        " {choice}",
        "--broker-port",
        str(broker_config.port),
        "--no-plot",
        "--json",
    )
    assert code == 0, out
    data = _json(out)
    assert data["dataset"].startswith("jsonl-mine-")
    # the tiny domains' short prompts recur across seeds: those the gate trained on are dropped
    dropped = re.search(r"minus (\d+) prompt", data["test"]["held_out"])
    assert dropped and data["test"]["questions"] + int(dropped.group(1)) == 32
    assert data["test"]["questions"] >= 8
    example = data["example"]
    assert not example["prompt"].startswith("Question:") and example["options"][0].startswith(" ")
    base = data["baselines"]
    best = max(m["accuracy"] for k, m in base.items() if k.startswith("alone:"))
    assert base["moe2_all"]["accuracy"] > best + 0.3
    # a second run finds the scores stored and needs no fleet
    code, again = _eval(
        fleet,
        "--jsonl",
        str(questions),
        "--prompt-format",
        "{question}",
        "--option-format",
        " {choice}",
        "--broker-port",
        "1",
        "--no-plot",
        "--json",
    )
    assert code == 0, again
    assert _json(again)["baselines"] == base
