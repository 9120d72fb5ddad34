"""Which gate weights an optimisation or an evaluation uses, and where they came from.

    w = gate_weights(reg, ["a", "b"], prompts, None)   # the newest gate; "uniform" for none
    w.values                                            # (prompts, 2), rows sum to 1
    w.provenance()                                      # version, datasets, onnx|torch|uniform

A gate that was exported is evaluated through ONNX Runtime exactly as a gateway computes it;
one that was not, through its torch head on the registry's cached embeddings, exactly as its
training reported it. Asking for the newest gate when none was trained is an error: weighting
experts equally must be asked for ("uniform").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe2.controller.extras import require
from moe2.controller.mixing import normalise
from moe2.controller.registry import Registry
from moe2.shared.errors import ConfigError

UNIFORM = "uniform"


@dataclass(frozen=True)
class GateWeights:
    version: str  # gate version, or "uniform"
    datasets: list[str]  # what the gate was trained on
    source: str  # "onnx" | "torch" | "uniform"
    values: np.ndarray  # (prompts, experts) float64, rows sum to 1
    metrics: dict[str, Any] = field(default_factory=dict)  # the gate's training metrics
    # (prompts,) each prompt's length in the gate's own tokens (its delay grows with it); 0
    # without a gate
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def held_out(self) -> set[int]:
        """Dataset positions of the gate's test split (never seen in training)."""
        split = self.metrics.get("split") or {}
        return {int(i) for i in split.get("test_idx", [])}

    def provenance(self) -> dict[str, Any]:
        return {"version": self.version, "datasets": self.datasets, "source": self.source}


def gate_weights(
    reg: Registry, experts: Sequence[str], prompts: Sequence[str], version: str | None
) -> GateWeights:
    """(prompts, experts) weights of gate ``version`` (None: the newest) renormalised over
    ``experts``; ``version="uniform"`` weighs every expert equally."""
    if version == UNIFORM:
        values = np.full((len(prompts), len(experts)), 1.0 / len(experts))
        return GateWeights(UNIFORM, [], UNIFORM, values, tokens=np.zeros(len(prompts), np.int64))
    row = reg.gate_version(version)  # the newest when None; an error naming --gate uniform
    gate_experts: list[str] = json.loads(row.experts_json)
    missing = [e for e in experts if e not in gate_experts]
    if missing:
        raise ConfigError(
            f"gate {row.version} does not know experts {missing} (it was trained on "
            f"{gate_experts}); train a new gate or pass --gate uniform"
        )
    out = Path(row.artefact_dir)
    # A trained gate's values need the train extra (ONNX Runtime and the exporter's torch).
    require("torch", "train", f"the values of gate {row.version}")
    from moe2.controller.gate.embedding import load_tokenizer

    if (out / "manifest.json").exists():
        from moe2.controller.gate.export import gate_files, onnx_values

        files = gate_files(out)
        values, source = onnx_values(files, list(prompts)), "onnx"
        tokenizer_json = files["tokenizer"].read_text()
    else:
        from moe2.controller.gate.cli import embeddings, load_head
        from moe2.controller.gate.embedding import Encoder
        from moe2.controller.gate.train import gate_values

        encoder = Encoder.load()
        emb = embeddings(reg, encoder, list(prompts))
        values, source = gate_values(load_head(row), emb), "torch"
        tokenizer_json = encoder.tokenizer_json
    tok = load_tokenizer(tokenizer_json)
    tokens = np.array([len(tok.encode(t).ids) for t in prompts], dtype=np.int64)  # type: ignore[attr-defined]
    cols = [gate_experts.index(e) for e in experts]
    return GateWeights(
        version=row.version,
        datasets=list(json.loads(row.datasets_json)),
        source=source,
        values=normalise(values[:, cols]),
        metrics=json.loads(row.metrics_json),
        tokens=tokens,
    )
