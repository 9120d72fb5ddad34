"""moe2-http, the OpenAI-compatible front, driven by the official ``openai`` client: a real
``moe2-http`` process in front of a gateway and two tiny experts (real agents, real broker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from moe2.controller.localfleet import LocalFleet
from moe2.shared.broker import free_port, wait_for_port
from moe2.shared.client import PromptClient
from moe2.shared.mqtt import BrokerConfig
from moe2.shared.protocol import ChatMessage

openai = pytest.importorskip("openai")

KEY = "sk-test-" + uuid.uuid4().hex


@dataclass
class Front:
    url: str
    app: str
    broker: BrokerConfig
    log: Path
    clients: list[Any] = field(default_factory=list)  # closed at the end, none left to GC


@pytest.fixture(scope="module")
def front(
    broker_config: BrokerConfig,
    tiny_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Front]:
    tmp = tmp_path_factory.mktemp("openai")
    app = f"qa-{uuid.uuid4().hex[:6]}"
    a, b = f"oa-animals-{uuid.uuid4().hex[:4]}", f"oa-code-{uuid.uuid4().hex[:4]}"
    keys = tmp / "keys"
    keys.write_text(f"# keys of the test\n{KEY}\n")
    with LocalFleet(broker_config, tmp / "fleet") as fleet:
        common = ("--n-threads", "1", "--broker-keepalive", "2")
        fleet.start(a, tiny_models["animals"], *common)
        fleet.start(b, tiny_models["code"], *common, "--serve-app", f"{app}={a},{b}:2")
        fleet.wait_online([a, b], 60)
        port = free_port()
        log = tmp / "moe2-http.log"
        cmd = [
            sys.executable,
            "-c",
            "from moe2.controller.openai.cli import main; main()",
            "--port",
            str(port),
            "--api-keys-file",
            str(keys),
            "--broker-host",
            broker_config.host,
            "--broker-port",
            str(broker_config.port),
            "--log-format",
            "json",
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        front = Front(f"http://127.0.0.1:{port}/v1", app, broker_config, log)
        try:
            wait_for_port("127.0.0.1", port, 30)
            yield front
        finally:
            for c in front.clients:
                c.close()
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def http(url: str, body: bytes | None = None, key: str | None = None) -> tuple[int, dict]:
    """A raw request: (status, JSON body)."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def client(front: Front, key: str = KEY) -> openai.OpenAI:
    c = openai.OpenAI(base_url=front.url, api_key=key, max_retries=0, timeout=60)
    front.clients.append(c)
    return c


CONVERSATION = [{"role": "user", "content": "the fox eats"}]


def expected(front: Front) -> str:
    """The same conversation through the MQTT prompt API."""
    with PromptClient(front.broker) as c:
        msgs = [ChatMessage(role="user", content="the fox eats")]
        return c.ask(front.app, msgs, max_tokens=8).text


def test_chat_completion(front: Front) -> None:
    reply = client(front).chat.completions.create(
        model=front.app, messages=CONVERSATION, max_tokens=8
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == front.app
    assert choice.message.role == "assistant"
    assert choice.message.content == expected(front) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 8
    extra = reply.model_extra or {}
    assert extra["moe2"]["fusion"] == "token-id" and len(extra["moe2"]["experts"]) == 2


def test_streamed_chat_completion(front: Front) -> None:
    stream = client(front).chat.completions.create(
        model=front.app,
        messages=CONVERSATION,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(deltas) == expected(front)
    assert len([d for d in deltas if d]) >= 2  # really streamed, not one final blob
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_completion_and_models(front: Front) -> None:
    c = client(front)
    done = c.completions.create(model=front.app, prompt="the fox eats", max_tokens=8)
    with PromptClient(front.broker) as pc:
        assert done.choices[0].text == pc.ask(front.app, "the fox eats", max_tokens=8).text
    streamed = c.completions.create(
        model=front.app, prompt="the fox eats", max_tokens=8, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == done.choices[0].text
    models = [m.id for m in c.models.list()]
    assert front.app in models
    assert c.models.retrieve(front.app).id == front.app


def test_bad_key_is_401(front: Front) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        client(front, key="sk-wrong").chat.completions.create(
            model=front.app, messages=CONVERSATION
        )
    assert err.value.status_code == 401
    status, body = http(f"{front.url}/models")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_unknown_model_is_404(front: Front) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client(front).chat.completions.create(model="no-such-app", messages=CONVERSATION)
    assert err.value.status_code == 404
    assert "no-such-app" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        client(front).models.retrieve("no-such-app")


def test_unsupported_and_invalid_requests_are_400(front: Front) -> None:
    c = client(front)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        c.chat.completions.create(model=front.app, messages=CONVERSATION, n=2)
    with pytest.raises(openai.BadRequestError, match="stop"):
        c.chat.completions.create(model=front.app, messages=CONVERSATION, stop=["."])
    status, body = http(
        f"{front.url}/chat/completions", b'{"model": "x", "messages": "not a list"}', KEY
    )
    assert status == 400 and body["error"]["param"] == "body"


def test_settings_need_keys_or_no_auth(tmp_path: Path) -> None:
    from moe2.controller.openai.settings import HttpSettings
    from moe2.shared.errors import ConfigError
    from moe2.shared.settings import load_settings

    with pytest.raises(ConfigError, match="no API keys"):
        load_settings(HttpSettings)
    os.environ["MOE2_HTTP_API_KEYS"] = "a, b"
    try:
        s = load_settings(HttpSettings, env_prefix="MOE2_HTTP_")
    finally:
        del os.environ["MOE2_HTTP_API_KEYS"]
    assert s.accepted_keys() == {"a", "b"}
    assert load_settings(HttpSettings, overrides={"no_auth": True}).no_auth
