"""The bin1 codec: the same typed messages as JSON, validated the same way, and chosen per
agent from what it announces."""

from __future__ import annotations

import math
import struct
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moe2.shared import protocol as p
from moe2.shared.errors import BadMessage
from moe2.shared.mqtt import BrokerConfig, Connection, RpcClient


def logprobs(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).dirichlet(np.ones(n))
    return np.log(x).astype(np.float32)


def replies() -> list[p.Message]:
    lp = logprobs(300)
    topk, full = p.encode_topk(lp, 32), p.encode_full(lp)
    return [
        p.DistributionReply(op="open", session="s-1", n_tokens=7, dist=topk, compute_ms=1.5),
        p.DistributionReply(op="step", session="s-1", n_tokens=8, dist=full, compute_ms=0.25),
        p.DistributionsReply(
            op="draft",
            session="s-é",
            dists=[topk, p.encode_topk(logprobs(300, 1), 32)],
            lengths=[9, 10],
            drafted=[4, 5],
            n_tokens=10,
            compute_ms=3.0,
        ),
        p.DistributionsReply(
            op="verify", session="s-2", dists=[full], lengths=[3], n_tokens=3, compute_ms=0.0
        ),
        p.ScoreReply(
            target_tokens=[5, 6], logprobs=[float(np.float32(-0.5)), -1.0], compute_ms=2.0
        ),
        p.ScoreManyReply(
            results=[
                p.ScoreResult(target_tokens=[1], logprobs=[float(np.float32(-3.3))]),
                p.ScoreResult(error=p.ErrorBody(code="context_overflow", message="too long")),
            ],
            compute_ms=4.0,
        ),
    ]


@pytest.mark.parametrize("message", replies(), ids=lambda m: type(m).__name__)
def test_bin1_decodes_to_what_json_decodes_to_and_is_smaller(message: p.Message) -> None:
    binary = p.encode_rpc(message, "bin1")
    assert binary[0] == 0xB1 and binary[2] != 0  # a binary layout, not JSON in a frame
    assert p.payload_codec(binary) == "bin1"
    got, want = p.decode_reply(binary), p.decode_reply(p.encode_rpc(message, "json"))
    assert type(got) is type(want)
    assert got.model_dump() == want.model_dump()
    assert len(binary) < len(p.encode(message))


def test_messages_without_a_binary_layout_travel_as_json_inside_a_frame() -> None:
    req = p.VerifyRequest(session="s", feed=[3, "aGk="], top_k=8, rewind_to=2)
    frame = p.encode_rpc(req, "bin1")
    assert frame[:3] == bytes((0xB1, 1, 0))
    assert p.decode_request(frame, 1 << 20) == req
    # a value float32 cannot hold exactly is not rounded: the message goes as JSON
    exact = p.ScoreReply(target_tokens=[1], logprobs=[-0.1], compute_ms=0.0)
    frame = p.encode_rpc(exact, "bin1")
    assert frame[2] == 0 and p.decode_reply(frame).logprobs == [-0.1]
    pieces = p.encode_topk(logprobs(50), 4).model_copy(update={"pieces": ["a", "b", "c", "d"]})
    frame = p.encode_rpc(
        p.DistributionReply(op="step", session="s", n_tokens=1, dist=pieces, compute_ms=0), "bin1"
    )
    assert frame[2] == 0 and p.decode_reply(frame).dist.pieces == ["a", "b", "c", "d"]


def frame(kind: int, body: bytes, version: int = 1) -> bytes:
    return bytes((0xB1, version, kind)) + body


def topk_body(ids: list[int], lps: list[float], tail: float) -> bytes:
    head = bytes((1,)) + struct.pack("<H", 1) + b"s" + struct.pack("<Id", 1, 0.5)
    dist = struct.pack("<BId", 1, len(ids), tail)
    dist += np.asarray(ids, "<i4").tobytes() + np.asarray(lps, "<f4").tobytes()
    return head + dist


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (frame(1, topk_body([1, 2], [math.log(0.5)] * 2, 0.0))[:-3], "truncated"),
        (frame(1, topk_body([1, 2], [math.log(0.5)] * 2, 0.0)) + b"x", "too many"),
        (frame(9, b""), "unknown bin1 message kind"),
        (frame(1, b"", version=2), "version 2"),
        (frame(1, topk_body([1, 1], [math.log(0.5)] * 2, 0.0)), "distinct"),
        (frame(1, topk_body([1, 2], [float("nan"), -0.1], 0.0)), "finite"),
        (frame(1, topk_body([1, 2], [-0.1, -0.1], 0.0)), "sum to"),
        (frame(1, topk_body([1, 2], [math.log(0.5)] * 2, 1.5)), "tail"),
    ],
)
def test_malformed_bin1_frames_are_refused_with_a_reason(payload: bytes, match: str) -> None:
    with pytest.raises(BadMessage, match=match):
        p.decode_reply(payload)


def test_a_binary_request_layout_is_refused_by_an_agent() -> None:
    with pytest.raises(BadMessage, match="kind 0"):
        p.decode_request(frame(1, topk_body([1], [0.0], 0.0)), 1 << 20)


def test_the_client_speaks_bin1_only_to_agents_that_announce_it(
    start_agent: Any, broker_config: BrokerConfig, tiny_models: dict[str, Path]
) -> None:
    from moe2.shared.fleet import FleetView

    agent = start_agent(tiny_models["animals"], f"codec-{uuid.uuid4().hex[:6]}")
    seen: list[bytes] = []
    spy = Connection(broker_config, f"spy-{uuid.uuid4().hex[:6]}")
    spy.subscribe("moe2/v1/replies/+/rpc/#", lambda m: seen.append(bytes(m.payload)))
    view = FleetView(spy, ("info",))
    spy.start()

    def next_reply(n: int) -> bytes:
        deadline = time.monotonic() + 5
        while len(seen) <= n and time.monotonic() < deadline:
            time.sleep(0.01)
        return seen[n]

    try:
        assert view.wait(lambda s: agent.agent_id in s.info, 10)
        announced = view.copy().info[agent.agent_id]
        assert announced.codecs == ["json", "bin1"]
        with RpcClient(broker_config, timeout=30) as rpc:
            rpc.call(agent.agent_id, p.PingRequest())  # JSON until negotiated
            assert next_reply(0)[:1] == b"{"
            assert rpc.use_codec(announced) == "bin1"
            opened = rpc.call(agent.agent_id, p.OpenRequest(prompt="the fox eats", full=True))
            assert next_reply(1)[:1] == b"\xb1" and isinstance(opened.dist, p.FullDist)
            step = rpc.call(agent.agent_id, p.StepRequest(session=opened.session, tokens=[300]))
            assert next_reply(2)[:1] == b"\xb1"
            assert isinstance(step.dist, p.TopKDist) and step.n_tokens == opened.n_tokens + 1
            # an agent from before the codec announces nothing: JSON
            old = announced.model_copy(update={"codecs": ["json"]})
            assert rpc.use_codec(old) == "json"
            rpc.call(agent.agent_id, p.CloseRequest(session=opened.session))
            assert next_reply(3)[:1] == b"{"
    finally:
        spy.stop()
