"""The LoRA adapter GGUF: the layout llama.cpp expects, checked against llama.cpp itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend
from moe2.controller.experts import lora_gguf as lg
from moe2.controller.experts.lora_gguf import AdapterMeta, LoraPair
from moe2.shared.errors import ConfigError


def test_rope_row_order_matches_llama_cpp_pairs() -> None:
    # One head of width 4: HF rotates (0, 2) and (1, 3); llama.cpp rotates (0, 1) and (2, 3).
    rows = np.arange(8).reshape(8, 1)  # 2 heads
    assert lg.to_gguf_rows(rows, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    b = np.random.default_rng(0).normal(size=(24, 3))
    np.testing.assert_array_equal(lg.from_gguf_rows(lg.to_gguf_rows(b, 3), 3), b)
    with pytest.raises(ConfigError, match="even width"):
        lg.to_gguf_rows(np.zeros((6, 2)), 2)


def test_names_map_to_gguf_tensors() -> None:
    assert lg.gguf_name("base_model.model.model.layers.12.self_attn.k_proj") == (
        "blk.12.attn_k.weight"
    )
    assert lg.gguf_name("model.layers.0.mlp.down_proj") == "blk.0.ffn_down.weight"
    with pytest.raises(ConfigError, match="cannot map"):
        lg.gguf_name("model.embed_tokens")


def test_adapter_round_trips_with_its_metadata(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    q, k, up = (
        f"model.layers.{m}" for m in ("0.self_attn.q_proj", "0.self_attn.k_proj", "1.mlp.up_proj")
    )
    pairs = {
        name: LoraPair(rng.normal(size=(4, 16)), rng.normal(size=(out, 4)))
        for name, out in ((q, 16), (k, 8), (up, 32))
    }
    meta = AdapterMeta("llama", 8.0, name="e1", cluster="3", base_sha256="ab" * 32, split="s")
    path = lg.write_adapter(tmp_path / "a.gguf", pairs, meta, n_head=4, n_head_kv=2)
    back = lg.read_adapter(path, n_head=4, n_head_kv=2)
    assert back.architecture == "llama" and back.alpha == 8.0 and back.rank == 4
    assert back.metadata[lg.KEY_CLUSTER] == "3" and back.metadata["general.name"] == "e1"
    assert back.metadata[lg.KEY_BASE_SHA256] == "ab" * 32
    for module, pair in pairs.items():
        got = back.pairs[lg.gguf_name(module)]
        np.testing.assert_allclose(got.a, pair.a, rtol=1e-6)
        np.testing.assert_allclose(got.b, pair.b, rtol=1e-6)
    stored = lg.read_adapter(path)  # without head counts: Q/K rows as llama.cpp reads them
    want = lg.to_gguf_rows(pairs[k].b, 2)
    np.testing.assert_allclose(stored.pairs["blk.0.attn_k.weight"].b, want, rtol=1e-6)


def test_bad_adapters_are_refused(tmp_path: Path) -> None:
    good = LoraPair(np.zeros((2, 8)), np.zeros((8, 2)))
    with pytest.raises(ConfigError, match="not supported"):
        lg.write_adapter(
            tmp_path / "x.gguf", {"model.layers.0.mlp.up_proj": good}, AdapterMeta("phi3", 1.0),
            n_head=1, n_head_kv=1,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="not"):
        lg.write_adapter(
            tmp_path / "x.gguf",
            {"model.layers.0.mlp.up_proj": LoraPair(np.zeros((2, 8)), np.zeros((8, 3)))},
            AdapterMeta("llama", 1.0),
            n_head=1,
            n_head_kv=1,
        )
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ConfigError, match="not a readable GGUF"):
        lg.read_adapter(tmp_path / "junk.gguf")


def test_llama_cpp_applies_the_adapter_exactly_as_transformers_trained_it(tmp_path: Path) -> None:
    """A tiny base with strong attention, so Q/K matter; LoRA on every projection. llama.cpp
    (base GGUF + adapter GGUF) must give the distribution of the peft model it came from, and
    an adapter written without the rope row order must not."""
    import torch

    from moe2.controller.experts import base as base_model
    from moe2.controller.experts import finetune as ft
    from moe2.controller.experts.domains import corpus
    from moe2.controller.experts.tiny import TinySpec, write_expert

    base = write_expert(tmp_path / "base.gguf", "animals", TinySpec(attn_scale=1.0, sentences=300))
    ref = base_model.describe(base)
    model, tok = base_model.load(ref)
    cfg = ft.FinetuneConfig(
        rank=8, alpha=16, dropout=0.0, lr=3e-3, batch_size=8, accumulation=1, max_steps=25,
        loss_on="all", threads=1,
    )  # fmt: skip
    sentences = [s.split(" ", 3) for s in corpus("cooking", 100)]
    examples = ft.tokenize(tok, [(" ".join(w[:3]), " " + w[3]) for w in sentences], cfg)
    result = ft.finetune(model, examples, cfg, tmp_path / "work")
    meta = AdapterMeta("llama", cfg.alpha, name="cook")
    good = lg.write_adapter(tmp_path / "good.gguf", result.pairs, meta, n_head=4, n_head_kv=4)
    ids = tok.encode("add two cups of flour and stir the", bos=True)
    with torch.no_grad():
        want = torch.log_softmax(result.model(torch.tensor([ids])).logits[0, -1].double(), -1)

    def served(adapter: Path | None) -> np.ndarray:
        b = LlamaCppBackend(AgentConfig(model=base, n_threads=1, lora=adapter))
        seq = b.new_sequence()
        out = seq.extend(ids).astype(np.float64)
        seq.close()
        b.close()
        return out

    assert np.abs(served(good) - want.numpy()).max() < 5e-3
    assert np.abs(served(None) - want.numpy()).max() > 1.0  # the adapter matters

    wrong = tmp_path / "wrong.gguf"
    unpermuted = {
        k: LoraPair(v.a, lg.from_gguf_rows(v.b, 4)) if k.endswith(("q_proj", "k_proj")) else v
        for k, v in result.pairs.items()
    }  # written with the rows llama.cpp's converter would not have produced
    lg.write_adapter(wrong, unpermuted, meta, n_head=4, n_head_kv=4)
    assert np.abs(served(wrong) - want.numpy()).max() > 0.1


def test_a_merged_and_quantised_expert_serves_what_base_plus_adapter_serves(
    tmp_path: Path, tiny_adapters
) -> None:
    from moe2.controller.experts.merge import merge, quantize

    base, adapter = tiny_adapters.base, tiny_adapters.adapters["cooking"]
    merged = merge(base, adapter, tmp_path / "merged.gguf", name="cook-merged")
    q8 = quantize(merged, tmp_path / "q8.gguf", "Q8_0", threads=1)
    assert q8.stat().st_size < merged.stat().st_size / 2
    ids = None
    dists, hashes, names = [], set(), []
    for model, lora in ((base, adapter), (merged, None), (q8, None), (base, None)):
        b = LlamaCppBackend(AgentConfig(model=model, n_threads=1, lora=lora))
        ids = ids or b.tokenize("season the soup with", add_bos=True)
        seq = b.new_sequence()
        dists.append(seq.extend(ids).astype(np.float64))
        hashes.add(b.info.tokenizer_hash)
        names.append(b.info.name)
        seq.close()
        b.close()
    assert len(hashes) == 1 and names[1:3] == ["cook-merged", "cook-merged"]
    served, flat, quant, plain = dists
    assert np.abs(flat - served).max() < 1e-3  # the same model, in one file

    def tv(a: np.ndarray, b: np.ndarray) -> float:  # total variation distance
        return float(0.5 * np.abs(np.exp(a) - np.exp(b)).sum())

    assert tv(quant, served) < 0.01 < 0.05 < tv(plain, served), (
        tv(quant, served),
        tv(plain, served),
    )
    with pytest.raises(ConfigError, match="unknown quantisation"):
        quantize(merged, tmp_path / "x.gguf", "Q3_XS")
