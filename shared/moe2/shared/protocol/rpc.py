"""Agent RPC: sessions over a model's next-token distributions, scoring, tokenization,
self-profiling."""

from __future__ import annotations

import base64
import re
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from moe2.shared.errors import BadMessage, UnknownOperation
from moe2.shared.protocol.base import (
    MAX_TEXT_CHARS,
    MAX_TOKENS_PER_REQUEST,
    MAX_TOP_K,
    Message,
    describe_error,
    parse_envelope,
)
from moe2.shared.protocol.profiles import AgentProfile

# --------------------------------------------------------------------------- distributions


class TopKDist(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["topk"] = "topk"
    ids: list[int]  # (k,) token ids, most probable first
    logprobs: list[float]  # (k,) natural-log probabilities, same order
    tail: float = Field(ge=0.0, le=1.0)  # probability mass of all tokens not in ids
    pieces: list[str] | None = None  # (k,) token texts, when asked for (cross-vocab fusion)

    @model_validator(mode="after")
    def _same_length(self) -> TopKDist:
        if len(self.ids) != len(self.logprobs):
            raise ValueError("ids and logprobs must have the same length")
        if self.pieces is not None and len(self.pieces) != len(self.ids):
            raise ValueError("pieces and ids must have the same length")
        return self


class FullDist(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["full"] = "full"
    n_vocab: int
    logprobs_b64: str  # base64 of (n_vocab,) little-endian float32 natural-log probabilities

    def logprobs(self) -> np.ndarray:
        arr = np.frombuffer(base64.b64decode(self.logprobs_b64), dtype="<f4")
        if arr.shape[0] != self.n_vocab:
            raise BadMessage(
                f"full distribution has {arr.shape[0]} entries, expected {self.n_vocab}"
            )
        return arr


Distribution = Annotated[TopKDist | FullDist, Field(discriminator="kind")]


def encode_topk(logprobs: np.ndarray, k: int, pieces: list[str] | None = None) -> TopKDist:
    """Top-k of a (n_vocab,) log-probability vector, most probable first."""
    k = min(k, logprobs.shape[0])
    if k < logprobs.shape[0]:
        idx = np.argpartition(-logprobs, k - 1)[:k]
    else:
        idx = np.arange(logprobs.shape[0])
    idx = idx[np.argsort(-logprobs[idx], kind="stable")]
    top = logprobs[idx].astype(np.float64)
    tail = float(max(0.0, 1.0 - np.exp(top).sum()))
    return TopKDist(ids=idx.tolist(), logprobs=top.tolist(), tail=min(tail, 1.0), pieces=pieces)


def encode_full(logprobs: np.ndarray) -> FullDist:
    arr = np.ascontiguousarray(logprobs, dtype="<f4")
    return FullDist(n_vocab=arr.shape[0], logprobs_b64=base64.b64encode(arr.tobytes()).decode())


# --------------------------------------------------------------------------- RPC requests

TokenList = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_TOKENS_PER_REQUEST)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class _Request(Message):
    op: str


class _DistributionOptions(BaseModel):
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K)  # None: the agent's default
    full: bool = False  # send the whole distribution instead of the top-k
    with_pieces: bool = False  # add the text of each top-k token


class OpenRequest(_Request, _DistributionOptions):
    """Open a session on a prompt; the reply carries the next-token distribution."""

    op: Literal["open"] = "open"
    prompt: Text | None = None
    tokens: TokenList | None = None
    add_bos: bool | None = None  # None: as the model expects

    @model_validator(mode="after")
    def _one_prompt(self) -> OpenRequest:
        if (self.prompt is None) == (self.tokens is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'tokens' (ids)")
        if self.tokens is not None and len(self.tokens) == 0:
            raise ValueError("'tokens' must not be empty")
        return self


class StepRequest(_Request, _DistributionOptions):
    """Append tokens to a session's history; reply with the next-token distribution."""

    op: Literal["step"] = "step"
    session: str = Field(min_length=1, max_length=64)
    tokens: Annotated[TokenList, Field(min_length=1)] | None = None
    # Text instead of ids: the agent tokenizes it (no BOS) and appends the tokens; how a
    # gateway feeds a token chosen by text to experts with another vocabulary.
    text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)] | None = None
    # Roll the history back to its first `rewind_to` tokens before appending (backtracking,
    # speculative decoding). Must not exceed the current history length.
    rewind_to: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_input(self) -> StepRequest:
        if (self.tokens is None) == (self.text is None):
            raise ValueError("give exactly one of 'tokens' (ids) or 'text'")
        return self


class CloseRequest(_Request):
    op: Literal["close"] = "close"
    session: str = Field(min_length=1, max_length=64)


class ScoreRequest(_Request):
    """Teacher-forced log-probabilities of ``target`` after ``prompt``, one forward pass."""

    op: Literal["score"] = "score"
    prompt: Text | None = None
    prompt_tokens: TokenList | None = None
    target: Text | None = None
    target_tokens: TokenList | None = None
    add_bos: bool | None = None

    @model_validator(mode="after")
    def _one_each(self) -> ScoreRequest:
        if (self.prompt is None) == (self.prompt_tokens is None):
            raise ValueError("give exactly one of 'prompt' or 'prompt_tokens'")
        if (self.target is None) == (self.target_tokens is None):
            raise ValueError("give exactly one of 'target' or 'target_tokens'")
        return self


class TokenizeRequest(_Request):
    op: Literal["tokenize"] = "tokenize"
    text: Text
    add_bos: bool = False
    special: bool = False  # parse special-token text such as "<s>"


class DetokenizeRequest(_Request):
    op: Literal["detokenize"] = "detokenize"
    tokens: TokenList
    pieces: bool = False  # also return the text of each token separately


class PingRequest(_Request):
    op: Literal["ping"] = "ping"


class ProfileRequest(_Request):
    """Profile the agent now, on its model thread (requests wait meanwhile), and by default
    replace its retained profile. Unset fields keep the agent's configured profiler settings;
    the bounds keep one request from holding the model for long."""

    op: Literal["profile"] = "profile"
    points: int | None = Field(default=None, ge=2, le=32)  # prompt lengths, spread up to n_ctx
    prompt_lengths: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None, min_length=2, max_length=32
    )  # exact prompt lengths, tokens (instead of points)
    repeats: int | None = Field(default=None, ge=1, le=20)  # measurements per prompt length
    decode_tokens: int | None = Field(default=None, ge=1, le=512)  # generated per measurement
    max_prompt_fraction: float | None = Field(default=None, gt=0, le=1)  # longest / n_ctx
    publish: bool = True  # replace the retained profile on agents/<id>/profile

    @model_validator(mode="after")
    def _distinct_lengths(self) -> ProfileRequest:
        if self.prompt_lengths is not None and len(set(self.prompt_lengths)) < 2:
            raise ValueError("prompt_lengths needs at least two distinct lengths")
        return self


RpcRequest = Annotated[
    OpenRequest
    | StepRequest
    | CloseRequest
    | ScoreRequest
    | TokenizeRequest
    | DetokenizeRequest
    | PingRequest
    | ProfileRequest,
    Field(discriminator="op"),
]
OPERATIONS = ("open", "step", "close", "score", "tokenize", "detokenize", "ping", "profile")

_request_adapter: TypeAdapter[Any] = TypeAdapter(RpcRequest)


# --------------------------------------------------------------------------- RPC replies


class _Reply(Message):
    ok: Literal[True] = True
    op: str


class DistributionReply(_Reply):
    op: Literal["open", "step"]
    session: str
    n_tokens: int  # history length after this request
    dist: Distribution
    compute_ms: float  # time spent in the model for this request


class CloseReply(_Reply):
    op: Literal["close"] = "close"
    session: str


class ScoreReply(_Reply):
    op: Literal["score"] = "score"
    target_tokens: list[int]
    logprobs: list[float]  # (len(target_tokens),) log p(y_t | x, y_<t)
    compute_ms: float


class TokenizeReply(_Reply):
    op: Literal["tokenize"] = "tokenize"
    tokens: list[int]


class DetokenizeReply(_Reply):
    op: Literal["detokenize"] = "detokenize"
    text: str
    pieces: list[str] | None = None


class PingReply(_Reply):
    op: Literal["ping"] = "ping"
    agent_id: str
    active_sessions: int


class ProfileReply(_Reply):
    op: Literal["profile"] = "profile"
    profile: AgentProfile
    published: bool  # whether it replaced the retained profile


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str
    message: str


class ErrorReply(Message):
    ok: Literal[False] = False
    op: str | None = None
    error: ErrorBody


def error_reply(code: str, message: str, op: str | None = None) -> ErrorReply:
    return ErrorReply(op=op, error=ErrorBody(code=code, message=message))


RpcReply = Annotated[
    DistributionReply
    | CloseReply
    | ScoreReply
    | TokenizeReply
    | DetokenizeReply
    | PingReply
    | ProfileReply,
    Field(discriminator="op"),
]
_reply_adapter: TypeAdapter[Any] = TypeAdapter(RpcReply)
_error_adapter = TypeAdapter(ErrorReply)


def decode_request(payload: bytes | bytearray, max_bytes: int) -> Any:
    """Parse and validate an RPC request; raises a ProtocolError subclass on bad input."""
    obj = parse_envelope(payload, max_bytes)
    op = obj.get("op")
    if op not in OPERATIONS:
        raise UnknownOperation(f"unknown op {op!r}; expected one of {', '.join(OPERATIONS)}")
    try:
        return _request_adapter.validate_python(obj)
    except ValidationError as exc:
        raise BadMessage(f"invalid {op} request: {describe_error(exc)}") from None


def decode_reply(payload: bytes | bytearray, max_bytes: int = 1 << 30) -> Any:
    """Parse an RPC reply: a reply model, or an ErrorReply."""
    obj = parse_envelope(payload, max_bytes)
    try:
        if obj.get("ok") is False:
            return _error_adapter.validate_python(obj)
        return _reply_adapter.validate_python(obj)
    except ValidationError as exc:
        raise BadMessage(f"invalid reply: {describe_error(exc)}") from None


def request_op(payload: bytes | bytearray) -> str | None:
    """Best-effort op name of a request that failed to decode (for the error reply)."""
    m = re.search(rb'"op"\s*:\s*"([a-z_]{1,20})"', payload[:4096])
    return m.group(1).decode() if m else None
