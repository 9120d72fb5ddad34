"""No measurement: energy from the device class's figures, labelled ``modelled``.

While the model runs on this box its time is measured; only the power is unknown, so a
reading is ``seconds x peak_power_w`` of the class's figures for the mode (the box is busy for
the whole interval; peak errs on the side of keeping an energy budget). Which seconds: where
the model computes on a CPU, the CPU time of the thread that runs it (``thread_cpu_seconds``,
read on that thread), not the wall time: experts sharing cores stretch each other's wall time
while waiting for a core, and that waiting draws no busy power of theirs. (llama.cpp's threads
work in lockstep, so the calling thread's CPU time is the time the model computed.) Where a
GPU does the work the calling thread mostly waits for it, so there the clock is wall time.
The class's kind gives the default; the agent, which knows where its model runs, decides
(``SelfProfiler``).
When nothing runs at all, ``moe2.shared.costmodel`` estimates delay and energy from eq. 4
(see ``moe2.agent.profiler.estimate_profile``).
"""

from __future__ import annotations

import time

from moe2.agent.meters.base import Clock, Meter, MeterError, Reading
from moe2.shared.costmodel import DeviceFigures


def thread_cpu_seconds() -> float:
    """CPU seconds of the calling thread (CLOCK_THREAD_CPUTIME_ID): time it spent on a core,
    none of the time it waited for one."""
    return time.thread_time()


class ModelledMeter(Meter):
    source = "modelled"
    scope = "device-figures"

    def __init__(self, figures: DeviceFigures, *, label: str = "", clock: Clock = time.monotonic):
        self.figures = figures
        self.label = label  # "<device class>/<mode>", for the reading's detail
        self.clock = clock  # the seconds charged: wall, or thread_cpu_seconds on a CPU box
        self.model_clock = clock  # a request's model time, read the same way
        self._t0: float | None = None

    @property
    def watts(self) -> float:
        """Joules per second of model time."""
        return self.figures.peak_power_w

    def available(self) -> bool:
        return True

    def start(self) -> None:
        self._t0 = self.clock()

    def stop(self) -> Reading:
        if self._t0 is None:
            raise MeterError("stop() without start()")
        seconds = self.clock() - self._t0
        self._t0 = None
        watts = self.watts
        kind = "cpu s" if self.clock is thread_cpu_seconds else "s"
        detail = f"{seconds:.6f} {kind} x peak_power_w {watts:g} W of {self.label or 'the figures'}"
        # The label is fixed here, not taken from an attribute a subclass could change.
        return Reading(seconds * watts, seconds, "modelled", self.scope, 0, detail)
