"""LoRA fine-tuning of a tiny llama GGUF through transformers' GGUF loading: it learns its
cluster, resumes exactly, tokenizes as llama.cpp does, and the CLI drives it end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend
from moe2.controller import datasets as ds
from moe2.controller.cli import main
from moe2.controller.experts import base as base_model
from moe2.controller.experts import finetune as ft
from moe2.controller.experts.domains import corpus
from moe2.controller.experts.lora_gguf import read_adapter
from moe2.shared.errors import ConfigError


def test_a_few_lora_steps_lower_the_loss_on_its_own_cluster(
    tiny_models: dict[str, Path], tiny_finetune, tmp_path: Path
) -> None:
    # The base knows only animal sentences; 30 steps on cooking text, loss on unseen ones.
    adapter, before, after = tiny_finetune(tiny_models["animals"], "cooking", tmp_path)
    assert after < before - 1.0, (before, after)
    meta = read_adapter(adapter)
    assert meta.architecture == "llama" and meta.rank == 8 and meta.alpha == 16.0
    assert len(meta.pairs) == 2 * 7  # 2 layers x every projection


def _cfg(**kw: object) -> ft.FinetuneConfig:
    base = {"rank": 4, "alpha": 8, "dropout": 0.1, "lr": 3e-3, "batch_size": 4}
    return ft.FinetuneConfig(**{**base, "accumulation": 2, "max_steps": 12, "threads": 1, **kw})


def _train(base: Path, cfg: ft.FinetuneConfig, work: Path) -> ft.FinetuneResult:
    model, tok = base_model.load(base_model.describe(base))
    pairs = [(" ".join(s.split()[:2]), " " + " ".join(s.split()[2:])) for s in corpus("code", 60)]
    return ft.finetune(model, ft.tokenize(tok, pairs, cfg), cfg, work)


def test_an_interrupted_run_resumes_to_the_same_weights(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    base = tiny_models["animals"]
    straight = _train(base, _cfg(), tmp_path / "straight")
    assert straight.finished and straight.steps == 12 and straight.resumed_from == 0
    cut = _train(base, _cfg(max_seconds=0.05, checkpoint_every=100), tmp_path / "cut")
    assert cut.stopped == "max_seconds" and 0 < cut.steps < 12
    resumed = _train(base, _cfg(checkpoint_every=100), tmp_path / "cut")
    assert resumed.resumed_from == cut.steps and resumed.steps == 12
    for name, pair in straight.pairs.items():
        np.testing.assert_allclose(resumed.pairs[name].a, pair.a, atol=1e-6)
        np.testing.assert_allclose(resumed.pairs[name].b, pair.b, atol=1e-6)
    with pytest.raises(ConfigError, match="other settings"):
        _train(base, _cfg(lr=1e-3), tmp_path / "cut")


def test_training_tokens_are_the_ones_the_agent_scores(tiny_models: dict[str, Path]) -> None:
    # The tiny experts have a SentencePiece-style vocabulary: transformers' tokenizer rebuilt
    # from it tokenizes " fish" as one token, llama.cpp (and so every agent) as two.
    base = tiny_models["animals"]
    _, tok = base_model.load(base_model.describe(base))
    assert isinstance(tok, base_model.LlamaCppTokenizer)
    llama = LlamaCppBackend(AgentConfig(model=base, n_threads=1))
    try:
        for s in ds.tiny_domains(["animals", "cooking"], 5, seed=3):
            (ex,) = ft.tokenize(tok, [(s.prompt, s.targets[0])], ft.FinetuneConfig())
            prompt = llama.tokenize(s.prompt, add_bos=llama.info.add_bos)
            target = llama.tokenize(s.targets[0], add_bos=False)
            assert ex.ids == prompt + target
            assert ex.labels == [ft.IGNORE] * len(prompt) + target  # loss on the answer
    finally:
        llama.close()


def test_epochs_see_every_example_once_in_length_sorted_batches() -> None:
    lengths = np.random.default_rng(0).integers(5, 300, size=101)
    examples = [ft.Example([0] * int(n), [0] * int(n)) for n in lengths]
    batches = ft.epoch_batches(examples, 8, [0, 1])
    assert sorted(j for b in batches for j in b) == list(range(101))
    assert batches == ft.epoch_batches(examples, 8, [0, 1])  # what a resumed run reads
    assert batches != ft.epoch_batches(examples, 8, [0, 2])
    padded = sum(len(b) * max(int(lengths[j]) for j in b) for b in batches)
    assert padded < 1.2 * lengths.sum()  # little padding


def test_config_defaults_are_table_v_and_inputs_are_checked() -> None:
    cfg = ft.FinetuneConfig()
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.lr) == (256, 512, 0.05, 5e-5)
    assert (cfg.batch_size, cfg.accumulation, cfg.max_grad_norm, cfg.epochs) == (8, 16, 1.0, 3)
    assert cfg.planned_steps(1000) == 24  # ceil(3 * 1000 / 128)
    assert _cfg(max_steps=5).planned_steps(1000) == 5
    with pytest.raises(ValidationError, match="unknown LoRA target"):
        ft.FinetuneConfig(targets="q_proj,lm_head")
    with pytest.raises(ConfigError, match="neither a GGUF file"):
        base_model.describe(Path("/nonexistent"))


def test_finetune_command_writes_one_adapter_per_cluster(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    corpus_file = tmp_path / "corpus.jsonl"
    with corpus_file.open("w") as f:
        for s in ds.tiny_domains(["cooking", "code"], 40, seed=0):
            f.write(json.dumps({"prompt": s.prompt, "target": s.targets[0], "app": s.app}) + "\n")
    db = f"sqlite:///{tmp_path / 'r.db'}"
    env = {"MOE2_DATA_DIR": str(tmp_path / "data")}
    run = CliRunner().invoke
    res = run(main, ["experts", "cluster", "--jsonl", str(corpus_file), "-k", "2", "--db", db])
    assert res.exit_code == 0, res.output
    args = ["experts", "finetune", "--base", str(tiny_models["animals"]), "--db", db]
    args += ["--rank", "4", "--alpha", "8", "--lr", "3e-3", "--accumulation", "1"]
    args += ["--max-steps", "10", "--loss-on", "all", "--threads", "1", "--quiet", "--json"]
    res = run(main, args, env=env)
    assert res.exit_code == 0, res.output
    experts = json.loads(res.stdout)
    assert [e["cluster"] for e in experts] == [0, 1]
    for e in experts:
        assert e["present"] and e["steps"] == 10 and e["split"] == f"jsonl:{corpus_file}"
        assert e["val_loss"] < e["val_loss_base"]
        assert Path(e["adapter"]).parent == tmp_path / "data" / "experts" / "corpus-jsonl-k2"
        assert read_adapter(Path(e["adapter"])).metadata["moe2.expert.cluster"] == str(e["cluster"])
    listed = run(main, ["experts", "list", "--db", db, "--json"])
    assert [e["name"] for e in json.loads(listed.stdout)] == [e["name"] for e in experts]
    assert listed.exit_code == 0
    # The same training again reuses the finished adapters without touching them.
    stamps = {e["adapter"]: Path(e["adapter"]).stat().st_mtime_ns for e in experts}
    again = run(main, args, env=env)
    assert again.exit_code == 0, again.output
    assert again.stderr.count("trained before, reusing") == 2
    assert json.loads(again.stdout) == experts
    assert {a: Path(a).stat().st_mtime_ns for a in stamps} == stamps
    # A damaged adapter is not reused: that expert is trained again (from its checkpoint).
    Path(experts[1]["adapter"]).write_bytes(b"not a gguf")
    redo = run(main, args, env=env)
    assert redo.exit_code == 0 and redo.stderr.count("trained before, reusing") == 1
    assert json.loads(redo.stdout)[1]["adapter_sha256"] == experts[1]["adapter_sha256"]
    bad = run(main, [*args[:6], "--cluster", "5"], env=env)
    assert bad.exit_code == 1 and "clusters 0..1" in bad.output
    merged = run(main, ["experts", "merge", experts[0]["name"], "--quantize", "Q8_0", "--db", db])
    assert merged.exit_code == 0, merged.output
    path = Path(merged.output.split(" (")[0])
    assert path.name == f"{experts[0]['name']}-merged-Q8_0.gguf" and path.is_file()
    listed = run(main, ["experts", "list", "--db", db, "--json"])
    assert json.loads(listed.stdout)[0]["merged"] == str(path.resolve())
