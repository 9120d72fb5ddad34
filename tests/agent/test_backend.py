"""The llama.cpp backend against itself and against the tiny experts' known vocabulary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend
from moe2.controller.experts.domains import all_words
from moe2.controller.experts.tiny import build_vocab, shared_vocab, vocab_hash, write_expert
from moe2.shared.errors import ContextOverflow, InvalidToken

TEXT = "the fox eats fish in the forest ."


def test_tokenizer_matches_the_vocabulary_the_expert_was_built_with(
    animals_backend: LlamaCppBackend,
) -> None:
    assert animals_backend.tokenize(TEXT, add_bos=True) == shared_vocab().encode(TEXT)
    assert animals_backend.detokenize(shared_vocab().encode(TEXT, bos=False)).strip() == TEXT


def test_tokenizer_hash_same_vocab_same_hash(
    tiny_models: dict[str, Path], animals_backend: LlamaCppBackend
) -> None:
    other = LlamaCppBackend(AgentConfig(model=tiny_models["code"], n_threads=1))
    try:
        assert other.info.tokenizer_hash == animals_backend.info.tokenizer_hash
        assert animals_backend.info.tokenizer_hash == vocab_hash(shared_vocab())
    finally:
        other.close()


def test_tokenizer_hash_differs_for_another_vocabulary(
    tmp_path: Path, animals_backend: LlamaCppBackend
) -> None:
    vocab = build_vocab((*all_words(), "zebra"))
    path = write_expert(tmp_path / "zebra.gguf", "animals", vocab=vocab)
    other = LlamaCppBackend(AgentConfig(model=path, n_threads=1))
    try:
        assert other.info.tokenizer_hash != animals_backend.info.tokenizer_hash
        assert other.info.tokenizer_hash == vocab_hash(vocab)
    finally:
        other.close()


def test_incremental_steps_equal_a_fresh_full_evaluation(animals_backend: LlamaCppBackend) -> None:
    ids = animals_backend.tokenize(TEXT, add_bos=True)
    inc = animals_backend.new_sequence()
    inc.extend(ids[:2])
    for t in ids[2:]:
        step = inc.extend([t])
    fresh = animals_backend.new_sequence()
    full = fresh.extend(ids)
    np.testing.assert_allclose(step, full, atol=1e-4)
    # and the history really matters: a different prefix gives a different distribution
    other = animals_backend.new_sequence()
    differs = other.extend([ids[0], *ids[3:]])
    assert np.abs(differs - full).max() > 1e-3
    for s in (inc, fresh, other):
        s.close()


def test_truncate_rolls_back_the_kv_cache(animals_backend: LlamaCppBackend) -> None:
    ids = animals_backend.tokenize(TEXT, add_bos=True)
    seq = animals_backend.new_sequence()
    first = seq.extend(ids[:4])
    seq.extend(ids[4:])
    seq.truncate(3)
    again = seq.extend(ids[3:4])
    np.testing.assert_allclose(again, first, atol=1e-4)
    seq.close()


def test_score_equals_stepwise_log_probabilities(animals_backend: LlamaCppBackend) -> None:
    ids = animals_backend.tokenize(TEXT, add_bos=True)
    prompt, target = ids[:3], ids[3:]
    scores = animals_backend.score(prompt, target)
    seq = animals_backend.new_sequence()
    lp = seq.extend(prompt)
    expected = []
    for t in target:
        expected.append(lp[t])
        lp = seq.extend([t])
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    seq.close()


def test_context_overflow_is_an_error_and_keeps_the_history(tiny_models: dict[str, Path]) -> None:
    b = LlamaCppBackend(AgentConfig(model=tiny_models["animals"], n_ctx=64, n_threads=1))
    try:
        seq = b.new_sequence()
        seq.extend([1] + [5] * 60)
        with pytest.raises(ContextOverflow):
            seq.extend([5] * 10)
        assert len(seq.tokens) == 61
        seq.extend([5] * 3)  # still usable up to the limit
        with pytest.raises(ContextOverflow):
            b.score([1] * 40, [5] * 40)
        seq.close()
    finally:
        b.close()


def test_invalid_token_ids_are_rejected(animals_backend: LlamaCppBackend) -> None:
    seq = animals_backend.new_sequence()
    with pytest.raises(InvalidToken):
        seq.extend([1, animals_backend.info.n_vocab])
    assert seq.tokens == []
    seq.close()


def test_model_info(animals_backend: LlamaCppBackend) -> None:
    info = animals_backend.info
    assert info.architecture == "llama"
    assert info.quantization == "F32"
    assert info.n_vocab == len(shared_vocab())
    assert info.eos_ids == (2,)
    assert info.bos_id == 1 and info.add_bos
