"""The energy-meter seam: one small ABC, the reading it returns, and sampling helpers.

    meter = choose_meter(device)          # moe2.agent.meters: first one that works here
    meter.start()
    run_the_model()
    reading = meter.stop()                # Reading(joules=3.1, seconds=0.52, source="rapl", ...)
    meter.close()

A meter is cheap to construct (no I/O); ``available()`` probes the hardware once and may keep
what it opened for the measurements that follow; ``close()`` releases it.
"""

from __future__ import annotations

import abc
import bisect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from moe2.shared.errors import Moe2Error
from moe2.shared.protocol.profiles import MeterSource

log = logging.getLogger(__name__)

Clock = Callable[[], float]  # monotonic seconds


class MeterError(Moe2Error):
    """A meter that was chosen cannot produce a reading (sensor gone, no samples...)."""

    code = "meter"


@dataclass(frozen=True)
class Reading:
    joules: float  # energy over the interval
    seconds: float  # length of the interval, by the meter's clock
    source: MeterSource  # what produced ``joules``
    scope: str  # what the energy covers: "gpu-board", "module", "cpu-package+dram"...
    samples: int = 0  # sensor readings inside the interval (2 for a counter)
    detail: str = ""  # which rails, zones or GPUs were summed

    @property
    def measured(self) -> bool:
        return self.source != "modelled"

    @property
    def watts(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else 0.0


class Meter(abc.ABC):
    source: MeterSource
    scope: str = "unknown"
    # Shortest interval the meter resolves well, seconds; the profiler stretches shorter work.
    min_window_s: float = 0.0
    # The clock a request's model time (``compute_ms``) is read from, on the thread running
    # the model: the seconds this meter's joules are of. Wall time for a meter that reads
    # power; a modelled meter on a CPU charges the model thread's CPU time instead.
    model_clock: Clock = time.perf_counter

    @abc.abstractmethod
    def available(self) -> bool:
        """Whether this meter works on this machine; never raises."""

    @abc.abstractmethod
    def start(self) -> None:
        """Begin an interval."""

    @abc.abstractmethod
    def stop(self) -> Reading:
        """End the interval begun by ``start`` and return its energy."""

    def close(self) -> None:  # noqa: B027 - most meters hold nothing to release
        """Release sensors, threads and processes."""

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- power sampling


class PowerTrace:
    """Power samples (t seconds, watts) integrated piecewise-linearly; thread-safe.

    Before the first and after the last sample, power is held constant.
    """

    def __init__(self, keep_s: float = 600.0) -> None:
        self._t: list[float] = []
        self._w: list[float] = []
        self._keep_s = keep_s  # samples older than this (relative to the newest) are dropped
        self._lock = threading.Lock()

    def add(self, t: float, watts: float) -> None:
        with self._lock:
            if self._t and t < self._t[-1]:
                return  # out of order: a late reader thread; the trace stays monotonic
            self._t.append(t)
            self._w.append(watts)
            if self._t[-1] - self._t[0] > self._keep_s:
                cut = bisect.bisect_left(self._t, self._t[-1] - self._keep_s)
                del self._t[:cut], self._w[:cut]

    def __len__(self) -> int:
        with self._lock:
            return len(self._t)

    def energy(self, t0: float, t1: float) -> tuple[float, int]:
        """(joules over [t0, t1], samples strictly inside it)."""
        if t1 < t0:
            raise ValueError(f"interval ends before it starts: {t0} > {t1}")
        with self._lock:
            ts, ws = list(self._t), list(self._w)
        if not ts:
            raise MeterError("no power samples were taken: the sensor produced nothing")
        lo = bisect.bisect_right(ts, t0)
        hi = bisect.bisect_left(ts, t1)
        xs = [t0, *ts[lo:hi], t1]
        ys = [self._at(ts, ws, t0), *ws[lo:hi], self._at(ts, ws, t1)]
        joules = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
        return joules, hi - lo

    @staticmethod
    def _at(ts: list[float], ws: list[float], t: float) -> float:
        i = bisect.bisect_left(ts, t)
        if i == 0:
            return ws[0]
        if i == len(ts):
            return ws[-1]
        t_a, t_b = ts[i - 1], ts[i]
        frac = (t - t_a) / (t_b - t_a) if t_b > t_a else 1.0
        return ws[i - 1] + frac * (ws[i] - ws[i - 1])


class Poller:
    """Calls ``fn`` every ``period_s`` on a daemon thread until stopped."""

    def __init__(self, fn: Callable[[], None], period_s: float, name: str) -> None:
        self._fn = fn
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Poller:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                self._fn()
            except Exception:  # a failing sensor read must not kill the thread silently
                log.exception("power poller %s failed", self._thread.name)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self._period_s + 1)


class SampledMeter(Meter):
    """A meter that reads instantaneous power (watts) and integrates it over the interval.

    ``read_watts`` is polled every ``period_s`` on a thread and once more at ``start`` and
    ``stop``, so an interval shorter than the period still has samples at both ends.
    """

    def __init__(self, period_s: float, clock: Clock = time.monotonic) -> None:
        self.period_s = period_s
        self.min_window_s = 5 * period_s
        self.clock = clock
        self.trace = PowerTrace()
        self._poller: Poller | None = None
        self._t0: float | None = None

    @abc.abstractmethod
    def read_watts(self) -> float:
        """Instantaneous power now, watts; raises MeterError when the sensor fails."""

    def detail(self) -> str:
        return ""

    def sample(self) -> None:
        self.trace.add(self.clock(), self.read_watts())

    def start(self) -> None:
        if self._poller is None:
            self._poller = Poller(self.sample, self.period_s, f"meter-{self.source}").start()
        self.sample()
        self._t0 = self.clock()

    def stop(self) -> Reading:
        if self._t0 is None:
            raise MeterError("stop() without start()")
        t1 = self.clock()
        self.sample()
        joules, inside = self.trace.energy(self._t0, t1)
        seconds, self._t0 = t1 - self._t0, None
        return Reading(joules, seconds, self.source, self.scope, inside + 2, self.detail())

    def close(self) -> None:
        if self._poller is not None:
            self._poller.stop()
            self._poller = None
