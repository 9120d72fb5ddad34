"""Retained announcements of an agent: what it serves and whether it is alive."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moe2.shared.protocol.base import Message


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
    # RPC payload codecs this agent reads (protocol/codec.py); older agents read JSON only.
    codecs: list[str] = Field(default_factory=lambda: ["json"])


class AgentStatus(Message):
    """Retained on ``agents/<id>/status``; the broker publishes ``offline`` as the LWT."""

    agent_id: str
    state: Literal["online", "offline"]
    since: float | None = None  # unix seconds; None in the last will (the broker sends it)
