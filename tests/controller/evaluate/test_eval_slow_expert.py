"""``moe2ctl eval --jsonl`` scores the user's questions itself: with an expert ten times
slower than its profile says, that scoring adapts (requests that time out are retried
smaller) and the evaluation completes, with default flags."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from slowexpert import claim_faster, long_questions, start_profiled

from moe2.controller.cli import main
from moe2.controller.localfleet import LocalFleet
from moe2.shared.mqtt import BrokerConfig


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    old = os.environ.get("MOE2_DATA_DIR")
    os.environ["MOE2_DATA_DIR"] = str(tmp_path / "data")
    yield tmp_path / "data"
    if old is None:
        os.environ.pop("MOE2_DATA_DIR", None)
    else:
        os.environ["MOE2_DATA_DIR"] = old


def test_eval_of_a_jsonl_file_completes_with_an_expert_slower_than_its_profile(
    broker_config: BrokerConfig, tiny_models: dict[str, Path], tmp_path: Path, data_dir: Path
) -> None:
    slow, fast = f"slow-{uuid.uuid4().hex[:6]}", f"fast-{uuid.uuid4().hex[:6]}"
    questions = tmp_path / "long.jsonl"
    with questions.open("w") as f:
        for s in long_questions(240, seed=11):
            line = {"question": s.prompt, "choices": [t.strip() for t in s.targets]}
            f.write(json.dumps(line | {"answer": s.answer, "subject": s.app}) + "\n")
    with LocalFleet(broker_config, tmp_path / "fleet") as fleet:
        start_profiled(fleet, slow, tiny_models["animals"])
        start_profiled(fleet, fast, tiny_models["cooking"])
        claim_faster(broker_config, slow, 10.0)
        run = CliRunner().invoke(
            main,
            [
                "eval",
                "--db",
                f"sqlite:///{tmp_path / 'registry.db'}",
                "--jsonl",
                str(questions),
                "--prompt-format",
                "{question}",
                "--option-format",
                " {choice}",
                "--gate",
                "uniform",
                "--experts",
                f"{slow},{fast}",
                "--broker-host",
                broker_config.host,
                "--broker-port",
                str(broker_config.port),
                "--no-plot",
                "--json",
            ],
        )
    assert run.exit_code == 0, run.output[-3000:]
    data = json.loads(run.output.strip().splitlines()[-1])
    assert data["test"]["questions"] > 0
    assert {f"alone:{slow}", f"alone:{fast}"} <= set(data["baselines"])
