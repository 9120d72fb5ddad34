"""CPU energy from Linux powercap RAPL counters (Intel, and AMD Zen through the same driver).

    /sys/class/powercap/intel-rapl:0/name                 "package-0"
    /sys/class/powercap/intel-rapl:0/energy_uj            microjoules, wraps at ...
    /sys/class/powercap/intel-rapl:0/max_energy_range_uj
    /sys/class/powercap/intel-rapl:0/intel-rapl:0:2/name  "dram" (not part of the package)

Summed: every package zone and every dram zone. Left out: core/uncore (inside the package),
psys (overlaps the packages) and intel-rapl-mmio (the same package counter again). Current
kernels make ``energy_uj`` root-only (CVE-2020-8694); without read access the meter is
unavailable. A poller reads the counters every ``poll_s`` so that an interval longer than one
wrap period still adds up.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from moe2.agent.meters.base import Clock, Meter, MeterError, Poller, Reading

DEFAULT_ROOT = Path("/sys/class/powercap")


@dataclass
class _Zone:
    name: str  # "package-0", "dram"
    energy: Path  # energy_uj
    max_range_uj: int  # the counter wraps to 0 after this value
    last_uj: int | None = None


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise MeterError(f"cannot read RAPL counter {path}: {exc}") from None


def find_zones(root: Path) -> list[_Zone]:
    """Package and dram zones under a powercap root (sorted, so readings are stable)."""
    zones: list[_Zone] = []
    for top in sorted(root.glob("intel-rapl:*")):
        if top.name.count(":") != 1:
            continue  # a subzone linked at the top level
        candidates = [top, *sorted(p for p in top.glob(f"{top.name}:*") if p.is_dir())]
        for zone in candidates:
            try:
                name = (zone / "name").read_text().strip()
            except OSError:
                continue
            if not (name.startswith("package") or name == "dram"):
                continue
            max_range = _read_int(zone / "max_energy_range_uj")
            zones.append(_Zone(f"{name}@{zone.name}", zone / "energy_uj", max_range))
    return zones


def wrapped_delta(last_uj: int, now_uj: int, max_range_uj: int) -> int:
    """Microjoules between two readings of a counter that wraps at ``max_range_uj``."""
    if now_uj >= last_uj:
        return now_uj - last_uj
    return max_range_uj - last_uj + now_uj


class RaplMeter(Meter):
    source = "rapl"
    min_window_s = 0.05  # counters update about every millisecond

    def __init__(
        self, root: Path = DEFAULT_ROOT, *, poll_s: float = 20.0, clock: Clock = time.monotonic
    ) -> None:
        self.root = root
        self.poll_s = poll_s
        self.clock = clock
        self._zones: list[_Zone] | None = None
        self._lock = threading.Lock()
        self._total_uj = 0
        self._t0: float | None = None
        self._poller: Poller | None = None

    @property
    def scope(self) -> str:  # type: ignore[override]
        dram = any(z.name.startswith("dram") for z in self._zones or [])
        return "cpu-package+dram" if dram else "cpu-package"

    def available(self) -> bool:
        if self._zones:
            return True
        try:
            zones = find_zones(self.root)
            for z in zones:
                _read_int(z.energy)
        except MeterError:
            return False
        if not zones:
            return False
        self._zones = zones
        return True

    def _accumulate(self) -> None:
        """Add every zone's progress since its last reading to the running total."""
        assert self._zones is not None
        with self._lock:
            for z in self._zones:
                now = _read_int(z.energy)
                if z.last_uj is not None:
                    self._total_uj += wrapped_delta(z.last_uj, now, z.max_range_uj)
                z.last_uj = now

    def start(self) -> None:
        if not self.available():
            raise MeterError(f"no readable RAPL package zone under {self.root}")
        with self._lock:
            for z in self._zones or []:
                z.last_uj = None
            self._total_uj = 0
        self._accumulate()
        self._t0 = self.clock()
        if self._poller is None and self.poll_s > 0:
            self._poller = Poller(self._accumulate, self.poll_s, "meter-rapl").start()

    def stop(self) -> Reading:
        if self._t0 is None:
            raise MeterError("stop() without start()")
        self._accumulate()
        seconds = self.clock() - self._t0
        self._t0 = None
        with self._lock:
            joules = self._total_uj / 1e6
        detail = "zones " + "+".join(z.name for z in self._zones or [])
        return Reading(joules, seconds, self.source, self.scope, 2, detail)

    def close(self) -> None:
        if self._poller is not None:
            self._poller.stop()
            self._poller = None
