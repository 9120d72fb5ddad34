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


def test_the_version_floor_counts_only_gateways_and_what_the_key_signed() -> None:
    """Issue 20, path 3: the next version comes from what gateways serve, never from an
    expert's acknowledgement or a version a gateway was merely sent; with the controller's
    key, only from assignments it signed (the retained one, each acknowledgement's proof)."""
    from moe2.shared.errors import BadSignature
    from moe2.shared.fleet import FleetState
    from moe2.shared.signing import Signer

    key = Signer.generate()
    signed = key.sign(p.AppAssignment(app="qa", version=3, subset=["e"]))
    edge = p.MAX_VERSION - 1
    state = FleetState()
    state.desired_app["qa"] = signed
    state.gateway["gw"] = p.GatewayStatus(gateway="gw", state="online")
    ok = p.AssignmentAck(gateway="gw", app="qa", version=3, accepted=True, current=3, proof=signed)
    state.assignment_ack[("gw", "qa")] = ok
    # an expert (no gateway status) acknowledging the end of the range: no evidence
    state.assignment_ack[("expert", "qa")] = p.AssignmentAck(
        gateway="expert", app="qa", version=edge, accepted=True, current=edge
    )
    assert state.version_floor("qa") == (0, 3)
    # a gateway that rejected a forged version serves what it served: 3
    state.assignment_ack[("gw", "qa")] = ok.model_copy(
        update={"version": edge, "accepted": False, "reason": "bad signature"}
    )
    assert state.version_floor("qa") == (0, 3)
    # a stolen gateway login claiming the edge: counted without a key, not with it
    state.gateway["stolen"] = p.GatewayStatus(gateway="stolen", state="online")
    lie = p.AssignmentAck(gateway="stolen", app="qa", version=edge, accepted=True, current=edge)
    state.assignment_ack[("stolen", "qa")] = lie
    assert state.version_floor("qa") == (0, edge)
    verifier = key.verifier()

    def proven(a: p.AppAssignment) -> bool:
        try:
            verifier.verify(a)
        except BadSignature:
            return False
        return True

    assert state.version_floor("qa", proven) == (0, 3)
    state.assignment_ack[("stolen", "qa")] = lie.model_copy(update={"proof": signed})
    assert state.version_floor("qa", proven) == (0, 3)  # a proof of another version
    forged = p.AppAssignment(app="qa", version=edge, subset=["e"], sig=signed.sig)
    state.assignment_ack[("stolen", "qa")] = lie.model_copy(update={"proof": forged})
    assert state.version_floor("qa", proven) == (0, 3)  # a signature of something else
    # a new epoch (push --force-version) is above any version of the old one
    reset = key.sign(p.AppAssignment(app="qa", version=1, epoch=1, subset=["e"]))
    state.desired_app["qa"] = reset
    assert state.version_floor("qa", proven) == (1, 1)
