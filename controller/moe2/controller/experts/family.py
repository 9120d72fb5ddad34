"""A family of domain experts from one base: one LoRA adapter per cluster of a stored
clustering, written as GGUF adapters and recorded in the registry.

The base is loaded once; each expert is trained on its cluster's samples (less a few kept
back to report the loss before and after), checkpointed under ``out/<expert>/`` so an
interrupted run resumes, and written to ``out/<expert>.gguf``.

    rows = train_experts(reg, Path("base.gguf"), "mmlu-train-k4",
                         [ExpertJob("smol-c0", 0), ExpertJob("smol-c1", 1)], cfg, out)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe2.controller.experts import base as base_model
from moe2.controller.experts.finetune import (
    FinetuneConfig,
    answer_pairs,
    finetune,
    mean_loss,
    resolve_device,
    tokenize,
    unwrap,
)
from moe2.controller.experts.lora_gguf import AdapterMeta, write_adapter
from moe2.controller.registry import Registry, SampleRow
from moe2.controller.registry.schema import ExpertAdapterRow
from moe2.shared.errors import ConfigError
from moe2.shared.files import sha256_file


@dataclass(frozen=True)
class ExpertJob:
    name: str  # expert (and adapter file) name
    cluster: int


def cluster_samples(reg: Registry, clustering: str) -> dict[int, list[SampleRow]]:
    """{cluster: its samples, in dataset order} of a stored clustering."""
    rec = reg.clustering(clustering)
    members = reg.cluster_members(rec.name)
    out: dict[int, list[SampleRow]] = {c: [] for c in range(rec.k)}
    for s in reg.samples(rec.dataset):
        if s.id in members:
            out[members[s.id]].append(s)
    return out


def train_experts(
    reg: Registry,
    base_path: Path,
    clustering: str,
    jobs: Sequence[ExpertJob],
    cfg: FinetuneConfig,
    out: Path,
    *,
    val_samples: int = 32,
    progress: bool = True,
) -> list[ExpertAdapterRow]:
    ref = base_model.describe(base_path)
    rec = reg.clustering(clustering)
    source = reg.dataset(rec.dataset).source
    by_cluster = cluster_samples(reg, rec.name)
    for job in jobs:
        if not by_cluster.get(job.cluster):
            raise ConfigError(f"cluster {job.cluster} of {rec.name} holds no samples")
    model, tok = base_model.load(ref, resolve_device(cfg.device))
    rows = []
    for job in jobs:
        samples = by_cluster[job.cluster]
        # Keep back at most a fifth of a small cluster, so there is always data to train on.
        n_val = min(val_samples, len(samples) // 5)
        order = np.random.default_rng(cfg.seed).permutation(len(samples))
        val = [samples[i] for i in order[:n_val]]
        train = [samples[i] for i in order[n_val:]]
        train_ex = tokenize(tok, answer_pairs(train), cfg)
        val_ex = tokenize(tok, answer_pairs(val), cfg) if val else []
        val_base = mean_loss(model, val_ex) if val_ex else None
        bar = _bar(job.name, cfg.planned_steps(len(train_ex)), progress)
        try:
            result = finetune(
                model,
                train_ex,
                cfg,
                out / job.name,
                progress=None if bar is None else bar.update_to,
            )
        finally:
            if bar is not None:
                bar.close()
        val_after = mean_loss(result.model, val_ex) if val_ex else None
        path = write_adapter(
            out / f"{job.name}.gguf",
            result.pairs,
            AdapterMeta(
                architecture=ref.architecture,
                alpha=cfg.alpha,
                name=job.name,
                cluster=str(job.cluster),
                clustering=rec.name,
                base_sha256=ref.sha256,
                base_file=ref.path.name,
                split=source,
            ),
            n_head=ref.n_head,
            n_head_kv=ref.n_head_kv,
        )
        model = unwrap(result.model)
        metrics = {
            "steps": result.steps,
            "planned_steps": result.planned_steps,
            "stopped": result.stopped,
            "seconds": round(result.seconds, 2),
            "resumed_from": result.resumed_from,
            "train_examples": len(train_ex),
            "val_examples": len(val_ex),
            "val_loss_base": val_base,
            "val_loss": val_after,
            "last_loss": result.history[-1]["loss"] if result.history else None,
            "device": str(next(model.parameters()).device),
        }
        row = ExpertAdapterRow(
            name=job.name,
            clustering_id=rec.id,
            cluster=job.cluster,
            base_path=str(ref.path.resolve()),
            base_sha256=ref.sha256,
            architecture=ref.architecture,
            adapter_path=str(path.resolve()),
            adapter_sha256=sha256_file(path),
            split=source,
            config_json=cfg.model_dump_json(),
            metrics_json=json.dumps(metrics),
        )
        reg.add_expert(row)
        rows.append(row)
    return rows


class _Bar:
    """A tqdm bar on stderr that jumps to the step the trainer reports (resumes included)."""

    def __init__(self, name: str, total: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=name, unit="step", file=sys.stderr, dynamic_ncols=True)

    def update_to(self, step: int, planned: int, loss: float) -> None:
        self._bar.total = planned
        self._bar.n = step
        self._bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def _bar(name: str, total: int, enabled: bool) -> _Bar | None:
    return _Bar(name, total) if enabled else None
