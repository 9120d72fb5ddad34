"""``moe2ctl train``, ``moe2ctl export`` and ``moe2ctl push-gate``.

moe2ctl train tiny --json                     # -> gate version g-20250101-120000-ab12
moe2ctl export --version g-...                # ONNX, checked against torch
moe2ctl push-gate --app zoo --k 2 --wait 60   # latest gate, subset = its experts
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from moe2.controller.extras import require
from moe2.controller.gate.config import TrainConfig
from moe2.controller.options import (
    broker_from_flags,
    broker_options,
    db_option,
    desired_state,
    emit,
    json_option,
    open_registry,
    settings,
)
from moe2.controller.registry import Registry
from moe2.controller.registry.schema import GateVersion
from moe2.shared import protocol as p
from moe2.shared.errors import ConfigError
from moe2.shared.settings import collect_overrides, load_settings, settings_options

if TYPE_CHECKING:  # torch loads only for the commands that need it
    from moe2.controller.gate.embedding import Encoder
    from moe2.controller.gate.model import GateHead


def embeddings(reg: Registry, encoder: Encoder, prompts: list[str]) -> np.ndarray:
    """(len(prompts), dim) float32, from the registry's cache where possible."""
    from moe2.controller.gate.embedding import MODEL_NAME

    keys = [hashlib.sha256(t.encode()).hexdigest() for t in prompts]
    cached = reg.cached_embeddings(MODEL_NAME, keys)
    todo = sorted({k: t for k, t in zip(keys, prompts) if k not in cached}.items())
    if todo:
        fresh = encoder.embed([t for _, t in todo])
        new = {k: v for (k, _), v in zip(todo, fresh)}
        reg.cache_embeddings(MODEL_NAME, new)
        cached.update(new)
    return np.stack([cached[k] for k in keys])


def train_gate(
    reg: Registry,
    dataset: str,
    experts: list[str] | None,
    cfg: TrainConfig,
    version: str | None = None,
    encoder: Encoder | None = None,
    gates_dir: Path | None = None,
) -> tuple[GateVersion, Any]:
    """Train and store a gate; its files go to ``gates_dir/<version>`` (default: the
    controller settings' gates folder)."""
    require("torch", "train", "training a gate")
    import torch

    from moe2.controller.gate.embedding import Encoder
    from moe2.controller.gate.train import TrainData, train

    table = reg.score_table(dataset, experts)
    if not table.samples or len(table.experts) < 2:
        raise ConfigError(
            f"dataset {dataset!r} has {len(table.samples)} fully scored samples over "
            f"{len(table.experts)} experts; run `moe2ctl collect {dataset}` with 2+ experts"
        )
    encoder = encoder or Encoder.load()
    emb = embeddings(reg, encoder, [s.prompt for s in table.samples])
    result = train(TrainData.build(table, emb, dataset), cfg)
    version = version or f"g-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    out = (gates_dir or settings().gates_dir) / version
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state": result.head.state_dict(),
            "dim": encoder.dim,
            "experts": table.experts,
            "config": cfg.model_dump(),
        },
        out / "head.pt",
    )
    row = GateVersion(
        version=version,
        experts_json=json.dumps(table.experts),
        datasets_json=json.dumps([dataset]),
        config_json=cfg.model_dump_json(),
        metrics_json=json.dumps(result.metrics()),
        artefact_dir=str(out),
    )
    reg.add_gate_version(row)
    return row, result


def load_head(row: GateVersion) -> GateHead:
    require("torch", "train", "a gate without its ONNX export")
    import torch

    from moe2.controller.gate.model import GateHead

    ck = torch.load(Path(row.artefact_dir) / "head.pt", weights_only=True)
    # Only the architecture: a checkpoint's training settings may predate today's checks.
    arch = TrainConfig.model_construct(**ck["config"])
    head = GateHead(ck["dim"], len(ck["experts"]), arch.hidden, arch.dropout)
    head.load_state_dict(ck["state"])
    return head.eval()


def export_gate(
    reg: Registry,
    version: str | None,
    prompts: list[str],
    encoder: Encoder | None = None,
    gates_dir: Path | None = None,
) -> tuple[p.GateManifest, float]:
    require("onnx", "train", "exporting a gate")
    from moe2.controller.gate import export as ex
    from moe2.controller.gate.embedding import Encoder

    row = reg.gate_version(version)
    encoder = encoder or Encoder.load()
    head = load_head(row)
    out = Path(row.artefact_dir)
    files = ex.export(encoder, head, out, (gates_dir or settings().gates_dir) / "_encoders")
    diff = ex.check(encoder, head, files, prompts)
    manifest = ex.write_manifest(out, row.version, json.loads(row.experts_json), files)
    metrics = json.loads(row.metrics_json) | {"onnx_max_abs_diff": diff}
    reg.update_gate(row.version, sha256=p.gate_digest(manifest), metrics_json=json.dumps(metrics))
    return manifest, diff


def _short(m: dict[str, Any]) -> str:
    sizes = m["split"]
    lines = [
        f"split: {sizes['train']} train, {sizes['val']} val (early stopping, LR schedule), "
        f"{sizes['test']} test (held out); {m['steps']} steps, {m['lr_decays']} LR decays "
        f"(final {m['final_lr']:.3g}), stopped by {m['stopped']}"
    ]
    for split in ("train", "val", "test"):
        r = m[split]
        if r is None:
            continue
        acc = lambda s: "-" if s["accuracy"] is None else f"{s['accuracy']:.3f}"  # noqa: E731
        lines.append(
            f"{split}: loss gate {r['gate']['loss']:.3f} uniform {r['uniform']['loss']:.3f} "
            f"best-expert {r['best_expert']} {r['experts'][r['best_expert']]['loss']:.3f}; "
            f"acc gate {acc(r['gate'])} uniform {acc(r['uniform'])} "
            f"best {acc(r['experts'][r['best_expert']])}; routing {r['routing_accuracy']:.3f}"
        )
    return "\n".join(lines)


@click.command("train")
@click.argument("dataset")
@click.option("--experts", default=None, help="comma-separated [default: all that scored it]")
@click.option("--version", default=None, help="gate version name [default: g-<time>-<rand>]")
@settings_options(TrainConfig)
@db_option
@json_option
def train_cmd(
    dataset: str,
    experts: str | None,
    version: str | None,
    db_url: str | None,
    as_json: bool,
    **kw: Any,
) -> None:
    """Train the gate on the stored scores of DATASET.

    The samples are split into train, val (early stopping and the LR schedule watch it) and
    test (held out from both, reported apart; `moe2ctl eval` evaluates on it)."""
    cfg = load_settings(TrainConfig, overrides=collect_overrides(kw))
    reg = open_registry(db_url)
    row, result = train_gate(reg, dataset, experts.split(",") if experts else None, cfg, version)
    reg.close()
    out = {"version": row.version, "experts": json.loads(row.experts_json)} | result.metrics()
    emit(out, as_json, lambda o: f"gate {o['version']} ({o['seconds']} s)\n" + _short(o))


@click.command("export")
@click.option("--version", default=None, help="gate version [default: the latest]")
@click.option("--check-dataset", default=None, help="prompts to compare ONNX and torch on")
@db_option
@json_option
def export_cmd(
    version: str | None, check_dataset: str | None, db_url: str | None, as_json: bool
) -> None:
    """Export a trained gate to ONNX (encoder + head), checked against torch (1e-5)."""
    reg = open_registry(db_url)
    row = reg.gate_version(version)
    ds_name = check_dataset or json.loads(row.datasets_json)[0]
    prompts = [s.prompt for s in reg.samples(ds_name)][-16:]
    manifest, diff = export_gate(reg, row.version, prompts)
    reg.close()
    out = {
        "version": manifest.version,
        "sha256": p.gate_digest(manifest),
        "max_abs_diff": diff,
        "files": [f.model_dump() for f in manifest.files],
        "dir": row.artefact_dir,
    }
    emit(
        out,
        as_json,
        lambda o: f"gate {o['version']} {o['sha256'][:12]} diff {o['max_abs_diff']:.1e}",
    )


@click.command("push-gate")
@click.option("--version", default=None, help="gate version [default: the latest]")
@click.option("--app", "apps", multiple=True, required=True, help="application(s) to serve")
@click.option("--subset", default=None, help="experts, comma-separated [default: the gate's]")
@click.option(
    "--k", type=click.IntRange(min=1), default=1, show_default=True, help="experts per prompt"
)
@click.option(
    "--gateway",
    "gateways",
    multiple=True,
    help="gateway that serves the apps (repeatable) [default: every gateway]",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="longest wait for the gateways to load the gate, seconds",
)
@db_option
@broker_options
@json_option
def push_gate_cmd(
    version: str | None,
    apps: tuple[str, ...],
    subset: str | None,
    k: int,
    gateways: tuple[str, ...],
    wait_s: float,
    db_url: str | None,
    as_json: bool,
    **kw: Any,
) -> None:
    """Publish a gate (versioned, hash-verified) and assign it to applications; wait for
    the gateways to load it. Exit status 4 when no gateway accepted an application."""
    from moe2.controller.gate import export as ex
    from moe2.controller.push import record, report

    broker = broker_from_flags(kw)
    reg = open_registry(db_url)
    try:
        row = reg.gate_version(version)
        out_dir = Path(row.artefact_dir)
        if not (out_dir / "manifest.json").exists():
            raise ConfigError(f"gate {row.version} is not exported: run `moe2ctl export` first")
        manifest = p.GateManifest.model_validate_json((out_dir / "manifest.json").read_text())
        members = subset.split(",") if subset else list(manifest.experts)
        files = {role: path.read_bytes() for role, path in ex.gate_files(out_dir).items()}
        with desired_state(broker) as desired:
            results = desired.push_gate(
                manifest,
                files,
                [(a, members, k) for a in apps],
                gateways=gateways or None,
                wait_s=wait_s,
            )
        record(reg, results)
        reg.update_gate(row.version, pushed_at=time.time())
    finally:
        reg.close()
    report(results, as_json, {"version": manifest.version, "sha256": p.gate_digest(manifest)})


COMMANDS = [train_cmd, export_cmd, push_gate_cmd]
