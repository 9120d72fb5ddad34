"""Domain experts served by real agents: one tiny base GGUF plus a LoRA adapter GGUF each,
fine-tuned at test time, behind a real mosquitto; fused through the gateway by token id."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moe2.agent.config import AgentConfig
from moe2.agent.gateway.config import GatewayConfig
from moe2.agent.gateway.fusion import Fused
from moe2.agent.gateway.generation import Generation
from moe2.agent.gateway.vocab import VocabCache
from moe2.agent.llama import LlamaCppBackend
from moe2.controller.experts.domains import corpus
from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.client import PromptClient
from moe2.shared.errors import ModelError
from moe2.shared.files import sha256_file
from moe2.shared.mqtt import BrokerConfig, RpcClient


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


def first_distribution(rpc: RpcClient, agent_id: str, prompt: str) -> np.ndarray:
    reply = rpc.call(agent_id, p.OpenRequest(prompt=prompt, full=True))
    rpc.call(agent_id, p.CloseRequest(session=reply.session))
    return np.asarray(reply.dist.logprobs(), dtype=np.float64)


def test_an_adapter_agent_announces_it_keeps_the_tokenizer_and_changes_distributions(
    fleet: LocalFleet, rpc: RpcClient, tiny_adapters: Any
) -> None:
    base = start(fleet, tiny_adapters.base, uid("base"))
    lora = tiny_adapters.adapters["cooking"]
    cook = start(fleet, tiny_adapters.base, uid("cook"), "--lora", str(lora))
    named = start(
        fleet, tiny_adapters.base, uid("named"), "--lora", str(lora), "--lora-name", "chef",
        "--lora-cluster", "kitchen", "--lora-scale", "0.5",
    )  # fmt: skip
    info_base, info_cook, info_named = (fleet.info[a] for a in (base, cook, named))
    assert info_base.adapter is None
    assert info_cook.adapter == p.AdapterInfo(
        name="tiny-cooking", file=lora.name, sha256=sha256_file(lora), scale=1.0, cluster="cooking"
    )  # from the adapter file's own metadata
    assert (info_named.adapter.name, info_named.adapter.cluster) == ("chef", "kitchen")
    assert info_named.adapter.scale == 0.5
    # Same base vocabulary: every expert of the base may fuse with the others by token id.
    assert info_cook.tokenizer_hash == info_base.tokenizer_hash == info_named.tokenizer_hash
    assert info_cook.model_sha256 == info_base.model_sha256  # the unchanged base file

    # Teacher-forced on cooking sentences it never saw: the expert is better on its cluster
    # than the base it came from, at full and at half scale.
    def nll(agent_id: str) -> float:
        total = 0.0
        for sentence in corpus("cooking", 10, seed=99):
            w = sentence.split(" ", 2)
            req = p.ScoreRequest(prompt=" ".join(w[:2]), target=" " + w[2])
            total -= sum(rpc.call(agent_id, req).logprobs)
        return total

    loss = {a: nll(a) for a in (base, named, cook)}
    assert loss[base] - loss[cook] > 60, loss  # nats over the 10 sentences (measured: 110)
    assert loss[named] < loss[base], loss
    d_base, d_half, d_cook = (first_distribution(rpc, a, "bake the") for a in (base, named, cook))
    assert np.abs(d_base - d_cook).max() > 1.0
    assert min(np.abs(d_half - d_cook).max(), np.abs(d_half - d_base).max()) > 0.1  # the scale


def test_old_peers_decode_info_without_an_adapter_unchanged() -> None:
    fields = dict(
        agent_id="a", model="m", model_file="m.gguf", architecture="llama", quantization="F32",
        n_ctx=64, n_vocab=10, tokenizer_hash="h", eos_ids=[2], add_bos=True,
        device_class="cpu-generic", software_version="0", max_sessions=1, started_at=0.0,
    )  # fmt: skip
    plain = p.encode(p.AgentInfo(**fields))
    assert b"adapter" not in plain  # what an agent without an adapter sends, as before
    assert p.decode_message(p.AgentInfo, plain).adapter is None
    with_adapter = p.AgentInfo(**fields, adapter=p.AdapterInfo(name="e", file="e.gguf"))
    assert p.decode_message(p.AgentInfo, p.encode(with_adapter)) == with_adapter


def test_an_adapter_of_another_base_is_refused_clearly(
    tiny_adapters: Any, tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    from moe2.controller.experts.tiny import TinySpec, write_expert

    other = write_expert(tmp_path / "wide.gguf", "animals", TinySpec(n_embd=64, n_head=2))
    lora = tiny_adapters.adapters["code"]
    with pytest.raises(ModelError, match="could not apply the LoRA adapter"):
        LlamaCppBackend(AgentConfig(model=other, n_threads=1, lora=lora))
    with pytest.raises(ModelError, match="could not apply"):  # not an adapter at all
        LlamaCppBackend(AgentConfig(model=other, n_threads=1, lora=tiny_models["code"]))
    proc = subprocess.run(
        [sys.executable, "-m", "moe2.agent", "--model", str(other), "--lora", "/nope.gguf"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MOE2_AGENT_BROKER__PORT": "1"},
    )
    assert proc.returncode == 2 and "LoRA adapter file /nope.gguf does not exist" in proc.stderr


def test_two_adapter_experts_fuse_by_token_id_through_the_gateway(
    fleet: LocalFleet, rpc: RpcClient, broker_config: BrokerConfig, tiny_adapters: Any
) -> None:
    base, ad = tiny_adapters.base, tiny_adapters.adapters
    cook = start(fleet, base, uid("cook"), "--lora", str(ad["cooking"]))
    code = start(fleet, base, uid("code"), "--lora", str(ad["code"]))
    start(fleet, base, uid("gw"), "--serve-app", f"kitchen={cook},{code}:2")
    with PromptClient(broker_config) as client:
        answer = client.ask("kitchen", "season the soup with", max_tokens=6)
    assert answer.fusion == "token-id" and answer.tokens >= 1
    assert {e.id for e in answer.experts} == {cook, code}
    assert sum(e.weight for e in answer.experts) == pytest.approx(1.0)

    # Each fused step is the weighted mixture of the two adapters' own distributions.
    weights = {cook: 0.6, code: 0.4}
    steps: list[Fused] = []
    vocabs = {n: VocabCache(rpc).get(n, fleet.info[n]) for n in weights}
    gen = Generation(
        rpc, fleet.info, vocabs, weights, GatewayConfig(), on_step=lambda i, f: steps.append(f)
    )
    result = gen.run("season the soup with", max_tokens=4)
    assert result.fusion == "token-id"
    backends = [
        LlamaCppBackend(AgentConfig(model=base, n_threads=1, lora=ad[d]))
        for d in ("cooking", "code")
    ]
    seqs = [b.new_sequence() for b in backends]
    ids = backends[0].tokenize("season the soup with", add_bos=True)
    lps = [s.extend(ids) for s in seqs]
    for fused in steps:
        want = 0.6 * np.exp(lps[0].astype(np.float64)) + 0.4 * np.exp(lps[1].astype(np.float64))
        np.testing.assert_allclose(fused.probs, want, atol=1e-5)
        t = int(np.argmax(want))
        if t in backends[0].info.eos_ids:
            break
        lps = [s.extend([t]) for s in seqs]
    for s, b in zip(seqs, backends):
        s.close()
        b.close()
