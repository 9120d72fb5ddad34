"""Prompt routing by application: a prompt only ever reaches a gateway that serves its app,
and a prompt for an app nobody serves gets ``unknown_app`` (never silence)."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.client import PromptClient
from moe2.shared.desired import DesiredState
from moe2.shared.errors import UnknownApp
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


def ask_many(cfg: BrokerConfig, app: str, n: int, out: dict[str, Any]) -> None:
    with PromptClient(cfg) as client:
        for i in range(n):
            try:
                answer = client.ask(app, f"the fox eats {i}", max_tokens=2, timeout=30)
                out.setdefault("gateways", Counter())[answer.gateway] += 1
                out.setdefault("apps", Counter())[answer.app] += 1
            except Exception as exc:  # every failure is counted and reported
                out.setdefault("errors", []).append(repr(exc))


def test_two_gateways_serving_different_apps_answer_only_their_own(
    fleet: LocalFleet, broker_config: BrokerConfig, tiny_models: dict[str, Path]
) -> None:
    qa, real = uid("qa"), uid("real")
    a = start(fleet, tiny_models["animals"], uid("a"))
    c = start(fleet, tiny_models["cooking"], uid("c"))
    gw_qa = start(fleet, tiny_models["code"], uid("gwq"), "--serve-app", f"{qa}={a}:1")
    gw_real = start(fleet, tiny_models["code"], uid("gwr"), "--serve-app", f"{real}={c}:1")
    results: dict[str, dict[str, Any]] = {qa: {}, real: {}}
    threads = [
        threading.Thread(target=ask_many, args=(broker_config, app, 100, results[app]))
        for app in (qa, real)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not results[qa].get("errors") and not results[real].get("errors"), results
    assert results[qa]["gateways"] == Counter({gw_qa: 100})
    assert results[real]["gateways"] == Counter({gw_real: 100})
    assert results[qa]["apps"] == Counter({qa: 100})
    # The gateways announce what they serve.
    gateways = fleet.view.online_gateways()
    assert qa in gateways[gw_qa].apps and real in gateways[gw_real].apps
    assert real not in gateways[gw_qa].apps


def test_a_pushed_assignment_moves_an_app_between_gateways(
    fleet: LocalFleet, broker_config: BrokerConfig, tiny_models: dict[str, Path]
) -> None:
    app = uid("app")
    a = start(fleet, tiny_models["animals"], uid("a"))
    g1 = start(fleet, tiny_models["code"], uid("g1"), "--serve-app", f"{app}={a}:1")
    g2 = start(fleet, tiny_models["code"], uid("g2"), "--gateway-enabled")
    with PromptClient(broker_config) as client:
        assert client.ask(app, "the fox", max_tokens=2).gateway == g1
        with DesiredState(broker_config) as desired:
            moved = desired.push_assignment(app, [a], 1, gateways=[g2])
        assert set(moved.accepted) >= {g1, g2}
        assert not moved.acks[g1].serving and moved.acks[g2].serving
        got = Counter(client.ask(app, "the fox", max_tokens=2).gateway for _ in range(20))
        assert got == Counter({g2: 20})


def test_a_prompt_for_an_app_nobody_serves_gets_unknown_app(
    fleet: LocalFleet, broker_config: BrokerConfig, tiny_models: dict[str, Path]
) -> None:
    a = start(fleet, tiny_models["animals"], uid("a"))
    start(fleet, tiny_models["code"], uid("g1"), "--serve-app", f"{uid('x')}={a}:1")
    start(fleet, tiny_models["code"], uid("g2"), "--serve-app", f"{uid('y')}={a}:1")
    with PromptClient(broker_config) as client, pytest.raises(UnknownApp):
        client.ask(uid("nowhere"), "hello", timeout=20)
    # A raw client (no ResponseTopic, reply_to only) gets exactly one error too.
    inbox = f"phone/{uuid.uuid4().hex[:6]}"
    got: list[dict[str, Any]] = []
    done = threading.Event()

    def on(msg: Any) -> None:
        got.append(json.loads(msg.payload))
        done.set()

    with Connection(broker_config, uid("raw")) as conn:
        conn.subscribe(inbox, on)
        body = {"id": "r1", "prompt": "hello", "reply_to": inbox}
        conn.publish(p.topics.prompts(uid("nowhere")), json.dumps(body).encode())
        assert done.wait(20)
        done.clear()
        assert not done.wait(1.0)  # exactly one
    assert got[0]["error"]["code"] == "unknown_app" and got[0]["id"] == "r1"


def test_a_crashed_gateway_does_not_swallow_prompts_for_unserved_apps(
    fleet: LocalFleet, broker_config: BrokerConfig, tiny_models: dict[str, Path]
) -> None:
    """A SIGKILLed gateway's MQTT session outlives it (``session_expiry_s``), and mosquitto
    hands a shared subscription's messages to offline sessions too: were the catch-all in that
    session, every other ``unknown_app`` prompt would wait there unanswered."""
    a = start(fleet, tiny_models["animals"], uid("a"))
    start(fleet, tiny_models["code"], uid("g1"), "--serve-app", f"{uid('x')}={a}:1")
    g2 = start(fleet, tiny_models["code"], uid("g2"), "--serve-app", f"{uid('y')}={a}:1")
    fleet.kill(g2)
    outcomes = Counter()
    with PromptClient(broker_config) as client:
        for _ in range(6):
            try:
                client.ask(uid("nowhere"), "hello", timeout=10)
            except UnknownApp:
                outcomes["unknown_app"] += 1
            except Exception as exc:
                outcomes[type(exc).__name__] += 1
    assert outcomes == Counter({"unknown_app": 6})
