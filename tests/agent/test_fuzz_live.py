"""Property test against real daemons (issue 12): malformed, truncated, oversized and
wrong-type payloads on every topic a peer can write (prompts, an agent's RPC topic, each
retained announcement, desired state, gate manifests and blobs). Every prompt and every RPC
request that names where to answer gets exactly one answer there; nothing takes an agent or
a gateway down, and the fleet serves as before afterwards."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.client import PromptClient
from moe2.shared.mqtt import BrokerConfig, Connection, RpcClient, response_properties

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


class World:
    """One expert and one gateway, and a client that sends raw payloads and counts replies
    per correlation id."""

    def __init__(self, cfg: BrokerConfig, fleet: LocalFleet, tiny: dict[str, Path]) -> None:
        self.app = f"fz-{uuid.uuid4().hex[:6]}"
        self.expert = f"fa-{uuid.uuid4().hex[:6]}"
        self.gateway = f"fg-{uuid.uuid4().hex[:6]}"
        for name, model, flags in (
            (self.expert, tiny["animals"], ()),
            (self.gateway, tiny["code"], ("--serve-app", f"{self.app}={self.expert}:1")),
        ):
            fleet.start(name, model, "--n-threads", "1", "--no-profile-on-start", *flags)
        fleet.wait_online([self.expert, self.gateway], 60)
        self.fleet = fleet
        self.inbox = f"fuzz/{uuid.uuid4().hex[:6]}"
        self.replies: Counter[bytes] = Counter()
        self.cond = threading.Condition()
        self.conn = Connection(cfg, f"fuzz-{uuid.uuid4().hex[:6]}")
        self.conn.subscribe(self.inbox, self._on)
        self.conn.start()
        self.sent = 0

    def _on(self, msg: Any) -> None:
        corr = bytes(getattr(msg.properties, "CorrelationData", b"") or b"")
        if b'"delta"' in msg.payload[:200] and b'"index"' in msg.payload[:200]:
            return  # a stream chunk: not a terminal message
        with self.cond:
            self.replies[corr] += 1
            self.cond.notify_all()

    def ask(self, topic: str, payload: bytes) -> bytes:
        corr = uuid.uuid4().bytes
        self.conn.publish(topic, payload, properties=response_properties(self.inbox, corr))
        return corr

    def wait(self, corrs: list[bytes], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: all(self.replies[c] for c in corrs), timeout)


@pytest.fixture(scope="module")
def world(
    broker_config: BrokerConfig, tiny_models: dict[str, Path], tmp_path_factory: Any
) -> Iterator[World]:
    with LocalFleet(broker_config, tmp_path_factory.mktemp("fuzzfleet")) as fleet:
        w = World(broker_config, fleet, tiny_models)
        yield w
        w.conn.stop()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def hostile(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    body = dict(base)
    how = draw(st.sampled_from(["retype", "drop", "add", "truncate", "deep", "junk", "big"]))
    if how == "retype":
        body[draw(st.sampled_from(sorted(body)))] = draw(json_values)
    elif how == "drop":
        body.pop(draw(st.sampled_from(sorted(body))))
    elif how == "add":
        body[draw(st.text(max_size=8))] = draw(json_values)
    raw = json.dumps(body).encode()
    if how == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif how == "deep":
        depth = draw(st.integers(500, 50_000))
        raw = raw[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    elif how == "junk":
        raw = draw(st.binary(max_size=300))
    elif how == "big":
        raw = raw[:-1] + b', "pad": "' + b"a" * draw(st.integers(1 << 20, 5 << 20)) + b'"}'
    return raw


PROMPT = {"id": "z", "prompt": "the fox", "reply_to": "fuzz/none", "max_tokens": 2}
OPEN = {"v": 1, "op": "open", "prompt": "the fox", "top_k": 3}
STATE = {"v": 1, "agent_id": "x", "state": "online", "app": "qa", "version": 2, "subset": ["x"]}


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    prompts=st.lists(hostile(PROMPT), min_size=1, max_size=3),
    requests=st.lists(hostile(OPEN), min_size=1, max_size=3),
    state=st.lists(hostile(STATE), max_size=3),
    topic=st.sampled_from(["info", "status", "profile", "gateway", "desired", "gate", "blob"]),
)
def test_every_payload_a_peer_can_write_is_survived_and_answered_once(
    world: World, prompts: list[bytes], requests: list[bytes], state: list[bytes], topic: str
) -> None:
    corrs = [world.ask(p.topics.prompts(world.app), pl) for pl in prompts]
    corrs += [world.ask(p.topics.agent_rpc(world.expert), pl) for pl in requests]
    target = {
        "info": p.topics.agent_info(world.expert),
        "status": p.topics.agent_status(world.expert),
        "profile": p.topics.agent_profile(world.expert),
        "gateway": p.topics.gateway_status(f"ghost-{uuid.uuid4().hex[:4]}"),
        "desired": p.topics.desired_app(world.app),
        "gate": p.topics.gate_manifest("g-fuzz"),
        "blob": p.topics.blob_chunk("a" * 64, 0),
    }[topic]
    for pl in state:
        world.conn.publish(target, pl, retain=True)
    assert world.wait(corrs, 60), {c: world.replies[c] for c in corrs}
    if state:
        world.conn.publish(target, b"", retain=True)  # the honest agent announces again
    with world.cond:
        assert all(world.replies[c] == 1 for c in corrs), {c: world.replies[c] for c in corrs}
    for name, proc in world.fleet.procs.items():
        assert proc.poll() is None, f"{name} died:\n{world.fleet.log_tail(name)}"


def test_the_fleet_serves_as_before_after_the_barrage(
    world: World, broker_config: BrokerConfig
) -> None:
    # runs after the barrage above (same module, same daemons)
    world.fleet.wait_online([world.expert, world.gateway], 30)
    with PromptClient(broker_config) as client:
        answer = client.ask(world.app, "the fox eats", max_tokens=4, timeout=60)
    assert [e.id for e in answer.experts] == [world.expert]
    with RpcClient(broker_config, timeout=30) as rpc:
        assert rpc.call(world.expert, p.PingRequest()).agent_id == world.expert
