"""No measurement: energy from the device class's figures, labelled ``modelled``.

While the model runs on this box its delay is measured by the clock; only the power is
unknown, so a reading is ``seconds x peak_power_w`` of the class's figures for the mode (the
box is busy for the whole interval; peak errs on the side of keeping an energy budget).
When nothing runs at all, ``moe2.shared.costmodel`` estimates delay and energy from eq. 4
(see ``moe2.agent.profiler.estimate_profile``).
"""

from __future__ import annotations

import time

from moe2.agent.meters.base import Clock, Meter, MeterError, Reading
from moe2.shared.costmodel import DeviceFigures


class ModelledMeter(Meter):
    source = "modelled"
    scope = "device-figures"

    def __init__(self, figures: DeviceFigures, *, label: str = "", clock: Clock = time.monotonic):
        self.figures = figures
        self.label = label  # "<device class>/<mode>", for the reading's detail
        self.clock = clock
        self._t0: float | None = None

    def available(self) -> bool:
        return True

    def start(self) -> None:
        self._t0 = self.clock()

    def stop(self) -> Reading:
        if self._t0 is None:
            raise MeterError("stop() without start()")
        seconds = self.clock() - self._t0
        self._t0 = None
        watts = self.figures.peak_power_w
        detail = f"{seconds:.6f} s x peak_power_w {watts:g} W of {self.label or 'the figures'}"
        # The label is fixed here, not taken from an attribute a subclass could change.
        return Reading(seconds * watts, seconds, "modelled", self.scope, 0, detail)
