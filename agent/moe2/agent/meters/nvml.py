"""NVIDIA GPUs through NVML (nvidia-ml-py, optional): the total-energy counter where the GPU has
one (Volta and later), else instantaneous power sampled on a thread and integrated.

Everything NVML is behind ``NvmlApi`` so tests pass recorded values. Jetson Orin answers
NotSupported for both, so this meter is unavailable there (the Jetson meters take over).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from moe2.agent.meters.base import Clock, MeterError, Reading, SampledMeter


class NvmlNotSupported(Exception):
    """NVML answered NVML_ERROR_NOT_SUPPORTED for this query on this device."""


class NvmlApi(Protocol):
    """The few NVML queries the meter makes; indices are NVML device indices."""

    def device_count(self) -> int: ...
    def name(self, index: int) -> str: ...
    def total_energy_mj(self, index: int) -> int: ...  # millijoules since the driver loaded
    def power_mw(self, index: int) -> int: ...  # milliwatts now
    def power_limit_mw(self, index: int) -> int: ...  # enforced limit, milliwatts
    def close(self) -> None: ...


class PynvmlApi:
    """``NvmlApi`` over nvidia-ml-py's ``pynvml``; raises MeterError when NVML is unusable."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError:
            raise MeterError("nvidia-ml-py is not installed (pip install nvidia-ml-py)") from None
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise MeterError(f"NVML cannot start: {exc}") from None
        self._handles: dict[int, object] = {}

    def _call(self, fn: Callable[..., int], index: int) -> int:
        nvml = self._nvml
        if index not in self._handles:
            self._handles[index] = nvml.nvmlDeviceGetHandleByIndex(index)
        try:
            return int(fn(self._handles[index]))
        except nvml.NVMLError_NotSupported:
            raise NvmlNotSupported(fn.__name__) from None
        except nvml.NVMLError as exc:
            raise MeterError(f"NVML {fn.__name__} failed on GPU {index}: {exc}") from None

    def device_count(self) -> int:
        return int(self._nvml.nvmlDeviceGetCount())

    def name(self, index: int) -> str:
        handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
        name = self._nvml.nvmlDeviceGetName(handle)
        return name.decode() if isinstance(name, bytes) else str(name)

    def total_energy_mj(self, index: int) -> int:
        return self._call(self._nvml.nvmlDeviceGetTotalEnergyConsumption, index)

    def power_mw(self, index: int) -> int:
        return self._call(self._nvml.nvmlDeviceGetPowerUsage, index)

    def power_limit_mw(self, index: int) -> int:
        return self._call(self._nvml.nvmlDeviceGetEnforcedPowerLimit, index)

    def close(self) -> None:
        self._nvml.nvmlShutdown()


class NvmlMeter(SampledMeter):
    """Energy of the GPUs in ``indices`` (default: all), summed.

    ``source`` is decided by ``available()``: "nvml-energy-counter" when every GPU has the
    counter, else "nvml-power-sampled".
    """

    scope = "gpu-board"

    def __init__(
        self,
        api_factory: Callable[[], NvmlApi] = PynvmlApi,
        indices: Sequence[int] | None = None,
        *,
        period_s: float = 0.05,  # power sampling period when there is no counter
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(period_s, clock)
        self._factory = api_factory
        self._indices = list(indices) if indices is not None else None
        self._api: NvmlApi | None = None
        self._mode: str | None = None  # "counter" or "sampled"
        self._e0: int | None = None
        self._c0: float | None = None
        self.source = "nvml-energy-counter"

    def available(self) -> bool:
        if self._api is not None:
            return True
        try:
            api = self._factory()
        except MeterError:
            return False
        try:
            indices = self._indices if self._indices is not None else range(api.device_count())
            indices = list(indices)
            if not indices:
                api.close()
                return False
            try:
                for i in indices:
                    api.total_energy_mj(i)
                mode = "counter"
            except NvmlNotSupported:
                for i in indices:
                    api.power_mw(i)  # NotSupported here too (Jetson Orin): no NVML meter
                mode = "sampled"
        except (NvmlNotSupported, MeterError):
            api.close()
            return False
        self._api, self._indices, self._mode = api, indices, mode
        self.source = "nvml-energy-counter" if mode == "counter" else "nvml-power-sampled"
        # The counter advances in steps of a few ms to tens of ms depending on the GPU.
        self.min_window_s = 0.2 if mode == "counter" else 5 * self.period_s
        return True

    def _require(self) -> tuple[NvmlApi, list[int]]:
        if self._api is None and not self.available():
            raise MeterError("no NVML GPU with an energy counter or a power sensor")
        assert self._api is not None and self._indices is not None
        return self._api, self._indices

    def read_watts(self) -> float:
        api, indices = self._require()
        try:
            return sum(api.power_mw(i) for i in indices) / 1000.0
        except NvmlNotSupported:
            raise MeterError("NVML stopped reporting power") from None

    def _energy_mj(self) -> int:
        api, indices = self._require()
        try:
            return sum(api.total_energy_mj(i) for i in indices)
        except NvmlNotSupported:
            raise MeterError("NVML stopped reporting the energy counter") from None

    def detail(self) -> str:
        return "gpus " + ",".join(str(i) for i in self._indices or [])

    def start(self) -> None:
        self._require()
        if self._mode == "sampled":
            super().start()
            return
        self._e0 = self._energy_mj()
        self._c0 = self.clock()

    def stop(self) -> Reading:
        if self._mode == "sampled":
            return super().stop()
        if self._e0 is None or self._c0 is None:
            raise MeterError("stop() without start()")
        e1, c1 = self._energy_mj(), self.clock()
        joules = (e1 - self._e0) / 1000.0  # the counter is 64-bit millijoules: no wrap
        seconds = c1 - self._c0
        self._e0 = self._c0 = None
        return Reading(joules, seconds, self.source, self.scope, 2, self.detail())

    def close(self) -> None:
        super().close()
        if self._api is not None:
            self._api.close()
            self._api = None


def nvml_power_limit_w(
    api_factory: Callable[[], NvmlApi] = PynvmlApi, index: int = 0
) -> float | None:
    """The enforced power limit of one GPU in watts (None without NVML), to name the mode."""
    try:
        api = api_factory()
    except MeterError:
        return None
    try:
        return api.power_limit_mw(index) / 1000.0
    except (NvmlNotSupported, MeterError):
        return None
    finally:
        api.close()
