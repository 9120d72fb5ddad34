"""Retained announcements of an agent: what it serves and whether it is alive."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moe2.shared.protocol.base import Message


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
    device_class: str
    software_version: str
    max_sessions: int
    started_at: float  # unix seconds
    # Added with domain experts; absent (and so unchanged on the wire) without an adapter.
    # An older peer rejects an info that has it: upgrade peers before serving adapters.
    adapter: AdapterInfo | None = None


class AgentStatus(Message):
    """Retained on ``agents/<id>/status``; the broker publishes ``offline`` as the LWT."""

    agent_id: str
    state: Literal["online", "offline"]
    since: float | None = None  # unix seconds; None in the last will (the broker sends it)
