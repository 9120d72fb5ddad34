"""What each application's answers really cost: per answer, the measured delay per step and
the energy of the experts that answered (their profiles' curves at the answer's prompt length
and steps), over a sliding window; published retained on ``agents/<gateway>/stats`` so the
controller checks its promises against reality, not only against profiles.

    stats = AppStatsWindow("gw-1", window_s=60)
    stats.answered("qa", latency_s=0.4, steps=10, energy_j=3.2, energy_measured=False)
    stats.errored("qa")
    stats.report()                   # AppStats over the last 60 s
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from moe2.shared import protocol as p


@dataclass(frozen=True)
class _Entry:
    at: float  # time.monotonic()
    app: str
    error: bool
    delay_s_per_step: float = 0.0
    steps: int = 0
    energy_j_per_step: float | None = None
    energy_measured: bool = False


def answer_energy(
    profiles: Mapping[str, p.AgentProfile], prompt_tokens: Mapping[str, int], steps: int
) -> tuple[float | None, bool]:
    """(joules per step, measured?) of an answer: each expert's prompt step and decode steps
    from its profile curves (eqs. 9-11); None when an expert has no profile."""
    if steps <= 0 or not prompt_tokens:
        return None, False
    total = 0.0
    measured = True
    for expert, length in prompt_tokens.items():
        prof = profiles.get(expert)
        if prof is None:
            return None, False
        c = prof.curves
        total += c.prompt_joules.at(length) + (steps - 1) * c.token_joules.at(length)
        measured = measured and prof.energy_measured
    return total / steps, measured


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
        steps: int,
        energy_j_per_step: float | None,
        energy_measured: bool,
    ) -> None:
        entry = _Entry(
            self.clock(),
            app,
            False,
            latency_s / max(1, steps),
            steps,
            energy_j_per_step,
            energy_measured,
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
            energies = [e.energy_j_per_step for e in ok]
            known = [x for x in energies if x is not None]
            apps[app] = p.AppFigures(
                answers=len(ok),
                errors=sum(1 for e in entries if e.app == app and e.error),
                steps=sum(e.steps for e in ok),
                delay_s_per_step=float(delays.mean()) if ok else None,
                delay_s_per_step_p95=float(np.percentile(delays, 95)) if ok else None,
                energy_j_per_step=float(np.mean(known))
                if known and len(known) == len(ok)
                else None,
                energy_measured=bool(ok) and all(e.energy_measured for e in ok),
            )
        return p.AppStats(
            gateway=self.gateway_id, window_s=self.window_s, apps=apps, at=time.time()
        )
