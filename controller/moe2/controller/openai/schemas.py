"""The parts of OpenAI's request bodies that moe2 honours, validated; responses are built as
OpenAI documents them (``chat.completion``, ``chat.completion.chunk``, ``text_completion``).

Fields moe2 has no use for (``frequency_penalty``, ``logit_bias``, ``user``...) are accepted
and ignored, as clients send them by default; those that would change the answer in a way
moe2 cannot honour (``n`` > 1, ``stop`` sequences, tools, a JSON ``response_format``) are
refused with a 400 that names them, rather than silently answered otherwise.

``logprobs`` (and ``top_logprobs``) are the fused distribution's: the log-probability of each
chosen token under the mixture the gateway drew it from, in OpenAI's shapes (chat:
``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``; completions:
``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``). They need a prompt API
that carries them (``PromptRequest.logprobs``); until the fleet's has it, asking is a 400.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moe2.shared import protocol as p

FinishReason = Literal["stop", "length"]
MAX_TOP_LOGPROBS = 20  # OpenAI's bound

# Whether the prompt API carries per-token log-probabilities (request option and reply fields).
LOGPROBS_IN_PROMPT_API = "logprobs" in p.PromptRequest.model_fields


class Unsupported(ValueError):
    """A request field moe2 does not honour (HTTP 400, ``param`` names it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1, max_length=128)]
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0)
    stream: bool = False
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    response_format: ResponseFormat | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise Unsupported("n", "moe2 answers one choice per request (n must be 1)")
        if self.stop:
            raise Unsupported("stop", "stop sequences are not supported; set max_tokens")
        if self.response_format is not None and self.response_format.type != "text":
            raise Unsupported(
                "response_format",
                f"response_format {self.response_format.type!r} is not supported: moe2 "
                "answers text only (no JSON mode or schema)",
            )
        if self.top_logprobs_asked() is not None and not LOGPROBS_IN_PROMPT_API:
            raise Unsupported(
                "logprobs",
                "logprobs are not supported yet: this fleet's prompt API does not carry "
                "per-token log-probabilities",
            )

    def top_logprobs_asked(self) -> int | None:
        """None: no logprobs; else how many alternatives per token (0: the chosen only)."""
        return None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def sampling(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_new_tokens,
            "temperature": 0.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "seed": self.seed,
        }


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def to_chat(self) -> p.ChatMessage:
        content = self.content
        if isinstance(content, list):
            kinds = {part.type for part in content} - {"text"}
            if kinds:
                raise Unsupported(
                    "messages", f"only text content is supported, not {', '.join(sorted(kinds))}"
                )
            content = "".join(part.text or "" for part in content)
        # OpenAI's newer "developer" role is the system prompt of the older API and of the
        # models' chat templates.
        role = "system" if self.role == "developer" else self.role
        return p.ChatMessage(role=role, content=content or "")


class ChatCompletionRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1, max_length=p.prompts.MAX_MESSAGES)]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream_options: StreamOptions | None = None
    tools: list[Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise Unsupported("tools", "tool calls are not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise Unsupported("top_logprobs", "top_logprobs needs logprobs: true")

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[p.ChatMessage]:
        return [m.to_chat() for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[str]
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)  # the legacy API: alternatives

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise Unsupported("prompt", "give one prompt per request")
        return self

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise Unsupported("echo", "echo is not supported")

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def finish_reason(answer: p.PromptAnswer) -> FinishReason:
    # moe2's "context" (an expert's context filled up) is a length limit to OpenAI clients.
    return "stop" if answer.finish_reason == "stop" else "length"


def usage(answer: p.PromptAnswer) -> dict[str, int]:
    # Experts with different tokenizers count a prompt differently, and the gateway reports
    # only the fused steps: prompt_tokens is 0, completion_tokens the generated tokens.
    return {"prompt_tokens": 0, "completion_tokens": answer.tokens, "total_tokens": answer.tokens}


def moe2_extension(answer: p.PromptAnswer) -> dict[str, Any]:
    """What moe2 adds to a response (OpenAI clients keep unknown fields)."""
    return {
        "experts": [e.model_dump() for e in answer.experts],
        "fusion": answer.fusion,
        "gateway": answer.gateway,
        "latency_ms": answer.latency_ms,
        "dropped": [d.model_dump() for d in answer.dropped],
    }


# ---------------------------------------------------------------------- log-probabilities
# The prompt API's per-token figures, as these functions read them: each token's text, its
# fused log-probability (nats), its bytes, and the most likely alternatives at its position.


class AltLogprob(Protocol):
    @property
    def token(self) -> str: ...
    @property
    def logprob(self) -> float: ...
    @property
    def bytes(self) -> Sequence[int] | None: ...


class TokenLogprob(AltLogprob, Protocol):
    @property
    def top_logprobs(self) -> Sequence[AltLogprob]: ...


def prompt_logprobs(req: p.PromptRequest, top: int | None) -> p.PromptRequest:
    """``req`` asking for per-token log-probabilities (``top`` alternatives each)."""
    if top is None:
        return req
    return p.PromptRequest.model_validate(
        {**req.model_dump(exclude_none=True), "logprobs": True, "top_logprobs": top}
    )


def tokens_of(reply: object) -> Sequence[TokenLogprob]:
    """The per-token figures a chunk or final answer carries (none when not asked)."""
    tokens: Sequence[TokenLogprob] | None = getattr(reply, "logprobs", None)
    return tokens or []


def _alt(t: AltLogprob) -> dict[str, Any]:
    data = list(t.bytes) if t.bytes is not None else list(t.token.encode())
    return {"token": t.token, "logprob": t.logprob, "bytes": data}


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """A chat choice's (or chunk's) ``logprobs``."""
    return {
        "content": [{**_alt(t), "top_logprobs": [_alt(a) for a in t.top_logprobs]} for t in tokens],
        "refusal": None,
    }


def completion_logprobs(tokens: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """A completion choice's ``logprobs`` (the legacy shape); ``offset``: characters of the
    answer before these tokens."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{a.token: a.logprob for a in t.top_logprobs} for t in tokens],
        "text_offset": offsets,
    }
