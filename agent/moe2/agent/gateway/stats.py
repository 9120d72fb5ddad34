"""What each application's answers really cost: per answer, eq. 8's delay as measured (the
latency less the gate's part, over the answer's steps, plus the gate once) and the energy of
the experts that answered by the one cost model (``moe2.shared.answercost``) on the tokens each
of them really evaluated, over a sliding window; published retained on
``agents/<gateway>/stats`` so the controller holds its promises against reality, figure by
figure. Failed answers are counted apart and enter no figure.

    stats = AppStatsWindow("gw-1", window_s=60)
    cost = answer_energy(profiles, {"a": Work(12, (3, 2))}, steps=3, kind=SCORED)
    stats.answered("qa", latency_s=0.4, gate_s=0.003, steps=3, energy=cost)
    stats.errored("qa")
    stats.report()                   # AppStats over the last 60 s

The gateway's own time per answer (``OwnTime``: the latency less the gate and the waits on
the experts) is kept here too, per kind of answer, and announced in its status::

    own = OwnTime()
    own.add(GENERATED, steps=12, seconds=0.004)
    own.figure()                     # GatewayOverhead(generated=<curve in T>, ...)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from moe2.shared import protocol as p
from moe2.shared.answercost import (
    GENERATED,
    SCORED,
    AnswerKind,
    Work,
    answer_cost,
    measured_delay_per_step,
)
from moe2.shared.costmodel import CostCurve, fit_curve


@dataclass(frozen=True)
class Energy:
    """An answer's joules by the cost model, and whether every profile behind them measured."""

    joules: float  # per prompt
    measured: bool


@dataclass(frozen=True)
class _Entry:
    at: float  # time.monotonic()
    app: str
    error: bool
    delay_s_per_step: float = 0.0  # eq. 8, measured
    gate_s: float = 0.0
    steps: int = 0
    energy: Energy | None = None


def answer_energy(
    profiles: Mapping[str, p.AgentProfile],
    works: Mapping[str, Work],
    steps: int,
    kind: AnswerKind,
) -> Energy | None:
    """What the experts of ``works`` spent on one answer (eqs. 10-11, per prompt), by their
    profiles; None when an expert has no profile or nothing answered."""
    if steps <= 0 or not works or any(e not in profiles for e in works):
        return None
    curves = {e: profiles[e].curves for e in works}
    cost = answer_cost(curves, works, steps=steps, kind=kind)
    return Energy(cost.energy_j, all(profiles[e].energy_measured for e in works))


class AppStatsWindow:
    def __init__(
        self, gateway_id: str, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.gateway_id = gateway_id
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: deque[_Entry] = deque()

    def answered(
        self,
        app: str,
        *,
        latency_s: float,
        gate_s: float,
        steps: int,
        energy: Energy | None,
    ) -> None:
        steps = max(1, steps)
        entry = _Entry(
            self.clock(),
            app,
            False,
            measured_delay_per_step(latency_s, gate_s, steps),
            gate_s,
            steps,
            energy,
        )
        with self._lock:
            self._entries.append(entry)
            self._expire()

    def errored(self, app: str) -> None:
        with self._lock:
            self._entries.append(_Entry(self.clock(), app, True))
            self._expire()

    def _expire(self) -> None:
        horizon = self.clock() - self.window_s
        while self._entries and self._entries[0].at < horizon:
            self._entries.popleft()

    def report(self) -> p.AppStats:
        with self._lock:
            self._expire()
            entries = list(self._entries)
        apps: dict[str, p.AppFigures] = {}
        for app in sorted({e.app for e in entries}):
            ok = [e for e in entries if e.app == app and not e.error]
            delays = np.array([e.delay_s_per_step for e in ok])
            known = [e.energy for e in ok if e.energy is not None]
            complete = bool(known) and len(known) == len(ok)
            apps[app] = p.AppFigures(
                answers=len(ok),
                errors=sum(1 for e in entries if e.app == app and e.error),
                steps=sum(e.steps for e in ok),
                delay_s_per_step=float(delays.mean()) if ok else None,
                delay_s_per_step_p95=float(np.percentile(delays, 95)) if ok else None,
                gate_s=float(np.mean([e.gate_s for e in ok])) if ok else None,
                energy_j_per_step=(
                    float(np.mean([x.joules / e.steps for e, x in zip(ok, known)]))
                    if complete
                    else None
                ),
                energy_j_per_prompt=float(np.mean([x.joules for x in known])) if complete else None,
                energy_measured=complete and all(x.measured for x in known),
            )
        return p.AppStats(
            gateway=self.gateway_id, window_s=self.window_s, apps=apps, at=time.time()
        )


class OwnTime:
    """The gateway's own seconds per answer, over its last ``window`` answers of each kind:
    a line in the answer's steps T for generated answers (fusion and sampling happen every
    step), the mean for scored ones (one fusion over the options, whatever T is)."""

    def __init__(self, window: int = 256) -> None:
        self._points: dict[AnswerKind, deque[tuple[int, float]]] = {}
        self._window = window
        self._lock = threading.Lock()

    def add(self, kind: AnswerKind, *, steps: int, seconds: float) -> None:
        with self._lock:
            points = self._points.setdefault(kind, deque(maxlen=self._window))
            points.append((max(1, steps), max(0.0, seconds)))

    def figure(self) -> p.GatewayOverhead | None:
        with self._lock:
            points = {k: list(v) for k, v in self._points.items() if v}
        if not points:
            return None
        curves = {k: _curve(v, by_steps=k == GENERATED) for k, v in points.items()}
        return p.GatewayOverhead(
            generated=curves.get(GENERATED),
            scored=curves.get(SCORED),
            answers=sum(len(v) for v in points.values()),
        )


def _curve(points: list[tuple[int, float]], *, by_steps: bool) -> CostCurve:
    xs = [float(t) for t, _ in points]
    ys = [s for _, s in points]
    if by_steps and len(set(xs)) >= 2:
        return fit_curve(xs, ys, unit="s")
    mean = float(np.mean(ys))
    std = float(np.std(ys))
    return CostCurve(
        unit="s",
        coef=[mean],
        residual_std=std,
        rel_residual_std=std / mean if mean > 0 else 0.0,
        n_points=len(ys),
        min_tokens=int(min(xs)),
        max_tokens=int(max(xs)),
    )


def overhead_moved(old: p.GatewayOverhead | None, new: p.GatewayOverhead | None) -> bool:
    """Whether ``new`` is worth announcing over ``old``: another kind measured, twice as
    many answers behind it, or a kind's figure at its typical T moved by 15% (and 20 µs)."""
    if new is None:
        return False
    if old is None or new.answers >= 2 * old.answers:
        return True
    for kind in (GENERATED, SCORED):
        a, b = getattr(old, kind), getattr(new, kind)
        if (a is None) != (b is None):
            return True
        if a is None or b is None:
            continue
        t = (b.min_tokens + b.max_tokens) / 2
        before, now = a.at(t), b.at(t)
        if abs(now - before) > max(20e-6, 0.15 * before):
            return True
    return False
