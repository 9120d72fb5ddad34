"""The cost model: what one expert's step costs in seconds and joules (paper eqs. 4-6, 10).

Two ways to know a cost:

- **Modelled** (eq. 4) from a device's datasheet figures, when nothing was measured::

      t = FLOPs / compute rate + bytes moved / memory bandwidth + overhead    # seconds
      E = t * busy power                                                     # joules

  The paper's form adds the compute and memory terms (no overlap), so it is a pessimistic
  roofline on the delay side, while datasheet peak rates make it optimistic: treat it as a
  first guess that a profile replaces.
- **Measured**: a profile's points fitted to curves in the prompt length L (the paper observes
  that delay and energy depend mainly on it)::

      prompt seconds    = a + b L (+ e L^2)    per-token seconds = c + d L    (joules likewise)
      scored seconds    = L tokens with a distribution read after each (teacher-forced scoring)

  fitted to relative errors; the prompt curves bend (L^2, attention over the whole prompt)
  only where the measurements show it (``moe2.agent.profiler.fit_points``).

Transmission (eqs. 5-6) is ``rtt + payload bytes / rate``; the gateway measures both per expert.

    figures = DeviceFigures(compute_flops_per_s=42.5e12, memory_bytes_per_s=204.8e9,
                            idle_power_w=9, peak_power_w=60, overhead_s=0.002)
    model = ModelFigures(n_params=135e6, weight_bytes=98e6, n_layers=30, n_embd=576, kv_dim=192)
    estimate_decode_token(model, figures, context=512)   # Cost(seconds=..., joules=...)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class DeviceFigures(BaseModel):
    """Hardware figures of one device class in one power mode (paper eq. 4's C_cap, b, C_ovh)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    compute_flops_per_s: float = Field(gt=0, description="compute rate, FLOP/s (C_cap)")
    memory_bytes_per_s: float = Field(gt=0, description="memory bandwidth, bytes/s (b)")
    idle_power_w: float = Field(ge=0, description="power drawn while idle, watts")
    peak_power_w: float = Field(gt=0, description="power drawn while busy, watts")
    overhead_s: float = Field(default=0.0, ge=0, description="fixed cost per step, seconds (C_ovh)")

    @model_validator(mode="after")
    def _peak_above_idle(self) -> DeviceFigures:
        if self.peak_power_w < self.idle_power_w:
            raise ValueError(
                f"peak_power_w ({self.peak_power_w}) must not be below idle_power_w "
                f"({self.idle_power_w})"
            )
        return self


@dataclass(frozen=True)
class ModelFigures:
    """What a model costs per token: its size and, for attention, its shape.

    With ``n_layers = 0`` the attention terms vanish and the cost no longer grows with history.
    """

    n_params: float  # parameters (2 FLOPs each per token: one multiply, one add)
    weight_bytes: float  # bytes of weights streamed from memory per forward pass
    n_layers: int = 0
    n_embd: int = 0  # attention width (heads x head dim), for the QK^T and AV FLOPs
    kv_dim: int = 0  # key/value width per layer (kv heads x head dim); GQA makes it < n_embd
    kv_bytes_per_value: float = 2.0  # f16 KV cache
    n_ubatch: int = 512  # prompt tokens per forward pass (llama.cpp's micro-batch)


@dataclass(frozen=True)
class Cost:
    seconds: float
    joules: float


def _seconds(flops: float, bytes_moved: float, device: DeviceFigures) -> float:
    # Paper eq. 4: compute + memory + overhead, not overlapped.
    return (
        flops / device.compute_flops_per_s
        + bytes_moved / device.memory_bytes_per_s
        + device.overhead_s
    )


def estimate_decode_token(model: ModelFigures, device: DeviceFigures, context: int) -> Cost:
    """One generated token that attends to ``context`` tokens (history plus itself)."""
    if context < 1:
        raise ValueError(f"context must be at least 1 token, got {context}")
    attn_flops = 4.0 * model.n_layers * model.n_embd * context  # QK^T and AV, 2 FLOPs per MAC
    flops = 2.0 * model.n_params + attn_flops
    kv_read = 2.0 * model.n_layers * model.kv_dim * model.kv_bytes_per_value * context  # K and V
    seconds = _seconds(flops, model.weight_bytes + kv_read, device)
    return Cost(seconds=seconds, joules=seconds * device.peak_power_w)


def estimate_prompt(model: ModelFigures, device: DeviceFigures, prompt_tokens: int) -> Cost:
    """Processing a prompt of ``prompt_tokens`` tokens (which yields the first distribution)."""
    n = prompt_tokens
    if n < 1:
        raise ValueError(f"prompt_tokens must be at least 1, got {n}")
    # Token i attends to i tokens: sum_{i=1..n} 4 * layers * embd * i = 2 * layers * embd * n(n+1)
    attn_flops = 2.0 * model.n_layers * model.n_embd * n * (n + 1)
    flops = 2.0 * model.n_params * n + attn_flops
    passes = math.ceil(n / model.n_ubatch)  # weights are streamed once per micro-batch
    kv_write = 2.0 * model.n_layers * model.kv_dim * model.kv_bytes_per_value * n
    seconds = _seconds(flops, model.weight_bytes * passes + kv_write, device)
    return Cost(seconds=seconds, joules=seconds * device.peak_power_w)


# --------------------------------------------------------------------------- fitted curves


class CostCurve(BaseModel):
    """A cost (seconds or joules) as a polynomial in the prompt length L, fitted to points.

    ``coef[i]`` multiplies L**i. ``residual_std`` is the spread of the points around the curve
    in the curve's unit; ``rel_residual_std`` the same relative to the measured values.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: str  # "s" or "J"
    coef: list[float] = Field(min_length=1)
    residual_std: float = Field(ge=0)
    rel_residual_std: float = Field(ge=0)
    n_points: int = Field(ge=1)
    min_tokens: int = Field(ge=0)  # range of L the curve was fitted on
    max_tokens: int = Field(ge=0)

    def at(self, prompt_tokens: float) -> float:
        """The cost at L tokens, never below zero. Below the fitted range a line whose
        intercept is negative (noise on a loaded box) would reach zero at a few tokens, and
        a short prompt of an expert 10,000 times slower would look free: there the cost is
        taken proportional to L through the curve's value at its shortest measured prompt."""
        value = self._poly(prompt_tokens)
        low = self.min_tokens
        if 0 < prompt_tokens < low:
            value = max(value, self._poly(low) * prompt_tokens / low)
        return max(0.0, value)

    def _poly(self, prompt_tokens: float) -> float:
        value = 0.0
        for c in reversed(self.coef):
            value = value * prompt_tokens + c
        return value


def fit_curve(
    prompt_tokens: Sequence[float],
    values: Sequence[float],
    *,
    unit: str,
    degree: int = 1,
    relative: bool = False,
) -> CostCurve:
    """Least-squares polynomial of ``degree`` in L through (L_i, value_i), repeats included.

    ``relative`` minimises relative errors instead (weights 1 / |value_i|), so that points
    spanning orders of magnitude all count: a 16-token prompt's 0.1 s as much as a
    2,000-token prompt's 30 s, whose absolute error would otherwise decide the whole line.
    """
    x = np.asarray(prompt_tokens, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two equal 1-D sequences, got shapes {x.shape} and {y.shape}")
    if len(np.unique(x)) < degree + 1:
        raise ValueError(
            f"a degree-{degree} curve needs at least {degree + 1} distinct prompt lengths, "
            f"got {len(np.unique(x))}"
        )
    if not np.all(np.isfinite(y)):
        raise ValueError("values must be finite")
    # Scale L to ~1 before solving so the Vandermonde matrix stays well conditioned.
    scale = float(np.max(np.abs(x))) or 1.0
    vander = np.vander(x / scale, degree + 1, increasing=True)  # (points, degree + 1)
    weight = 1.0 / np.where(np.abs(y) > 0, np.abs(y), 1.0) if relative else np.ones_like(y)
    sol, *_ = np.linalg.lstsq(vander * weight[:, None], y * weight, rcond=None)
    coef = [float(c) / scale**i for i, c in enumerate(sol)]
    fitted = vander @ sol
    resid = y - fitted
    dof = max(1, len(x) - (degree + 1))
    residual_std = float(np.sqrt(np.sum(resid**2) / dof)) if len(x) > degree + 1 else 0.0
    # Relative to the measured values (always > 0 for costs; a fitted value may be ~0).
    denom = np.where(np.abs(y) > 0, np.abs(y), 1.0)
    rel = resid / denom
    rel_std = float(np.sqrt(np.sum(rel**2) / dof)) if len(x) > degree + 1 else 0.0
    return CostCurve(
        unit=unit,
        coef=coef,
        residual_std=residual_std,
        rel_residual_std=rel_std,
        n_points=len(x),
        min_tokens=int(x.min()),
        max_tokens=int(x.max()),
    )


class RequestOverhead(BaseModel):
    """Seconds a request spends in an agent beyond its model's work, per operation (``open``,
    ``step``, ``score_choices``): decoding it, scheduling, encoding the distributions of the
    reply, publishing it. What a ``ping`` spends there is left out: a link's round trip (eqs.
    5-6) already holds it, so a request costs ``link + overhead + model`` with nothing
    counted twice. Measured by the agent on the requests it serves (seeded by a probe of its
    own request path when it profiles), re-announced as it moves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seconds: dict[str, float]  # op -> mean seconds per request beyond the model and a ping
    requests: int = Field(ge=0)  # requests the means are of

    def of(self, op: str) -> float:
        return max(0.0, self.seconds.get(op, 0.0))


class CostCurves(BaseModel):
    """The curves a profile publishes, all in a token count L.

    ``score_*`` price L tokens evaluated with a distribution read after every one (teacher-
    forced scoring: a multiple-choice answer's options after its prompt); the distributions
    cost on top of a prompt pass (the output layer and its softmax per row). Profiles from
    agents that predate them leave them out.

    ``model_watts`` is set where energy is modelled (no power reading): the joules are that
    busy power times the *model time* (on a CPU, the CPU time of the thread running the model,
    so experts sharing cores do not charge each other's waiting); a request's reported model
    time (``compute_ms``) times it is the request's energy, as the curves count it. With a
    real meter it is None and the curves' joules over their seconds give the power."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_seconds: CostCurve  # processing the whole prompt, seconds
    token_seconds: CostCurve  # one generated token after a prompt of L, seconds per token
    prompt_joules: CostCurve  # joules for the whole prompt
    token_joules: CostCurve  # joules per generated token
    score_seconds: CostCurve | None = None  # L tokens scored in one pass, seconds
    score_joules: CostCurve | None = None  # L tokens scored in one pass, joules
    model_watts: float | None = Field(default=None, ge=0)  # joules per second of model time
    overhead: RequestOverhead | None = None  # the agent's own seconds per request


def step_costs(
    curves: CostCurves, prompt_tokens: int, answer_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Compute delay and energy of each step t = 1..T of one expert (eqs. 6 and 10, no link).

    Step 1 processes the prompt (that yields the first distribution); step t > 1 evaluates one
    token after a history of L + t - 1. Returns ((T,) seconds, (T,) joules).
    """
    if answer_tokens < 1:
        raise ValueError(f"answer_tokens must be at least 1, got {answer_tokens}")
    history = prompt_tokens + np.arange(answer_tokens, dtype=np.float64)  # (T,)
    seconds = np.array([curves.token_seconds.at(h) for h in history])
    joules = np.array([curves.token_joules.at(h) for h in history])
    seconds[0] = curves.prompt_seconds.at(prompt_tokens)
    joules[0] = curves.prompt_joules.at(prompt_tokens)
    return seconds, joules


# --------------------------------------------------------------------------- transmission


@dataclass(frozen=True)
class Link:
    """A measured path between the gateway and one expert."""

    rtt_s: float  # round trip of an empty request, seconds
    bytes_per_s: float  # payload rate R_n, bytes/s


def transmission_delay(payload_bytes: float, link: Link) -> float:
    """Paper eq. 5 plus the round trip: seconds to send ``payload_bytes`` and hear back."""
    if payload_bytes < 0:
        raise ValueError(f"payload_bytes must be >= 0, got {payload_bytes}")
    return link.rtt_s + payload_bytes / link.bytes_per_s


def fit_link(payload_bytes: Sequence[float], seconds: Sequence[float]) -> Link:
    """The link that explains measured round trips: seconds = rtt + bytes / rate.

    Needs at least two distinct payload sizes; a non-positive slope (rate too fast to see at
    these sizes) gives an infinite rate.
    """
    curve = fit_curve(payload_bytes, seconds, unit="s", degree=1)
    intercept, slope = curve.coef
    rate = 1.0 / slope if slope > 0 else math.inf
    return Link(rtt_s=max(0.0, intercept), bytes_per_s=rate)
