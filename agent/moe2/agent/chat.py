"""A conversation (``messages``) turned into the tokens this agent's model expects.

Each agent renders with its own model's chat template (the GGUF's ``tokenizer.chat_template``,
the Jinja template Hugging Face ships with the model), so when a gateway fuses experts of
different families each one sees the conversation in its own format. Rendering happens here,
not on the gateway, because only the agent has the template, the texts of its special tokens
and the tokenizer that must read them as special tokens.

    chat = ChatRenderer(backend)
    ids = chat.tokens([ChatMessage(role="user", content="Write a haiku")])

Templates are rendered by llama-cpp-python's ``Jinja2ChatFormatter`` (a sandboxed Jinja
environment with the helpers Hugging Face templates use: ``raise_exception``, ``tojson``,
``strftime_now``), with ``add_generation_prompt`` so the model answers as the assistant.
llama.cpp's own C++ template engine is not reachable through llama-cpp-python's low-level API
for arbitrary templates. As llama.cpp's server does, a BOS that the template writes is dropped
when the tokenizer adds one itself, so a prompt never starts with two.

A model without a template (a base model such as Gemma-3-270m's GGUF) completes text: a
single user message is its content unchanged; a longer conversation is a plain transcript
ending in ``Assistant:``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from moe2.shared.errors import BadMessage
from moe2.shared.protocol import ChatMessage

if TYPE_CHECKING:
    from moe2.agent.backend import ModelBackend

log = logging.getLogger(__name__)

Rendering = Literal["template", "plain"]


def plain_transcript(messages: Sequence[ChatMessage]) -> str:
    """What a model without a chat template is given."""
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].content
    lines = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


class ChatRenderer:
    def __init__(self, backend: ModelBackend) -> None:
        self.backend = backend
        info = backend.info
        self.template = info.chat_template
        self._formatter: Any = None
        if self.template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            try:
                self._formatter = Jinja2ChatFormatter(
                    template=self.template,
                    eos_token=info.eos_text or "",
                    bos_token=info.bos_text or "",
                    add_generation_prompt=True,
                )
            except Exception as exc:  # jinja2's TemplateSyntaxError and friends
                log.warning(
                    "the chat template of %s does not compile (%s: %s); conversations are "
                    "given to it as plain text",
                    info.name,
                    type(exc).__name__,
                    exc,
                )

    @property
    def rendering(self) -> Rendering:
        return "template" if self._formatter is not None else "plain"

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text, special tokens written out as text."""
        if not messages:
            raise BadMessage("a conversation needs at least one message")
        if self._formatter is None:
            return plain_transcript(messages)
        dicts = [m.model_dump(exclude_none=True) for m in messages]
        try:
            return str(self._formatter(messages=dicts).prompt)
        except Exception as exc:  # the template's raise_exception(), undefined variables...
            raise BadMessage(
                f"the chat template of {self.backend.info.name} refused the conversation: "
                f"{type(exc).__name__}: {exc}"
            ) from None

    def tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The ids the model evaluates: special tokens as themselves, one BOS at most."""
        info = self.backend.info
        text = self.render(messages)
        if self._formatter is None:  # plain text: tokenized as any prompt
            return self.backend.tokenize(text, add_bos=info.add_bos)
        bos = info.bos_text
        if info.add_bos and bos and text.startswith(bos):
            text = text[len(bos) :]
        return self.backend.tokenize(text, add_bos=info.add_bos, special=True)
