"""The gate learns to route between the tiny synthetic-domain experts, its loss is the
optimizer's J on the same samples, its test split is never seen by training, the learning
rate decays before early stopping, and its ONNX export computes the same gate values as
torch."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from tinyfleet import register_experts, score_directly

from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend
from moe2.controller import datasets as ds
from moe2.controller.gate.cli import embeddings, export_gate, load_head, train_gate
from moe2.controller.gate.config import TrainConfig
from moe2.controller.gate.embedding import Encoder
from moe2.controller.gate.train import TrainData, gate_values, report, train
from moe2.controller.mixing import Mixed
from moe2.controller.optimize import Problem
from moe2.controller.optimize.fromregistry import scored_set
from moe2.controller.optimize.objective import Evaluator
from moe2.controller.registry import Registry
from moe2.controller.splits import split
from moe2.shared import protocol as p
from moe2.shared.errors import ConfigError

DOMAINS = ("animals", "code", "cooking", "arithmetic")
FAST = TrainConfig(
    batch_size=16, accumulation=1, eval_every=10, plateau_patience=5, early_stop=15, max_epochs=40
)


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
    register_experts(reg, {d: b.info for d, b in backends.items()})
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


def test_j_from_a_problem_file_equals_the_gates_training_loss(trained: Any, tmp_path: Path) -> None:
    # Runs before the export test below: an exported gate is evaluated through ONNX Runtime
    # (float32 differences of ~1e-7), an unexported one through the torch head as training.
    reg, row, _, _ = trained
    experts = json.loads(row.experts_json)
    data = scored_set(reg, "train", gate_version=row.version, experts=experts)
    assert data.gate.source == "torch"
    metrics = json.loads(reg.gate_version(row.version).metrics_json)
    test_idx, val_idx = set(metrics["split"]["test_idx"]), set(metrics["split"]["val_idx"])
    assert len(test_idx) == metrics["split"]["test"] > 0
    parts = {
        "test": data.positions(test_idx, inside=True),
        "train": data.positions(test_idx | val_idx, inside=False),
    }
    for part, positions in parts.items():
        chosen = data.select(positions)
        path = tmp_path / f"{part}.json"
        chosen.problem({}, None).to_file(path)
        problem = Problem.from_file(path)
        j = Evaluator(problem).objective(list(range(problem.n_experts)))
        assert j == pytest.approx(metrics[part]["gate"]["loss"], abs=1e-6), part
        # the training's own loss function on the problem's gate values, to rounding
        assert chosen.mixed.loss(np.log(problem.gate)) == pytest.approx(j, abs=1e-9)


def test_the_test_split_is_never_seen_by_training() -> None:
    # Corrupting every test sample's scores and embedding leaves the trained gate unchanged,
    # to the bit; the split is stable when samples are added.
    data = _synthetic(600)
    parts = split(data.mixed.sample_idx, 0.1, 0.2, 0)
    assert not set(parts.train) & set(parts.test) and not set(parts.val) & set(parts.test)
    assert len(parts.test) == 120 and len(parts.val) == 60
    bigger = split(np.arange(900), 0.1, 0.2, 0)
    moved = set(parts.test) - set(bigger.test)
    assert len(moved) < 30  # most test samples stay test samples as the dataset grows
    cfg = TrainConfig(max_epochs=3, plateau_patience=2, early_stop=5, eval_every=2)
    a = train(data, cfg)
    spoiled = _synthetic(600)
    spoiled.mixed.logp[parts.test] = -50.0
    spoiled.emb[parts.test] = 1.0
    b = train(spoiled, cfg)
    for k, v in a.head.state_dict().items():
        assert torch.equal(v, b.head.state_dict()[k]), k
    assert a.val.gate.loss == b.val.gate.loss
    assert a.test is not None and b.test is not None and a.test.gate.loss != b.test.gate.loss


def test_the_learning_rate_decays_before_early_stopping() -> None:
    result = train(_synthetic(2000), TrainConfig())
    m = result.metrics()
    assert m["stopped"] == "early stop", m
    assert m["lr_decays"] >= 1 and m["final_lr"] < TrainConfig().lr
    assert m["test"]["gate"]["loss"] < m["test"]["uniform"]["loss"]
    with pytest.raises(ValidationError, match=r"early_stop \(30\) must exceed plateau_patience"):
        TrainConfig(early_stop=30)


def test_train_refuses_too_few_samples_for_three_splits() -> None:
    with pytest.raises(ConfigError, match="cannot be split into train, val"):
        train(_synthetic(1), TrainConfig())


def _synthetic(n: int, experts: int = 4, tokens: int = 3) -> TrainData:
    # Each sample belongs to one expert's domain: that expert knows its answer.
    rng = np.random.default_rng(0)
    dom = rng.integers(0, experts, n)
    centres = rng.normal(size=(experts, 32))
    emb = (centres[dom] + rng.normal(scale=1.0, size=(n, 32))).astype(np.float32)
    logp = np.full((n, 2, experts, tokens), -4.0) + rng.normal(
        scale=0.3, size=(n, 2, experts, tokens)
    )
    logp[np.arange(n), 0, dom, :] = -0.5
    mixed = Mixed(
        experts=[f"e{i}" for i in range(experts)],
        sample_idx=np.arange(n),
        prompts=[""] * n,
        choices=[("right", "wrong")] * n,
        apps=["a"] * n,
        logp=np.minimum(logp, 0),
        mask=np.ones((n, 2, tokens), bool),
        n_options=np.full(n, 2),
        answer=np.zeros(n, np.int64),
        per_token=np.ones(n, bool),
        steps=np.full((n, 2), tokens),
    )
    return TrainData(mixed, emb)


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
