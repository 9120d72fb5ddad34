"""Agent RPC: sessions over a model's next-token distributions, scoring, tokenization,
self-profiling."""

from __future__ import annotations

import base64
import math
import re
from typing import Annotated, Any, Generic, Literal, TypeVar

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_serializer,
    model_validator,
)

from moe2.shared.errors import BadMessage, MessageTooLarge, UnknownOperation
from moe2.shared.protocol.base import (
    MAX_CHOICES,
    MAX_TEXT_CHARS,
    MAX_TOKENS_PER_REQUEST,
    MAX_TOP_K,
    NAME_PATTERN,
    Message,
    describe_error,
    parse_envelope,
)
from moe2.shared.protocol.profiles import AgentProfile
from moe2.shared.protocol.prompts import Conversation

# --------------------------------------------------------------------------- distributions

# A distribution whose probabilities do not sum to 1 within this is refused (float32 sums of
# a 150k vocabulary stay within 1e-4; a peer that sends garbage does not).
NORMALISATION_TOLERANCE = 1e-3


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
        if len(set(self.ids)) != len(self.ids) or any(t < 0 for t in self.ids):
            raise ValueError("ids must be distinct non-negative token ids")
        if not all(math.isfinite(lp) and lp <= 1e-6 for lp in self.logprobs):
            raise ValueError("logprobs must be finite natural-log probabilities (<= 0)")
        mass = sum(math.exp(lp) for lp in self.logprobs) + self.tail
        if abs(mass - 1.0) > NORMALISATION_TOLERANCE:
            raise ValueError(
                f"top-k probabilities plus tail sum to {mass:.4f}, expected 1 "
                f"(within {NORMALISATION_TOLERANCE})"
            )
        return self


class FullDist(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["full"] = "full"
    n_vocab: int = Field(ge=1, le=1 << 22)
    # base64 of (n_vocab,) little-endian float32 natural-log probabilities; empty in a
    # distribution built from an array (``from_array``), filled in when written as JSON
    logprobs_b64: str
    _raw: np.ndarray | None = PrivateAttr(default=None)  # the array it was built from
    _array: np.ndarray | None = PrivateAttr(default=None)  # validated, read-only

    @classmethod
    def from_array(cls, arr: np.ndarray) -> FullDist:
        """A distribution holding ``arr`` ((n,) little-endian float32, read-only) without
        encoding it: base64 only if it is ever written as JSON."""
        dist = cls(n_vocab=int(arr.shape[0]), logprobs_b64="")
        dist._raw = arr
        return dist

    @field_serializer("logprobs_b64")
    def _b64(self, value: str) -> str:
        if not value and self._raw is not None:
            return base64.b64encode(self._raw.tobytes()).decode()
        return value

    def raw(self) -> np.ndarray:
        """The (n_vocab,) little-endian float32 values as they are, not validated."""
        if self._raw is not None:
            return self._raw
        try:
            raw = base64.b64decode(self.logprobs_b64, validate=True)
        except ValueError:
            raise BadMessage("full distribution is not valid base64") from None
        if len(raw) != 4 * self.n_vocab:
            raise BadMessage(
                f"full distribution has {len(raw) / 4:g} entries, expected {self.n_vocab}"
            )
        self._raw = np.frombuffer(raw, dtype="<f4")
        return self._raw

    def logprobs(self) -> np.ndarray:
        """(n_vocab,) float32 log-probabilities (read-only); BadMessage unless finite and
        normalised. Decoded and checked once."""
        if self._array is not None:
            return self._array
        arr = self.raw()
        if not np.all(arr <= 1e-6) or np.isnan(arr).any():
            raise BadMessage("full distribution holds values that are not log-probabilities")
        mass = float(np.exp(arr.astype(np.float64)).sum())
        if abs(mass - 1.0) > NORMALISATION_TOLERANCE:
            raise BadMessage(f"full distribution sums to {mass:.4f}, expected 1")
        self._array = arr
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
    arr = np.array(logprobs, dtype="<f4")  # a copy: the distribution keeps it
    arr.setflags(write=False)
    if not 1 <= arr.shape[0] <= 1 << 22:
        raise ValueError(f"a full distribution has 1 to {1 << 22} entries, not {arr.shape[0]}")
    return FullDist.from_array(arr)


# --------------------------------------------------------------------------- RPC replies


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str
    message: str
    # With ``busy``: milliseconds after which the agent expects to have room for the request
    # (the work queued ahead of it); the requester waits that long before asking again.
    retry_after_ms: float | None = Field(default=None, ge=0, le=86_400_000)


class _Reply(Message):
    ok: Literal[True] = True
    op: str


class DistributionReply(_Reply):
    op: Literal["open", "step"]
    session: str
    n_tokens: int  # history length after this request
    dist: Distribution
    compute_ms: float  # model time of this request, as its meter charges it (energy = power x it)


class DistributionsReply(_Reply):
    """Next-token distributions at several positions of one session (speculative fusion).

    ``verify``: one distribution after each fed piece. ``draft``: ``dists[i]`` is the
    distribution ``drafted[i]`` was drawn from (after the fed pieces and ``drafted[:i]``);
    the last drafted token is not yet in the history (the next request feeds it or rewinds).
    ``lengths[i]`` is the history length, in tokens, at ``dists[i]``: what ``rewind_to``
    takes to come back to that position."""

    op: Literal["draft", "verify"]
    session: str
    dists: list[Distribution]
    lengths: list[int]
    drafted: list[int] = Field(default_factory=list)
    n_tokens: int  # history length after this request
    compute_ms: float

    @model_validator(mode="after")
    def _aligned(self) -> DistributionsReply:
        if len(self.lengths) != len(self.dists):
            raise ValueError("lengths and dists must have the same length")
        if self.op == "draft" and len(self.drafted) != len(self.dists):
            raise ValueError("a draft has one distribution per drafted token")
        if any(b < a for a, b in zip(self.lengths, self.lengths[1:])):
            raise ValueError("lengths must not decrease")
        return self


class CloseReply(_Reply):
    op: Literal["close"] = "close"
    session: str


class ScoreReply(_Reply):
    op: Literal["score"] = "score"
    target_tokens: list[int]
    logprobs: list[float]  # (len(target_tokens),) log p(y_t | x, y_<t)
    compute_ms: float


class ScoreChoicesReply(_Reply):
    op: Literal["score_choices"] = "score_choices"
    prompt_tokens: int = 0  # length of the prompt as the agent tokenized it
    targets_tokens: list[list[int]]  # (targets,) the ids scored, per target
    logprobs: list[list[float]]  # (targets, len(target)) log p(y_t | x, y_<t), nats
    compute_ms: float  # model time for all of them


class ScoreResult(BaseModel):
    """One sample of a ``score_many``: its scores, or why it could not be scored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_tokens: list[int] = Field(default_factory=list)
    logprobs: list[float] = Field(default_factory=list)  # (len(target_tokens),)
    error: ErrorBody | None = None

    @model_validator(mode="after")
    def _aligned(self) -> ScoreResult:
        if len(self.target_tokens) != len(self.logprobs):
            raise ValueError("target_tokens and logprobs must have the same length")
        return self


class ScoreManyReply(_Reply):
    op: Literal["score_many"] = "score_many"
    results: list[ScoreResult]  # in the order of the request's samples
    compute_ms: float


class TokenizeReply(_Reply):
    op: Literal["tokenize"] = "tokenize"
    tokens: list[int]


class DetokenizeReply(_Reply):
    op: Literal["detokenize"] = "detokenize"
    text: str
    pieces: list[str] | None = None


class VocabReply(_Reply):
    """Every token's text as raw bytes (what it adds to the output; empty for control tokens),
    so a gateway knows token texts ahead and never asks inside its token loop."""

    op: Literal["vocab"] = "vocab"
    tokenizer_hash: str
    n_vocab: int = Field(ge=1, le=1 << 22)
    lengths_b64: str  # base64 of (n_vocab,) little-endian uint32 byte lengths
    data_b64: str  # base64 of the concatenated token bytes

    def pieces(self) -> list[bytes]:
        try:
            lengths = np.frombuffer(base64.b64decode(self.lengths_b64, validate=True), "<u4")
            data = base64.b64decode(self.data_b64, validate=True)
        except ValueError:
            raise BadMessage("vocabulary is not valid base64") from None
        if lengths.shape[0] != self.n_vocab or int(lengths.sum()) != len(data):
            raise BadMessage("vocabulary lengths do not match its data")
        ends = np.cumsum(lengths, dtype=np.int64)
        starts = ends - lengths
        return [data[a:b] for a, b in zip(starts.tolist(), ends.tolist())]


def encode_vocab(tokenizer_hash: str, pieces: list[bytes]) -> VocabReply:
    lengths = np.array([len(x) for x in pieces], dtype="<u4")
    return VocabReply(
        tokenizer_hash=tokenizer_hash,
        n_vocab=len(pieces),
        lengths_b64=base64.b64encode(lengths.tobytes()).decode(),
        data_b64=base64.b64encode(b"".join(pieces)).decode(),
    )


class PingReply(_Reply):
    op: Literal["ping"] = "ping"
    agent_id: str
    active_sessions: int


class ProfileReply(_Reply):
    op: Literal["profile"] = "profile"
    profile: AgentProfile
    published: bool  # whether it replaced the retained profile


class ErrorReply(Message):
    ok: Literal[False] = False
    op: str | None = None
    error: ErrorBody


def error_reply(
    code: str, message: str, op: str | None = None, retry_after_ms: float | None = None
) -> ErrorReply:
    body = ErrorBody(code=code, message=message, retry_after_ms=retry_after_ms)
    return ErrorReply(op=op, error=body)


# --------------------------------------------------------------------------- requesters


class RequesterStatus(Message):
    """Retained on ``requesters/<owner>/<client>``: whether an RPC client is connected.
    ``RpcClient`` publishes ``online`` at every connection and ``gone`` when it closes; its
    last will says ``gone`` when it dies. Both ``gone`` messages expire at the broker after
    a minute, so clients that come and go leave nothing behind."""

    client_id: str = Field(pattern=NAME_PATTERN)
    state: Literal["online", "gone"]
    # unix seconds: when it connected (online); when it went, or for its last will when the
    # client was made (gone)
    since: float


# --------------------------------------------------------------------------- RPC requests

TokenList = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_TOKENS_PER_REQUEST)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


ReplyT = TypeVar("ReplyT", bound="_Reply")


# Longest a request may say its requester waits: a day, in milliseconds.
MAX_TIMEOUT_MS = 86_400_000.0


class _Request(Message, Generic[ReplyT]):
    """An RPC request; ``_Request[XReply]`` names the reply type the agent answers with, so
    ``RpcClient.call(agent, OpenRequest(...))`` is typed ``DistributionReply``.

    ``timeout_ms`` is the request's deadline, relative (as gRPC's ``grpc-timeout``, so no
    clocks need to agree): the requester stops waiting this many milliseconds after it sent
    the request. The agent counts it from when the request reaches it, never starts one whose
    deadline has passed, stops one in progress at its next tick once it has, and answers
    ``busy`` at once when the work queued ahead would not let it finish in time. None: the
    requester waits as long as it takes (old requesters). ``RpcClient`` fills it in."""

    op: str
    timeout_ms: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_MS)

    @classmethod
    def reply_type(cls) -> type[_Reply]:
        for base in cls.__mro__:
            meta = getattr(base, "__pydantic_generic_metadata__", None)
            if meta and meta.get("origin") is _Request and meta.get("args"):
                reply: type[_Reply] = meta["args"][0]
                return reply
        raise TypeError(f"{cls.__name__} does not name its reply type")


class _DistributionOptions(BaseModel):
    top_k: int | None = Field(default=None, ge=1, le=MAX_TOP_K)  # None: the agent's default
    full: bool = False  # send the whole distribution instead of the top-k
    with_pieces: bool = False  # add the text of each top-k token


class OpenRequest(_Request[DistributionReply], _DistributionOptions):
    """Open a session on a prompt; the reply carries the next-token distribution.

    ``messages`` is a conversation the agent renders with its own model's chat template
    (special tokens as themselves; ``add_bos`` does not apply)."""

    op: Literal["open"] = "open"
    prompt: Text | None = None
    tokens: TokenList | None = None
    messages: Conversation | None = None
    add_bos: bool | None = None  # None: as the model expects

    @model_validator(mode="after")
    def _one_prompt(self) -> OpenRequest:
        if sum(x is not None for x in (self.prompt, self.tokens, self.messages)) != 1:
            raise ValueError(
                "give exactly one of 'prompt' (text), 'tokens' (ids) or 'messages' (a conversation)"
            )
        if self.tokens is not None and len(self.tokens) == 0:
            raise ValueError("'tokens' must not be empty")
        return self


class StepRequest(_Request[DistributionReply], _DistributionOptions):
    """Append tokens to a session's history; reply with the next-token distribution."""

    op: Literal["step"] = "step"
    session: str = Field(min_length=1, max_length=64)
    tokens: Annotated[TokenList, Field(min_length=1)] | None = None
    # Text instead of ids: the agent tokenizes it (no BOS) and appends the tokens; how a
    # gateway feeds a token chosen by text to experts with another vocabulary.
    text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)] | None = None
    # Raw bytes instead of text (base64 in JSON): a cross-vocabulary pick may be part of a
    # UTF-8 character (byte tokens), which no str can hold.
    text_b64: Annotated[str, Field(min_length=4, max_length=2 * MAX_TEXT_CHARS)] | None = None
    # Roll the history back to its first `rewind_to` tokens before appending (backtracking,
    # speculative decoding). Must not exceed the current history length.
    rewind_to: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_input(self) -> StepRequest:
        given = sum(x is not None for x in (self.tokens, self.text, self.text_b64))
        if given != 1:
            raise ValueError("give exactly one of 'tokens' (ids), 'text' or 'text_b64'")
        if self.text_b64 is not None:
            self.text_bytes()  # valid base64 of at least one byte
        return self

    @classmethod
    def with_bytes(cls, session: str, data: bytes, **options: Any) -> StepRequest:
        return cls(session=session, text_b64=base64.b64encode(data).decode(), **options)

    def text_bytes(self) -> bytes | None:
        """The bytes to append: ``text`` as UTF-8, or ``text_b64`` decoded."""
        if self.text is not None:
            return self.text.encode()
        if self.text_b64 is None:
            return None
        try:
            data = base64.b64decode(self.text_b64, validate=True)
        except ValueError:
            raise ValueError("text_b64 is not valid base64") from None
        if not data:
            raise ValueError("text_b64 decodes to nothing")
        return data


MAX_GAMMA = 256  # tokens one draft request may ask for

# A piece fed to a session: a token id, or base64 bytes the agent tokenizes itself (how a
# gateway feeds text chosen across vocabularies).
FeedPiece = Annotated[int, Field(ge=0)] | Annotated[str, Field(min_length=4, max_length=1024)]


def _feed_bytes(piece: str) -> bytes:
    try:
        data = base64.b64decode(piece, validate=True)
    except ValueError:
        raise ValueError("a fed piece is a token id or base64 bytes") from None
    if not data:
        raise ValueError("a fed piece decodes to no bytes")
    return data


class _FeedRequest(_DistributionOptions):
    session: str = Field(min_length=1, max_length=64)
    # Roll the history back to its first `rewind_to` tokens first (a rejected draft).
    rewind_to: int | None = Field(default=None, ge=1)
    feed: Annotated[list[FeedPiece], Field(max_length=MAX_TOKENS_PER_REQUEST)]

    @model_validator(mode="after")
    def _valid_pieces(self) -> _FeedRequest:
        for piece in self.feed:
            if isinstance(piece, str):
                _feed_bytes(piece)
        return self

    def pieces(self) -> list[int | bytes]:
        """The fed pieces: token ids, or bytes to tokenize."""
        return [x if isinstance(x, int) else _feed_bytes(x) for x in self.feed]

    @staticmethod
    def encode_pieces(pieces: list[int | bytes]) -> list[int | str]:
        return [x if isinstance(x, int) else base64.b64encode(x).decode() for x in pieces]


class DraftRequest(_Request[DistributionsReply], _FeedRequest):
    """Feed pieces to a session, then draft up to ``gamma`` tokens from the model's own
    distribution (greedy at temperature 0, else sampled from the distribution sent back,
    sharpened and cut as ``moe2.agent.sampling`` does). Drafting stops early at an
    end-of-generation token or a full context.

    With ``position`` (the answer position of the first drafted token) and a ``seed``, the
    token at answer position i is the keyed draw of ``moe2.agent.sampling.draw`` for
    (seed, i), over the drafter's ids (``keys="id"``) or its tokens merged by bytes
    (``keys="bytes"``, as a gateway fusing across vocabularies names them): the draw the
    gateway makes from the fused distribution, so a drafted token is accepted exactly when
    per-token decoding would have drawn it. Without ``position``: drawn from a random
    stream seeded with ``seed``."""

    op: Literal["draft"] = "draft"
    feed: Annotated[list[FeedPiece], Field(min_length=1, max_length=MAX_TOKENS_PER_REQUEST)]
    gamma: int = Field(ge=1, le=MAX_GAMMA)
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=1 << 63)
    position: int | None = Field(default=None, ge=0, exclude_if=lambda v: v is None)
    keys: Literal["id", "bytes"] = Field(default="id", exclude_if=lambda v: v == "id")

    @model_validator(mode="after")
    def _keyed_draw_needs_seed(self) -> DraftRequest:
        if self.position is not None and self.temperature > 0 and self.seed is None:
            raise ValueError("a keyed draw ('position' at temperature > 0) needs a 'seed'")
        return self


class VerifyRequest(_Request[DistributionsReply], _FeedRequest):
    """Feed pieces to a session in one forward pass; one distribution after each piece."""

    op: Literal["verify"] = "verify"
    feed: Annotated[list[FeedPiece], Field(min_length=1, max_length=MAX_GAMMA + 1)]


class CloseRequest(_Request[CloseReply]):
    op: Literal["close"] = "close"
    session: str = Field(min_length=1, max_length=64)


class ScoreRequest(_Request[ScoreReply]):
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


class ScoreChoicesRequest(_Request[ScoreChoicesReply]):
    """Teacher-forced log-probabilities of each of several targets after one prompt (the
    options of a multiple-choice question): the prompt is evaluated once and kept, and each
    target after it, so N options cost one prompt pass instead of N."""

    op: Literal["score_choices"] = "score_choices"
    prompt: Text | None = None
    prompt_tokens: TokenList | None = None
    targets: list[Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]] | None = Field(
        default=None, min_length=1, max_length=MAX_CHOICES
    )
    targets_tokens: list[Annotated[TokenList, Field(min_length=1)]] | None = Field(
        default=None, min_length=1, max_length=MAX_CHOICES
    )
    add_bos: bool | None = None

    @model_validator(mode="after")
    def _one_each(self) -> ScoreChoicesRequest:
        if (self.prompt is None) == (self.prompt_tokens is None):
            raise ValueError("give exactly one of 'prompt' or 'prompt_tokens'")
        if (self.targets is None) == (self.targets_tokens is None):
            raise ValueError("give exactly one of 'targets' or 'targets_tokens'")
        return self


class ScoreSample(BaseModel):
    """One (prompt, target) pair of a ``score_many`` request, as in ``score``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Text | None = None
    prompt_tokens: TokenList | None = None
    target: Text | None = None
    target_tokens: TokenList | None = None
    add_bos: bool | None = None

    @model_validator(mode="after")
    def _one_each(self) -> ScoreSample:
        if (self.prompt is None) == (self.prompt_tokens is None):
            raise ValueError("give exactly one of 'prompt' or 'prompt_tokens'")
        if (self.target is None) == (self.target_tokens is None):
            raise ValueError("give exactly one of 'target' or 'target_tokens'")
        return self


MAX_SCORE_SAMPLES = 256


class ScoreManyRequest(_Request[ScoreManyReply]):
    """Several teacher-forced scorings in one request (one round trip per batch); the
    agent evaluates them together. A sample that fails has its own error in the reply."""

    op: Literal["score_many"] = "score_many"
    samples: list[ScoreSample] = Field(min_length=1, max_length=MAX_SCORE_SAMPLES)


class TokenizeRequest(_Request[TokenizeReply]):
    op: Literal["tokenize"] = "tokenize"
    text: Text
    add_bos: bool = False
    special: bool = False  # parse special-token text such as "<s>"


class DetokenizeRequest(_Request[DetokenizeReply]):
    op: Literal["detokenize"] = "detokenize"
    tokens: TokenList
    pieces: bool = False  # also return the text of each token separately


class VocabRequest(_Request[VocabReply]):
    """The text of every token of the agent's vocabulary, as bytes."""

    op: Literal["vocab"] = "vocab"


class PingRequest(_Request[PingReply]):
    op: Literal["ping"] = "ping"


class ProfileRequest(_Request[ProfileReply]):
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
    | DraftRequest
    | VerifyRequest
    | CloseRequest
    | ScoreRequest
    | ScoreChoicesRequest
    | ScoreManyRequest
    | TokenizeRequest
    | DetokenizeRequest
    | VocabRequest
    | PingRequest
    | ProfileRequest,
    Field(discriminator="op"),
]
OPERATIONS = (
    "open",
    "step",
    "draft",
    "verify",
    "close",
    "score",
    "score_choices",
    "score_many",
    "tokenize",
    "detokenize",
    "vocab",
    "ping",
    "profile",
)

_request_adapter: TypeAdapter[Any] = TypeAdapter(RpcRequest)


# --------------------------------------------------------------------------- decoding

RpcReply = Annotated[
    DistributionReply
    | DistributionsReply
    | CloseReply
    | ScoreReply
    | ScoreChoicesReply
    | ScoreManyReply
    | TokenizeReply
    | DetokenizeReply
    | VocabReply
    | PingReply
    | ProfileReply,
    Field(discriminator="op"),
]
_reply_adapter: TypeAdapter[Any] = TypeAdapter(RpcReply)
_error_adapter = TypeAdapter(ErrorReply)


def decode_request(payload: bytes | bytearray, max_bytes: int) -> Any:
    """Parse and validate an RPC request in any codec (``codec.py``); raises a
    ProtocolError subclass on bad input."""
    if payload[:1] == b"\xb1":
        from moe2.shared.protocol.codec import decode_bin1

        if len(payload) > max_bytes:
            raise MessageTooLarge(
                f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}"
            )
        kind, body = decode_bin1(payload)
        if kind != 0:
            raise BadMessage("a bin1 request must carry its JSON text (kind 0)")
        payload = body
    obj = parse_envelope(payload, max_bytes)
    op = obj.get("op")
    if op not in OPERATIONS:
        raise UnknownOperation(f"unknown op {op!r}; expected one of {', '.join(OPERATIONS)}")
    try:
        return _request_adapter.validate_python(obj)
    except ValidationError as exc:
        raise BadMessage(f"invalid {op} request: {describe_error(exc)}") from None


def decode_reply(payload: bytes | bytearray, max_bytes: int = 1 << 30) -> Any:
    """Parse an RPC reply in any codec: a reply model, or an ErrorReply."""
    if payload[:1] == b"\xb1":
        from moe2.shared.protocol.codec import decode_bin1

        kind, body = decode_bin1(payload)
        if kind != 0:
            return body
        payload = body
    obj = parse_envelope(payload, max_bytes)
    try:
        if obj.get("ok") is False:
            return _error_adapter.validate_python(obj)
        return _reply_adapter.validate_python(obj)
    except ValidationError as exc:
        raise BadMessage(f"invalid reply: {describe_error(exc)}") from None


def request_op(payload: bytes | bytearray) -> str | None:
    """Best-effort op name of a request that failed to decode (for the error reply)."""
    m = re.search(rb'"op"\s*:\s*"([a-z_]{1,20})"', bytes(payload[:4096]))
    return m.group(1).decode() if m else None
