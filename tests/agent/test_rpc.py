"""A real moe2-agent process behind a real mosquitto, compared with llama.cpp run directly."""

from __future__ import annotations

import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moe2.agent.llama import LlamaCppBackend
from moe2.shared import protocol as p
from moe2.shared.errors import (
    BadMessage,
    Busy,
    ContextOverflow,
    Moe2Error,
    UnknownSession,
)
from moe2.shared.mqtt import BrokerConfig, Connection, RpcClient, response_properties

TEXT = "the fox eats fish in the"


@pytest.fixture
def rpc(broker_config: BrokerConfig) -> Any:
    with RpcClient(broker_config, timeout=30) as client:
        yield client


@pytest.fixture
def animals_agent(start_agent: Any, tiny_models: dict[str, Path]) -> Any:
    # No profile at start: the agent serves requests between a profile's windows, and a
    # session opened while the profile's sequences hold KV cells of the same context lands
    # elsewhere in the cache, which moves its log-probs by ~3e-4 from a fresh context's.
    return start_agent(
        tiny_models["animals"],
        f"animals-{uuid.uuid4().hex[:6]}",
        "--max-sessions",
        "2",
        "--no-profile-on-start",
    )


def _dense(dist: p.TopKDist, n_vocab: int) -> np.ndarray:
    out = np.full(n_vocab, -np.inf)
    out[dist.ids] = dist.logprobs
    return out


def test_served_step_distribution_equals_direct_llama_cpp(
    rpc: RpcClient, animals_agent: Any, animals_backend: LlamaCppBackend
) -> None:
    ids = animals_backend.tokenize(TEXT, add_bos=True)
    direct = animals_backend.new_sequence()
    want = direct.extend(ids)
    opened = rpc.call(animals_agent.agent_id, p.OpenRequest(tokens=ids, full=True))
    np.testing.assert_allclose(opened.dist.logprobs(), want, atol=1e-4)
    # step by step, top-k with tail mass, compared with the direct run on the same history
    session = opened.session
    for _ in range(5):
        tok = int(np.argmax(want))
        want = direct.extend([tok])
        reply = rpc.call(
            animals_agent.agent_id, p.StepRequest(session=session, tokens=[tok], top_k=8)
        )
        top = np.argsort(-want, kind="stable")[:8]
        assert reply.dist.ids == top.tolist()
        np.testing.assert_allclose(reply.dist.logprobs, want[top], atol=1e-4)
        assert reply.dist.tail == pytest.approx(1 - np.exp(want[top]).sum(), abs=1e-5)
        assert reply.n_tokens == len(direct.tokens)
    direct.close()
    assert rpc.call(animals_agent.agent_id, p.CloseRequest(session=session)).ok


def test_text_prompt_pieces_score_and_tokenize(
    rpc: RpcClient, animals_agent: Any, animals_backend: LlamaCppBackend
) -> None:
    aid = animals_agent.agent_id
    tokens = rpc.call(aid, p.TokenizeRequest(text=TEXT, add_bos=True)).tokens
    assert tokens == animals_backend.tokenize(TEXT, add_bos=True)
    text = rpc.call(aid, p.DetokenizeRequest(tokens=tokens[1:], pieces=True))
    assert text.text.strip() == TEXT and text.pieces[0] == " the"
    opened = rpc.call(aid, p.OpenRequest(prompt=TEXT, top_k=3, with_pieces=True))
    assert opened.n_tokens == len(tokens)
    assert opened.dist.pieces == [animals_backend.piece(i) for i in opened.dist.ids]
    scored = rpc.call(aid, p.ScoreRequest(prompt_tokens=tokens[:3], target_tokens=tokens[3:]))
    np.testing.assert_allclose(
        scored.logprobs, animals_backend.score(tokens[:3], tokens[3:]), atol=1e-4
    )


def test_sessions_are_bounded_and_a_full_agent_says_busy(
    rpc: RpcClient, animals_agent: Any
) -> None:
    aid = animals_agent.agent_id
    s1 = rpc.call(aid, p.OpenRequest(tokens=[1, 5])).session
    s2 = rpc.call(aid, p.OpenRequest(tokens=[1, 6])).session
    with pytest.raises(Busy):  # max_sessions=2, both in use: refused, nothing evicted
        rpc.call(aid, p.OpenRequest(tokens=[1, 7]))
    with pytest.raises(UnknownSession):
        rpc.call(aid, p.StepRequest(session="s-nonexistent", tokens=[5]))
    for s in (s1, s2):
        assert rpc.call(aid, p.StepRequest(session=s, tokens=[5])).n_tokens == 3
    rpc.call(aid, p.CloseRequest(session=s1))
    s3 = rpc.call(aid, p.OpenRequest(tokens=[1, 7])).session  # room again
    for s in (s2, s3):
        rpc.call(aid, p.CloseRequest(session=s))


def test_context_overflow_is_an_error_reply(
    rpc: RpcClient, start_agent: Any, tiny_models: dict[str, Path]
) -> None:
    agent = start_agent(tiny_models["animals"], f"small-{uuid.uuid4().hex[:6]}", "--n-ctx", "64")
    s = rpc.call(agent.agent_id, p.OpenRequest(tokens=[1] + [5] * 60)).session
    with pytest.raises(ContextOverflow):
        rpc.call(agent.agent_id, p.StepRequest(session=s, tokens=[5] * 10))
    assert rpc.call(agent.agent_id, p.StepRequest(session=s, tokens=[5])).n_tokens == 62


BAD_REQUESTS = [
    (b"\xff\xfe not utf8 {", "bad_request"),
    (b"{}", "unsupported_version"),
    (b'{"v": 99, "op": "ping"}', "unsupported_version"),
    (b'{"v": 1, "op": "warp"}', "unknown_op"),
    (b'{"v": 1, "op": "open", "tokens": []}', "bad_request"),
    (b'{"v": 1, "op": "open", "tokens": [99999999]}', "invalid_token"),
    (b'{"v": 1, "op": "open", "prompt": 5}', "bad_request"),
    (b'{"v": 1, "op": "step", "session": "x", "tokens": [1]}', "unknown_session"),
    (b'{"v": 1, "op": "close", "session": ""}', "bad_request"),
    (b'{"v": 1, "op": "score", "prompt": "a", "target": ""}', "bad_request"),
    (b'{"v": 1, "op": "detokenize", "tokens": [-3]}', "bad_request"),
    (b"[" * 100_000, "bad_request"),
    (b'{"v": 1, "op": "open", "prompt": "' + b"a" * 5_000_000 + b'"}', "too_large"),
]


def test_bad_messages_get_error_replies_and_the_agent_keeps_serving(
    rpc: RpcClient, animals_agent: Any, broker_config: BrokerConfig
) -> None:
    aid = animals_agent.agent_id
    futures: list[Future[Any]] = [rpc.send_raw(aid, payload) for payload, _ in BAD_REQUESTS]
    for fut, (_, code) in zip(futures, BAD_REQUESTS):
        err = fut.exception(timeout=30)  # an error reply fails the call with its code
        assert isinstance(err, Moe2Error), err
        assert err.code == code, err
        assert err.message
    # A request without a ResponseTopic cannot be answered; it must not hurt either.
    with Connection(broker_config, f"noreply-{uuid.uuid4().hex[:6]}") as raw:
        raw.publish(p.topics.agent_rpc(aid), b'{"v": 1, "op": "ping"}').wait_for_publish(5)
        raw.publish(
            p.topics.agent_rpc(aid),
            b"garbage",
            properties=response_properties("moe2/v1/replies/nobody", b"1"),
        ).wait_for_publish(5)
    assert rpc.call(aid, p.PingRequest()).agent_id == aid
    assert animals_agent.proc.poll() is None


def test_every_request_gets_exactly_one_reply_even_when_busy(
    rpc: RpcClient, start_agent: Any, tiny_models: dict[str, Path]
) -> None:
    agent = start_agent(tiny_models["animals"], f"busy-{uuid.uuid4().hex[:6]}", "--queue-size", "2")
    prompt = [1] + [5, 6, 7, 8] * 200
    futures = [
        rpc.call_async(agent.agent_id, p.ScoreRequest(prompt_tokens=prompt, target_tokens=[5] * 50))
        for _ in range(30)
    ]
    errors = [f.exception(timeout=60) for f in futures]
    busy = [e for e in errors if e is not None]
    assert busy, "a queue of 2 should have refused some of 30 simultaneous requests"
    assert all(isinstance(e, Busy) for e in busy), busy
    assert any(isinstance(f.result(), p.ScoreReply) for f, e in zip(futures, errors) if e is None)
    assert rpc.call(agent.agent_id, p.PingRequest()).ok


def test_rewind_rolls_a_session_back(rpc: RpcClient, animals_agent: Any) -> None:
    aid = animals_agent.agent_id
    first = rpc.call(aid, p.OpenRequest(tokens=[1, 5, 6], top_k=5))
    rpc.call(aid, p.StepRequest(session=first.session, tokens=[7, 8, 9]))
    again = rpc.call(aid, p.StepRequest(session=first.session, tokens=[6], rewind_to=2, top_k=5))
    assert again.n_tokens == 3
    assert again.dist.ids == first.dist.ids
    np.testing.assert_allclose(again.dist.logprobs, first.dist.logprobs, atol=1e-4)
    with pytest.raises(BadMessage):
        rpc.call(aid, p.StepRequest(session=first.session, tokens=[6], rewind_to=50))
