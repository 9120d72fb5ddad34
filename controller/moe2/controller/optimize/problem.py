"""One subset-selection problem: scores, gate, costs and limits, and its JSON file (DESIGN.md §3).

A problem is built from arrays (the registry path) or read from a file (replay); both go through
the same validation, and ``to_file`` writes exactly the format ``from_file`` reads::

    problem = Problem(experts=("a", "b"), gate=[[0.7, 0.3]], p=[[[0.9, 0.8], [0.2, 0.4]]],
                      app=("qa",), delay=[[1.2, 0.4]], energy=[[9.0, 3.0]],
                      delay_limits={"qa": 2.0}, energy_limit=20.0)
    problem.to_file("replay.json"); Problem.from_file("replay.json")

Every error names the field and the sample (and expert, token) index, so a bad file is fixed
without a debugger.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from moe2.shared.errors import ConfigError

FloatArray = NDArray[np.float64]

# Gate rows are softmax outputs, often written from float32 with rounding: accept that much.
GATE_SUM_TOLERANCE = 1e-3

_REQUIRED = ("experts", "gate", "p", "app", "delay", "energy")
_OPTIONAL = ("gate_delay", "limits", "epsilon", "meta")
_LIMIT_KEYS = ("delay", "energy")


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

    ``p[i]`` is sample i's (experts, tokens_i) array of target-token probabilities; the token
    count may differ between samples. ``delay`` is seconds and ``energy`` joules per sample and
    expert; ``gate_delay`` (seconds) is added to every app's delay. Apps missing from
    ``delay_limits`` are unconstrained, as is energy when ``energy_limit`` is None.
    """

    experts: tuple[str, ...]
    gate: FloatArray  # (samples, experts), rows sum to 1
    p: tuple[FloatArray, ...]  # samples × (experts, tokens_i)
    app: tuple[str, ...]  # (samples,)
    delay: FloatArray  # (samples, experts) seconds
    energy: FloatArray  # (samples, experts) joules
    gate_delay: float = 0.0  # seconds
    delay_limits: Mapping[str, float] = field(default_factory=dict)  # app -> seconds
    energy_limit: float | None = None  # joules, mean per sample
    epsilon: float = 0.0  # accepted optimality gap in objective units (nats per sample)
    meta: Mapping[str, Any] = field(default_factory=dict)  # free-form, carried but not used

    def __init__(
        self,
        experts: Sequence[str],
        gate: ArrayLike,
        p: ArrayLike | Sequence[ArrayLike],
        app: Sequence[str],
        delay: ArrayLike,
        energy: ArrayLike,
        gate_delay: float = 0.0,
        delay_limits: Mapping[str, float] | None = None,
        energy_limit: float | None = None,
        epsilon: float = 0.0,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        # Coerces and validates once, so every solver can trust the arrays.
        names = _experts(experts)
        n = len(names)
        if isinstance(gate, (list, tuple)) and not gate:
            raise _fail("there are no samples: gate, p, app, delay and energy are empty")
        gate_arr = _numeric("gate", gate, 2)
        samples = gate_arr.shape[0]
        if samples == 0:
            raise _fail("there are no samples: gate, p, app, delay and energy are empty")
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
        set_(self, "p", _probabilities(p, samples, n))
        set_(self, "app", apps)
        set_(self, "delay", _costs("delay", delay, samples, n, "seconds"))
        set_(self, "energy", _costs("energy", energy, samples, n, "joules"))
        set_(self, "gate_delay", _number("gate_delay", gate_delay))
        set_(self, "delay_limits", _delay_limits(delay_limits or {}, apps))
        set_(
            self,
            "energy_limit",
            None if energy_limit is None else _number("limits.energy", energy_limit),
        )
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
    def tokens(self) -> NDArray[np.int64]:
        """(samples,) number of target tokens of each sample."""
        return np.array([pi.shape[1] for pi in self.p], dtype=np.int64)

    # -- the file format of DESIGN.md §3 -------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any) -> Problem:
        if not isinstance(data, Mapping):
            raise _fail(f"a problem is a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise _fail(
                f"unknown key(s) {', '.join(map(repr, unknown))}; "
                f"expected {', '.join(_REQUIRED + _OPTIONAL)}"
            )
        missing = [k for k in _REQUIRED if k not in data]
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
        return cls(
            experts=data["experts"],
            gate=data["gate"],
            p=data["p"],
            app=data["app"],
            delay=data["delay"],
            energy=data["energy"],
            gate_delay=data.get("gate_delay", 0.0),
            delay_limits=limits.get("delay") or {},
            energy_limit=limits.get("energy"),
            epsilon=data.get("epsilon", 0.0),
            meta=data.get("meta"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "experts": list(self.experts),
            "gate": self.gate.tolist(),
            "p": [pi.tolist() for pi in self.p],
            "app": list(self.app),
            "delay": self.delay.tolist(),
            "energy": self.energy.tolist(),
            "gate_delay": self.gate_delay,
            "limits": {"delay": dict(self.delay_limits), "energy": self.energy_limit},
            "epsilon": self.epsilon,
        }
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


def _probabilities(p: Any, samples: int, n: int) -> tuple[FloatArray, ...]:
    if isinstance(p, np.ndarray) and p.ndim == 3:
        rows: Sequence[Any] = list(p)
    elif isinstance(p, (list, tuple)):
        rows = p
    else:
        raise _fail("p must be a list with one (experts × tokens) array per sample")
    if len(rows) != samples:
        raise _fail(f"p has {len(rows)} samples, expected {samples} (as many as gate rows)")
    out = []
    for i, row in enumerate(rows):
        arr = _numeric(f"p[{i}]", row, 2)
        if arr.shape[0] != n or arr.shape[1] == 0:
            raise _fail(
                f"p[{i}] has shape {arr.shape}, expected ({n}, tokens ≥ 1): one list of "
                "target-token probabilities per expert, the same length for every expert"
            )
        _check_finite("p", arr, (i,))
        _check_range("p", arr, 0.0, 1.0, "outside [0, 1]", (i,))
        out.append(arr)
    return tuple(out)


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
