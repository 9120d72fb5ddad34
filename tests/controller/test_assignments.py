"""Pushed assignments change which experts answer, and reach gateways that join later."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from moe2.controller.assignments import push_assignment
from moe2.controller.cli import main
from moe2.controller.localfleet import LocalFleet
from moe2.shared.client import PromptClient
from moe2.shared.mqtt import BrokerConfig


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def fleet(broker_config: BrokerConfig, tmp_path: Path) -> Any:
    with LocalFleet(broker_config, tmp_path / "fleet") as f:
        yield f


def start(fleet: LocalFleet, model: Path, agent_id: str, *flags: str) -> str:
    fleet.start(agent_id, model, "--n-threads", "1", "--no-profile-on-start", *flags)
    fleet.wait_online([agent_id], 60)
    return agent_id


def test_a_pushed_assignment_changes_which_experts_answer(
    fleet: LocalFleet, broker_config: BrokerConfig, tiny_models: dict[str, Path]
) -> None:
    app = uid("app")
    a = start(fleet, tiny_models["animals"], uid("a"))
    c = start(fleet, tiny_models["code"], uid("c"))
    gw = start(fleet, tiny_models["animals"], uid("gw"), "--serve-app", f"{app}={a}:1")
    with PromptClient(broker_config) as client:
        assert [e.id for e in client.ask(app, "the fox eats", max_tokens=4).experts] == [a]
        assignment, acks = push_assignment(broker_config, app, [c], 1, expect_gateways=1)
        assert assignment.version == 1
        assert set(acks) == {gw} and acks[gw].accepted
        assert [e.id for e in client.ask(app, "the fox eats", max_tokens=4).experts] == [c]
        # a second push is the next version; a gateway that starts now gets it retained
        second, _ = push_assignment(broker_config, app, [a, c], 2, wait_s=0.5)
        assert second.version == 2
        fleet.stop(gw)
        start(fleet, tiny_models["code"], uid("gw2"), "--gateway-enabled")  # no local apps
        answer = client.ask(app, "the fox eats", max_tokens=4)
        assert {e.id for e in answer.experts} == {a, c}


def test_push_command_validates_and_reports(broker_config: BrokerConfig) -> None:
    runner = CliRunner()
    flags = ["--broker-port", str(broker_config.port)]
    bad = runner.invoke(main, ["push", "--app", "qa", "--subset", "x,y", "--k", "3", *flags])
    assert bad.exit_code != 0 and "k=3 exceeds" in bad.output
    bad = runner.invoke(main, ["push", "--app", "q/a", "--subset", "x", *flags])
    assert bad.exit_code != 0 and "invalid application" in bad.output
    ok = runner.invoke(main, ["push", "--app", uid("qa"), "--subset", "x", "--wait", "0.2",
                              "--json", *flags])
    assert ok.exit_code == 0, ok.output
    assert '"version": 1' in ok.output
