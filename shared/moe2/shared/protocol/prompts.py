"""The public prompt API (docs/protocol.md, "The prompt API").

A client publishes to ``moe2/v1/prompts/<app>``::

    {"id": "42", "prompt": "the fox eats", "reply_to": "phone/7/answers",
     "max_tokens": 32, "temperature": 0.0, "stream": true}

or a conversation instead of ``prompt``, which each expert renders with its own model's chat
template (so with experts of different families each sees it in its own format)::

    {"id": "43", "messages": [{"role": "system", "content": "Answer briefly."},
                              {"role": "user", "content": "Name a prime."}],
     "reply_to": "phone/7/answers"}

and receives on ``reply_to`` (and on its MQTT 5 ResponseTopic with its CorrelationData, when
given) optional chunks ``{"id", "index", "delta"}``, then exactly one final answer or exactly
one error ``{"id", "error": {"code", "message"}}``.

A prompt that carries ``"choices": ["Paris", "Rome", ...]`` is a multiple-choice question: the
gateway scores every choice as the text that follows the prompt on the top-k experts of the
application's subset, fuses the log-likelihoods with the one mixing rule, and answers one
``ChoiceAnswer`` ``{"id", "choice": index, "logprobs": [...], "experts", "mixing", "steps",
"latency_ms", "compute_ms", "app", "dropped", "gateway"}`` (no stream chunks).

A client that no longer wants an answer (its user went away) publishes a ``PromptCancel``
``{"id", "reply_to"}`` (both as the prompt gave them) to ``moe2/v1/cancel/<app>`` (or
``moe2/v1/cancel/<app>/<its login>`` on a broker with logins, where the ACL binds it): every
gateway sees it, the one holding the prompt stops its generation (freeing the experts'
sessions) and answers the prompt ``cancelled``; a cancel that comes before its prompt is
remembered for a minute.

These payloads carry no schema version: the topic's ``v1`` is the version, so that any MQTT
client can speak it.
"""

from __future__ import annotations

import json
import re
from json.decoder import scanstring  # type: ignore[attr-defined]  # public, untyped in typeshed
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from moe2.shared.errors import BadMessage, MessageTooLarge
from moe2.shared.protocol.base import MAX_CHOICES, MAX_TEXT_CHARS, describe_error
from moe2.shared.protocol.topics import reply_owner, topics

MAX_PROMPT_ID = 128
MAX_MESSAGES = 256  # turns in one conversation
MAX_TOPIC = 512
# What a broker accepts in a topic name: no wildcards, and none of the code points MQTT
# forbids or lets a server refuse (controls U+0000-001F and U+007F-009F, surrogates,
# non-characters). mosquitto answers a PUBLISH to such a topic by dropping the connection as
# malformed, and a kept session sends the same PUBLISH again on every reconnect: one prompt
# with such a reply_to would cut its gateway off the broker for good.
_TOPIC_OK = re.compile("^[^#+\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef]+$")
_STRUCTURE = re.compile(r'"|,|[\[{]+|[\]}]+')  # runs of brackets at once
_NESTED = re.compile(r'"|[\[{]+|[\]}]+')  # inside brackets, commas do not matter


def check_publish_topic(topic: str) -> str:
    if (
        not topic
        or len(topic) > MAX_TOPIC
        or not _TOPIC_OK.match(topic)
        or topic.startswith("$")
        or any(ord(c) & 0xFFFE == 0xFFFE for c in topic)  # U+xFFFE, U+xFFFF: non-characters
    ):
        raise ValueError(
            "must be a topic to publish to: 1-512 characters, no '+', '#', control characters "
            "or non-characters, not starting with '$'"
        )
    return topic


def check_reply_topic(topic: str, owner: str | None = None) -> str:
    """A topic a gateway may answer on (``reply_to`` or the MQTT 5 ResponseTopic).

    Inside ``moe2/`` only the replies namespace ``moe2/v1/replies/<user>/...``, and not its
    ``rpc`` subtree (RPC replies): a prompt must not make a gateway write into another
    client's RPC inbox, an agent's topics or the desired state. Outside ``moe2/`` any topic,
    where the broker lets gateways publish (a broker without logins; see
    ``Gateway.may_reply_outside``).

    ``owner``: the login that published the prompt (its topic ``prompts/<app>/<owner>``
    says so, bound by the broker's ACL); then ``<user>`` must be ``owner``, so no prompt
    makes a gateway write into another user's inbox."""
    check_publish_topic(topic)
    replies = topics.REPLIES_ROOT
    if topic.split("/", 1)[0] != "moe2":
        return topic
    user = reply_owner(topic)
    if user is None:
        raise ValueError(
            f"inside moe2/ a reply topic must be {replies}/<user>/... (not .../rpc/...), "
            "the subtree the broker lets user <user> read"
        )
    if owner is not None and user != owner:
        raise ValueError(
            f"a prompt of user {owner!r} is answered only in {replies}/{owner}/..., not "
            f"in another user's replies ({user!r})"
        )
    return topic


def addressable(payload: bytes | bytearray) -> tuple[str | None, str | None]:
    """(id, reply_to) of a prompt that failed validation, when its top level has them as
    strings: enough to address an error to the sender. Never recursive, whatever the nesting
    (a deeply nested value is skipped over), and never returns a string that cannot be sent
    back as UTF-8 (a lone surrogate), nor a key given twice (which of the two was meant is
    anybody's guess)."""
    fields = _top_level_strings(bytes(payload), ("id", "reply_to"))
    pid = fields.get("id")
    if pid is not None and not (0 < len(pid) <= MAX_PROMPT_ID):
        pid = None
    return pid, fields.get("reply_to")


def _top_level_strings(data: bytes, wanted: tuple[str, ...]) -> dict[str, str]:
    """The string values of ``wanted`` keys of a JSON object's top level (best effort: {}
    when it is not an object), leaving out keys given more than once. Nested values are
    skipped by counting brackets outside strings, so no depth limit applies."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return {}
    pairs = _top_level_pairs(text)
    keys = [k for k, _ in pairs]
    return {
        k: v
        for k, v in pairs
        if k in wanted and v is not None and keys.count(k) == 1 and _utf8_safe(v)
    }


def _top_level_pairs(text: str) -> list[tuple[str, str | None]]:
    """(key, string value or None) of each member of the object's top level, in order, up
    to where it stops being well-formed."""
    out: list[tuple[str, str | None]] = []
    i, n = _skip_ws(text, 0), len(text)
    if i >= n or text[i] != "{":
        return out
    i += 1
    while True:
        i = _skip_ws(text, i)
        if i >= n or text[i] != '"':
            return out  # the end of the object, or not JSON
        try:
            key, i = scanstring(text, i + 1)
        except ValueError:
            return out
        i = _skip_ws(text, i)
        if i >= n or text[i] != ":":
            return out
        i = _skip_ws(text, i + 1)
        value: str | None = None
        if i < n and text[i] == '"':
            try:
                value, i = scanstring(text, i + 1)
            except ValueError:
                return out
        else:
            i = _skip_value(text, i)
            if i < 0:
                return out
        out.append((key, value))
        i = _skip_ws(text, i)
        if i < n and text[i] == ",":
            i += 1
            continue
        return out


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _skip_value(text: str, i: int) -> int:
    """Index just past the non-string JSON value at ``i`` (-1 when it does not end)."""
    depth = 0
    while True:
        m = (_STRUCTURE if depth == 0 else _NESTED).search(text, i)
        if m is None:
            return -1
        i, run = m.start(), m.group()
        if run == '"':
            try:
                _, i = scanstring(text, i + 1)
            except ValueError:
                return -1
            if depth == 0:
                return i
            continue
        if run == ",":
            if depth == 0:  # after a number, true, false or null
                return i
            i += 1
        elif run[0] in "[{":
            depth += len(run)
            i = m.end()
        else:  # a run of closing brackets
            if depth == 0:
                return i  # the end of the enclosing object: the value ended before it
            if len(run) >= depth:
                return i + depth
            depth -= len(run)
            i = m.end()


def _utf8_safe(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape
        return False
    return True


class _Public(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ChatRole = Literal["system", "user", "assistant", "tool"]


class ChatMessage(_Public):
    """One turn of a conversation, as OpenAI's chat API and Hugging Face templates have it."""

    role: ChatRole
    content: Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


Conversation = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]


def conversation_text(messages: list[ChatMessage]) -> str:
    """The text a gate weighs a conversation by: its last user turn (what the experts are
    asked to answer now), else its last turn."""
    users = [m for m in messages if m.role == "user"]
    return (users or messages)[-1].content


class PromptRequest(_Public):
    id: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_ID)]
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)] | None = None
    messages: Conversation | None = None  # instead of prompt
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
        return check_reply_topic(v)

    @model_validator(mode="after")
    def _one_input(self) -> PromptRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'messages' (a conversation)")
        if self.messages is not None and sum(len(m.content) for m in self.messages) > (
            MAX_TEXT_CHARS
        ):
            raise ValueError(f"the conversation exceeds {MAX_TEXT_CHARS} characters")
        if self.choices is not None and self.prompt is None:
            raise ValueError("'choices' go with a text 'prompt', not with 'messages'")
        return self

    @property
    def gate_text(self) -> str:
        """What the gate weighs the experts by."""
        if self.messages is not None:
            return conversation_text(self.messages)
        return self.prompt or ""


class PromptCancel(_Public):
    """Published on ``moe2/v1/cancel/<app>[/<user>]``: stop answering prompt ``id``.
    ``reply_to`` must be the prompt's own, so a cancel names the prompt of one client, not any
    prompt that happens to share an id; the topic's ``<app>`` and ``<user>`` must be those of
    the prompt's topic, so a user cancels only its own prompts."""

    id: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_ID)]
    reply_to: str

    @field_validator("reply_to")
    @classmethod
    def _reply_topic(cls, v: str) -> str:
        return check_reply_topic(v)


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
    gate_ms: float | None = None  # the gate's part of latency_ms (once per prompt)
    compute_ms: dict[str, float] = Field(default_factory=dict)  # model time each reported


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
    gate_ms: float | None = None  # the gate's part of latency_ms
    prompt_tokens: dict[str, int] = Field(default_factory=dict)  # the prompt, in each's tokens


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
    empty) lets the caller still address an error to a usable ``id``/``reply_to``. A key
    given twice in any object is refused: JSON parsers disagree on which one counts, so the
    gateway and whoever reads the prompt after it could act on different ones."""
    if len(payload) > max_bytes:
        raise MessageTooLarge(f"prompt message of {len(payload)} bytes exceeds {max_bytes}")
    try:
        raw = _json_object.validate_json(payload)
    except ValidationError as exc:
        raise BadMessage(f"prompt is not a JSON object: {describe_error(exc)}") from None
    _refuse_duplicate_keys(payload)
    try:
        return PromptRequest.model_validate(raw), raw
    except ValidationError as exc:
        raise BadMessage(f"invalid prompt: {describe_error(exc)}") from None


MAX_CANCEL_BYTES = 4096


def decode_cancel(payload: bytes | bytearray) -> PromptCancel:
    """A ``PromptCancel``; raises BadMessage/MessageTooLarge."""
    if len(payload) > MAX_CANCEL_BYTES:
        raise MessageTooLarge(f"cancel message of {len(payload)} bytes exceeds {MAX_CANCEL_BYTES}")
    try:
        cancel = PromptCancel.model_validate_json(payload)
    except ValidationError as exc:
        raise BadMessage(f"invalid cancel: {describe_error(exc)}") from None
    _refuse_duplicate_keys(payload, "cancel")  # as for prompts: one reading of id/reply_to
    return cancel


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _refuse_duplicate_keys(payload: bytes | bytearray, what: str = "prompt") -> None:
    """BadMessage when an object of ``payload`` (valid JSON already) repeats a key."""
    try:
        json.loads(payload, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise BadMessage(f"invalid {what}: the key {exc.args[0]!r} is given twice") from None
    except (ValueError, RecursionError) as exc:  # accepted by pydantic, not by json: refuse
        raise BadMessage(f"{what} is not a JSON object: {type(exc).__name__}") from None
