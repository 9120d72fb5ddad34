"""Property tests: every decoder of something a peer can write (prompts, RPC requests and
replies, each retained announcement, desired state, gate manifests) either returns a valid
message or raises a moe2 error with a code; nothing else escapes, whatever the bytes:
malformed, truncated, oversized, wrong types, deeply nested, invalid UTF-8, lone
surrogates (issue 12: property-based tests)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe2.shared import protocol as p
from moe2.shared.errors import Moe2Error
from moe2.shared.fleet import MAX_STATE_BYTES
from moe2.shared.protocol.prompts import addressable

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values of every type, nested a few levels.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

VALID: dict[str, Any] = {
    "prompt": {"id": "1", "prompt": "the fox", "reply_to": "phone/1", "max_tokens": 4},
    "open": {"v": 1, "op": "open", "prompt": "the fox", "top_k": 3},
    "step": {"v": 1, "op": "step", "session": "s-1", "tokens": [5], "rewind_to": 2},
    "reply": {"v": 1, "ok": True, "op": "close", "session": "s-1"},
    "info": json.loads(
        p.encode(
            p.AgentInfo(
                agent_id="a1",
                model="m",
                model_file="m.gguf",
                architecture="llama",
                quantization="F32",
                n_ctx=64,
                n_vocab=100,
                tokenizer_hash="h",
                eos_ids=[2],
                add_bos=True,
                device_class="cpu-generic",
                software_version="0",
                max_sessions=4,
                started_at=0.0,
            )
        )
    ),
    "status": {"v": 1, "agent_id": "a1", "state": "online"},
    "assignment": {"v": 1, "app": "qa", "version": 3, "subset": ["a1"], "k": 1},
    "ack": {"v": 1, "gateway": "g", "app": "qa", "version": 3, "accepted": True},
    "gateway": {"v": 1, "gateway": "g", "state": "online", "apps": {"qa": 0}},
}


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid payload broken one way: a field of another type, a field dropped or added,
    truncated, padded, nested deep, or not UTF-8."""
    base = dict(VALID[draw(st.sampled_from(sorted(VALID)))])
    how = draw(st.sampled_from(["retype", "drop", "add", "truncate", "deep", "bytes", "junk"]))
    if how == "retype" and base:
        base[draw(st.sampled_from(sorted(base)))] = draw(json_values)
    elif how == "drop" and base:
        base.pop(draw(st.sampled_from(sorted(base))))
    elif how == "add":
        base[draw(st.text(max_size=10))] = draw(json_values)
    raw = json.dumps(base).encode()
    if how == "truncate":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    elif how == "deep":
        depth = draw(st.integers(100, 20_000))
        raw = raw[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    elif how == "bytes":
        raw = raw + draw(st.binary(min_size=1, max_size=8)) + b"\xff\xfe"
    elif how == "junk":
        raw = draw(st.binary(max_size=200))
    return raw


payloads = mutated() | st.binary(max_size=300) | st.text(max_size=200).map(str.encode)


def _only_moe2_errors(fn: Any, payload: bytes) -> Any:
    try:
        return fn(payload)
    except Moe2Error as exc:
        assert exc.code and exc.message
        return None


@SETTINGS
@given(payloads)
def test_prompts_decode_or_fail_with_a_code(payload: bytes) -> None:
    got = _only_moe2_errors(lambda b: p.decode_prompt(b, 1 << 20), payload)
    if got is not None:
        req, _raw = got
        assert isinstance(req, p.PromptRequest)
        req.model_dump_json()  # whatever was accepted can be echoed back as UTF-8
    pid, reply_to = addressable(payload)
    for field in (pid, reply_to):
        assert field is None or isinstance(field.encode("utf-8"), bytes)


@SETTINGS
@given(payloads)
def test_rpc_requests_and_replies_decode_or_fail_with_a_code(payload: bytes) -> None:
    _only_moe2_errors(lambda b: p.decode_request(b, 4 << 20), payload)
    reply = _only_moe2_errors(p.decode_reply, payload)
    if isinstance(reply, p.DistributionReply) and isinstance(reply.dist, p.FullDist):
        _only_moe2_errors(lambda _b: reply.dist.logprobs(), payload)
    if isinstance(reply, p.VocabReply):
        _only_moe2_errors(lambda _b: reply.pieces(), payload)
    p.request_op(payload)  # best effort, never raises


MODELS = [
    p.AgentInfo,
    p.AgentStatus,
    p.AgentProfile,
    p.LinkReport,
    p.GatewayStatus,
    p.AssignmentAck,
    p.GateAck,
    p.AppAssignment,
    p.GateManifest,
]


@SETTINGS
@given(st.sampled_from(MODELS), payloads)
def test_announcements_and_desired_state_decode_or_fail_with_a_code(
    model: type[p.Message], payload: bytes
) -> None:
    got = _only_moe2_errors(lambda b: p.decode_message(model, b, MAX_STATE_BYTES), payload)
    assert got is None or isinstance(got, model)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([*MODELS, None]), st.integers(MAX_STATE_BYTES + 1, 4 * MAX_STATE_BYTES))
def test_oversized_payloads_are_refused_before_parsing(
    model: type[p.Message] | None, size: int
) -> None:
    payload = b'{"v": 1, "x": "' + b"a" * size + b'"}'
    try:
        if model is None:
            p.decode_prompt(payload, MAX_STATE_BYTES)
        else:
            p.decode_message(model, payload, MAX_STATE_BYTES)
    except Moe2Error as exc:
        assert exc.code == "too_large"
    else:
        raise AssertionError("an oversized payload was accepted")


@SETTINGS
@given(st.text(max_size=120))
def test_topics_parse_to_a_kind_or_none(topic: str) -> None:
    parsed = p.topics.parse(topic)
    assert parsed is None or parsed.kind
