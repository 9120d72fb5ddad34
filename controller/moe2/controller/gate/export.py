"""ONNX export of a trained gate: the sentence encoder and the head as two models (the
encoder is the same for every gate version, so gateways fetch it once: blobs are addressed
by content), checked against torch before anything is published.

    files = export(encoder, head, out_dir)              # {"embedding": Path, "head": ..., ...}
    diff = check(encoder, head, files, prompts)         # max |onnx - torch| over gate values
    manifest = write_manifest(out_dir, version, experts, files)
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from moe2.controller.gate.embedding import MAX_LENGTH, MODEL_NAME, Encoder, encode_batch
from moe2.controller.gate.embedding import load_tokenizer as _load_tokenizer
from moe2.controller.gate.model import GateHead
from moe2.shared import protocol as p
from moe2.shared.errors import ConfigError
from moe2.shared.protocol.gates import blob_ref

OPSET = 17
TOLERANCE = 1e-5  # max |onnx - torch| of gate values on held-out prompts


def _export(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, **kw: object
) -> None:
    tmp = path.with_suffix(".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation/tracer notes
        torch.onnx.export(module, args, str(tmp), opset_version=OPSET, dynamo=False, **kw)  # type: ignore[arg-type]
    tmp.replace(path)


def export_embedding(encoder: Encoder, cache_dir: Path) -> Path:
    """The encoder as ONNX, exported once per machine and reused (same bytes, same hash)."""
    path = cache_dir / f"embedding-{MODEL_NAME}.onnx"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    ids = torch.ones((1, 8), dtype=torch.int64)
    _export(
        encoder.eval(),
        (ids, torch.ones_like(ids)),
        path,
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "embedding": {0: "batch"},
        },
    )
    return path


def export_head(head: GateHead, dim: int, path: Path) -> Path:
    _export(
        head.eval(),
        (torch.zeros((1, dim)),),
        path,
        input_names=["embedding"],
        output_names=["gate"],
        dynamic_axes={"embedding": {0: "batch"}, "gate": {0: "batch"}},
    )
    return path


def export(encoder: Encoder, head: GateHead, out_dir: Path, cache_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    emb = export_embedding(encoder, cache_dir)
    tok = out_dir / "tokenizer.json"
    tok.write_text(encoder.tokenizer_json)
    return {
        "embedding": emb,
        "head": export_head(head, encoder.dim, out_dir / "head.onnx"),
        "tokenizer": tok,
    }


def onnx_values(files: dict[str, Path], prompts: Sequence[str]) -> np.ndarray:
    """Gate values through ONNX Runtime exactly as a gateway computes them, one prompt at a
    time: (prompts, experts) float64."""
    import onnxruntime as ort

    emb = ort.InferenceSession(str(files["embedding"]), providers=["CPUExecutionProvider"])
    head = ort.InferenceSession(str(files["head"]), providers=["CPUExecutionProvider"])
    tok = _load_tokenizer(files["tokenizer"].read_text(), MAX_LENGTH)
    rows = []
    for prompt in prompts:
        ids, mask = encode_batch(tok, [prompt])
        (e,) = emb.run(None, {"input_ids": ids, "attention_mask": mask})
        (g,) = head.run(None, {"embedding": e})
        rows.append(g[0])
    return np.asarray(rows, dtype=np.float64)


@torch.no_grad()
def torch_values(encoder: Encoder, head: GateHead, prompts: Sequence[str]) -> np.ndarray:
    tok = _load_tokenizer(encoder.tokenizer_json, MAX_LENGTH)
    head.eval()
    rows = []
    for prompt in prompts:
        ids, mask = encode_batch(tok, [prompt])
        rows.append(head(encoder(torch.from_numpy(ids), torch.from_numpy(mask)))[0].numpy())
    return np.asarray(rows, dtype=np.float64)


def check(
    encoder: Encoder, head: GateHead, files: dict[str, Path], prompts: Sequence[str]
) -> float:
    """Max |ONNX - torch| over the gate values of ``prompts``; raises above TOLERANCE."""
    diff = float(np.abs(onnx_values(files, prompts) - torch_values(encoder, head, prompts)).max())
    if diff > TOLERANCE:
        raise ConfigError(
            f"the ONNX gate differs from torch by {diff:.2e} (> {TOLERANCE:.0e}); not exported"
        )
    return diff


def write_manifest(
    out_dir: Path, version: str, experts: Sequence[str], files: dict[str, Path]
) -> p.GateManifest:
    refs = [blob_ref(role, files[role].read_bytes()) for role in ("embedding", "head", "tokenizer")]
    manifest = p.GateManifest(
        version=version,
        experts=list(experts),
        files=refs,
        max_length=MAX_LENGTH,
        embedding_model=MODEL_NAME,
        created_at=time.time(),
    )
    (out_dir / "manifest.json").write_text(manifest.model_dump_json(indent=1))
    for role, path in files.items():  # the gate directory holds every file it names
        if path.parent != out_dir and not (out_dir / f"{role}.onnx").exists():
            try:
                os.link(path, out_dir / f"{role}.onnx")  # the shared encoder: no second copy
            except OSError:
                shutil.copyfile(path, out_dir / f"{role}.onnx")
    return manifest


def gate_files(out_dir: Path) -> dict[str, Path]:
    files = {
        "embedding": out_dir / "embedding.onnx",
        "head": out_dir / "head.onnx",
        "tokenizer": out_dir / "tokenizer.json",
    }
    missing = [str(f) for f in files.values() if not f.exists()]
    if missing:
        raise ConfigError(f"gate directory {out_dir} is incomplete (missing {missing}): export it")
    return files
