"""The parts of OpenAI's request bodies that moe2 honours, validated; responses are built as
OpenAI documents them (``chat.completion``, ``chat.completion.chunk``, ``text_completion``).

Fields moe2 has no use for (``frequency_penalty``, ``logit_bias``, ``user``...) are accepted
and ignored, as clients send them by default; those that would change the answer in a way
moe2 cannot honour (``n`` > 1, ``stop`` sequences, tools) are refused with a 400 that names
them, rather than silently answered otherwise.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moe2.shared import protocol as p

FinishReason = Literal["stop", "length"]


class Unsupported(ValueError):
    """A request field moe2 does not honour (HTTP 400, ``param`` names it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


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

    def check_supported(self) -> None:
        if self.n != 1:
            raise Unsupported("n", "moe2 answers one choice per request (n must be 1)")
        if self.stop:
            raise Unsupported("stop", "stop sequences are not supported; set max_tokens")

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

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise Unsupported("tools", "tool calls are not supported")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[p.ChatMessage]:
        return [m.to_chat() for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[str]
    stream_options: StreamOptions | None = None
    echo: bool = False

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
