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
from typing import Any

import numpy as np

from moe2.controller.experts import base as base_model
from moe2.controller.experts.finetune import (
    Example,
    FinetuneConfig,
    answer_pairs,
    finetune,
    mean_loss,
    resolve_device,
    run_identity,
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


def _kept_back(
    samples: Sequence[SampleRow], val_samples: int, seed: int
) -> tuple[list[SampleRow], list[SampleRow]]:
    """(train, val): at most ``val_samples`` kept back, never more than a fifth of a small
    cluster, so there is always data to train on."""
    n_val = min(val_samples, len(samples) // 5)
    order = np.random.default_rng(seed).permutation(len(samples))
    return [samples[i] for i in order[n_val:]], [samples[i] for i in order[:n_val]]


def _cached(done: Path, identity: dict[str, Any], adapter: Path) -> dict[str, Any] | None:
    """The metrics of a finished run of this very training, when its adapter is intact."""
    try:
        record = json.loads(done.read_text())
    except (OSError, ValueError):
        return None
    if record.get("identity") != identity or not adapter.is_file():
        return None
    if sha256_file(adapter) != record.get("adapter_sha256"):
        return None
    metrics: dict[str, Any] = record["metrics"]
    return metrics


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
    """Train (or reuse) one adapter per job. A finished adapter is kept with a record of the
    run that made it (``out/<expert>/done.json``: settings, data, steps, adapter hash): asked
    again for the same training, it is reused without loading the base model."""
    ref = base_model.describe(base_path)
    rec = reg.clustering(clustering)
    source = reg.dataset(rec.dataset).source
    by_cluster = cluster_samples(reg, rec.name)
    for job in jobs:
        if not by_cluster.get(job.cluster):
            raise ConfigError(f"cluster {job.cluster} of {rec.name} holds no samples")
    tok = base_model.load_tokenizer(ref)
    model: Any = None  # loaded when an expert needs training
    rows = []
    for job in jobs:
        train, val = _kept_back(by_cluster[job.cluster], val_samples, cfg.seed)
        train_ex = tokenize(tok, answer_pairs(train), cfg)
        val_ex = tokenize(tok, answer_pairs(val), cfg) if val else []
        identity = run_identity(cfg, train_ex)
        adapter = out / f"{job.name}.gguf"
        done = out / job.name / "done.json"
        metrics = _cached(done, identity, adapter)
        if metrics is not None:
            print(f"{job.name}: trained before, reusing {adapter}", file=sys.stderr)
        else:
            if model is None:
                model = base_model.load_model(ref, resolve_device(cfg.device))
            metrics, model = _train_one(
                model, ref, rec.name, source, job, cfg, train_ex, val_ex, adapter, progress
            )
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(
                json.dumps(
                    {
                        "identity": identity,
                        "adapter_sha256": sha256_file(adapter),
                        "metrics": metrics,
                    }
                )
            )
        row = ExpertAdapterRow(
            name=job.name,
            clustering_id=rec.id,
            cluster=job.cluster,
            base_path=str(ref.path.resolve()),
            base_sha256=ref.sha256,
            architecture=ref.architecture,
            adapter_path=str(adapter.resolve()),
            adapter_sha256=sha256_file(adapter),
            split=source,
            config_json=cfg.model_dump_json(),
            metrics_json=json.dumps(metrics),
        )
        reg.add_expert(row)
        rows.append(row)
    close = getattr(tok, "close", None)
    if close is not None:
        close()
    return rows


def _train_one(
    model: Any,
    ref: base_model.BaseModelRef,
    clustering: str,
    source: str,
    job: ExpertJob,
    cfg: FinetuneConfig,
    train_ex: list[Example],
    val_ex: list[Example],
    adapter: Path,
    progress: bool,
) -> tuple[dict[str, Any], Any]:
    """Train one adapter and write it; (its metrics, the base model again)."""
    val_base = mean_loss(model, val_ex) if val_ex else None
    bar = _bar(job.name, cfg.planned_steps(len(train_ex)), progress)
    try:
        result = finetune(
            model,
            train_ex,
            cfg,
            adapter.parent / job.name,
            progress=None if bar is None else bar.update_to,
        )
    finally:
        if bar is not None:
            bar.close()
    val_after = mean_loss(result.model, val_ex) if val_ex else None
    write_adapter(
        adapter,
        result.pairs,
        AdapterMeta(
            architecture=ref.architecture,
            alpha=cfg.alpha,
            name=job.name,
            cluster=str(job.cluster),
            clustering=clustering,
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
    return metrics, model


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
