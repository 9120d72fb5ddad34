import json
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


def test_a_prompt_with_a_key_given_twice_is_refused_and_addresses_nobody() -> None:
    """Issue 20: with duplicate keys, routing used the last reply_to and the error path the
    first. Now the prompt is refused, and neither reply_to is used to address the error."""
    from moe2.shared.protocol.prompts import addressable

    twice = b'{"id": "1", "prompt": "x", "reply_to": "a/mine", "reply_to": "a/theirs"}'
    with pytest.raises(BadMessage, match="given twice"):
        p.decode_prompt(twice, 1 << 20)
    assert addressable(twice) == ("1", None)
    nested = b'{"id": "2", "prompt": "x", "reply_to": "a/b", "messages": [{"role": "user", "role": "system", "content": "x"}]}'  # noqa: E501
    with pytest.raises(BadMessage, match="'role' is given twice"):
        p.decode_prompt(nested, 1 << 20)
    req, _ = p.decode_prompt(b'{"id": "3", "prompt": "x", "reply_to": "a/b"}', 1 << 20)
    assert req.reply_to == "a/b"
    # A cancel likewise names one prompt, read one way.
    with pytest.raises(BadMessage, match="invalid cancel: the key 'id' is given twice"):
        p.decode_cancel(b'{"id": "1", "id": "2", "reply_to": "a/b"}')
    assert p.decode_cancel(b'{"id": "1", "reply_to": "a/b"}').id == "1"


def test_a_reply_topic_of_a_named_publisher_stays_in_its_replies() -> None:
    """Issue 20: a prompt on prompts/<app>/<owner> is answered only in replies/<owner>/."""
    from moe2.shared.protocol.prompts import check_reply_topic

    assert check_reply_topic("moe2/v1/replies/phone-7/answers", "phone-7")
    assert check_reply_topic("phone/7/answers", "phone-7")  # outside moe2/: the broker decides
    for other in ("moe2/v1/replies/victim/answers", "moe2/v1/replies/phone-7x/a"):
        with pytest.raises(ValueError, match="answered only in moe2/v1/replies/phone-7/"):
            check_reply_topic(other, "phone-7")
    assert check_reply_topic("moe2/v1/replies/victim/answers")  # no owner named: any user


def test_a_reply_topic_the_broker_would_refuse_is_refused_before_publishing() -> None:
    """mosquitto drops a connection that publishes to a topic with a control character or a
    non-character (and a kept session resends it on every reconnect): such a reply_to is an
    error to the prompt's sender, never a PUBLISH."""
    from moe2.shared.protocol.prompts import check_reply_topic

    for bad in ("fuzz/\bQ", "a/\x7fb", "a/\x85", "a/\ufdd0", "a/\uffff", "a/\U0001fffe", "a/+"):
        with pytest.raises(ValueError, match="must be a topic to publish to"):
            check_reply_topic(bad)
    assert check_reply_topic("fuzz/\u00e9t\u00e9/\U0001f600")  # other UTF-8 is fine


def test_versions_order_by_epoch_and_acknowledgements_name_what_they_answer() -> None:
    a = p.AppAssignment(app="qa", version=p.MAX_VERSION, subset=["e"])
    reset = p.AppAssignment(app="qa", version=1, epoch=1, subset=["e"])
    assert a.key < reset.key and p.describe_version(reset.key) == "1 (epoch 1)"
    # an assignment without an epoch encodes as before (its old signatures still verify)
    assert "epoch" not in json.loads(p.encode(a))
    other = a.model_copy(update={"subset": ["f"]})
    assert p.assignment_digest(a) != p.assignment_digest(other)
    assert p.assignment_digest(a) == p.assignment_digest(
        p.decode_message(p.AppAssignment, p.encode(a))
    )
