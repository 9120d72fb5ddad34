import math

import numpy as np
import pytest

from moe2.shared import protocol as p
from moe2.shared.errors import BadMessage, MessageTooLarge, UnknownOperation, UnsupportedVersion


def test_request_round_trip() -> None:
    req = p.StepRequest(session="s-1", tokens=[1, 2, 3], top_k=5, with_pieces=True)
    back = p.decode_request(p.encode(req), 1 << 20)
    assert back == req


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"{not json", BadMessage),
        (b"[1, 2]", BadMessage),
        (b'{"op": "ping"}', UnsupportedVersion),
        (b'{"v": 2, "op": "ping"}', UnsupportedVersion),
        (b'{"v": 1, "op": "teleport"}', UnknownOperation),
        (b'{"v": 1}', UnknownOperation),
        (b'{"v": 1, "op": "open"}', BadMessage),  # neither prompt nor tokens
        (b'{"v": 1, "op": "open", "prompt": "a", "tokens": [1]}', BadMessage),
        (b'{"v": 1, "op": "open", "tokens": [-1]}', BadMessage),
        (b'{"v": 1, "op": "open", "tokens": [1], "top_k": 0}', BadMessage),
        (b'{"v": 1, "op": "open", "tokens": [1], "top_k": 100000}', BadMessage),
        (b'{"v": 1, "op": "step", "session": "s", "tokens": []}', BadMessage),
        (b'{"v": 1, "op": "step", "session": "s", "tokens": ["a"]}', BadMessage),
        (b'{"v": 1, "op": "ping", "surprise": true}', BadMessage),
        (b'{"v": 1, "op": "score", "prompt": "a"}', BadMessage),
    ],
)
def test_bad_requests_raise_typed_errors(payload: bytes, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        p.decode_request(payload, 1 << 20)
    assert info.value.message  # a readable reason


def test_oversized_payload_is_rejected_before_parsing() -> None:
    with pytest.raises(MessageTooLarge):
        p.decode_request(b" " * 2000, 1000)


def test_topk_keeps_order_and_tail_mass() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=500)
    logprobs = logits - np.log(np.exp(logits).sum())
    dist = p.encode_topk(logprobs, 10)
    assert dist.logprobs == sorted(dist.logprobs, reverse=True)
    assert dist.ids[0] == int(np.argmax(logprobs))
    assert math.isclose(sum(math.exp(x) for x in dist.logprobs) + dist.tail, 1.0, rel_tol=1e-9)


def test_full_distribution_round_trip() -> None:
    logprobs = np.log(np.full(7, 1 / 7, dtype=np.float32))
    dist = p.encode_full(logprobs)
    back = p.decode_reply(
        p.encode(p.DistributionReply(op="step", session="s", n_tokens=3, dist=dist, compute_ms=1.0))
    )
    assert np.array_equal(back.dist.logprobs(), logprobs)


@pytest.mark.parametrize("name", ["", "a/b", "+", "#", "x" * 65, "-lead", "sp ace"])
def test_topic_names_reject_wildcards_and_slashes(name: str) -> None:
    with pytest.raises(BadMessage):
        p.topics.agent_rpc(name)


def test_error_reply_round_trip() -> None:
    reply = p.decode_reply(p.encode(p.error_reply("busy", "later", "step")))
    assert isinstance(reply, p.ErrorReply)
    assert reply.error.code == "busy"
