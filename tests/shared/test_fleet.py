"""The fleet view against a real broker: decoded, typed, and identity bound to the topic."""

from __future__ import annotations

import time
import uuid

from moe2.shared import protocol as p
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import BrokerConfig, Connection


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def info(agent_id: str, n_vocab: int = 100) -> p.AgentInfo:
    return p.AgentInfo(
        agent_id=agent_id,
        model="m",
        model_file="m.gguf",
        architecture="llama",
        quantization="F32",
        n_ctx=64,
        n_vocab=n_vocab,
        tokenizer_hash="h",
        eos_ids=[2],
        add_bos=True,
        device_class="cpu-generic",
        software_version="0",
        max_sessions=4,
        started_at=0.0,
    )


def test_the_view_decodes_retained_state_and_refuses_forged_identities(
    broker_config: BrokerConfig,
) -> None:
    a, b = uid("a"), uid("b")
    with Connection(broker_config, uid("pub")) as pub:
        pub.publish_acked(p.topics.agent_info(a), p.encode(info(a)), retain=True)
        pub.publish_acked(
            p.topics.agent_status(a),
            p.encode(p.AgentStatus(agent_id=a, state="online")),
            retain=True,
        )
        state = FleetView.snapshot(broker_config, ("info", "status"))
        assert state.online(a) == info(a)
        # An agent speaking for another one, on its own topic: ignored, both ways.
        pub.publish_acked(
            p.topics.agent_status(b),
            p.encode(p.AgentStatus(agent_id=a, state="offline")),
            retain=True,
        )
        pub.publish_acked(p.topics.agent_info(b), p.encode(info(a, n_vocab=7)), retain=True)
        conn = Connection(broker_config, uid("view"))
        view = FleetView(conn, ("info", "status"))
        with conn:
            assert view.wait(lambda s: s.online(a) is not None, 5)
            time.sleep(0.3)
            assert view.online(a) == info(a) and b not in view.info and b not in view.status
            assert view.rejected == 2
            # A cleared retained message removes the entry.
            pub.publish_acked(p.topics.agent_status(a), b"", retain=True)
            assert view.wait(lambda s: s.online(a) is None, 5)
        for topic in (p.topics.agent_info(a), p.topics.agent_info(b), p.topics.agent_status(b)):
            pub.publish_acked(topic, b"", retain=True)


def test_topics_are_parsed_in_one_place() -> None:
    t = p.topics.parse(p.topics.assignment_ack("gw-1", "qa"))
    assert t is not None and (t.kind, t.agent, t.app) == ("assignment_ack", "gw-1", "qa")
    t = p.topics.parse(p.topics.blob_chunk("a" * 64, 3))
    assert t is not None and (t.kind, t.sha256, t.index) == ("blob_chunk", "a" * 64, 3)
    t = p.topics.parse(p.topics.rpc_reply("c1", "orin-1"))
    assert t is not None and (t.kind, t.client, t.rest) == ("reply", "c1", ("rpc", "orin-1"))
    assert p.topics.parse("moe2/v1/agents/a+b/info") is None  # not a name we could build
    assert p.topics.parse("other/v1/agents/a/info") is None
    assert p.topics.parse("moe2/v1/prompts/qa/phone-7/extra") is None
    t = p.topics.parse(p.topics.prompts("qa", "phone-7"))  # the publisher's login, bound by ACL
    assert t is not None and (t.kind, t.app, t.client) == ("prompt", "qa", "phone-7")
    assert p.topics.prompt_owner("moe2/v1/prompts/-bad-/phone-7/x") == "phone-7"
    assert p.topics.prompt_owner(p.topics.prompts("qa")) is None
