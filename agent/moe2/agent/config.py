"""The agent's one typed configuration, validated at start-up.

A file (``moe2-agent --config /etc/moe2/agent.toml``)::

    id = "orin-1"
    model = "/var/lib/moe2/models/smollm2-135m-instruct-q4_1.gguf"
    lora = "/var/lib/moe2/experts/smollm2-c2.gguf"     # optional: serve a domain expert
    device_class = "orin-agx-64gb"
    n_ctx = 2048
    max_sessions = 16

    [broker]
    host = "10.0.0.2"
    port = 8883
    tls_ca = "/etc/moe2/ca.crt"

    [profile]
    repeats = 3

Environment: ``MOE2_AGENT_N_CTX=4096``, ``MOE2_AGENT_BROKER__PORT=1884``. Flags:
``--n-ctx 4096``, ``--broker-port 1884``. Flags beat environment beats file.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from moe2.agent.gateway.config import GatewayConfig
from moe2.shared.devices import MeterName, resolve_device_class
from moe2.shared.errors import ConfigError
from moe2.shared.mqtt import BrokerConfig
from moe2.shared.protocol import NAME_PATTERN, check_name


def _default_id() -> str:
    host = socket.gethostname().split(".")[0] or "agent"
    safe = "".join(c if c.isalnum() or c in "_.-" else "-" for c in host)[:64]
    return safe if safe[:1].isalnum() else f"agent-{safe}"[:64]


class ProfilerSettings(BaseModel):
    """How self-profiling measures: delay and energy against prompt length. The defaults
    keep the start-up profile short; a ``profile`` request can ask for more points and
    repeats (``ProfileRequest`` overrides a bounded subset of these fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_lengths: list[int] | None = Field(
        default=None, description="prompt lengths to measure, tokens (default: spread by points)"
    )
    points: int = Field(
        default=4, ge=2, le=64, description="prompt lengths, spread geometrically up to n_ctx"
    )
    min_prompt_tokens: int = Field(default=16, ge=1, description="shortest prompt, tokens")
    # Half the context by default: the longest prompt costs most of the profile (attention),
    # and start-up should stay short; the curves extend beyond it, a request can go further.
    max_prompt_fraction: float = Field(
        default=0.5, gt=0, le=1, description="longest prompt as a fraction of n_ctx"
    )
    repeats: int = Field(default=1, ge=1, le=100, description="measurements per prompt length")
    decode_tokens: int = Field(default=8, ge=1, le=4096, description="tokens generated per run")
    warmup: bool = Field(default=True, description="one unmeasured run first (caches, kernels)")
    idle_seconds: float = Field(
        default=0.5, ge=0, le=60, description="seconds of idle power measured first (0: skip)"
    )
    max_runs_per_window: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="prompt evaluations that may share one meter window when one is too short",
    )

    @field_validator("prompt_lengths")
    @classmethod
    def _two_lengths(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(set(v)) < 2 or min(v) < 1):
            raise ValueError("prompt_lengths needs at least two distinct lengths >= 1 token")
        return v

    def lengths_for(self, n_ctx: int) -> list[int]:
        """Prompt lengths to measure, leaving room for ``decode_tokens`` in the context."""
        fits = n_ctx - self.decode_tokens - 1  # longest prompt that leaves room to decode
        top = min(int(self.max_prompt_fraction * n_ctx), fits)
        if self.prompt_lengths is not None:
            too_long = [n for n in self.prompt_lengths if n > fits]
            if too_long:
                raise ConfigError(
                    f"prompt lengths {too_long} leave no room for {self.decode_tokens} decoded "
                    f"tokens in a context of {n_ctx}; expected at most {fits}"
                )
            return sorted(set(self.prompt_lengths))
        low = min(self.min_prompt_tokens, top)
        if top <= low:
            raise ConfigError(
                f"a context of {n_ctx} tokens leaves no prompt lengths to profile between "
                f"{low} and {top}; lower decode_tokens or min_prompt_tokens"
            )
        # Geometric spread: short prompts are common, long ones show the growth with history.
        return sorted({round(float(x)) for x in np.geomspace(low, top, self.points)})


class ProfileConfig(ProfilerSettings):
    """Self-profiling of the agent, published retained on ``agents/<id>/profile``
    (``[profile]`` in the file, ``--profile-*`` flags): how to measure, plus when and with
    which meter."""

    on_start: bool = Field(
        default=True, description="profile once at start (requests wait until it is done)"
    )
    meter: MeterName | None = Field(
        default=None,
        description="use this energy meter (default: the first of the device class's list "
        "that works here)",
    )
    power_mode: str | None = Field(
        default=None,
        description="power mode of the device class the box runs in (default: detected; "
        "nvpmodel on a Jetson, the NVML power limit on a GPU)",
    )


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        default_factory=_default_id,
        pattern=NAME_PATTERN,
        description="agent id, unique in the fleet (default: host name)",
    )
    model: Path = Field(description="GGUF model file to serve")
    lora: Path | None = Field(
        default=None,
        description="LoRA adapter GGUF applied on top of the model (a domain expert of it)",
    )
    lora_scale: float = Field(
        default=1.0, gt=0, le=16, description="scale of the adapter (on top of alpha / rank)"
    )
    lora_name: str | None = Field(
        default=None,
        max_length=128,
        description="expert label announced for the adapter (default: its general.name)",
    )
    lora_cluster: str | None = Field(
        default=None,
        max_length=128,
        description="prompt cluster the adapter was trained on (default: from its metadata)",
    )
    device_class: str = Field(
        default="cpu-generic",
        description="device class from firmware-configs/ (cost model figures), "
        "or 'auto' to detect it",
    )
    n_ctx: int = Field(default=2048, ge=64, le=1 << 20, description="context size in tokens")
    n_threads: int = Field(
        default=0, ge=0, le=1024, description="CPU threads for llama.cpp (0: all cores)"
    )
    n_gpu_layers: int | None = Field(
        default=None,
        ge=-1,
        description="layers to offload to the GPU (-1: all; default: all when the device "
        "class has a GPU, 0 otherwise)",
    )
    require_gpu_offload: bool = Field(
        default=True,
        description="refuse to start when layers asked on the GPU are not there (a CPU-only "
        "llama-cpp-python build, no GPU visible); false: warn and run on the CPU",
    )
    flash_attn: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="llama.cpp flash attention; auto: on on the CPU with batching (its "
        "attention is computed per query row, so a token's logits are bit-identical whether "
        "it is evaluated alone, in a batch or next to other sessions; without it llama.cpp's "
        "batched attention differs from a single step by up to 0.1 in probability on SmolLM2, "
        "which breaks exact speculative fusion; measured cost: a step at 1,000 tokens of "
        "history 1.6x one at 10, against 1.2x without), off on the CPU without batching, "
        "llama.cpp's choice when layers are offloaded to a GPU",
    )
    max_sessions: int = Field(
        default=16,
        ge=1,
        le=256,
        description="concurrent sessions (each holds a KV cache); beyond this, opening one "
        "is refused with 'busy' (announced, so gateways never ask for more); sized with the "
        "gateway's max_concurrent so one gateway can use an expert for every prompt it runs",
    )
    session_idle_s: float = Field(
        default=30.0,
        gt=0,
        le=86_400,
        description="a session unused this long is reclaimed (its gateway failed or died "
        "before closing it); a live generation steps every few seconds at most",
    )
    drain_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="on SIGTERM: seconds to let work in flight finish (the gateway's prompts, "
        "then the sessions other gateways hold here) before disconnecting",
    )
    batching: bool = Field(
        default=True,
        description="one llama context holds every session (one unified KV cache) and "
        "concurrent sessions' steps share one llama_decode per tick; off: a context per "
        "session, requests one at a time",
    )
    batch_wait_ms: float = Field(
        default=2.0,
        ge=0,
        le=100,
        description="when several sessions shared the last tick and only some of their next "
        "requests are in, wait up to this long (and at most a quarter of that tick) for the "
        "others, so they share the next tick too instead of alternating; 0: never wait",
    )
    default_top_k: int = Field(
        default=40, ge=1, le=4096, description="top-k sent when a request does not say"
    )
    queue_size: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="requests waiting for the model before 'busy' replies",
    )
    max_payload_bytes: int = Field(
        default=4 << 20, ge=1024, le=256 << 20, description="largest request accepted, in bytes"
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="serve Prometheus metrics on this port at /metrics (0: any free port; "
        "default: off)",
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="address the metrics endpoint listens on"
    )
    hash_model_file: bool = Field(default=True, description="announce the sha256 of the GGUF file")
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)

    def gpu_layers(self) -> int:
        """Layers to offload: the setting, else all when the device class has a GPU."""
        if self.n_gpu_layers is not None:
            return self.n_gpu_layers
        device, _how = resolve_device_class(self.device_class)
        return -1 if device.kind in ("jetson", "nvidia-dgpu") else 0

    @field_validator("id")
    @classmethod
    def _id_is_topic_safe(cls, v: str) -> str:
        return check_name("agent id", v)

    @field_validator("model")
    @classmethod
    def _model_exists(cls, v: Path) -> Path:
        if not v.is_file():
            raise ValueError(f"model file {v} does not exist")
        return v

    @field_validator("lora")
    @classmethod
    def _lora_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"LoRA adapter file {v} does not exist")
        return v
