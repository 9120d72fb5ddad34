"""Retained announcements of an agent: what it serves and whether it is alive."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moe2.shared.protocol.base import NAME_PATTERN, Message

AgentName = Annotated[str, Field(pattern=NAME_PATTERN)]

# Largest vocabulary an announcement may claim (the largest models have ~262k tokens).
MAX_VOCAB = 1 << 22


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


class AdapterInfo(BaseModel):
    """A LoRA adapter the agent applies on top of its base model (a domain expert). The base
    keeps its vocabulary, so experts of one base share ``tokenizer_hash`` and fuse by id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # label of the expert (configured, else the adapter file's general.name)
    file: str  # file name of the adapter GGUF
    sha256: str | None = None  # of the adapter file, when computed
    scale: float = Field(default=1.0, gt=0)  # llama.cpp scale on top of alpha / rank
    cluster: str | None = None  # the prompt cluster it was fine-tuned on, when known


class AgentInfo(Message):
    """Retained on ``agents/<id>/info``: what this agent serves. A gateway trusts none of it
    blindly: ``n_vocab`` and ``tokenizer_hash`` must match the vocabulary the agent serves
    (``vocab`` RPC), ``max_sessions`` bounds how many sessions it opens there."""

    agent_id: AgentName
    model: str  # model name from the GGUF metadata, or the file name
    model_file: str
    model_sha256: str | None = None  # of the GGUF file, when computed
    architecture: str
    quantization: str  # e.g. "Q4_K_M", "F32"
    n_ctx: int = Field(ge=1)
    n_vocab: int = Field(ge=1, le=MAX_VOCAB)
    tokenizer_hash: str  # sha256 over the vocabulary; equal hashes may fuse by token id
    bos_id: int | None = Field(default=None, ge=0)
    eos_ids: list[Annotated[int, Field(ge=0)]] = Field(max_length=1024)  # end a generation
    add_bos: bool  # whether the model expects BOS before a prompt
    chat_template: str | None = None
    backend: ComputeBackend | None = None  # None: an agent of an older version
    device_class: str
    software_version: str
    max_sessions: int = Field(ge=1, le=4096)  # sessions it holds at once (open beyond: busy)
    started_at: float  # unix seconds
    # Added with domain experts; absent (and so unchanged on the wire) without an adapter.
    # An older peer rejects an info that has it: upgrade peers before serving adapters.
    adapter: AdapterInfo | None = None
    # RPC payload codecs this agent reads (protocol/codec.py); older agents read JSON only.
    codecs: list[str] = Field(default_factory=lambda: ["json"])

    @model_validator(mode="after")
    def _ids_in_vocabulary(self) -> AgentInfo:
        if any(t >= self.n_vocab for t in self.eos_ids) or (
            self.bos_id is not None and self.bos_id >= self.n_vocab
        ):
            raise ValueError(f"bos/eos token ids must be below n_vocab={self.n_vocab}")
        return self


class AgentStatus(Message):
    """Retained on ``agents/<id>/status``; the broker publishes ``offline`` as the LWT."""

    agent_id: AgentName
    state: Literal["online", "offline"]
    since: float | None = None  # unix seconds; None in the last will (the broker sends it)
