"""Energy meters, one per way of knowing a box's energy, chosen automatically.

    device = load_device_class("rtx4090")
    with choose_meter(device) as meter:     # nvml, else rapl, else modelled
        meter.start(); work(); reading = meter.stop()
        print(reading.joules, reading.source)

The device class file lists the meters to try, best first (``meters: [jtop, tegrastats,
modelled]``); the first whose ``available()`` holds is used. ``modelled`` always is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from moe2.agent.meters.base import Meter, MeterError, Reading
from moe2.agent.meters.jetson import JtopMeter, TegrastatsMeter
from moe2.agent.meters.modelled import ModelledMeter, thread_cpu_seconds
from moe2.agent.meters.nvml import NvmlMeter
from moe2.agent.meters.rapl import RaplMeter
from moe2.shared.devices import DeviceClass
from moe2.shared.errors import ConfigError

log = logging.getLogger(__name__)

# (device class, power mode or None for the default) -> an unprobed meter
MeterFactory = Callable[[DeviceClass, "str | None"], Meter]


def _modelled(device: DeviceClass, mode: str | None) -> Meter:
    key = mode or device.default_mode
    # On a CPU box the model's own CPU time is charged (read on the model thread); where a
    # GPU computes, the wall time of the model's calls.
    clock = thread_cpu_seconds if device.kind == "cpu" else time.perf_counter
    return ModelledMeter(device.figures(key), label=f"{device.device_class}/{key}", clock=clock)


METERS: dict[str, MeterFactory] = {
    "nvml": lambda device, mode: NvmlMeter(),
    "jtop": lambda device, mode: JtopMeter(),
    "tegrastats": lambda device, mode: TegrastatsMeter(),
    "rapl": lambda device, mode: RaplMeter(),
    "modelled": _modelled,
}


def choose_meter(
    device: DeviceClass,
    mode: str | None = None,
    *,
    prefer: str | None = None,
    registry: Mapping[str, MeterFactory] | None = None,
) -> Meter:
    """The first available meter of the class's list (or exactly ``prefer``, if given)."""
    factories = METERS if registry is None else registry
    names = [prefer] if prefer is not None else list(device.meters)
    for name in names:
        if name not in factories:
            raise ConfigError(
                f"unknown energy meter {name!r}; expected one of: {', '.join(factories)}"
            )
    for name in names:
        meter = factories[name](device, mode)
        if meter.available():
            log.info("energy meter: %s (%s)", name, meter.source)
            return meter
        meter.close()
        log.info("energy meter %s is not available here", name)
    raise ConfigError(
        f"energy meter {prefer!r} is not available on this machine; the class "
        f"{device.device_class!r} lists: {', '.join(device.meters)}"
        if prefer is not None
        else f"no energy meter of {', '.join(names)} is available (modelled should always be)"
    )


__all__ = [
    "METERS",
    "JtopMeter",
    "Meter",
    "MeterError",
    "MeterFactory",
    "ModelledMeter",
    "NvmlMeter",
    "RaplMeter",
    "Reading",
    "TegrastatsMeter",
    "choose_meter",
    "thread_cpu_seconds",
]
