"""The profiler's logic against a tiny in-test backend whose costs are known exactly: it runs on
a fake clock, so prompt and token delays (and, through a RAPL tree in a temp dir, energy) are
set by the test and must come back out of the fitted curves."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from moe2.agent.backend import ModelBackend, ModelInfo, Sequence
from moe2.agent.meters import ModelledMeter, RaplMeter, Reading
from moe2.agent.meters.base import Meter, MeterError
from moe2.agent.profiler import (
    ProfilerSettings,
    estimate_profile,
    profile_backend,
    prompt_tokens_for,
    stability,
)
from moe2.shared.costmodel import DeviceFigures, ModelFigures, estimate_decode_token
from moe2.shared.errors import ConfigError, ContextOverflow
from moe2.shared.protocol import AgentProfile, decode_message, encode

# The backend's true costs: prompt = A + B L seconds, one token = C + D h at history h.
A, B, C, D = 0.02, 1e-4, 0.005, 2e-6
ACTIVE_W, IDLE_W = 40.0, 5.0


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class TimedSequence(Sequence):
    def __init__(self, backend: TimedBackend) -> None:
        self.backend = backend
        self._tokens: list[int] = []

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    def extend(self, tokens: Seq[int]) -> np.ndarray:
        if len(self._tokens) + len(tokens) > self.backend.info.n_ctx:
            raise ContextOverflow("history would exceed the context")
        # a batch is a prompt; one token is a decode step at the current history
        cost = A + B * len(tokens) if len(tokens) > 1 else C + D * len(self._tokens)
        self.backend.run_for(cost)
        self._tokens += list(tokens)
        logits = np.zeros(self.backend.info.n_vocab, dtype=np.float32)
        logits[(len(self._tokens) * 7) % self.backend.info.n_vocab] = 5.0
        return logits - np.log(np.exp(logits).sum())

    def truncate(self, n: int) -> None:
        del self._tokens[n:]

    def close(self) -> None:
        self.backend.open_sequences -= 1


class TimedBackend(ModelBackend):
    def __init__(
        self, clock: FakeClock, n_ctx: int = 512, on_run: Callable[[float], None] = lambda s: None
    ) -> None:
        self.clock = clock
        self.on_run = on_run
        self.open_sequences = 0
        self.info = ModelInfo(
            name="timed-test",
            architecture="llama",
            quantization="F32",
            n_ctx=n_ctx,
            n_vocab=64,
            n_params=1_000_000,
            model_bytes=4_000_000,
            tokenizer_hash="0" * 64,
            bos_id=1,
            eos_ids=(2,),
            add_bos=True,
            chat_template=None,
        )

    def run_for(self, seconds: float) -> None:
        self.clock.t += seconds
        self.on_run(seconds)

    def tokenize(self, text: str | bytes, *, add_bos: bool, special: bool = False) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode()
        words = [3 + sum(map(ord, w)) % 60 for w in text.split()]
        return ([1] if add_bos else []) + words

    def detokenize(self, tokens: Seq[int]) -> str:
        return " ".join(map(str, tokens))

    def piece_bytes(self, token: int) -> bytes:
        return str(token).encode()

    def new_sequence(self) -> Sequence:
        self.open_sequences += 1
        return TimedSequence(self)

    def score(self, prompt: Seq[int], target: Seq[int]) -> np.ndarray:
        return np.zeros(len(target), dtype=np.float32)

    def close(self) -> None:
        pass


SETTINGS = ProfilerSettings(
    prompt_lengths=[16, 64, 200, 400], repeats=3, decode_tokens=8, idle_seconds=0.5
)
FIGURES = DeviceFigures(
    compute_flops_per_s=1e12, memory_bytes_per_s=1e11, idle_power_w=9, peak_power_w=60
)


def _profile(backend: ModelBackend, meter: Meter, clock: FakeClock, **kw) -> AgentProfile:
    def sleep(seconds: float) -> None:
        clock.t += seconds

    return profile_backend(
        backend,
        meter,
        kw.pop("settings", SETTINGS),
        agent_id="cpu-1",
        device_class="cpu-generic",
        power_mode="default",
        clock=clock,
        sleep=sleep,
        now=lambda: 1.7e9,
        **kw,
    )


def test_curves_recover_the_true_costs_with_a_modelled_meter() -> None:
    clock = FakeClock()
    backend = TimedBackend(clock)
    profile = _profile(backend, ModelledMeter(FIGURES, clock=clock), clock)

    assert [p.prompt_tokens for p in profile.points] == [16, 64, 200, 400]
    assert all(p.repeats == 3 and p.decode_tokens == 8 for p in profile.points)
    c = profile.curves
    assert c.prompt_seconds.coef == pytest.approx([A, B])
    # Tokens after a prompt of L see histories L..L+7: mean cost C + D (L + 3.5).
    assert c.token_seconds.coef == pytest.approx([C + 3.5 * D, D])
    assert c.prompt_seconds.rel_residual_std == pytest.approx(0.0, abs=1e-9)
    # Modelled energy is the measured time at the figures' peak power, and says so.
    assert c.prompt_joules.coef == pytest.approx([60 * A, 60 * B])
    assert profile.meter_source == "modelled"
    assert not profile.energy_measured
    assert profile.delay_measured
    assert profile.idle_watts is None  # nothing measured at rest either
    assert backend.open_sequences == 0  # every sequence was closed


def test_energy_measured_through_rapl_is_labelled_rapl(tmp_path: Path) -> None:
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    (zone / "energy_uj").write_text("1000000\n")
    clock = FakeClock()

    def burn(watts: float) -> Callable[[float], None]:
        def add(seconds: float) -> None:
            uj = int((zone / "energy_uj").read_text()) + round(watts * seconds * 1e6)
            (zone / "energy_uj").write_text(f"{uj}\n")

        return add

    backend = TimedBackend(clock, on_run=burn(ACTIVE_W))
    meter = RaplMeter(tmp_path, poll_s=0, clock=clock)
    assert meter.available()

    def idle_sleep(seconds: float) -> None:
        clock.t += seconds
        burn(IDLE_W)(seconds)

    profile = profile_backend(
        backend,
        meter,
        SETTINGS,
        agent_id="cpu-1",
        device_class="cpu-generic",
        power_mode="default",
        clock=clock,
        sleep=idle_sleep,
    )
    assert profile.meter_source == "rapl"
    assert profile.energy_measured
    assert profile.energy_scope == "cpu-package"
    assert profile.idle_watts == pytest.approx(IDLE_W)
    assert profile.curves.prompt_joules.coef == pytest.approx(
        [ACTIVE_W * A, ACTIVE_W * B], rel=1e-4
    )
    assert profile.curves.token_joules.at(100) == pytest.approx(
        ACTIVE_W * profile.curves.token_seconds.at(100), rel=1e-3
    )


class SlowToResolve(ModelledMeter):
    """A meter that needs 0.1 s windows: short work must be repeated inside one window."""

    min_window_s = 0.1


def test_short_work_is_stretched_to_the_meters_window() -> None:
    clock = FakeClock()
    backend = TimedBackend(clock)
    settings = ProfilerSettings(
        prompt_lengths=[16, 64], repeats=1, decode_tokens=2, idle_seconds=0, warmup=False
    )
    profile = _profile(backend, SlowToResolve(FIGURES, clock=clock), clock, settings=settings)
    first = profile.points[0]
    # 0.0216 s per prompt: five evaluations fill the window; each is still timed on its own
    assert first.prompt_seconds[0] == pytest.approx(A + B * 16)
    assert first.prompt_joules[0] == pytest.approx(60 * (A + B * 16))
    # decoding goes on past 2 tokens until the window is full (0.1 s / ~5 ms a token)
    assert first.decode_tokens >= 19


class LabelledRapl(ModelledMeter):
    """Calls itself "rapl" but its readings say where the joules came from."""

    source = "rapl"  # type: ignore[assignment]


class Switching(ModelledMeter):
    """Changes its readings' source half-way through."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.calls = 0

    def stop(self) -> Reading:
        r = super().stop()
        self.calls += 1
        if self.calls > 4:  # the warm-up's 3 windows, then inside the first run
            return Reading(r.joules, r.seconds, "rapl", "cpu-package")
        return r


def test_a_profile_never_claims_a_meter_it_did_not_use() -> None:
    clock = FakeClock()
    profile = _profile(TimedBackend(clock), LabelledRapl(FIGURES, clock=clock), clock)
    # The readings were modelled, so the profile says modelled whatever the meter calls itself.
    assert profile.meter_source == "modelled"
    assert not profile.energy_measured

    with pytest.raises(MeterError, match=r"more than one meter|changed its source"):
        _profile(TimedBackend(clock), Switching(FIGURES, clock=clock), clock)

    data = profile.model_dump()
    with pytest.raises(ValidationError, match="only a real meter"):
        AgentProfile.model_validate({**data, "energy_measured": True})
    with pytest.raises(ValidationError, match="only a real meter"):
        AgentProfile.model_validate({**data, "meter_source": "rapl", "energy_measured": False})
    with pytest.raises(ValidationError, match="meter_source"):
        AgentProfile.model_validate({**data, "meter_source": "guess"})


def test_the_profile_travels_as_a_retained_message() -> None:
    clock = FakeClock()
    profile = _profile(TimedBackend(clock), ModelledMeter(FIGURES, clock=clock), clock)
    back = decode_message(AgentProfile, encode(profile))
    assert back == profile
    assert back.curves.token_seconds.at(300) == profile.curves.token_seconds.at(300)


def test_prompt_lengths_spread_up_to_the_context() -> None:
    lengths = ProfilerSettings(points=6, max_prompt_fraction=0.9).lengths_for(2048)
    assert lengths[0] == 16 and lengths[-1] == int(0.9 * 2048)
    assert len(lengths) == 6
    # The defaults keep the start-up profile short: 4 lengths up to half the context.
    assert ProfilerSettings().lengths_for(2048)[-1] == 1024
    ratios = np.diff(np.log(lengths))
    assert np.allclose(ratios, ratios[0], rtol=0.05)  # geometric
    # a small context still leaves room for the decoded tokens
    assert ProfilerSettings(decode_tokens=16).lengths_for(64)[-1] <= 64 - 16 - 1
    with pytest.raises(ConfigError, match="no room"):
        ProfilerSettings(prompt_lengths=[16, 500], decode_tokens=16).lengths_for(512)
    with pytest.raises(ValidationError, match="two distinct"):
        ProfilerSettings(prompt_lengths=[64, 64])


def test_prompts_have_exactly_the_asked_length() -> None:
    backend = TimedBackend(FakeClock())
    for n in (1, 2, 17, 400):
        prompt = prompt_tokens_for(backend, n)
        assert len(prompt) == n
        assert prompt[0] == 1  # BOS, as the model wants it


def test_estimated_profile_is_modelled_through_and_through() -> None:
    model = ModelFigures(n_params=1e9, weight_bytes=5e8)  # no layer shape: flat per-token cost
    profile = estimate_profile(
        model,
        FIGURES,
        ProfilerSettings(),
        agent_id="orin-1",
        model_name="qwen2.5-3b",
        n_ctx=4096,
        device_class="orin-agx-64gb",
        power_mode="MAXN",
        now=lambda: 1.7e9,
    )
    assert profile.meter_source == "modelled"
    assert not profile.energy_measured and not profile.delay_measured
    assert profile.points == []
    expected = estimate_decode_token(model, FIGURES, 1000)
    assert profile.curves.token_seconds.at(1000) == pytest.approx(expected.seconds)
    assert profile.curves.token_joules.at(1000) == pytest.approx(expected.joules)
    with pytest.raises(ValidationError, match="delay_measured needs measured points"):
        AgentProfile.model_validate({**profile.model_dump(), "delay_measured": True})


def test_stability_is_the_worst_max_over_min_ratio() -> None:
    clock = FakeClock()
    base = _profile(TimedBackend(clock), ModelledMeter(FIGURES, clock=clock), clock)
    slower_curves = base.curves.model_copy(
        update={
            "token_seconds": base.curves.token_seconds.model_copy(
                update={"coef": [1.1 * c for c in base.curves.token_seconds.coef]}
            ),
        }
    )
    slower = base.model_copy(update={"curves": slower_curves})
    ratios = stability([base, slower], [16, 400])
    assert ratios["token_seconds"] == pytest.approx(1.1)
    assert ratios["prompt_seconds"] == pytest.approx(1.0)


def test_a_stopping_agent_waits_one_meter_window_at_most() -> None:
    """The profiler asks whether the agent stops between every two meter windows, not only
    between measurements (a measurement is three windows: prompt, scoring, decoding); asked
    to stop, it ends there and leaves no sequence open."""
    from moe2.agent.profiler import ProfileCancelled

    clock = FakeClock()
    settings = SETTINGS.model_copy(update={"idle_seconds": 0.0})
    asked: list[float] = []

    def cancelled() -> bool:
        asked.append(clock.t)
        return False

    _profile(TimedBackend(clock), ModelledMeter(FIGURES, clock=clock), clock,
             settings=settings, cancelled=cancelled)  # fmt: skip
    # Before each measurement and after its prompt and scoring windows; the warm-up too.
    measurements = len(settings.prompt_lengths) * settings.repeats
    assert len(asked) == 3 * measurements + 2, asked

    backend = TimedBackend(clock := FakeClock())
    with pytest.raises(ProfileCancelled):
        _profile(backend, ModelledMeter(FIGURES, clock=clock), clock, settings=settings,
                 cancelled=lambda: clock.t >= 0.5)  # fmt: skip
    assert backend.open_sequences == 0
