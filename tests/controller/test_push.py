"""Pushed assignments: versions from one source, every answer reported, effects visible."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from moe2.controller.cli import main
from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.client import PromptClient
from moe2.shared.desired import DesiredState
from moe2.shared.errors import ConfigError
from moe2.shared.mqtt import BrokerConfig, Connection


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
        with DesiredState(broker_config) as desired:
            first = desired.push_assignment(app, [c], 1)
        assert first.assignment.version == 1
        assert gw in first.accepted and gw in first.expected and not first.rejected
        assert first.acks[gw].serving
        assert [e.id for e in client.ask(app, "the fox eats", max_tokens=4).experts] == [c]
        # a second push is the next version; a gateway that starts now gets it retained
        with DesiredState(broker_config) as desired:
            second = desired.push_assignment(app, [a, c], 2, wait_s=5)
        assert second.assignment.version == 2 and gw in second.accepted
        fleet.stop(gw)
        gw2 = start(fleet, tiny_models["code"], uid("gw2"), "--gateway-enabled")  # no local apps
        with DesiredState(broker_config) as desired:  # a gateway announces after subscribing
            assert desired.view.wait(
                lambda s: (g := s.gateway.get(gw2)) is not None and g.apps.get(app) == 2, 60
            ), desired.view.copy().gateway.get(gw2)
        answer = client.ask(app, "the fox eats", max_tokens=4)
        assert {e.id for e in answer.experts} == {a, c}


def test_gateways_reject_stale_and_forged_versions_with_a_reason(
    fleet: LocalFleet, broker_config: BrokerConfig, tiny_models: dict[str, Path]
) -> None:
    app = uid("app")
    a = start(fleet, tiny_models["animals"], uid("a"))
    gw = start(fleet, tiny_models["animals"], uid("gw"), "--serve-app", f"{app}={a}:1")
    with DesiredState(broker_config) as desired:
        assert desired.push_assignment(app, [a], 1).accepted == [gw]
        assert desired.push_assignment(app, [a], 1).accepted == [gw]
        v = desired.view.latest_version(app)
    assert v == 2
    # An older version published behind the publisher's back: rejected, and says why.
    stale = p.AppAssignment(app=app, version=v - 1, subset=[a], k=1)
    acks: list[p.AssignmentAck] = []
    with Connection(broker_config, uid("x")) as conn:
        conn.subscribe(
            p.topics.assignment_ack(gw, app),
            lambda m: acks.append(p.decode_message(p.AssignmentAck, m.payload)),
        )
        conn.publish_acked(p.topics.desired_app(app), p.encode(stale))
        deadline = time.monotonic() + 10
        while not any(x.version == stale.version for x in acks):
            assert time.monotonic() < deadline, acks
            time.sleep(0.05)
    rejected = [x for x in acks if x.version == stale.version][-1]
    assert not rejected.accepted and rejected.code == "stale_version", rejected
    assert "stale version" in (rejected.reason or "")
    assert rejected.current == v
    # The next push still goes above what the gateway serves, and is accepted.
    with DesiredState(broker_config) as desired:
        result = desired.push_assignment(app, [a], 1)
    assert result.accepted == [gw] and result.assignment.version > v


def test_push_command_validates_and_reports(broker_config: BrokerConfig, tmp_path: Path) -> None:
    runner = CliRunner()
    flags = ["--broker-port", str(broker_config.port), "--db", f"sqlite:///{tmp_path}/r.db"]
    bad = runner.invoke(main, ["push", "--app", "qa", "--subset", "x,y", "--k", "3", *flags])
    assert bad.exit_code == 2 and "k=3 exceeds" in bad.output
    bad = runner.invoke(main, ["push", "--app", "q/a", "--subset", "x", *flags])
    assert bad.exit_code != 0 and "invalid application" in bad.output


def announce(cfg: BrokerConfig, agent_id: str) -> None:
    """A retained info of an expert (offline): known to the fleet, as a stopped agent is."""
    info = p.AgentInfo(
        agent_id=agent_id,
        model="m",
        model_file="m.gguf",
        architecture="llama",
        quantization="F32",
        n_ctx=64,
        n_vocab=10,
        tokenizer_hash="ab" * 32,
        eos_ids=[2],
        add_bos=False,
        device_class="cpu-generic",
        software_version="test",
        max_sessions=1,
        started_at=time.time(),
    )
    with Connection(cfg, uid("announce")) as conn:
        conn.publish_acked(p.topics.agent_info(agent_id), p.encode(info), retain=True)


def test_push_with_no_gateway_online_exits_4_and_says_so(broker: Any, tmp_path: Path) -> None:
    # A broker of its own: no gateway of another test may answer.
    from moe2.shared.broker import start_broker

    with start_broker("mosquitto") as alone:
        announce(BrokerConfig(port=alone.port), "x")
        flags = ["--broker-port", str(alone.port), "--db", f"sqlite:///{tmp_path}/r.db"]
        run = CliRunner().invoke(
            main, ["push", "--app", "qa", "--subset", "x", "--wait", "0.2", "--json", *flags]
        )
    assert run.exit_code == 4, run.output
    out = json.loads(run.output.splitlines()[0])
    assert out["pushed"][0]["version"] == 1 and out["pushed"][0]["accepted"] == []
    assert "no gateway accepted" in run.output


def test_moe2ctl_signs_pushes_with_the_fleet_key_and_reverts(
    fleet: LocalFleet,
    broker_config: BrokerConfig,
    tiny_models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: Any,
) -> None:
    """Defect 6 through the CLI: ``moe2ctl keys generate`` makes the fleet key; ``push`` signs
    with it (a gateway trusting the key accepts), ``push --revert`` sends the app back to
    the gateway's local configuration as a signed version; without the key the same gateway
    rejects the push, saying why."""
    monkeypatch.setenv("MOE2_DATA_DIR", str(tmp_path / "data"))
    runner = CliRunner()
    made = runner.invoke(main, ["keys", "generate", "--json"])
    assert made.exit_code == 0, made.output
    keys = json.loads(made.output)
    assert (Path(keys["private_key"]).stat().st_mode & 0o777) == 0o600
    conf = tmp_path / "gw.toml"
    conf.write_text(f'[gateway]\ntrusted_keys = ["{keys["public_key"]}"]\n')
    app = uid("app")
    a = start(fleet, tiny_models["animals"], uid("a"))
    c = start(fleet, tiny_models["code"], uid("c"))
    gw = start(
        fleet,
        tiny_models["animals"],
        uid("gw"),
        "--config",
        str(conf),
        "--serve-app",
        f"{app}={a}:1",
    )
    flags = ["--broker-host", broker_config.host, "--broker-port", str(broker_config.port)]
    pushed = runner.invoke(main, ["push", "--app", app, "--subset", c, "--json", *flags])
    assert pushed.exit_code == 0, pushed.output
    out = json.loads(pushed.output)["pushed"][0]
    assert out["signed"] and out["accepted"] == [gw], out
    with PromptClient(broker_config) as client:
        assert [e.id for e in client.ask(app, "the fox", max_tokens=2).experts] == [c]
        reverted = runner.invoke(main, ["push", "--app", app, "--revert", "--json", *flags])
        assert reverted.exit_code == 0, reverted.output
        back = json.loads(reverted.output)["pushed"][0]
        assert back["revert"] and back["signed"] and back["accepted"] == [gw], back
        assert [e.id for e in client.ask(app, "the fox", max_tokens=2).experts] == [a]
    monkeypatch.setenv("MOE2_DATA_DIR", str(tmp_path / "nokey"))  # no fleet key there
    unsigned = runner.invoke(main, ["push", "--app", app, "--subset", c, "--json", *flags])
    assert unsigned.exit_code == 4, unsigned.output  # published, accepted by nobody
    body = json.loads(unsigned.output.splitlines()[0])["pushed"][0]
    assert not body["signed"] and "bad signature" in body["rejected"][gw], body


def test_push_of_an_unknown_expert_is_refused_and_publishes_nothing(
    fleet: LocalFleet, broker_config: BrokerConfig, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A typo in --subset would take the application down (every prompt no_experts): it is
    refused before anything is published, and the application keeps being served."""
    app = uid("app")
    a = start(fleet, tiny_models["animals"], uid("a"))
    gw = start(fleet, tiny_models["animals"], uid("gw"), "--serve-app", f"{app}={a}:1")
    flags = ["--broker-port", str(broker_config.port), "--db", f"sqlite:///{tmp_path}/r.db"]
    runner = CliRunner()
    bad = runner.invoke(
        main, ["push", "--app", app, "--subset", "nosuch1,nosuch2", "--k", "2", *flags]
    )
    assert bad.exit_code == 2, bad.output
    assert "nosuch1" in bad.output and "nothing was published" in bad.output
    half = runner.invoke(main, ["push", "--app", app, "--subset", f"{a},nosuch1", *flags])
    assert (
        half.exit_code == 2 and "nosuch1" in half.output and a not in half.output.split("(known")[0]
    )
    from moe2.shared.fleet import FleetView

    state = FleetView.snapshot(broker_config, ("desired_app", "assignment_ack"), 3.0)
    assert app not in state.desired_app and (gw, app) not in state.assignment_ack
    with PromptClient(broker_config) as client:  # still served from its configuration
        assert [e.id for e in client.ask(app, "the fox eats", max_tokens=2).experts] == [a]
    with DesiredState(broker_config) as desired, pytest.raises(ConfigError, match="k=0"):
        desired.push_assignment(app, [a], 0)
    # a known expert goes through
    ok = runner.invoke(main, ["push", "--app", app, "--subset", a, "--json", *flags])
    assert ok.exit_code == 0, ok.output
