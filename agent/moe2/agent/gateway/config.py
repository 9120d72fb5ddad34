"""Gateway settings (the ``[gateway]`` section of the agent's configuration)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moe2.shared.protocol import NAME_PATTERN

AgentId = Annotated[str, Field(pattern=NAME_PATTERN)]


class AppConfig(BaseModel):
    """A locally configured application: used until the controller pushes an assignment."""

    model_config = ConfigDict(extra="forbid")

    subset: list[AgentId] = Field(min_length=1, description="experts that may serve the app")
    k: int = Field(default=2, ge=1, description="experts per prompt (top-k of the subset)")


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="answer prompts from mobile clients")
    group: str = Field(
        default="moe2-gateways",
        pattern=NAME_PATTERN,
        description="shared-subscription group: gateways of a group split prompts",
    )
    apps: dict[Annotated[str, Field(pattern=NAME_PATTERN)], AppConfig] = Field(
        default_factory=dict, description="applications served before any assignment is pushed"
    )
    max_tokens_limit: int = Field(
        default=512, ge=1, le=32768, description="largest max_tokens a prompt may ask for"
    )
    default_max_tokens: int = Field(default=64, ge=1, description="when a prompt does not say")
    step_timeout_s: float = Field(
        default=5.0, gt=0, description="an expert silent this long in a step is dropped"
    )
    open_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="the first step (prompt processing) may take "
        "this long before an expert is dropped",
    )
    deadline_s: float = Field(
        default=120.0, gt=0, description="a prompt not answered by then gets an error"
    )
    max_concurrent: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="prompts generated at once by this gateway (the agents' default "
        "max_sessions is the same, so one gateway alone never waits for an expert's sessions)",
    )
    max_pending: int = Field(
        default=256, ge=0, description="prompts waiting beyond those before 'busy' errors"
    )
    queue_s: float = Field(
        default=30.0,
        gt=0,
        description="longest a prompt waits (from its arrival) for a session on each chosen "
        "expert (each holds the max_sessions it announces) before a 'busy' error",
    )
    session_expiry_s: int = Field(
        default=60,
        ge=0,
        le=86_400,
        description="the broker keeps this gateway's MQTT session this long after a crash: "
        "prompts it held unanswered, and those routed to it meanwhile, are delivered when it "
        "is back within this (0: a clean session, such prompts are lost)",
    )
    adopt_after_s: float | None = Field(
        default=3.0,
        ge=0,
        le=3600,
        description="when a gateway of our group vanished (its last will) and is not back "
        "after this, one live gateway takes over its kept session and publishes the prompts "
        "waiting there again for live gateways (null: never; nothing to adopt when "
        "session_expiry_s is 0)",
    )
    top_k: int = Field(
        default=64, ge=1, le=4096, description="candidates per expert and step (top-k fusion)"
    )
    full_vocab_limit: int = Field(
        default=8192,
        ge=0,
        description="ask for full distributions (exact fusion) when "
        "the vocabulary is at most this large",
    )
    link_probe_interval_s: float = Field(
        default=600.0,
        ge=0,
        description="seconds between measurements of round trip and rate to each expert "
        "(published retained on agents/<id>/links; 0: never)",
    )
    link_probe_first_s: float = Field(
        default=30.0, ge=0, description="seconds after start of the first measurement"
    )
    decoding: Literal["auto", "per-token", "speculative", "tree"] = Field(
        default="auto",
        description="how the fused answer is decoded (every way gives the same tokens): auto "
        "chooses per round the fastest of a per-token step, a speculative round with one "
        "drafter and a tree round (every chosen expert drafts, all verify), from the "
        "acceptance, round trip and drafting cost measured for the set of experts; "
        "per-token: one round trip to every expert per token; speculative: always one "
        "drafter; tree: always every expert drafting",
    )
    speculative_gamma: int = Field(
        default=4, ge=1, le=256, description="tokens drafted in the first speculative round"
    )
    speculative_max_gamma: int = Field(
        default=32,
        ge=1,
        le=256,
        description="most tokens drafted per round (the draft length adapts to the measured "
        "acceptance rate and round trip)",
    )
    speculative_pipeline: bool = Field(
        default=True,
        description="while the others verify a draft, the drafter already drafts on from its "
        "last token (used when the whole draft is accepted; wasted drafting otherwise)",
    )
    rpc_codec: Literal["bin1", "json"] = Field(
        default="bin1",
        description="payload codec of requests to experts that announce they read it "
        "(distributions travel as raw float32); JSON otherwise",
    )
    rpc_qos: int = Field(
        default=0,
        ge=0,
        le=1,
        description="MQTT QoS of the gateway's requests to experts (replies match it); 0 saves "
        "a broker acknowledgement per step, and a lost step is caught by the step timeout",
    )
    max_prompt_bytes: int = Field(default=1 << 20, ge=256, description="largest prompt message")
    stats_window_s: float = Field(
        default=60.0,
        gt=0,
        description="window over which each application's measured delay and energy are "
        "published (retained on agents/<id>/stats)",
    )
    stats_interval_s: float = Field(
        default=5.0, gt=0, description="seconds between publications of those figures"
    )
    trusted_keys: list[Path] = Field(
        default_factory=list,
        description="PEM Ed25519 public keys of the fleet (moe2ctl keys generate): when set, "
        "only assignments and gates one of them signed are applied",
    )
    gate_providers: Literal["auto", "tensorrt", "cuda", "cpu"] = Field(
        default="auto",
        description="ONNX Runtime providers for a trained gate; auto: TensorRT, then CUDA, "
        "then the CPU, as this onnxruntime build has them",
    )
    gate_engine_cache: Path | None = Field(
        default=None,
        description="folder of TensorRT engines built for the gate (default: "
        "~/.cache/moe2/tensorrt)",
    )

    @model_validator(mode="after")
    def _default_within_limit(self) -> GatewayConfig:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens exceeds max_tokens_limit")
        if self.speculative_gamma > self.speculative_max_gamma:
            raise ValueError("speculative_gamma exceeds speculative_max_gamma")
        return self
