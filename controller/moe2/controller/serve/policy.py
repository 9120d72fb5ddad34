"""What ``moe2ctl serve`` keeps true, and how eagerly it reacts: one settings model.

    policy = ServePolicy(dataset="qa", apps={"qa": 0.05}, energy=2.0, k=2)

Each application is optimised on its own candidates (the experts scored on its samples), with
a subset of its own; only the energy budget is shared (``optimize.decompose``).

From a TOML file (``moe2ctl serve --policy FILE``), flags overriding it::

    dataset = "qa"
    energy = 2.0
    k = 2
    [apps]
    qa = 0.05       # seconds per answer step, as `optimize --app qa=0.05`
    [scoring]       # how agents that join are scored: as `moe2ctl collect`'s flags
    request_s = 10.0
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moe2.controller.collect import CollectSettings
from moe2.shared.protocol import NAME_PATTERN

AppName = Annotated[str, Field(pattern=NAME_PATTERN)]


class ServePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(min_length=1, description="registry dataset that scores the experts")
    apps: dict[AppName, Annotated[float, Field(gt=0)]] = Field(
        min_length=1, description="delay limit of each application, seconds per answer step"
    )
    energy: float | None = Field(
        default=None, gt=0, description="fleet energy limit, J per step (or per prompt)"
    )
    energy_per: Literal["step", "prompt"] = Field(
        default="step", description="the unit of the energy limit: per step (eq. 11) or prompt"
    )
    k: int = Field(default=2, ge=1, description="experts fused per prompt")
    gate: str | None = Field(
        default=None,
        description="gate version [default: the newest]; 'uniform' weighs experts equally "
        "(experts the gate does not know are left out, with the reason recorded)",
    )
    solver: str = Field(default="smo", description="subset optimiser")
    time_limit_s: float | None = Field(
        default=60.0,
        gt=0,
        description="seconds one optimisation may take (every application it re-optimises "
        "shares them); the best subsets found by then come with their proven gap",
    )
    max_gap: float = Field(
        default=0.0,
        ge=0,
        description="push a subset only when proven within this of the optimum (nats per "
        "sample; 0: only proven optimal; inf: also a heuristic's, which proves nothing); "
        "anything else is recorded as refused, with its gap",
    )
    gate_delay: float | None = Field(
        default=None,
        ge=0,
        description="seconds the gate adds per prompt [default: what the gateways measured]",
    )
    # How eagerly to react.
    tick_s: float = Field(default=0.5, gt=0, le=60, description="seconds between looks")
    debounce_s: float = Field(
        default=2.0, ge=0, description="a change must settle this long before acting"
    )
    min_interval_s: float = Field(
        default=10.0, ge=0, description="least seconds between two optimisations"
    )
    profile_threshold: float = Field(
        default=0.25,
        gt=0,
        description="relative change of an expert's per-token delay or energy that matters",
    )
    link_threshold_s: float = Field(
        default=0.005, gt=0, description="change of an expert's measured round trip that matters"
    )
    delay_tolerance: float = Field(
        default=0.1,
        ge=0,
        description="measured delay may exceed an app's limit by this fraction before acting",
    )
    min_answers: int = Field(
        default=5, ge=1, description="answers a gateway's figures need before they count"
    )
    score_new_agents: bool = Field(
        default=True, description="score agents that join on the dataset, then consider them"
    )
    # How new agents are scored: the flags of `moe2ctl collect` (``[scoring]`` in the file).
    scoring: CollectSettings = Field(default_factory=CollectSettings)
    settle_s: float = Field(
        default=6.0,
        ge=0,
        description="after (re)connecting to the broker, wait this long for the fleet to "
        "announce itself again before acting (agents reconnect within 1-5 s)",
    )
    lease_ttl_s: float = Field(
        default=10.0, gt=0, description="another serve takes over this long after we stop"
    )
    push_wait_s: float = Field(default=5.0, ge=0, description="wait for gateways' acks")

    @model_validator(mode="after")
    def _lease_outlives_ticks(self) -> ServePolicy:
        if self.lease_ttl_s < 3 * self.tick_s:
            raise ValueError("lease_ttl_s must be at least 3 ticks: the lease is renewed each tick")
        return self
