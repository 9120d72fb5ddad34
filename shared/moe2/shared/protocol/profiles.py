"""The retained cost profile of an agent: measured points, fitted curves, and where each
figure came from.

Retained on ``agents/<id>/profile``. The energy figures carry the meter that produced them;
``energy_measured`` is false exactly when that meter is ``modelled``, and the schema refuses
any other combination, so a modelled figure can never travel as a measured one.
"""

from __future__ import annotations

import statistics
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moe2.shared.costmodel import CostCurves
from moe2.shared.protocol.base import NAME_PATTERN, Message

# Every source an energy figure can have (one per meter and mode of a meter).
MeterSource = Literal[
    "nvml-energy-counter",  # NVML total-energy counter (Volta and later)
    "nvml-power-sampled",  # NVML instantaneous power, sampled and integrated
    "jtop",  # jetson-stats total power, sampled and integrated
    "tegrastats",  # tegrastats rail power, sampled and integrated
    "rapl",  # Linux powercap RAPL energy counters
    "modelled",  # no measurement: device figures times measured or modelled time
]
METER_SOURCES: tuple[str, ...] = get_args(MeterSource)


class ProfilePoint(BaseModel):
    """One prompt length, measured ``repeats`` times; lists hold one value per repeat."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_tokens: int = Field(ge=1)
    decode_tokens: int = Field(ge=1)  # tokens generated after the prompt in each repeat
    prompt_seconds: list[float] = Field(min_length=1)  # whole prompt
    token_seconds: list[float] = Field(min_length=1)  # per generated token
    prompt_joules: list[float] = Field(min_length=1)  # whole prompt
    token_joules: list[float] = Field(min_length=1)  # per generated token
    # The prompt's tokens scored (a distribution after each); absent from older agents.
    score_seconds: list[float] | None = Field(default=None, min_length=1)
    score_joules: list[float] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_value_per_repeat(self) -> ProfilePoint:
        n = {
            len(self.prompt_seconds),
            len(self.token_seconds),
            len(self.prompt_joules),
            len(self.token_joules),
            *(len(x) for x in (self.score_seconds, self.score_joules) if x is not None),
        }
        if (self.score_seconds is None) != (self.score_joules is None):
            raise ValueError("score_seconds and score_joules come together")
        if len(n) != 1:
            raise ValueError("every list of a point needs one value per repeat")
        return self

    @property
    def repeats(self) -> int:
        return len(self.prompt_seconds)

    @staticmethod
    def spread(values: list[float]) -> float:
        """(max - min) / mean of one list: 0 when the repeats agree."""
        mean = statistics.fmean(values)
        return (max(values) - min(values)) / mean if mean > 0 else 0.0


class AgentProfile(Message):
    """Retained on ``agents/<id>/profile``: what a request costs on this agent."""

    agent_id: str = Field(pattern=NAME_PATTERN)
    model: str  # model name, as in AgentInfo
    device_class: str  # firmware-configs class
    power_mode: str | None = None  # mode key of the class (e.g. "MAXN", "450W"), None if unknown
    meter_source: MeterSource  # what produced the energy figures
    energy_measured: bool  # false exactly when meter_source is "modelled"
    delay_measured: bool  # false when delays come from the eq. 4 estimate, not a run
    energy_scope: str  # what a measured joule covers: "module", "gpu-board", "cpu-package"...
    idle_watts: float | None = Field(default=None, ge=0)  # baseline the meter saw at rest
    n_ctx: int = Field(ge=1)
    points: list[ProfilePoint]  # empty for a fully modelled profile
    curves: CostCurves
    profiled_at: float  # unix seconds when profiling finished
    duration_s: float = Field(ge=0)  # wall-clock seconds profiling took

    @model_validator(mode="after")
    def _never_claim_a_measurement(self) -> AgentProfile:
        if self.energy_measured != (self.meter_source != "modelled"):
            raise ValueError(
                f"energy_measured={self.energy_measured} contradicts meter_source="
                f"{self.meter_source!r}: only a real meter's figures are measured"
            )
        if self.delay_measured and not self.points:
            raise ValueError("delay_measured needs measured points")
        return self

    def spread(self, unit: Literal["s", "J"]) -> float:
        """The stated spread of the delay ("s") or energy ("J") figures, relative: the largest
        disagreement between the repeats of one measurement ((max - min) / mean) or the curves'
        relative residual around their points, whichever is larger. 0 for a profile with no
        points (nothing measured, nothing to spread)."""
        if not self.points:
            return 0.0
        c = self.curves
        if unit == "s":
            lists = [
                x
                for pt in self.points
                for x in (pt.prompt_seconds, pt.token_seconds, pt.score_seconds)
                if x is not None
            ]
            curves = (c.prompt_seconds, c.token_seconds, c.score_seconds)
        else:
            lists = [
                x
                for pt in self.points
                for x in (pt.prompt_joules, pt.token_joules, pt.score_joules)
                if x is not None
            ]
            curves = (c.prompt_joules, c.token_joules, c.score_joules)
        repeats = max(ProfilePoint.spread(v) for v in lists)
        return max(repeats, *(cv.rel_residual_std for cv in curves if cv is not None))


class LinkFigures(BaseModel):
    """Transmission between a gateway and one expert (paper eqs. 5-6)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rtt_s: float = Field(ge=0)  # round trip of an empty request, seconds
    bytes_per_s: float = Field(gt=0)  # payload rate (request + reply bytes), inf when unseen
    measured_at: float  # unix seconds


class LinkReport(Message):
    """Retained on ``agents/<gateway>/links``: the links a gateway measured to its experts;
    the controller adds rtt + bytes / rate to each expert's per-token delay."""

    gateway: str = Field(pattern=NAME_PATTERN)
    links: dict[str, LinkFigures]
