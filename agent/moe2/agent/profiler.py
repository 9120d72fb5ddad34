"""Self-profiling: what a prompt and a generated token cost on this box, in seconds and joules.

For prompt lengths spread up to the context size, each point is measured ``repeats`` times:
the prompt is evaluated (the time to the first distribution), then ``decode_tokens`` tokens
are generated greedily; an energy meter brackets each phase. The points are fitted to cost
curves in the prompt length (``moe2.shared.costmodel``) and returned as the retained
``AgentProfile``.

    meter = choose_meter(load_device_class("cpu-generic"))
    profile = profile_backend(backend, meter, ProfilerSettings(repeats=3),
                              agent_id="cpu-1", device_class="cpu-generic", power_mode="default")
    profile.curves.token_seconds.at(512)     # seconds per token after a 512-token prompt

Run it while the backend serves nothing else: requests running beside it would be measured
as its cost. The agent does so through ``SelfProfiler`` on its model thread, at start and on a
``profile`` request, and serves the requests that arrived meanwhile between two measurements
(``between``): a profile never holds the model for longer than one measurement, so it delays
serving by that at most instead of blocking it for the whole profile.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from moe2.agent.backend import ModelBackend, ModelInfo
from moe2.agent.config import ProfilerSettings
from moe2.agent.meters import ModelledMeter, choose_meter, thread_cpu_seconds
from moe2.agent.meters.base import Meter, MeterError
from moe2.agent.meters.nvml import nvml_power_limit_w
from moe2.shared.costmodel import (
    CostCurve,
    CostCurves,
    DeviceFigures,
    ModelFigures,
    estimate_decode_token,
    estimate_prompt,
    fit_curve,
)
from moe2.shared.devices import DeviceClass, jetson_power_mode
from moe2.shared.errors import Cancelled, ConfigError, ModelError
from moe2.shared.protocol.base import describe_error
from moe2.shared.protocol.profiles import AgentProfile, MeterSource, ProfilePoint

# Plain prose: tokenizes to ordinary tokens in every vocabulary (no special or byte tokens).
FILLER_TEXT = (
    "The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the "
    "morning light, and the river runs quietly past the old mill towards the sea. "
)


class ProfileCancelled(Cancelled):
    """The agent is stopping: the profile was abandoned between two measurements."""


@dataclass(frozen=True)
class _Run:
    prompt_s: float  # whole prompt, seconds
    token_s: float  # per generated token, seconds
    score_s: float  # the prompt's tokens scored (a distribution after each), seconds
    prompt_j: float  # whole prompt, joules
    token_j: float  # per generated token, joules
    score_j: float  # the prompt's tokens scored, joules
    tokens: int  # tokens generated
    source: MeterSource  # what the meter's readings said produced the joules
    scope: str
    watts: float  # the readings' joules over their seconds (a modelled meter: its busy power)


def prompt_tokens_for(backend: ModelBackend, length: int) -> list[int]:
    """A prompt of exactly ``length`` tokens of ordinary text (BOS first if the model wants it)."""
    info = backend.info
    prefix = [info.bos_id] if info.add_bos and info.bos_id is not None else []
    filler = backend.tokenize(FILLER_TEXT, add_bos=False)
    if not filler:
        raise ModelError("the tokenizer turned the profiling text into no tokens")
    body_len = max(0, length - len(prefix))
    body = (filler * (body_len // len(filler) + 1))[:body_len]
    return (prefix + body)[:length]


# Distributions one scoring pass may return at once, in floats (as the agent's scoring ticks:
# ``batching.MAX_LOGIT_FLOATS``): a long profile prompt is scored in chunks of that many rows.
SCORE_LOGIT_FLOATS = 16 << 20


def _measure(
    backend: ModelBackend,
    meter: Meter,
    prompt: list[int],
    decode_tokens: int,
    max_runs_per_window: int,
    clock: Callable[[], float],
    between: Callable[[], None] = lambda: None,
) -> _Run:
    """One run at one prompt length: the prompt, the same tokens scored, then decoding, each
    in a meter window of its own; ``between`` runs between two windows (the agent serves
    waiting requests there), so a request waits one window at most."""
    room = backend.info.n_ctx - len(prompt)
    chunk = max(1, SCORE_LOGIT_FLOATS // max(1, backend.info.n_vocab))
    seq = backend.new_sequence()
    try:
        # Prompt: repeat the evaluation inside one meter window until it is long enough to
        # resolve; the delay is the mean of the individual evaluations.
        times: list[float] = []
        meter.start()
        window_start = clock()
        while True:
            if times:
                seq.truncate(0)
            t0 = clock()
            logprobs = seq.extend(prompt)
            times.append(clock() - t0)
            if clock() - window_start >= meter.min_window_s or len(times) >= max_runs_per_window:
                break
        prompt_reading = meter.stop()
        between()

        # Scoring: the same tokens with a distribution after every one (teacher-forced
        # scores, a multiple-choice answer's options), in chunks that bound the rows held at
        # once, as the agent scores; in a window of its own likewise.
        score_times: list[float] = []
        meter.start()
        window_start = clock()
        while True:
            seq.truncate(0)
            t0 = clock()
            for pos in range(0, len(prompt), chunk):
                part = prompt[pos : pos + chunk]
                seq.evaluate(part, range(len(part)))
            score_times.append(clock() - t0)
            if (
                clock() - window_start >= meter.min_window_s
                or len(score_times) >= max_runs_per_window
            ):
                break
        score_reading = meter.stop()
        between()
        seq.truncate(len(prompt))  # (the prompt's history, as the prompt pass left it)

        # Decode greedily; past decode_tokens only while the window is still too short.
        n = 0
        meter.start()
        t0 = clock()
        while n < room and (n < decode_tokens or clock() - t0 < meter.min_window_s):
            logprobs = seq.extend([int(np.argmax(logprobs))])
            n += 1
        decode_s = clock() - t0
        decode_reading = meter.stop()
    finally:
        seq.close()
    sources = {r.source for r in (prompt_reading, score_reading, decode_reading)}
    if len(sources) != 1:
        raise MeterError(f"the meter changed its source while profiling: {sorted(sources)}")
    return _Run(
        prompt_s=statistics.fmean(times),
        token_s=decode_s / n,
        score_s=statistics.fmean(score_times),
        prompt_j=prompt_reading.joules / len(times),
        token_j=decode_reading.joules / n,
        score_j=score_reading.joules / len(score_times),
        tokens=n,
        source=prompt_reading.source,
        scope=prompt_reading.scope,
        watts=max(r.watts for r in (prompt_reading, score_reading, decode_reading)),
    )


def profile_backend(
    backend: ModelBackend,
    meter: Meter,
    settings: ProfilerSettings,
    *,
    agent_id: str,
    device_class: str,
    power_mode: str | None,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], float] = time.time,
    cancelled: Callable[[], bool] = lambda: False,
    between: Callable[[], None] = lambda: None,
) -> AgentProfile:
    """Measure the backend with the meter and return its profile (meter already chosen).

    ``between`` runs before each measurement and between its meter windows (the agent serves
    waiting requests there: its time is in no measurement); then ``cancelled`` is asked and,
    when it says so, ProfileCancelled: a stopping agent waits one meter window at most."""

    def pause() -> None:
        between()
        if cancelled():
            raise ProfileCancelled("profiling cancelled: the agent is stopping")

    info = backend.info
    lengths = settings.lengths_for(info.n_ctx)
    started = clock()

    if settings.warmup:
        _measure(
            backend,
            meter,
            prompt_tokens_for(backend, lengths[0]),
            min(settings.decode_tokens, 4),
            1,
            clock,
            pause,
        )

    idle_watts = None
    if meter.source != "modelled" and settings.idle_seconds > 0:
        meter.start()
        sleep(settings.idle_seconds)
        idle = meter.stop()
        idle_watts = idle.watts if idle.measured else None  # a modelled "idle" is no baseline

    points: list[ProfilePoint] = []
    all_runs: list[_Run] = []
    for length in lengths:
        prompt = prompt_tokens_for(backend, length)
        runs = []
        for _ in range(settings.repeats):
            pause()
            runs.append(
                _measure(
                    backend,
                    meter,
                    prompt,
                    settings.decode_tokens,
                    settings.max_runs_per_window,
                    clock,
                    pause,
                )
            )
        all_runs += runs
        points.append(
            ProfilePoint(
                prompt_tokens=length,
                decode_tokens=min(r.tokens for r in runs),
                prompt_seconds=[r.prompt_s for r in runs],
                token_seconds=[r.token_s for r in runs],
                prompt_joules=[r.prompt_j for r in runs],
                token_joules=[r.token_j for r in runs],
                score_seconds=[r.score_s for r in runs],
                score_joules=[r.score_j for r in runs],
            )
        )

    # The label comes from the readings themselves, and all of them must agree: a profile
    # never names a meter that did not produce its figures.
    sources = {(r.source, r.scope) for r in all_runs}
    if len(sources) != 1:
        raise MeterError(f"readings came from more than one meter: {sorted(sources)}")
    ((source, scope),) = sources
    curves = fit_points(points)
    if source == "modelled":  # joules = busy power x model time: say which power
        curves = curves.model_copy(update={"model_watts": max(r.watts for r in all_runs)})
    return AgentProfile(
        agent_id=agent_id,
        model=info.name,
        device_class=device_class,
        power_mode=power_mode,
        meter_source=source,
        energy_measured=source != "modelled",
        delay_measured=True,
        energy_scope=scope,
        idle_watts=idle_watts,
        n_ctx=info.n_ctx,
        points=points,
        curves=curves,
        profiled_at=now(),
        duration_s=clock() - started,
    )


# A prompt curve gets a quadratic term only when a line misses the points by more than this
# (relative residual) and the quadratic at least halves the miss.
BEND_ABOVE = 0.03


def fit_points(points: Sequence[ProfilePoint]) -> CostCurves:
    """Curves in the prompt length through every repeat of every point, fitted to relative
    errors (the lengths span orders of magnitude). Per-token costs are lines (attention over
    the history grows linearly); whole-prompt costs are lines unless the measurements bend:
    attention over the prompt grows as L^2, which shows on long prompts."""

    def fit(attr: str, unit: str, may_bend: bool) -> CostCurve:
        # (a point without scores, from an older agent, leaves the score curves out)
        xs = [p.prompt_tokens for p in points for _ in getattr(p, attr)]
        ys = [v for p in points for v in getattr(p, attr)]
        line = fit_curve(xs, ys, unit=unit, relative=True)
        if not may_bend or len(set(xs)) < 4 or line.rel_residual_std <= BEND_ABOVE:
            return line
        bent = fit_curve(xs, ys, unit=unit, degree=2, relative=True)
        return bent if bent.rel_residual_std <= line.rel_residual_std / 2 else line

    scored = all(p.score_seconds is not None and p.score_joules is not None for p in points)
    return CostCurves(
        prompt_seconds=fit("prompt_seconds", "s", may_bend=True),
        token_seconds=fit("token_seconds", "s", may_bend=False),
        prompt_joules=fit("prompt_joules", "J", may_bend=True),
        token_joules=fit("token_joules", "J", may_bend=False),
        score_seconds=fit("score_seconds", "s", may_bend=True) if scored else None,
        score_joules=fit("score_joules", "J", may_bend=True) if scored else None,
    )


# --------------------------------------------------------------------------- the agent itself


def current_power_mode(device: DeviceClass) -> str | None:
    """The key of the mode the box runs in now, as far as it can tell (None: unknown)."""
    if device.kind == "jetson":
        return jetson_power_mode(device)
    if device.kind == "nvidia-dgpu":
        watts = nvml_power_limit_w()
        return device.mode_for_power_limit(watts) if watts is not None else None
    return device.default_mode if len(device.modes) == 1 else None


class SelfProfiler:
    """An agent profiling its own backend: its settings, its device class, a meter per run.

        profiler = SelfProfiler(backend, load_device_class("cpu-generic"), "default",
                                ProfilerSettings(points=4), agent_id="cpu-1")
        profile = profiler.run(profiler.settings_with({"repeats": 3}))

    The meter is chosen (and probed) at each run and closed after it, so nothing a meter
    holds (NVML, a jtop connection, a polling thread) outlives the profile.
    """

    def __init__(
        self,
        backend: ModelBackend,
        device: DeviceClass,
        power_mode: str | None,
        settings: ProfilerSettings,
        *,
        agent_id: str,
        meter: str | None = None,
        cancelled: Callable[[], bool] = lambda: False,
        between: Callable[[], None] = lambda: None,
    ) -> None:
        if power_mode is not None:
            device.mode(power_mode)  # ConfigError names the class's modes
        self.backend = backend
        self.device = device
        self.power_mode = power_mode
        self.settings = settings
        self.agent_id = agent_id
        self.meter = meter  # None: the first of the class's meters that works here
        self.cancelled = cancelled  # asked between measurements (the agent is stopping)
        self.between = between  # run between measurements (serve waiting requests)

    def settings_with(self, overrides: Mapping[str, Any]) -> ProfilerSettings:
        """The agent's settings with ``overrides``; ConfigError when they do not fit its model."""
        try:
            merged = {**self.settings.model_dump(), **overrides}
            settings = type(self.settings).model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(f"invalid profiler settings: {describe_error(exc)}") from None
        settings.lengths_for(self.backend.info.n_ctx)  # room for every prompt, or ConfigError
        return settings

    def _choose_meter(self) -> Meter:
        """The first of the class's meters that works here (or the one named). A modelled
        meter charges the model thread's CPU time where the model computes on the CPU
        (whatever GPU the declared class has), wall time where a GPU does."""
        meter = choose_meter(self.device, self.power_mode, prefer=self.meter)
        if isinstance(meter, ModelledMeter):
            offload = self.backend.offload  # None: the backend cannot tell; the class says
            on_cpu = self.device.kind == "cpu" if offload is None else not offload.on_gpu
            meter.clock = meter.model_clock = thread_cpu_seconds if on_cpu else time.perf_counter
        return meter

    def model_clock(self) -> Callable[[], float]:
        """The clock a request's model time is read from, as the meter a profile uses
        charges it (``Meter.model_clock``); wall time when no meter works here (then no
        profile is made, and the profile request says why)."""
        try:
            meter = self._choose_meter()
        except ConfigError:
            return time.perf_counter
        try:
            return meter.model_clock
        finally:
            meter.close()

    def run(self, settings: ProfilerSettings | None = None) -> AgentProfile:
        meter = self._choose_meter()
        try:
            return profile_backend(
                self.backend,
                meter,
                settings or self.settings,
                agent_id=self.agent_id,
                device_class=self.device.device_class,
                power_mode=self.power_mode,
                cancelled=self.cancelled,
                between=self.between,
            )
        finally:
            meter.close()


# --------------------------------------------------------------------------- no measurement


def model_figures(info: ModelInfo) -> ModelFigures:
    """What the backend tells about the model's size (no layer shape: attention is left out)."""
    return ModelFigures(n_params=float(info.n_params), weight_bytes=float(info.model_bytes))


def estimate_profile(
    model: ModelFigures,
    figures: DeviceFigures,
    settings: ProfilerSettings,
    *,
    agent_id: str,
    model_name: str,
    n_ctx: int,
    device_class: str,
    power_mode: str | None,
    now: Callable[[], float] = time.time,
) -> AgentProfile:
    """A profile from paper eq. 4 alone (nothing run, nothing measured), for a box that cannot
    run the profiler; every figure says so."""
    lengths = settings.lengths_for(n_ctx)
    prompt = [estimate_prompt(model, figures, n) for n in lengths]
    token = [estimate_decode_token(model, figures, n + 1) for n in lengths]
    prompt_s = fit_curve(lengths, [c.seconds for c in prompt], unit="s")
    prompt_j = fit_curve(lengths, [c.joules for c in prompt], unit="J")
    curves = CostCurves(
        prompt_seconds=prompt_s,
        token_seconds=fit_curve(lengths, [c.seconds for c in token], unit="s"),
        prompt_joules=prompt_j,
        token_joules=fit_curve(lengths, [c.joules for c in token], unit="J"),
        # eq. 4 has no term for the distributions scoring reads: a scored token as a prompt's
        score_seconds=prompt_s,
        score_joules=prompt_j,
        model_watts=figures.peak_power_w,
    )
    return AgentProfile(
        agent_id=agent_id,
        model=model_name,
        device_class=device_class,
        power_mode=power_mode,
        meter_source="modelled",
        energy_measured=False,
        delay_measured=False,
        energy_scope="device-figures",
        n_ctx=n_ctx,
        points=[],
        curves=curves,
        profiled_at=now(),
        duration_s=0.0,
    )


def stability(profiles: Sequence[AgentProfile], lengths: Sequence[int]) -> dict[str, float]:
    """Spread of repeated profiles as a ratio: max / min of each curve over the runs, the
    worst over ``lengths`` (1.0 means the runs agree exactly)."""
    if len(profiles) < 2:
        raise ValueError("stability needs at least two profiles")
    out: dict[str, float] = {}
    for name in CostCurves.model_fields:
        curves = [getattr(p.curves, name) for p in profiles]
        if not all(isinstance(c, CostCurve) for c in curves):  # no score curves; not a curve
            continue
        worst = 1.0
        for n in lengths:
            values = [c.at(n) for c in curves]
            lo, hi = min(values), max(values)
            worst = max(worst, hi / lo if lo > 0 else math.inf)
        out[name] = worst
    return out
