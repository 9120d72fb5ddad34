"""moe2-http, the OpenAI-compatible front, driven by the official ``openai`` client: a real
``moe2-http`` process in front of a gateway and two tiny experts (real agents, real broker),
under load and failure."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moe2.controller.localfleet import LocalFleet
from moe2.shared.broker import free_port, wait_for_port
from moe2.shared.client import PromptClient
from moe2.shared.costmodel import CostCurve
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import BrokerConfig
from moe2.shared.protocol import ChatMessage

openai = pytest.importorskip("openai")

KEY = "sk-test-" + uuid.uuid4().hex
# Greedy, the tiny experts answer this with dots up to max_tokens: a long answer on demand.
LONG = "3 plus 4"


@dataclass
class Front:
    url: str
    app: str
    broker: BrokerConfig
    log: Path
    experts: dict[str, int]  # agent id -> its metrics port
    gateway: str
    fleet: LocalFleet
    clients: list[Any] = field(default_factory=list)  # closed at the end, none left to GC

    @property
    def base(self) -> str:
        return self.url.removesuffix("/v1")


def start_front(
    broker: BrokerConfig, tmp: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], int, Path]:
    keys = tmp / "keys"
    keys.write_text(f"# keys of the test\n{KEY}\n")
    port = free_port()
    log = tmp / f"moe2-http-{port}.log"
    cmd = [
        sys.executable,
        "-c",
        "from moe2.controller.openai.cli import main; main()",
        "--port",
        str(port),
        "--api-keys-file",
        str(keys),
        "--broker-host",
        broker.host,
        "--broker-port",
        str(broker.port),
        "--broker-keepalive",
        "2",
        "--log-format",
        "json",
        *extra,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    wait_for_port("127.0.0.1", port, 30)
    return proc, port, log


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
def registry_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'registry.db'}"


@pytest.fixture(scope="module")
def front(
    broker_config: BrokerConfig,
    tiny_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
    registry_url: str,
) -> Iterator[Front]:
    from moe2.controller.registry import Registry

    Registry.open(registry_url).close()  # the controller's registry, migrated
    tmp = tmp_path_factory.mktemp("openai")
    app = f"qa-{uuid.uuid4().hex[:6]}"
    a, b = f"oa-animals-{uuid.uuid4().hex[:4]}", f"oa-code-{uuid.uuid4().hex[:4]}"
    ports = {a: free_port(), b: free_port()}
    with LocalFleet(broker_config, tmp / "fleet") as fleet:
        # Room for 40 prompts at once on each expert and at the gateway; one round trip per
        # token, so a long answer lasts while the tests look at it.
        common = ("--n-threads", "1", "--broker-keepalive", "2", "--max-sessions", "40",
                  "--n-ctx", "1024")  # fmt: skip
        fleet.start(a, tiny_models["animals"], *common, "--metrics-port", str(ports[a]))
        fleet.start(
            b,
            tiny_models["code"],
            *common,
            "--metrics-port",
            str(ports[b]),
            "--serve-app",
            f"{app}={a},{b}:2",
            "--gateway-max-concurrent",
            "40",
            "--gateway-decoding",
            "per-token",
            "--gateway-stats-interval-s",
            "1",
        )
        fleet.wait_online([a, b], 60)
        proc, port, log = start_front(
            broker_config,
            tmp,
            "--header-timeout-s",
            "1",
            "--body-timeout-s",
            "1",
            "--db-url",
            registry_url,
        )
        front = Front(f"http://127.0.0.1:{port}/v1", app, broker_config, log, ports, b, fleet)
        try:
            yield front
        finally:
            for c in front.clients:
                c.close()
            stop(proc)


def http(
    url: str,
    body: bytes | None = None,
    key: str | None = None,
    method: str | None = None,
    timeout: float = 10,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A raw request: (status, JSON body, headers)."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read()), dict(err.headers)


def scrape(
    url: str, key: str | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def eventually(check: Callable[[], bool], timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return check()


def sessions(front: Front) -> float:
    """Sessions open on the experts, from their own metrics."""
    return sum(
        total(scrape(f"http://127.0.0.1:{port}/metrics"), "moe2_agent_sessions")
        for port in front.experts.values()
    )


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
    status, body, _ = http(f"{front.url}/models")
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
    status, body, _ = http(
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


# ---------------------------------------------------------------------- errors, as statuses


def test_streamed_errors_known_before_the_first_byte_are_http_statuses(front: Front) -> None:
    c = client(front)
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="no-such-app", messages=CONVERSATION, stream=True)
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    body = {"model": "no-such-app", "messages": CONVERSATION, "stream": True}
    status, answer, headers = http(f"{front.url}/chat/completions", json.dumps(body).encode(), KEY)
    assert status == 404 and headers["content-type"] == "application/json"  # not an event
    assert answer["error"]["param"] == "model"
    # The gateway's own refusal before its first token is a status too (over its limit).
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(
            model=front.app, messages=CONVERSATION, max_tokens=100_000, stream=True
        )
    assert bad.value.status_code == 400 and "max_tokens" in str(bad.value)


def test_json_everywhere_and_no_silent_fields(front: Front) -> None:
    status, body, _ = http(f"{front.base}/no/such/route", key=KEY)
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body, headers = http(f"{front.url}/chat/completions", key=KEY)  # a GET
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    assert "POST" in headers.get("allow", "")
    c = client(front)
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(
            model=front.app, messages=CONVERSATION, response_format={"type": "json_object"}
        )
    assert err.value.body["param"] == "response_format"  # type: ignore[index]
    text = c.chat.completions.create(
        model=front.app, messages=CONVERSATION, max_tokens=2, response_format={"type": "text"}
    )
    assert text.choices[0].message.content is not None


def test_logprobs_are_never_silently_null(front: Front) -> None:
    from moe2.controller.openai.schemas import LOGPROBS_IN_PROMPT_API

    if LOGPROBS_IN_PROMPT_API:
        pytest.skip("the prompt API carries log-probabilities: see the test below")
    c = client(front)
    with pytest.raises(openai.BadRequestError, match="not supported yet") as err:
        c.chat.completions.create(model=front.app, messages=CONVERSATION, logprobs=True)
    assert err.value.body["param"] == "logprobs"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="not supported yet"):
        c.completions.create(model=front.app, prompt="the fox eats", logprobs=2)


def test_logprobs_are_the_fused_distributions(front: Front) -> None:
    """Each chosen token's logprob is log Σ_n ω_n p_n(token) of the experts that answered,
    asked here directly over RPC, step by step."""
    import math

    import numpy as np

    from moe2.controller.openai.schemas import LOGPROBS_IN_PROMPT_API
    from moe2.shared import protocol as p
    from moe2.shared.mqtt import RpcClient

    if not LOGPROBS_IN_PROMPT_API:
        pytest.skip("the prompt API does not carry per-token log-probabilities yet")
    done = client(front).completions.create(
        model=front.app, prompt="the fox eats", max_tokens=4, logprobs=3
    )
    lp = done.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs
    weights = {e["id"]: e["weight"] for e in (done.model_extra or {})["moe2"]["experts"]}
    with RpcClient(front.broker, timeout=30) as rpc:
        opened = {n: rpc.call(n, p.OpenRequest(prompt="the fox eats", full=True)) for n in weights}
        sids = {n: r.session for n, r in opened.items()}
        dists = {n: r.dist for n, r in opened.items()}
        try:
            for i in range(min(3, len(lp.tokens))):
                mix = sum(
                    w * np.exp(dists[n].logprobs().astype(np.float64)) for n, w in weights.items()
                )
                chosen = int(np.argmax(mix))  # greedy: what the gateway picked
                assert lp.token_logprobs[i] == pytest.approx(math.log(mix[chosen]), abs=1e-4)
                for n in weights:
                    step = p.StepRequest(session=sids[n], tokens=[chosen], full=True)
                    dists[n] = rpc.call(n, step).dist
        finally:
            for n, sid in sids.items():
                rpc.call(n, p.CloseRequest(session=sid))


# ---------------------------------------------------------------------- load and failure


def test_32_streams_in_flight_at_once_and_dropped_ones_free_their_sessions(front: Front) -> None:
    n = 32
    gw_metrics = f"http://127.0.0.1:{front.experts[front.gateway]}/metrics"
    cancelled_before = total(scrape(gw_metrics), "moe2_gateway_prompts_cancelled_total")
    c = openai.OpenAI(base_url=front.url, api_key=KEY, max_retries=0, timeout=120)
    front.clients.append(c)
    started = threading.Barrier(n + 1, timeout=180)
    release = threading.Event()
    seen: list[dict[str, Any]] = [{} for _ in range(n)]

    def one(i: int) -> None:
        try:
            stream = c.chat.completions.create(
                model=front.app,
                messages=[{"role": "user", "content": LONG}],
                max_tokens=500,
                stream=True,
            )
            with stream:
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        seen[i]["first"] = True
                        break
                started.wait()
                release.wait(180)
                # leaving the block closes the connection mid-answer
                seen[i]["finished"] = any(ch.choices and ch.choices[0].finish_reason for ch in [])
        except Exception as exc:  # reported below
            seen[i]["error"] = repr(exc)
            started.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    try:
        started.wait()  # every stream has its first token...
        # ...and every one is still being generated at the gateway
        in_flight = total(scrape(gw_metrics), "moe2_gateway_prompts_in_flight")
        assert in_flight == n, in_flight
        assert sessions(front) == 2 * n  # one session per stream on each expert
    finally:
        released = time.monotonic()
        release.set()
        for t in threads:
            t.join(60)
    assert all(s.get("first") and "error" not in s for s in seen), seen
    # Every dropped stream cancelled its prompt: the experts' sessions are free again.
    assert eventually(lambda: sessions(front) == 0, 60), sessions(front)
    print(f"{n} dropped streams: sessions free {time.monotonic() - released:.2f} s after")
    after = scrape(gw_metrics)
    assert total(after, "moe2_gateway_prompts_cancelled_total") - cancelled_before == n
    assert total(after, "moe2_gateway_prompts_in_flight") == 0
    front_metrics = scrape(f"{front.base}/metrics", KEY)
    assert total(front_metrics, "moe2_http_client_disconnects_total") >= n
    assert total(front_metrics, "moe2_http_in_flight") == 0


def test_a_dropped_request_before_its_answer_cancels_the_prompt(front: Front) -> None:
    gw_metrics = f"http://127.0.0.1:{front.experts[front.gateway]}/metrics"
    before = total(scrape(gw_metrics), "moe2_gateway_prompts_cancelled_total")
    # gone before the answer can be (500 tokens take the tiny fleet about a second)
    impatient = openai.OpenAI(base_url=front.url, api_key=KEY, max_retries=0, timeout=0.3)
    front.clients.append(impatient)
    with pytest.raises(openai.APITimeoutError):  # not streamed: nothing comes before the end
        impatient.chat.completions.create(
            model=front.app, messages=[{"role": "user", "content": LONG}], max_tokens=500
        )
    assert eventually(
        lambda: total(scrape(gw_metrics), "moe2_gateway_prompts_cancelled_total") == before + 1
    )
    assert eventually(lambda: sessions(front) == 0)


def test_beyond_the_gateways_capacity_is_429_with_retry_after(
    front: Front, tiny_models: dict[str, Path]
) -> None:
    app, gw = f"cap-{uuid.uuid4().hex[:6]}", f"oa-cap-{uuid.uuid4().hex[:4]}"
    front.fleet.start(
        gw,
        tiny_models["animals"],
        "--n-threads",
        "1",
        "--serve-app",
        f"{app}={gw}:1",
        "--gateway-max-concurrent",
        "1",
        "--gateway-max-pending",
        "0",
        "--gateway-decoding",
        "per-token",
    )
    try:
        front.fleet.wait_online([gw], 60)
        assert eventually(lambda: app in [m.id for m in client(front).models.list()])
        c = client(front)
        held = c.chat.completions.create(
            model=app, messages=[{"role": "user", "content": LONG}], max_tokens=500, stream=True
        )
        with held:
            next(iter(held))
            with pytest.raises(openai.RateLimitError) as err:
                c.chat.completions.create(model=app, messages=CONVERSATION, max_tokens=2)
            assert err.value.status_code == 429
            assert err.value.response.headers["retry-after"] == "1"
        # its place is given back: the next request goes through
        assert eventually(
            lambda: total(scrape(f"{front.base}/metrics", KEY), "moe2_http_in_flight") == 0
        )

        def answered() -> bool:
            # the gateway frees its one place once the cancel of the dropped stream reached it
            try:
                return bool(
                    c.chat.completions.create(
                        model=app, messages=CONVERSATION, max_tokens=2
                    ).choices
                )
            except openai.RateLimitError:
                return False

        assert eventually(answered)
    finally:
        front.fleet.stop(gw)


def test_a_stopped_gateway_is_503_not_404(front: Front, tiny_models: dict[str, Path]) -> None:
    app, gw = f"gone-{uuid.uuid4().hex[:6]}", f"oa-gone-{uuid.uuid4().hex[:4]}"
    front.fleet.start(
        gw, tiny_models["animals"], "--n-threads", "1", "--serve-app", f"{app}={gw}:1"
    )
    front.fleet.wait_online([gw], 60)
    c = client(front)
    assert eventually(lambda: app in [m.id for m in c.models.list()])
    front.fleet.stop(gw)
    assert eventually(lambda: app not in [m.id for m in c.models.list()])
    with pytest.raises(openai.InternalServerError) as err:  # an SDK retries a 503
        c.chat.completions.create(model=app, messages=CONVERSATION, stream=True)
    assert err.value.status_code == 503 and err.value.code == "model_unavailable"
    assert err.value.response.headers["retry-after"] == "1"


def test_random_model_names_make_no_metric_series(front: Front) -> None:
    from prompting import PromptInbox

    gw_metrics = f"http://127.0.0.1:{front.experts[front.gateway]}/metrics"
    names = [f"rnd{uuid.uuid4().hex[:10]}" for _ in range(100)]
    c = client(front)
    for name in names:
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model=name, messages=CONVERSATION)
    # The same names straight at the gateways over MQTT: answered unknown_app.
    before = total(scrape(gw_metrics), "moe2_gateway_prompt_errors_total", code="unknown_app")
    with PromptInbox(front.broker) as inbox:
        ids = [inbox.send(name, 1, max_tokens=2)[0] for name in names]
        assert inbox.wait_all(ids, 60)
        assert inbox.summary(ids)["errors"] == {"unknown_app": len(names)}
    for url, key in ((f"{front.base}/metrics", KEY), (gw_metrics, None)):
        samples = scrape(url, key)
        values = {v for _, labels in samples for _, v in labels}
        assert not any(name in v for name in names for v in values), url
    after = scrape(gw_metrics)
    assert total(after, "moe2_gateway_prompt_errors_total", code="unknown_app") - before == 100
    unknown = [lab for (n, lab) in after if n == "moe2_gateway_prompt_errors_total"]
    assert (("app", "_unknown"), ("code", "unknown_app")) in unknown


def test_slow_clients_are_closed(front: Front) -> None:
    port = int(front.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:  # says nothing
        s.settimeout(20)
        assert s.recv(1024) == b""  # closed by the server (header timeout 1 s)
    with socket.create_connection(("127.0.0.1", port)) as s:  # half a request head
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        s.settimeout(20)
        assert s.recv(1024) == b""
    with socket.create_connection(("127.0.0.1", port)) as s:  # the head, then half the body
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n\r\n".encode()
            + b'{"model":'
        )
        s.settimeout(20)
        head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 408"), head
        assert b'"request_timeout"' in head or b'"request_timeout"' in s.recv(4096)


def test_health_ready_metrics_and_access_log(front: Front) -> None:
    status, body, _ = http(f"{front.base}/health")
    assert status == 200 and body["ok"] is True
    status, body, _ = http(f"{front.base}/ready")
    assert status == 200 and body["ready"] and front.app in body["models"]
    status, _, _ = http(f"{front.base}/metrics")
    assert status == 401  # behind the keys
    client(front).chat.completions.create(model=front.app, messages=CONVERSATION, max_tokens=2)
    m = scrape(f"{front.base}/metrics", KEY)
    assert total(m, "process_cpu_seconds_total") > 0  # process metrics
    assert total(m, "moe2_http_requests_total", endpoint="/v1/chat/completions", status="200") >= 1
    assert total(m, "moe2_http_model_requests_total", model=front.app) >= 1
    for agent in front.experts:
        assert total(m, "moe2_fleet_agent_up", agent=agent) == 1
    assert total(m, "moe2_fleet_gateway_capacity", gateway=front.gateway) == 40 + 256
    assert total(m, "moe2_fleet_app_gateways", app=front.app) == 1
    assert total(m, "moe2_http_broker_connected") == 1
    lines = [json.loads(ln) for ln in front.log.read_text().splitlines() if ln.strip()]
    access = [r["moe2"] for r in lines if r["logger"] == "moe2.http.access"]
    assert any(
        a["path"] == "/v1/chat/completions" and a["status"] == 200 and a["model"] == front.app
        for a in access
    )


def test_broker_down_is_a_fast_503_and_health_says_so(tmp_path: Path) -> None:
    from moe2.shared.broker import start_broker

    with start_broker("mosquitto") as own:  # its own broker: stopped below
        proc, port, _log = start_front(BrokerConfig(port=own.port), tmp_path)
        try:
            base = f"http://127.0.0.1:{port}"
            c = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=10)
            status, body, _ = http(f"{base}/ready")
            assert status == 503 and body["reasons"] == ["no online gateway serves an application"]
            with pytest.raises(openai.InternalServerError) as err:
                c.chat.completions.create(model="qa", messages=CONVERSATION)
            assert err.value.code == "no_gateway"
            own.stop()  # the broker goes down
            assert eventually(lambda: http(f"{base}/health")[0] == 503)
            t0 = time.monotonic()
            with pytest.raises(openai.InternalServerError) as err:  # not the 300 s deadline
                c.chat.completions.create(model="qa", messages=CONVERSATION, stream=True)
            print(f"503 after {time.monotonic() - t0:.3f} s with the broker down")
            assert err.value.status_code == 503 and err.value.code == "broker_unavailable"
            assert err.value.response.headers["retry-after"] == "1"
            assert http(f"{base}/ready")[0] == 503
            c.close()
        finally:
            stop(proc)


# ---------------------------------------------------------------------- the fleet page

ARTEFACTS = Path(
    os.environ.get("MOE2_TEST_ARTEFACTS", Path(__file__).parents[2] / "test-artefacts")
)


def test_fleet_page_in_headless_chromium(front: Front, registry_url: str, tmp_path: Path) -> None:
    """The operator's page: the fleet's agents (with their cost curves drawn), its
    applications against the limits of the last serve decision, and that decision's
    reason, rendered by a real browser that logs in with an API key."""
    import browser

    from moe2.controller.registry import Registry
    from moe2.controller.registry.schema import Decision

    if (why := browser.missing()) is not None:
        pytest.fail(why)
    reason = f"expert {front.gateway} came back ({uuid.uuid4().hex[:6]})"
    reg = Registry.open(registry_url)
    try:
        reg.add_decision(
            Decision(
                controller="test",
                app=front.app,
                action="pushed",
                reason=reason,
                subset_json=json.dumps(sorted(front.experts)),
                version=1,
                detail_json=json.dumps({"limits": {front.app: 0.5}, "energy_limit": 3.0}),
            )
        )
    finally:
        reg.close()
    client(front).chat.completions.create(model=front.app, messages=CONVERSATION, max_tokens=4)

    def measured() -> bool:  # the gateway's stats of real answers are in, and the decision
        # (the front reads the registry at most every 5 s: an earlier test's read may stand)
        rows = http(f"{front.base}/fleet.json", key=KEY)[1]["apps"]
        return any(
            r["app"] == front.app and r["answers"] > 0 and r["delay_limit"] is not None
            for r in rows
        )

    assert eventually(measured, 30)
    summary = http(f"{front.base}/fleet.json", key=KEY)[1]
    app = next(r for r in summary["apps"] if r["app"] == front.app)
    assert app["delay_limit"] == 0.5 and app["energy_limit"] == 3.0
    assert app["gateways"] == {front.gateway: 0} and app["delay_s_per_step"] > 0
    assert summary["decisions"][0]["reason"] == reason
    assert http(f"{front.base}/fleet")[0] == 401  # behind the keys

    host = front.base.removeprefix("http://")
    with browser.Browser(tmp_path / "chromium") as b:
        b.open(f"http://operator:{KEY}@{host}/fleet")  # HTTP Basic, the key as password
        assert b.run("return document.title") == "moe2 fleet"
        agents = b.run(
            "return [...document.querySelectorAll('tr[data-agent]')].map(r => r.dataset.agent)"
        )
        assert set(front.experts) <= set(agents)
        states = b.run(
            "return Object.fromEntries([...document.querySelectorAll('tr[data-agent]')]"
            ".map(r => [r.dataset.agent, r.cells[1].textContent]))"
        )
        assert all(states[a] == "online" for a in front.experts)
        # every curve the gateway's profile has (prompt, per token and, since profiles
        # measure a scoring pass, scoring; delay and energy), each drawn and named
        profile = FleetView.snapshot(front.broker, ("profile",)).profile[front.gateway]
        has = {n for n, c in profile.curves if isinstance(c, CostCurve)}
        assert {"prompt_seconds", "token_seconds", "prompt_joules", "token_joules"} <= has
        selector = f'tr[data-agent="{front.gateway}"] svg polyline title'
        titles = b.run(
            f"return [...document.querySelectorAll('{selector}')]"
            ".map(t => t.textContent.split(':')[0])"
        )
        assert sorted(titles) == sorted(has), titles
        row = b.run(f"return document.querySelector('tr[data-app=\"{front.app}\"]').innerText")
        assert front.gateway in row and "0.5 s" in row  # served by, the delay limit
        assert reason in b.run(
            "return document.getElementById('decisions').nextElementSibling.innerText"
        )
        shot = b.screenshot(ARTEFACTS / "fleet-page.png")
        assert shot.stat().st_size > 10_000
