"""The gate learns to route between the tiny synthetic-domain experts, and its ONNX export
computes the same gate values as torch."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend
from moe2.controller import datasets as ds
from moe2.controller.gate.cli import embeddings, export_gate, load_head, train_gate
from moe2.controller.gate.config import TrainConfig
from moe2.controller.gate.embedding import Encoder
from moe2.controller.gate.train import TrainData, gate_values, report
from moe2.controller.registry import Registry
from moe2.shared import protocol as p

DOMAINS = ("animals", "code", "cooking", "arithmetic")
FAST = TrainConfig(
    batch_size=16, accumulation=1, eval_every=10, plateau_patience=5, early_stop=15, max_epochs=40
)


def score_directly(reg: Registry, dataset: str, backends: dict[str, LlamaCppBackend]) -> None:
    """What `moe2ctl collect` stores, computed in-process (the MQTT path has its own test)."""
    first = next(iter(backends.values()))
    rows = []
    for s in reg.samples(dataset):
        prompt = first.tokenize(s.prompt, add_bos=first.info.add_bos)
        for o, target in enumerate(s.targets):
            ids = first.tokenize(target, add_bos=False)
            for name, b in backends.items():
                rows.append(
                    {
                        "sample_id": s.id,
                        "expert": name,
                        "option": o,
                        "tokenizer_hash": b.info.tokenizer_hash,
                        "tokens": ids,
                        "logprobs": b.score(prompt, ids),
                    }
                )
    reg.add_scores(rows)


@pytest.fixture(scope="module")
def trained(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("gate")
    old = os.environ.get("MOE2_DATA_DIR")
    os.environ["MOE2_DATA_DIR"] = str(tmp / "data")
    reg = Registry.open(f"sqlite:///{tmp / 'registry.db'}")
    backends = {d: LlamaCppBackend(AgentConfig(model=tiny_models[d], n_threads=1)) for d in DOMAINS}
    for name, seed, n in (("train", 1, 40), ("heldout", 2, 15)):
        reg.add_dataset(
            name, "multiple-choice", "tiny", ds.tiny_domains(DOMAINS, n, seed, choices=4)
        )
        score_directly(reg, name, backends)
    encoder = Encoder.load()
    row, result = train_gate(reg, "train", None, FAST, version="g-test", encoder=encoder)
    yield reg, row, result, encoder
    for b in backends.values():
        b.close()
    reg.close()
    if old is None:
        os.environ.pop("MOE2_DATA_DIR", None)
    else:
        os.environ["MOE2_DATA_DIR"] = old


def test_gate_routes_better_than_every_single_expert_and_uniform(trained: Any) -> None:
    reg, row, result, encoder = trained
    assert result.val.gate.loss < result.val.uniform.loss
    table = reg.score_table("heldout", json.loads(row.experts_json))
    data = TrainData.build(table, embeddings(reg, encoder, [s.prompt for s in table.samples]))
    held = report(data, gate_values(load_head(row), data.emb))
    best = held.experts[held.best_expert].accuracy
    assert held.gate.accuracy is not None and best is not None and held.uniform.accuracy is not None
    assert held.gate.accuracy >= best + 0.3, held
    assert held.gate.accuracy >= held.uniform.accuracy + 0.3, held
    assert held.gate.loss < held.uniform.loss and held.routing_accuracy >= 0.9
    metrics = json.loads(reg.gate_version("g-test").metrics_json)
    assert {"train", "val", "test", "split", "epochs", "seconds"} <= set(metrics)


def test_onnx_gate_matches_torch_to_1e5(trained: Any) -> None:
    from moe2.agent.gateway.onnxgate import OnnxGate
    from moe2.controller.gate.export import gate_files, torch_values

    reg, row, _, encoder = trained
    prompts = [*[s.prompt for s in reg.samples("heldout")][:12], "", "x" * 3000]
    manifest, diff = export_gate(reg, row.version, prompts, encoder=encoder)
    assert diff <= 1e-5
    assert reg.gate_version(row.version).sha256 == p.gate_digest(manifest)
    files = gate_files(Path(row.artefact_dir))
    gate = OnnxGate(manifest, {k: v.read_bytes() for k, v in files.items()})
    want = torch_values(encoder, load_head(row), prompts)
    got = np.stack([gate.probabilities(x) for x in prompts])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert "CPUExecutionProvider" in gate.providers
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
