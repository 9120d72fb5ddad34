"""Gate artefacts: how a trained gate travels from the controller to the gateways.

A gate version is a retained ``GateManifest`` on ``moe2/v1/gates/<version>`` that names its
files (ONNX models, tokenizer) by sha256. Each file is a content-addressed blob, published
retained in raw-byte chunks on ``moe2/v1/blobs/<sha256>/<index>`` (chunk payloads carry no
JSON envelope: the blob's sha256 in the manifest is their integrity check). Because blobs are
addressed by content, a new gate version that reuses the embedding model resends only its head.

    manifest = GateManifest(version="g3", experts=["a", "b"], files=[...], ...)
    ref = GateRef(version="g3", sha256=gate_digest(manifest))  # goes into AppAssignment.gate

A gateway verifies the manifest against the assignment's ``GateRef``, every blob against the
manifest, loads the gate and only then serves with it; it reports each outcome in a retained
``GateAck`` on ``moe2/v1/agents/<gateway>/gates/<version>``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from moe2.shared.costmodel import CostCurve
from moe2.shared.protocol.base import NAME_PATTERN, Message

DEFAULT_CHUNK_BYTES = 1 << 20  # bytes per retained chunk message
MAX_BLOB_BYTES = 1 << 30

SHA256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class BlobRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["embedding", "head", "tokenizer"]
    sha256: SHA256
    size: int = Field(ge=1, le=MAX_BLOB_BYTES)  # bytes
    chunks: int = Field(ge=1)
    chunk_bytes: int = Field(ge=1)  # every chunk but the last has exactly this many bytes


class GateManifest(Message):
    """Retained on ``moe2/v1/gates/<version>``.

    ``embedding`` maps (input_ids, attention_mask) int64 (batch, seq) to (batch, dim) float32
    sentence embeddings; ``head`` maps (batch, dim) embeddings to (batch, len(experts)) gate
    values (softmax, rows sum to 1); ``tokenizer`` is a HuggingFace ``tokenizer.json``.
    """

    version: Annotated[str, Field(pattern=NAME_PATTERN)]
    experts: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(min_length=1)
    files: list[BlobRef] = Field(min_length=3, max_length=3)
    max_length: int = Field(default=256, ge=8, le=8192)  # tokens fed to the embedding
    embedding_model: str  # e.g. "all-MiniLM-L6-v2"
    created_at: float  # unix seconds
    sig: str | None = Field(default=None, max_length=200)  # base64 Ed25519 (signing.py)

    def file(self, role: str) -> BlobRef:
        for f in self.files:
            if f.role == role:
                return f
        raise KeyError(role)


def gate_digest(manifest: GateManifest) -> str:
    """sha256 over what defines a gate's behaviour: its experts (in order), files, length."""
    body = {
        "version": manifest.version,
        "experts": list(manifest.experts),
        "files": sorted((f.role, f.sha256, f.size) for f in manifest.files),
        "max_length": manifest.max_length,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def blob_ref(role: str, data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> BlobRef:
    return BlobRef(
        role=role,  # type: ignore[arg-type]
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        chunks=max(1, -(-len(data) // chunk_bytes)),
        chunk_bytes=chunk_bytes,
    )


def chunk(data: bytes, ref: BlobRef, index: int) -> bytes:
    return data[index * ref.chunk_bytes : (index + 1) * ref.chunk_bytes]


class GateAck(Message):
    """Retained on ``moe2/v1/agents/<gateway>/gates/<version>``: what became of a gate."""

    gateway: str
    version: str
    sha256: str
    state: Literal["loaded", "rejected"]
    apps: list[str] = Field(default_factory=list)  # applications now served with it
    providers: list[str] = Field(default_factory=list)  # ONNX Runtime execution providers
    reason: str | None = None
    # Seconds the gate takes on a prompt on this gateway (tokenizer, encoder and head), a
    # curve in the prompt's length in the gate's own tokens, like a profile's: fitted at load
    # on sample sentences and then on the last prompts it gated (``latency_prompts`` of its
    # points); the τ_gate of eq. 8 the controller promises. Announced again as it moves.
    latency: CostCurve | None = None
    latency_prompts: int = Field(default=0, ge=0)
