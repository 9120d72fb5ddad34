"""The one mixing rule: per token when a sample's scores share one tokenizer hash, per sequence
when they don't, decided from the stored hashes (never from token counts), and the same arrays
in gate training, the optimizer and evaluation."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import numpy as np
import pytest
from tinyfleet import register_experts

from moe2.agent.backend import ModelInfo
from moe2.controller import datasets as ds
from moe2.controller.collect import collect
from moe2.controller.evaluate.answerer import Question, Route, ScoreAnswerer
from moe2.controller.experts.domains import all_words
from moe2.controller.experts.tiny import build_vocab, write_expert
from moe2.controller.gate.train import TrainData
from moe2.controller.localfleet import LocalFleet
from moe2.controller.mixing import SEQUENCE, TOKEN, level_of, mix, mixture_loglik
from moe2.controller.optimize.fromregistry import GateDelay, scored_set
from moe2.controller.optimize.objective import Evaluator
from moe2.controller.registry import Registry
from moe2.controller.registry.sync import online_experts, sync_once
from moe2.shared import mixing as shared_mixing
from moe2.shared import protocol as p
from moe2.shared.client import PromptClient
from moe2.shared.costmodel import CostCurve
from moe2.shared.errors import ConfigError
from moe2.shared.mqtt import BrokerConfig, RpcClient

LLAMA, QWEN = "hash-llama", "hash-qwen"


def _info(name: str, tokenizer: str) -> ModelInfo:
    return ModelInfo(
        name=name,
        architecture="llama",
        quantization="F32",
        n_ctx=512,
        n_vocab=100,
        n_params=1000,
        model_bytes=4000,
        tokenizer_hash=tokenizer,
        bos_id=1,
        eos_ids=(2,),
        add_bos=True,
        chat_template=None,
    )


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    """Two samples with two options; experts a and b share a vocabulary, c has its own but
    (by chance) tokenizes every target into as many tokens as a and b do."""
    r = Registry.open(f"sqlite:///{tmp_path / 'r.db'}")
    samples = [
        ds.Sample("qa", "Q1?", (" yes", " no"), 0),
        ds.Sample("qa", "Q2?", (" red", " blue"), 1),
    ]
    r.add_dataset("mix", "multiple-choice", "test", samples)
    rows = []
    logp = {  # expert -> sample -> option -> per-token log-probabilities
        "a": [[[-0.1, -0.2], [-3.0, -1.0]], [[-2.0, -2.0], [-0.5, -0.4]]],
        "b": [[[-1.0, -2.5], [-0.2, -0.3]], [[-0.3, -0.1], [-3.0, -2.0]]],
        "c": [[[-0.7, -0.7], [-0.9, -0.6]], [[-1.1, -0.2], [-0.4, -1.5]]],
    }
    hashes = {"a": LLAMA, "b": LLAMA, "c": QWEN}
    for i, smp in enumerate(r.samples("mix")):
        for o in range(2):
            for e in logp:
                rows.append(
                    {
                        "sample_id": smp.id,
                        "expert": e,
                        "option": o,
                        "tokenizer_hash": hashes[e],
                        "tokens": [5, 6],
                        "logprobs": logp[e][i][o],
                        "prompt_tokens": 3,
                    }
                )
    r.add_scores(rows)
    placement = {"a": ("rtx4090", 7.0), "b": ("orin-agx-64gb", 3.0), "c": ("cpu-generic", 0.5)}
    register_experts(r, {e: _info(e, hashes[e]) for e in logp}, placement)
    return r


def test_the_level_comes_from_the_hashes() -> None:
    assert level_of([frozenset({LLAMA}), frozenset({LLAMA})]) == TOKEN
    assert level_of([frozenset({LLAMA}), frozenset({QWEN})]) == SEQUENCE
    # an expert whose vocabulary changed between options cannot be fused per token either
    assert level_of([frozenset({LLAMA, QWEN}), frozenset({LLAMA})]) == SEQUENCE


def test_equal_token_counts_across_vocabularies_mix_per_sequence(reg: Registry) -> None:
    same = mix(reg.score_table("mix", ["a", "b"]))
    assert same.per_token.all() and same.mask[:, :, :2].all()
    mixed = mix(reg.score_table("mix", ["a", "b", "c"]))
    assert not mixed.per_token.any()
    assert mixed.mask.shape[-1] == 1  # one unit per option: the whole target
    np.testing.assert_allclose(mixed.target(0)[:, 0], [-0.3, -3.5, -1.4])
    assert mixed.steps[0].tolist() == [2, 2]


def test_one_vocabulary_with_different_token_counts_is_refused(reg: Registry) -> None:
    table = reg.score_table("mix", ["a", "b"])
    table.logp[0][1][1, 1] = np.nan  # b stored one token fewer for sample 0, option 1
    with pytest.raises(ConfigError, match="share one tokenizer hash but stored different token"):
        mix(table, "mix")


def test_training_the_optimizer_and_evaluation_mix_alike(reg: Registry) -> None:
    for experts in (["a", "b"], ["a", "b", "c"]):
        table = reg.score_table("mix", experts)
        reference = mix(table, "mix")
        train = TrainData.build(table, np.zeros((2, 4), np.float32), "mix").mixed
        np.testing.assert_array_equal(train.logp, reference.logp)
        np.testing.assert_array_equal(train.per_token, reference.per_token)
        data = scored_set(reg, "mix", gate_version="uniform", experts=experts)
        np.testing.assert_array_equal(data.mixed.logp, reference.logp)
        problem = data.problem({}, None)
        for i in range(2):
            np.testing.assert_array_equal(problem.logp[i], reference.target(i))
        # The gateway's own time per answer falls on step 1 of every expert alike: each
        # subset's delay grows by exactly own / T.
        flat = CostCurve(
            unit="s", coef=[0.002], residual_std=0, rel_residual_std=0, n_points=3,
            min_tokens=1, max_tokens=4,
        )  # fmt: skip
        own = p.GatewayOverhead(generated=flat, scored=flat, answers=3)
        timed = data.problem({}, None, gate_delay=GateDelay(own=own))
        np.testing.assert_allclose(timed.prompt_delay, problem.prompt_delay + 0.002)
        np.testing.assert_array_equal(timed.decode_delay, problem.decode_delay)
        assert timed.meta["gateway_own_s"] == pytest.approx(0.002)
        # J(N) with uniform weights = the training loss function = the sum over units of
        # log of the mean probability, written out
        n = len(experts)
        j = Evaluator(problem).objective(list(range(n)))
        log_w = np.full((2, n), -math.log(n))
        assert reference.loss(log_w) == pytest.approx(j, abs=1e-12)
        by_hand = -np.mean(
            [mixture_loglik(log_w[i][:, None], reference.target(i)) for i in range(2)]
        )
        assert by_hand == pytest.approx(j, abs=1e-12)
        # evaluation picks the option of highest fused log-likelihood under the same rule
        answerer = ScoreAnswerer(data)
        qs = [Question(i, "", ("x", "y"), int(reference.answer[i]), "qa") for i in range(2)]
        got = answerer.answer(qs, Route(tuple(experts), n, "uniform"))
        want = reference.option_loglik(log_w).argmax(1)
        assert [a.choice for a in got] == want.tolist()


def test_the_level_is_decided_over_the_experts_mixed_as_the_gateway_decides_it(
    reg: Registry,
) -> None:
    """a and b share a vocabulary, c has another: all three mix per sequence, but a and b
    alone mix per token, in the controller as in the gateway (the one function)."""
    whole = mix(reg.score_table("mix", ["a", "b", "c"]), "mix")
    assert not whole.per_token.any()
    half = math.log(0.5)
    log_w = np.array([[half, half, -math.inf]] * 2)  # a and b, equal weights; c left out
    got = whole.option_loglik(log_w)
    pair = mix(reg.score_table("mix", ["a", "b"]), "mix").option_loglik(np.full((2, 2), half))
    np.testing.assert_allclose(got, pair)
    # what the gateway computes from the same scores (choices.py: the chosen experts' hashes)
    table = reg.score_table("mix", ["a", "b"])
    level = shared_mixing.level_of([frozenset({LLAMA}), frozenset({LLAMA})])
    assert level == TOKEN
    for i in range(2):
        for o in range(2):
            u = shared_mixing.units(table.logp[i][o], level, "q")
            want = shared_mixing.mixture_loglik(np.full((2, 1), half), u)
            assert got[i, o] == pytest.approx(float(want))
    # with c in, per sequence: the product of each expert's token probabilities is mixed
    every = whole.option_loglik(np.full((2, 3), math.log(1 / 3)))
    seq = np.log(np.exp(whole.raw[0, 0].sum(axis=1)).mean())  # type: ignore[union-attr]
    assert every[0, 0] == pytest.approx(seq)


def test_a_mixed_family_fleet_answers_alike_in_the_controller_and_the_gateway(
    broker_config: BrokerConfig,
    tiny_models: dict[str, Path],
    tmp_path: Path,
) -> None:
    """Three live experts: animals and cooking on one vocabulary, a cooking expert on another.
    The gateway serves animals + cooking: it mixes their scores per token; the controller, on
    the scores stored for all three, must fuse that subset per token too and pick the same
    option with the same log-likelihoods (it used to mix per sequence: all three's level)."""
    words = (*all_words(), "aardvark", "abacus")
    other = write_expert(tmp_path / "tiny-cooking-other.gguf", "cooking", vocab=build_vocab(words))
    a, k, o = (f"{x}-{uuid.uuid4().hex[:6]}" for x in ("ani", "coo", "oth"))
    reg = Registry.open(f"sqlite:///{tmp_path / 'live.db'}")
    samples = ds.tiny_domains(("animals", "cooking"), 6, seed=7, choices=3)
    reg.add_dataset("fam", ds.CHOICE, "tiny", samples)
    with LocalFleet(broker_config, tmp_path / "fleet") as fleet:
        common = ("--n-threads", "1", "--no-profile-on-start")
        fleet.start(a, tiny_models["animals"], *common)
        fleet.start(k, tiny_models["cooking"], *common)
        fleet.start(o, other, *common, "--serve-app", f"fam={a},{k}:2")
        fleet.wait_online([a, k, o], 60)
        sync_once(reg, broker_config)
        online = {e: i for e, i in online_experts(reg).items() if e in (a, k, o)}
        with RpcClient(broker_config, timeout=30) as rpc:
            assert collect(reg, rpc, "fam", online).complete
        with PromptClient(broker_config) as client:
            answers = [client.choose("fam", s.prompt, list(s.targets), timeout=30) for s in samples]
    whole = mix(reg.score_table("fam", [a, k, o]), "fam")
    reg.close()
    assert not whole.per_token.any()  # the three together: per sequence
    half = math.log(0.5)
    log_w = np.array([[half, half, -math.inf]] * len(samples))
    ll = whole.option_loglik(log_w)
    for i, answer in enumerate(answers):
        assert answer.mixing == "token"
        assert {e.id for e in answer.experts} == {a, k}
        # batched scoring on F32 tiny experts sums in another order: up to ~1e-3 apart
        np.testing.assert_allclose(answer.logprobs, ll[i, : len(answer.logprobs)], atol=2e-3)
        assert answer.choice == int(np.argmax(ll[i]))
