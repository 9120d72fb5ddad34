"""Retained announcements of an agent: what it serves and whether it is alive."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moe2.shared.protocol.base import Message


class ComputeDevice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # ggml's device name: "CPU", "CUDA0", "Metal"
    description: str  # "NVIDIA GeForce RTX 4090", "Orin"
    kind: Literal["cpu", "gpu", "igpu", "accel"]
    memory_total: int | None = None  # bytes


class ComputeBackend(BaseModel):
    """Where the agent's model runs, as llama.cpp placed it at load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # "CPU", "CUDA", "Metal", "Vulkan"...
    gpu_layers: int  # layers (output layer included) on a GPU
    n_layers: int  # offloadable layers: repeating layers + the output layer
    requested_layers: int  # what the configuration asked for
    vram_bytes: int  # model weights in GPU memory
    supports_gpu_offload: bool  # whether this llama.cpp build can offload at all
    devices: list[ComputeDevice] = Field(default_factory=list)


class AgentInfo(Message):
    """Retained on ``agents/<id>/info``: what this agent serves."""

    agent_id: str
    model: str  # model name from the GGUF metadata, or the file name
    model_file: str
    model_sha256: str | None = None  # of the GGUF file, when computed
    architecture: str
    quantization: str  # e.g. "Q4_K_M", "F32"
    n_ctx: int
    n_vocab: int
    tokenizer_hash: str  # sha256 over the vocabulary; equal hashes may fuse by token id
    bos_id: int | None = None
    eos_ids: list[int]  # ids that end a generation (eos, eot)
    add_bos: bool  # whether the model expects BOS before a prompt
    chat_template: str | None = None
    backend: ComputeBackend | None = None  # None: an agent of an older version
    device_class: str
    software_version: str
    max_sessions: int
    started_at: float  # unix seconds


class AgentStatus(Message):
    """Retained on ``agents/<id>/status``; the broker publishes ``offline`` as the LWT."""

    agent_id: str
    state: Literal["online", "offline"]
    since: float | None = None  # unix seconds; None in the last will (the broker sends it)
