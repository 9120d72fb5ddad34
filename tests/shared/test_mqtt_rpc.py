"""Typed RPC over a real broker: the reply type follows the request type, errors map onto the
error tree, and a reply counts only from the agent that was asked."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from moe2.shared import protocol as p
from moe2.shared.errors import BadMessage, Busy, InternalError, RequestTimeout
from moe2.shared.mqtt import BrokerConfig, Connection, RpcClient, reply_properties


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


class FakePeer:
    """Answers on the agent's rpc topic with whatever ``answer`` returns: (topic, payload)."""

    def __init__(self, cfg: BrokerConfig, agent_id: str, answer: Any) -> None:
        self.conn = Connection(cfg, uid("peer"))
        self.answer = answer
        self.conn.subscribe(p.topics.agent_rpc(agent_id), self._on)

    def _on(self, msg: Any) -> None:
        topic, payload = self.answer(msg.properties.ResponseTopic)
        corr = msg.properties.CorrelationData
        self.conn.publish(topic, payload, properties=reply_properties(corr))


def test_reply_types_errors_and_repliers(broker_config: BrokerConfig) -> None:
    agent, other = uid("a"), uid("b")
    ping = p.encode(p.PingReply(agent_id=agent, active_sessions=0))
    answers = {
        "ok": lambda rt: (rt, ping),
        "busy": lambda rt: (rt, p.encode(p.error_reply("busy", "full"))),
        "internal": lambda rt: (rt, p.encode(p.error_reply("internal", "bug"))),
        "wrong-type": lambda rt: (rt, p.encode(p.CloseReply(session="s"))),
        # a reply sent on the topic of another agent: not the one asked
        "impostor": lambda rt: (rt.rsplit("/", 1)[0] + f"/{other}", ping),
    }
    with RpcClient(broker_config, timeout=5) as rpc:
        for case, answer in answers.items():
            peer = FakePeer(broker_config, agent, answer)
            with peer.conn:
                if case == "ok":
                    reply = rpc.call(agent, p.PingRequest())
                    assert isinstance(reply, p.PingReply) and reply.agent_id == agent
                elif case == "busy":
                    with pytest.raises(Busy):
                        rpc.call(agent, p.PingRequest())
                elif case == "internal":
                    with pytest.raises(InternalError):
                        rpc.call(agent, p.PingRequest())
                elif case == "wrong-type":
                    with pytest.raises(BadMessage, match="answered 'close'"):
                        rpc.call(agent, p.PingRequest())
                else:
                    with pytest.raises(RequestTimeout):
                        rpc.call(agent, p.PingRequest(), timeout=1.0)
                    assert rpc.rejected_replies == 1


def test_distributions_must_be_finite_and_normalised() -> None:
    with pytest.raises(ValueError, match="sum to"):
        p.TopKDist(ids=[1, 2], logprobs=[-0.1, -0.1], tail=0.5)
    with pytest.raises(ValueError, match="finite"):
        p.TopKDist(ids=[1], logprobs=[float("nan")], tail=0.0)
    with pytest.raises(ValueError, match="distinct"):
        p.TopKDist(ids=[1, 1], logprobs=[-0.7, -0.7], tail=0.0)
    import numpy as np

    bad = p.encode_full(np.full(4, np.log(0.5), dtype=np.float32))
    with pytest.raises(BadMessage, match="sums to"):
        bad.logprobs()
    assert p.encode_full(np.full(4, np.log(0.25), dtype=np.float32)).logprobs().shape == (4,)


def test_a_call_nobody_answers_fails_after_its_deadline_without_other_traffic(
    broker_config: BrokerConfig,
) -> None:
    """Work chained on a call's future (a gateway's vocabulary fetch) must learn it failed
    even when the caller sends nothing else and nobody waits on it."""
    with RpcClient(broker_config, timeout=5) as rpc:
        fut = rpc.call_async(uid("nobody"), p.PingRequest(), timeout=0.3)
        with pytest.raises(RequestTimeout, match="deadline"):
            fut.result(timeout=10)  # not rpc.wait: that gives up on its own at the deadline
        assert rpc.expired == 1 and rpc.pending() == 0
