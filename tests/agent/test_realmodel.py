"""End to end on a real packaged model (SmolLM2-135M-Instruct, Q4_1) over MQTT."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend
from moe2.controller.experts import packaged
from moe2.shared import protocol as p
from moe2.shared.mqtt import BrokerConfig, RpcClient

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return packaged.fetch("smollm2-135m")  # cached after the first run


@pytest.fixture(scope="module")
def smollm2_backend(smollm2: Path) -> Iterator[LlamaCppBackend]:
    b = LlamaCppBackend(AgentConfig(model=smollm2, n_ctx=512, n_threads=1))
    yield b
    b.close()


def test_smollm2_end_to_end_over_mqtt(
    smollm2: Path,
    smollm2_backend: LlamaCppBackend,
    start_agent: Any,
    broker_config: BrokerConfig,
    animals_backend: LlamaCppBackend,
) -> None:
    # No start-up profile: a session served while the profile's sequence comes and goes in
    # the same KV cache gets shifted distributions (the known defect below).
    agent = start_agent(
        smollm2, f"smollm2-{uuid.uuid4().hex[:6]}", "--n-ctx", "512", "--no-profile-on-start"
    )
    prompt = "The capital of France is"
    ids = smollm2_backend.tokenize(prompt, add_bos=smollm2_backend.info.add_bos)
    direct = smollm2_backend.new_sequence()
    want = direct.extend(ids)
    with RpcClient(broker_config, timeout=60) as rpc:
        info_tokens = rpc.call(
            agent.agent_id, p.TokenizeRequest(text=prompt, add_bos=smollm2_backend.info.add_bos)
        )
        assert info_tokens.tokens == ids
        opened = rpc.call(agent.agent_id, p.OpenRequest(tokens=ids, full=True))
        np.testing.assert_allclose(opened.dist.logprobs(), want, atol=2e-3)
        generated = []
        for _ in range(4):
            tok = int(np.argmax(want))
            generated.append(tok)
            want = direct.extend([tok])
            reply = rpc.call(
                agent.agent_id, p.StepRequest(session=opened.session, tokens=[tok], top_k=20)
            )
            assert reply.dist.ids[0] == int(np.argmax(want))
            np.testing.assert_allclose(reply.dist.logprobs, want[reply.dist.ids], atol=2e-3)
    assert "Paris" in smollm2_backend.detokenize(generated)
    # a different vocabulary: a different tokenizer hash
    assert smollm2_backend.info.tokenizer_hash != animals_backend.info.tokenizer_hash
    assert smollm2_backend.info.architecture == "llama"
    assert smollm2_backend.info.quantization == "Q4_1"
    direct.close()


@pytest.mark.xfail(
    strict=True,
    reason="known defect, open: on the CPU with flash attention, once another sequence's KV "
    "cells are freed, a session's next step lands in the freed cells before its own and its "
    "distribution shifts (0.56 nats on SmolLM2 here); without flash attention a rewound and "
    "re-verified session shifts instead (0.74)",
)
def test_a_session_keeps_its_distribution_when_another_closes(
    smollm2: Path, smollm2_backend: LlamaCppBackend
) -> None:
    ids = smollm2_backend.tokenize("The capital of France is", add_bos=True)
    direct = smollm2_backend.new_sequence()
    want = direct.extend(ids)
    tok = int(np.argmax(want))
    want_next = direct.extend([tok])
    direct.close()
    shared = LlamaCppBackend(AgentConfig(model=smollm2, n_ctx=512, n_threads=1))
    other = shared.new_sequence()
    other.extend(list(range(100, 300)))
    session = shared.new_sequence()
    np.testing.assert_allclose(session.extend(ids), want, atol=1e-4)
    other.close()
    np.testing.assert_allclose(session.extend([tok]), want_next, atol=1e-3)
