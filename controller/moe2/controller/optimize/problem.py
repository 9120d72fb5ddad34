"""One subset-selection problem: scores, gate, costs and limits, and its JSON file (docs/method.md,
"The problem file").

A problem is built from arrays (the registry path) or read from a file (replay); both go through
the same validation, and ``to_file`` writes exactly the format ``from_file`` reads::

    problem = Problem(experts=("a", "b"), gate=[[0.7, 0.3]], logp=[[[-0.1, -0.2], [-1.6, -0.9]]],
                      app=("qa",), prompt_delay=[[1.2, 0.4]], decode_delay=[[0.1, 0.3]],
                      steps=[8], energy=[[9.0, 3.0]], delay_limits={"qa": 2.0}, energy_limit=20.0)
    problem.to_file("replay.json"); Problem.from_file("replay.json")

Two forms of the scores and of the delays are read:

- ``logp`` (sample × expert × unit log-probabilities, nats) is exact at any length; ``p``
  (probabilities) is the original form and keeps its original meaning, including the floor of
  ``P_FLOOR`` below which every probability counted the same (a long answer's probability
  underflows it: write ``logp``).
- ``prompt_delay`` + ``decode_delay`` + ``steps`` give eq. 8's delay exactly: a sample's delay
  under S is (1/T) Σ_t max_{n∈S} τ_n(t) with step 1 the prompt step and steps 2..T decode steps,
  i.e. (max_S prompt + (T−1) max_S decode) / T. ``delay`` (one mean step per sample × expert)
  is the original form: it equals prompt = decode = delay with T = 1.

Energy is stored per step (``energy``: joules per step of the answer, eq. 11); the limit is
stated per step (``limits.energy``, eq. 12) or per prompt (``limits.energy_per_prompt``: the
whole answer's joules, T × the step figure, the unit of the paper's Tables II–IV), one of them.

Every error names the field and the sample (and expert, unit) index, so a bad file is fixed
without a debugger.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from moe2.shared.errors import ConfigError

FloatArray = NDArray[np.float64]

# Gate rows are softmax outputs, often written from float32 with rounding: accept that much.
GATE_SUM_TOLERANCE = 1e-3

# The floor the original ``p`` form always had: a probability below it (or exactly 0, an
# underflow) counts as this much, capping one unit's loss near 69 nats. ``logp`` has no floor.
P_FLOOR = 1e-30

# A log-probability written from float32 may exceed 0 by rounding: accept that much.
LOGP_TOLERANCE = 1e-6

_BASE = ("experts", "gate", "app", "energy")
_SCORES = ("p", "logp")  # exactly one
_DELAY_OLD = ("delay",)
_DELAY_EXACT = ("prompt_delay", "decode_delay", "steps")  # all three, or "delay"
_OPTIONAL = ("gate_delay", "limits", "epsilon", "meta")
_KEYS = _BASE + _SCORES + _DELAY_OLD + _DELAY_EXACT + _OPTIONAL
_LIMIT_KEYS = ("delay", "energy", "energy_per_prompt")

EnergyPer = Literal["step", "prompt"]  # the unit of ``energy_limit``


def _fail(message: str) -> ConfigError:
    return ConfigError(f"problem: {message}")


def _index(name: str, idx: Sequence[int]) -> str:
    return name + "".join(f"[{int(i)}]" for i in idx)


def _numeric(name: str, value: Any, ndim: int) -> FloatArray:
    """``value`` as a float array of ``ndim`` dimensions, or an error naming the bad entry."""
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.array(value)
        except ValueError:  # ragged nesting
            arr = np.array(value, dtype=object)
    if arr.dtype.kind in "iuf" and arr.ndim == ndim:
        return arr.astype(np.float64, copy=False)
    _explain_shape(name, value, ndim)
    raise _fail(f"{name} must be a {ndim}-dimensional array of numbers")  # pragma: no cover


def _explain_shape(name: str, value: Any, ndim: int, idx: tuple[int, ...] = ()) -> None:
    # Walks the nested lists to name the first entry that is not a number or not a list.
    where = _index(name, idx)
    if len(idx) == ndim:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise _fail(f"{where} = {value!r} is not a number")
        return
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise _fail(f"{where} must be a list, got {value!r}")
    for i, item in enumerate(value):
        _explain_shape(name, item, ndim, (*idx, i))
    lengths = {len(v) for v in value if isinstance(v, (list, tuple, np.ndarray))}
    if len(lengths) > 1:
        raise _fail(f"the rows of {where} have different lengths {sorted(lengths)}")


def _check_finite(name: str, arr: FloatArray, offset: tuple[int, ...] = ()) -> None:
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        idx = (*offset, *bad[0])
        raise _fail(f"{_index(name, idx)} is {arr[tuple(bad[0])]}: values must be finite numbers")


def _check_range(
    name: str, arr: FloatArray, lo: float, hi: float, what: str, offset: tuple[int, ...] = ()
) -> None:
    bad = np.argwhere((arr < lo) | (arr > hi))
    if bad.size:
        idx = (*offset, *bad[0])
        raise _fail(f"{_index(name, idx)} = {arr[tuple(bad[0])]:g} is {what}")


def _check_shape(name: str, arr: FloatArray, shape: tuple[int, ...], meaning: str) -> None:
    if arr.shape != shape:
        raise _fail(f"{name} has shape {arr.shape}, expected {shape} ({meaning})")


def _number(name: str, value: Any, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _fail(f"{name} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out) or out < minimum:
        raise _fail(f"{name} = {out} must be a finite number ≥ {minimum:g}")
    return out


@dataclass(frozen=True, eq=False)
class Problem:
    """Choose S ⊆ experts minimising J(S) under every app's delay limit and the energy limit.

    ``logp[i]`` is sample i's (experts, units) array of target log-probabilities (a unit is a
    token, or the whole target when the experts' vocabularies differ; see
    ``moe2.controller.mixing``); the unit count may differ between samples. Delays are
    seconds, ``energy`` joules per sample and expert (mean per step); ``gate_delay`` (seconds)
    is added to every app's delay. Apps missing from ``delay_limits`` are unconstrained, as is
    energy when ``energy_limit`` is None.
    """

    experts: tuple[str, ...]
    gate: FloatArray  # (samples, experts), rows sum to 1
    logp: tuple[FloatArray, ...]  # samples × (experts, units_i), nats
    app: tuple[str, ...]  # (samples,)
    prompt_delay: FloatArray  # (samples, experts) seconds of step 1 (the prompt)
    decode_delay: FloatArray  # (samples, experts) seconds of each step 2..T
    steps: NDArray[np.int64]  # (samples,) T, the answer's length in steps
    energy: FloatArray  # (samples, experts) joules
    gate_delay: float = 0.0  # seconds
    delay_limits: Mapping[str, float] = field(default_factory=dict)  # app -> seconds
    energy_limit: float | None = None  # joules, mean per sample, per ``energy_per``
    energy_per: EnergyPer = "step"  # the limit's unit: per step (eq. 11) or per prompt
    epsilon: float = 0.0  # accepted optimality gap in objective units (nats per sample)
    meta: Mapping[str, Any] = field(default_factory=dict)  # free-form, carried but not used
    # The forms the scores and delays were given in, so that ``to_dict`` writes them back.
    _p_given: tuple[FloatArray, ...] | None = field(default=None, repr=False)
    _delay_given: FloatArray | None = field(default=None, repr=False)

    def __init__(
        self,
        *,
        experts: Sequence[str],
        gate: ArrayLike,
        app: Sequence[str],
        energy: ArrayLike,
        p: ArrayLike | Sequence[ArrayLike] | None = None,
        logp: ArrayLike | Sequence[ArrayLike] | None = None,
        delay: ArrayLike | None = None,
        prompt_delay: ArrayLike | None = None,
        decode_delay: ArrayLike | None = None,
        steps: ArrayLike | None = None,
        gate_delay: float = 0.0,
        delay_limits: Mapping[str, float] | None = None,
        energy_limit: float | None = None,
        energy_per: EnergyPer = "step",
        epsilon: float = 0.0,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        # Coerces and validates once, so every solver can trust the arrays.
        names = _experts(experts)
        n = len(names)
        if isinstance(gate, (list, tuple)) and not gate:
            raise _fail("there are no samples: gate, logp, app, delays and energy are empty")
        gate_arr = _numeric("gate", gate, 2)
        samples = gate_arr.shape[0]
        if samples == 0:
            raise _fail("there are no samples: gate, logp, app, delays and energy are empty")
        _check_shape("gate", gate_arr, (samples, n), "samples × experts")
        _check_finite("gate", gate_arr)
        _check_range("gate", gate_arr, 0.0, 1.0, "outside [0, 1]")
        sums = gate_arr.sum(axis=1)
        bad = np.flatnonzero(np.abs(sums - 1.0) > GATE_SUM_TOLERANCE)
        if bad.size:
            i = int(bad[0])
            raise _fail(f"gate[{i}] sums to {sums[i]:.6g}, expected 1 (±{GATE_SUM_TOLERANCE:g})")
        apps = _apps(app, samples)
        set_ = object.__setattr__
        set_(self, "experts", names)
        set_(self, "gate", gate_arr)
        if (p is None) == (logp is None):
            raise _fail(
                "give the target scores once: 'logp' (log-probabilities, nats) or 'p' "
                "(probabilities, the original form)"
            )
        if logp is not None:
            set_(self, "logp", _log_probabilities(logp, samples, n))
            set_(self, "_p_given", None)
        else:
            probs = _probabilities(p, samples, n)
            set_(self, "_p_given", probs)
            set_(self, "logp", tuple(np.log(np.maximum(a, P_FLOOR)) for a in probs))
        set_(self, "app", apps)
        exact = (prompt_delay, decode_delay, steps)
        if delay is not None:
            if any(x is not None for x in exact):
                raise _fail(
                    "give the delays once: 'delay' (mean step, the original form) or "
                    "'prompt_delay' + 'decode_delay' + 'steps', not both"
                )
            d = _costs("delay", delay, samples, n, "seconds")
            set_(self, "_delay_given", d)
            set_(self, "prompt_delay", d)
            set_(self, "decode_delay", d)
            set_(self, "steps", np.ones(samples, dtype=np.int64))
        else:
            missing = [k for k, v in zip(_DELAY_EXACT, exact, strict=True) if v is None]
            if missing:
                raise _fail(
                    f"missing key(s) {', '.join(map(repr, missing))}: the delays are 'delay' "
                    "or all of 'prompt_delay', 'decode_delay' and 'steps'"
                )
            set_(self, "_delay_given", None)
            set_(self, "prompt_delay", _costs("prompt_delay", prompt_delay, samples, n, "seconds"))
            set_(self, "decode_delay", _costs("decode_delay", decode_delay, samples, n, "seconds"))
            set_(self, "steps", _steps(steps, samples))
        set_(self, "energy", _costs("energy", energy, samples, n, "joules"))
        set_(self, "gate_delay", _number("gate_delay", gate_delay))
        set_(self, "delay_limits", _delay_limits(delay_limits or {}, apps))
        set_(
            self,
            "energy_limit",
            None if energy_limit is None else _number("limits.energy", energy_limit),
        )
        if energy_per not in ("step", "prompt"):
            raise _fail(f"energy_per = {energy_per!r}: expected 'step' or 'prompt'")
        set_(self, "energy_per", energy_per)
        set_(self, "epsilon", _number("epsilon", epsilon))
        if meta is not None and not isinstance(meta, Mapping):
            raise _fail(f"meta must be an object, got {meta!r}")
        set_(self, "meta", dict(meta or {}))

    @property
    def n_samples(self) -> int:
        return int(self.gate.shape[0])

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    @property
    def units(self) -> NDArray[np.int64]:
        """(samples,) number of mixing units (target tokens, or 1 per sequence) per sample."""
        return np.array([a.shape[1] for a in self.logp], dtype=np.int64)

    @property
    def sample_energy(self) -> FloatArray:
        """(samples, experts) joules in the limit's unit: per step, or per prompt (× T)."""
        if self.energy_per == "prompt":
            return np.asarray(self.energy * self.steps[:, None], dtype=np.float64)
        return self.energy

    def with_limits(
        self,
        delay_limits: Mapping[str, float],
        energy_limit: float | None,
        energy_per: EnergyPer | None = None,
    ) -> Problem:
        """The same samples, gate and costs under other limits (a grid of settings)."""
        out = object.__new__(Problem)
        out.__dict__.update(self.__dict__)
        object.__setattr__(out, "delay_limits", _delay_limits(delay_limits, self.app))
        object.__setattr__(
            out,
            "energy_limit",
            None if energy_limit is None else _number("limits.energy", energy_limit),
        )
        if energy_per is not None:
            object.__setattr__(out, "energy_per", energy_per)
        return out

    # -- the file format -----------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any) -> Problem:
        if not isinstance(data, Mapping):
            raise _fail(f"a problem is a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise _fail(
                f"unknown key(s) {', '.join(map(repr, unknown))}; expected {', '.join(_KEYS)}"
            )
        missing = [k for k in _BASE if k not in data]
        if not any(k in data for k in _SCORES):
            missing.append("logp (or p)")
        if not any(k in data for k in _DELAY_OLD + _DELAY_EXACT):
            missing.append("prompt_delay, decode_delay and steps (or delay)")
        if missing:
            raise _fail(f"missing key(s) {', '.join(map(repr, missing))}")
        limits = data.get("limits") or {}
        if not isinstance(limits, Mapping):
            raise _fail(
                f'limits must be an object like {{"delay": {{...}}, "energy": 20.0}}, '
                f"got {limits!r}"
            )
        unknown = sorted(set(limits) - set(_LIMIT_KEYS))
        if unknown:
            raise _fail(
                f"unknown key(s) {', '.join(map(repr, unknown))} in limits; "
                f"expected {', '.join(_LIMIT_KEYS)}"
            )
        if limits.get("energy") is not None and limits.get("energy_per_prompt") is not None:
            raise _fail(
                "limits: give 'energy' (joules per step) or 'energy_per_prompt' (joules per "
                "prompt), not both"
            )
        per_prompt = limits.get("energy_per_prompt")
        return cls(
            experts=data["experts"],
            gate=data["gate"],
            p=data.get("p"),
            logp=data.get("logp"),
            app=data["app"],
            delay=data.get("delay"),
            prompt_delay=data.get("prompt_delay"),
            decode_delay=data.get("decode_delay"),
            steps=data.get("steps"),
            energy=data["energy"],
            gate_delay=data.get("gate_delay", 0.0),
            delay_limits=limits.get("delay") or {},
            energy_limit=limits.get("energy") if per_prompt is None else per_prompt,
            energy_per="step" if per_prompt is None else "prompt",
            epsilon=data.get("epsilon", 0.0),
            meta=data.get("meta"),
        )

    def to_dict(self) -> dict[str, Any]:
        # The scores and delays in the form they were given, so a file round-trips exactly.
        out: dict[str, Any] = {"experts": list(self.experts), "gate": self.gate.tolist()}
        if self._p_given is not None:
            out["p"] = [a.tolist() for a in self._p_given]
        else:
            out["logp"] = [a.tolist() for a in self.logp]
        out["app"] = list(self.app)
        if self._delay_given is not None:
            out["delay"] = self._delay_given.tolist()
        else:
            out["prompt_delay"] = self.prompt_delay.tolist()
            out["decode_delay"] = self.decode_delay.tolist()
            out["steps"] = self.steps.tolist()
        out.update(
            {
                "energy": self.energy.tolist(),
                "gate_delay": self.gate_delay,
                "limits": {
                    "delay": dict(self.delay_limits),
                    ("energy" if self.energy_per == "step" else "energy_per_prompt"): (
                        self.energy_limit
                    ),
                },
                "epsilon": self.epsilon,
            }
        )
        if self.meta:
            out["meta"] = dict(self.meta)
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> Problem:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read problem file {path}: {exc.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"problem file {path} is not valid JSON: {exc.msg} at line {exc.lineno} "
                f"column {exc.colno}"
            ) from None
        return cls.from_dict(data)

    def to_file(self, path: str | Path) -> None:
        # allow_nan=False: validation already rejects NaN, and the file must be strict JSON.
        Path(path).write_text(json.dumps(self.to_dict(), allow_nan=False) + "\n", "utf-8")


def _experts(experts: Any) -> tuple[str, ...]:
    if isinstance(experts, str) or not isinstance(experts, Sequence):
        raise _fail(f"experts must be a list of names, got {experts!r}")
    if not experts:
        raise _fail("experts is empty: a problem needs at least one expert")
    for i, name in enumerate(experts):
        if not isinstance(name, str) or not name:
            raise _fail(f"experts[{i}] = {name!r} must be a non-empty string")
    seen: set[str] = set()
    for name in experts:
        if name in seen:
            raise _fail(f"expert {name!r} is listed twice in experts")
        seen.add(name)
    return tuple(experts)


def _apps(app: Any, samples: int) -> tuple[str, ...]:
    if isinstance(app, str) or not isinstance(app, Sequence):
        raise _fail(f"app must be a list with one application name per sample, got {app!r}")
    if len(app) != samples:
        raise _fail(f"app has {len(app)} entries, expected {samples} (one per sample)")
    for i, name in enumerate(app):
        if not isinstance(name, str) or not name:
            raise _fail(f"app[{i}] = {name!r} must be a non-empty string")
    return tuple(app)


def _score_rows(name: str, value: Any, samples: int) -> Sequence[Any]:
    if isinstance(value, np.ndarray) and value.ndim == 3:
        rows: Sequence[Any] = list(value)
    elif isinstance(value, (list, tuple)):
        rows = value
    else:
        raise _fail(f"{name} must be a list with one (experts × units) array per sample")
    if len(rows) != samples:
        raise _fail(f"{name} has {len(rows)} samples, expected {samples} (as many as gate rows)")
    return rows


def _score_array(name: str, i: int, row: Any, n: int) -> FloatArray:
    arr = _numeric(f"{name}[{i}]", row, 2)
    if arr.shape[0] != n or arr.shape[1] == 0:
        raise _fail(
            f"{name}[{i}] has shape {arr.shape}, expected ({n}, units ≥ 1): one list of "
            "target scores per expert, the same length for every expert"
        )
    _check_finite(name, arr, (i,))
    return arr


def _probabilities(p: Any, samples: int, n: int) -> tuple[FloatArray, ...]:
    rows = _score_rows("p", p, samples)
    out = []
    for i, row in enumerate(rows):
        arr = _score_array("p", i, row, n)
        _check_range("p", arr, 0.0, 1.0, "outside [0, 1]", (i,))
        out.append(arr)
    return tuple(out)


def _log_probabilities(logp: Any, samples: int, n: int) -> tuple[FloatArray, ...]:
    rows = _score_rows("logp", logp, samples)
    out = []
    for i, row in enumerate(rows):
        arr = _score_array("logp", i, row, n)
        _check_range(
            "logp", arr, -math.inf, LOGP_TOLERANCE, "above 0: a log-probability is ≤ 0", (i,)
        )
        out.append(np.minimum(arr, 0.0))
    return tuple(out)


def _steps(value: Any, samples: int) -> NDArray[np.int64]:
    arr = _numeric("steps", value, 1)
    _check_shape("steps", arr, (samples,), "one answer length per sample")
    _check_finite("steps", arr)
    bad = np.flatnonzero((arr < 1) | (arr != np.round(arr)))
    if bad.size:
        i = int(bad[0])
        raise _fail(f"steps[{i}] = {arr[i]:g} must be a whole number of steps ≥ 1")
    return arr.astype(np.int64)


def _costs(name: str, value: Any, samples: int, n: int, unit: str) -> FloatArray:
    arr = _numeric(name, value, 2)
    _check_shape(name, arr, (samples, n), "samples × experts")
    _check_finite(name, arr)
    _check_range(name, arr, 0.0, math.inf, f"negative: {name} is {unit} ≥ 0")
    return arr


def _delay_limits(limits: Any, apps: tuple[str, ...]) -> dict[str, float]:
    if not isinstance(limits, Mapping):
        raise _fail(f'limits.delay must be an object {{"app": seconds}}, got {limits!r}')
    known = sorted(set(apps))
    out = {}
    for name, value in limits.items():
        if name not in known:
            raise _fail(
                f"limits.delay names app {name!r}, but no sample has that app "
                f"(apps in the samples: {', '.join(known)})"
            )
        out[str(name)] = _number(f"limits.delay[{name!r}]", value)
    return out
