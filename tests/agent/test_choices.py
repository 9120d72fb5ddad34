"""Multiple-choice prompts through the gateway: every choice scored on the chosen experts
(``score_choices``: the prompt evaluated once), fused with the one mixing rule (per token on one
vocabulary, per whole option across vocabularies), the answer the option of highest fused
log-likelihood; prompt-only requests keep their answers."""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend
from moe2.controller.experts.domains import all_words
from moe2.controller.experts.tiny import build_vocab, write_expert
from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.client import PromptClient
from moe2.shared.errors import BadMessage
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import BrokerConfig, Connection, RpcClient, response_properties

PROMPT = "the fox eats the"
CHOICES = [" red apple", " small bird", " hot oven", " def compute ( x ) :"]


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def fleet(broker_config: BrokerConfig, tmp_path: Path) -> Iterator[LocalFleet]:
    with LocalFleet(broker_config, tmp_path / "fleet") as f:
        yield f


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
    fleet.wait_online([agent_id], 60)
    return agent_id


def direct(backend: LlamaCppBackend, prompt: str, choices: list[str]) -> list[np.ndarray]:
    ids = backend.tokenize(prompt, add_bos=backend.info.add_bos)
    return [backend.score(ids, backend.tokenize(c, add_bos=False)) for c in choices]


@pytest.fixture(scope="module")
def other_vocab_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cooking expert on a vocabulary of its own (two more words, so other ids): another
    tokenizer hash, so the gateway must mix it per whole option."""
    words = (*all_words(), "aardvark", "abacus")
    path = tmp_path_factory.mktemp("vocab") / "tiny-cooking-other.gguf"
    return write_expert(path, "cooking", vocab=build_vocab(words))


def test_score_choices_equals_one_score_per_choice(
    tiny_models: dict[str, Path], animals_backend: LlamaCppBackend
) -> None:
    ids = animals_backend.tokenize(PROMPT, add_bos=True)
    targets = [animals_backend.tokenize(c, add_bos=False) for c in CHOICES]
    once = animals_backend.score_choices(ids, targets)
    for got, target in zip(once, targets, strict=True):
        # side by side in one batch: the same to float32 rounding
        np.testing.assert_allclose(got, animals_backend.score(ids, target), atol=1e-5)


def test_score_choices_over_rpc(
    fleet: LocalFleet, broker_config: BrokerConfig, tiny_models: dict[str, Path]
) -> None:
    a = start(fleet, tiny_models["animals"], uid("a"))
    backend = LlamaCppBackend(AgentConfig(model=tiny_models["animals"], n_threads=1))
    with RpcClient(broker_config, timeout=30) as rpc:
        reply = rpc.call(a, p.ScoreChoicesRequest(prompt=PROMPT, targets=CHOICES))
        want = direct(backend, PROMPT, CHOICES)
        assert [len(t) for t in reply.targets_tokens] == [len(w) for w in want]
        for got, w in zip(reply.logprobs, want, strict=True):
            assert np.allclose(got, w, atol=1e-6)
        with pytest.raises(BadMessage, match="targets"):
            rpc.call(a, p.ScoreChoicesRequest.model_construct(prompt=PROMPT, targets=None))
    backend.close()


def _fused(scores: dict[str, list[np.ndarray]], weights: dict[str, float], per_token: bool):
    """Fused log-likelihood of every choice, computed here from the experts' own scores."""
    out = []
    for o in range(len(CHOICES)):
        if per_token:
            probs = sum(w * np.exp(scores[n][o]) for n, w in weights.items())
            out.append(float(np.log(probs).sum()))
        else:
            out.append(math.log(sum(w * math.exp(scores[n][o].sum()) for n, w in weights.items())))
    return out


def test_a_choice_prompt_on_one_vocabulary_is_mixed_per_token(
    fleet: LocalFleet, broker_config: BrokerConfig, tiny_models: dict[str, Path]
) -> None:
    a = start(fleet, tiny_models["animals"], uid("a"))
    k = start(fleet, tiny_models["cooking"], uid("k"))
    gw = start(fleet, tiny_models["code"], uid("gw"), "--serve-app", f"mc={a},{k}:2")
    scores = {}
    for name, d in ((a, "animals"), (k, "cooking")):
        b = LlamaCppBackend(AgentConfig(model=tiny_models[d], n_threads=1))
        scores[name] = direct(b, PROMPT, CHOICES)
        b.close()
    with PromptClient(broker_config) as client:
        answer = client.choose("mc", PROMPT, CHOICES, timeout=30)
        text = client.ask("mc", "the fox eats", max_tokens=5)  # prompt-only: unchanged
    want = _fused(scores, {a: 0.5, k: 0.5}, per_token=True)  # no gate: uniform weights
    assert answer.mixing == "token"
    assert answer.logprobs == pytest.approx(want, abs=1e-6)
    assert answer.choice == int(np.argmax(want))
    assert answer.steps == [len(s) for s in scores[a]]
    assert {e.id: e.weight for e in answer.experts} == pytest.approx({a: 0.5, k: 0.5})
    assert set(answer.compute_ms) == {a, k} and all(v > 0 for v in answer.compute_ms.values())
    assert answer.gateway == gw and answer.app == "mc" and not answer.dropped
    assert 0 < answer.latency_ms < 30_000
    assert isinstance(text, p.PromptAnswer) and text.tokens > 0


def test_a_choice_prompt_across_vocabularies_is_mixed_per_option(
    fleet: LocalFleet,
    broker_config: BrokerConfig,
    tiny_models: dict[str, Path],
    other_vocab_model: Path,
) -> None:
    a = start(fleet, tiny_models["animals"], uid("a"))
    k = start(fleet, other_vocab_model, uid("k"))
    start(fleet, tiny_models["code"], uid("gw"), "--serve-app", f"mc={a},{k}:2")
    infos = fleet.info
    assert infos[a].tokenizer_hash != infos[k].tokenizer_hash
    scores = {}
    for name, path in ((a, tiny_models["animals"]), (k, other_vocab_model)):
        b = LlamaCppBackend(AgentConfig(model=path, n_threads=1))
        scores[name] = direct(b, PROMPT, CHOICES)
        b.close()
    with PromptClient(broker_config) as client:
        answer = client.choose("mc", PROMPT, CHOICES, timeout=30)
    want = _fused(scores, {a: 0.5, k: 0.5}, per_token=False)
    assert answer.mixing == "sequence"
    assert answer.logprobs == pytest.approx(want, abs=1e-6)
    assert answer.choice == int(np.argmax(want))
    # T of each option: the longer of the two tokenizations
    assert answer.steps == [max(len(scores[a][o]), len(scores[k][o])) for o in range(4)]


def test_top_1_scores_on_one_expert_and_bad_choices_get_one_error(
    fleet: LocalFleet, broker_config: BrokerConfig, tiny_models: dict[str, Path]
) -> None:
    a = start(fleet, tiny_models["animals"], uid("a"))
    k = start(fleet, tiny_models["cooking"], uid("k"))
    start(fleet, tiny_models["code"], uid("gw"), "--serve-app", f"mc={a},{k}:1")
    with PromptClient(broker_config) as client:
        answer = client.choose("mc", PROMPT, CHOICES, timeout=30)
    assert [e.id for e in answer.experts] == [a] and list(answer.compute_ms) == [a]
    inbox = f"test/{uuid.uuid4().hex[:6]}"
    got: list[dict[str, Any]] = []
    cond = threading.Condition()

    def on(msg: Any) -> None:
        with cond:
            got.append(json.loads(msg.payload))
            cond.notify_all()

    bad = [
        {"id": "one", "prompt": PROMPT, "reply_to": inbox, "choices": [" x"]},
        {"id": "empty", "prompt": PROMPT, "reply_to": inbox, "choices": [" x", ""]},
        {"id": "type", "prompt": PROMPT, "reply_to": inbox, "choices": " x"},
    ]
    with Connection(broker_config, uid("cl")) as conn:
        conn.subscribe(inbox, on)
        time.sleep(0.3)
        for msg in bad:
            conn.publish(
                p.topics.prompts("mc"),
                json.dumps(msg).encode(),
                properties=response_properties(inbox, b"c"),
            )
        with cond:
            assert cond.wait_for(lambda: len(got) >= len(bad), 20), got
        time.sleep(0.5)
    assert len(got) == len(bad)
    assert {g["id"]: g["error"]["code"] for g in got} == dict.fromkeys(
        ("one", "empty", "type"), "bad_request"
    )


def test_choice_answers_count_in_the_apps_measured_figures(
    fleet: LocalFleet, broker_config: BrokerConfig, tiny_models: dict[str, Path]
) -> None:
    a = uid("a")
    fleet.start(a, tiny_models["animals"], "--n-threads", "1")  # it profiles itself
    gw = start(
        fleet,
        tiny_models["code"],
        uid("gw"),
        "--serve-app",
        f"mc={a}:1",
        "--gateway-stats-interval-s",
        "0.3",
    )
    fleet.wait_online([a], 60)
    end = time.monotonic() + 60
    while a not in FleetView.snapshot(broker_config, ("profile",), 5).profile:
        assert time.monotonic() < end, "no profile"
        time.sleep(0.3)
    with PromptClient(broker_config) as client:
        answers = [client.choose("mc", PROMPT, CHOICES, timeout=30) for _ in range(3)]
    deadline = time.monotonic() + 10
    while True:
        state = FleetView.snapshot(broker_config, ("stats",), 5)
        st = state.stats.get(gw)
        if st is not None and "mc" in st.apps and st.apps["mc"].answers == 3:
            break
        assert time.monotonic() < deadline, "no figures for the app"
        time.sleep(0.3)
    fig = st.apps["mc"]
    # each answer counts as the chosen option's steps, as a generation of it would
    assert fig.steps == sum(x.steps[x.choice] for x in answers)
    assert fig.energy_j_per_step is not None and fig.energy_j_per_step > 0
