"""The public prompt API (DESIGN.md §3).

A client publishes to ``moe2/v1/prompts/<app>``::

    {"id": "42", "prompt": "the fox eats", "reply_to": "phone/7/answers",
     "max_tokens": 32, "temperature": 0.0, "stream": true}

and receives on ``reply_to`` (and on its MQTT 5 ResponseTopic with its CorrelationData, when
given) optional chunks ``{"id", "index", "delta"}``, then exactly one final answer or exactly
one error ``{"id", "error": {"code", "message"}}``.

A prompt that carries ``"choices": ["Paris", "Rome", ...]`` is a multiple-choice question: the
gateway scores every choice as the text that follows the prompt on the top-k experts of the
application's subset, fuses the log-likelihoods with the one mixing rule, and answers one
``ChoiceAnswer`` ``{"id", "choice": index, "logprobs": [...], "experts", "mixing", "steps",
"latency_ms", "compute_ms", "app", "dropped", "gateway"}`` (no stream chunks).

These payloads carry no schema version: the topic's ``v1`` is the version, so that any MQTT
client can speak it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from moe2.shared.errors import BadMessage, MessageTooLarge
from moe2.shared.protocol.base import MAX_CHOICES, MAX_TEXT_CHARS, describe_error

MAX_PROMPT_ID = 128
MAX_TOPIC = 512
_TOPIC_OK = re.compile(r"^[^#+\x00]+$")


def check_publish_topic(topic: str) -> str:
    if not topic or len(topic) > MAX_TOPIC or not _TOPIC_OK.match(topic) or topic.startswith("$"):
        raise ValueError(
            "must be a topic to publish to: 1-512 characters, no '+', '#', NUL, not starting "
            "with '$'"
        )
    return topic


class _Public(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PromptRequest(_Public):
    id: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_ID)]
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
    reply_to: str
    max_tokens: int | None = Field(default=None, ge=1)  # the gateway caps it (error above)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0)  # 0: greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    seed: int | None = Field(default=None, ge=0, le=(1 << 63) - 1)  # sampling seed
    # A multiple-choice question: the options, scored as the text that follows the prompt
    # (give them their leading space, e.g. " Paris"); the answer is a ChoiceAnswer.
    choices: list[Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]] | None = Field(
        default=None, min_length=2, max_length=MAX_CHOICES
    )

    @field_validator("reply_to")
    @classmethod
    def _reply_topic(cls, v: str) -> str:
        return check_publish_topic(v)


class StreamChunk(_Public):
    id: str
    index: int  # 0, 1, 2... in order
    delta: str


class ExpertWeight(_Public):
    id: str
    weight: float


class DroppedExpert(_Public):
    id: str
    reason: str
    at_token: int


class PromptAnswer(_Public):
    id: str
    text: str
    finish_reason: Literal["stop", "length", "context"]
    experts: list[ExpertWeight]  # the experts that answered, with their final weights
    tokens: int  # generated tokens (fusion steps)
    latency_ms: float
    app: str
    fusion: Literal["token-id", "token-text"]  # same vocabulary, or aligned by text
    dropped: list[DroppedExpert] = Field(default_factory=list)
    gateway: str | None = None  # the gateway that answered


class ChoiceAnswer(_Public):
    """The answer to a prompt with ``choices``."""

    id: str
    choice: int  # index of the option with the highest fused log-likelihood
    logprobs: list[float]  # (choices,) fused log-likelihood of each option, nats
    experts: list[ExpertWeight]  # the experts whose scores were fused, with their weights
    mixing: Literal["token", "sequence"]  # per token (one vocabulary) or per whole option
    steps: list[int]  # (choices,) tokens of each option (across vocabularies the longest)
    latency_ms: float  # from the gateway receiving the prompt to this answer
    compute_ms: dict[str, float]  # model time each expert reported for its scores
    app: str
    dropped: list[DroppedExpert] = Field(default_factory=list)
    gateway: str | None = None


class PromptErrorBody(_Public):
    code: str
    message: str


class PromptError(_Public):
    id: str | None
    error: PromptErrorBody


def prompt_error(prompt_id: str | None, code: str, message: str) -> PromptError:
    return PromptError(id=prompt_id, error=PromptErrorBody(code=code, message=message))


_json_object: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])


def decode_prompt(
    payload: bytes | bytearray, max_bytes: int
) -> tuple[PromptRequest, dict[str, Any]]:
    """(request, raw object). Raises BadMessage/MessageTooLarge; the raw object (possibly
    empty) lets the caller still address an error to a usable ``id``/``reply_to``."""
    if len(payload) > max_bytes:
        raise MessageTooLarge(f"prompt message of {len(payload)} bytes exceeds {max_bytes}")
    try:
        raw = _json_object.validate_json(payload)
    except ValidationError as exc:
        raise BadMessage(f"prompt is not a JSON object: {describe_error(exc)}") from None
    try:
        return PromptRequest.model_validate(raw), raw
    except ValidationError as exc:
        raise BadMessage(f"invalid prompt: {describe_error(exc)}") from None
