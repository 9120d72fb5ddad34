"""Energy meters against recorded sensor outputs: NVML through its seam, RAPL sysfs trees in a
temp dir (with wrap-around), tegrastats text and jtop's power dict; the modelled meter; and the
choice among them."""

from __future__ import annotations

import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest

from moe2.agent.meters import (
    METERS,
    MeterFactory,
    ModelledMeter,
    Reading,
    choose_meter,
    thread_cpu_seconds,
)
from moe2.agent.meters.base import Meter, MeterError, PowerTrace
from moe2.agent.meters.jetson import (
    JtopMeter,
    TegrastatsMeter,
    jtop_total_w,
    parse_tegrastats_rails,
    total_power_w,
)
from moe2.agent.meters.nvml import NvmlMeter, NvmlNotSupported, nvml_power_limit_w
from moe2.agent.meters.rapl import RaplMeter, find_zones, wrapped_delta
from moe2.shared.costmodel import DeviceFigures
from moe2.shared.devices import MeterName, load_device_class, load_device_classes
from moe2.shared.errors import ConfigError
from moe2.shared.protocol.profiles import METER_SOURCES

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "firmware-configs"

# --- Real tegrastats lines ---------------------------------------------------------------
# AGX Orin 64GB (62780MB RAM), JetPack 5 form: rails read instant/average.
ORIN_AGX_JP5 = (
    "11-21-2025 08:49:48 RAM 13983/62780MB (lfb 424x4MB) SWAP 126/31390MB (cached 0MB) "
    "CPU [90%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,"
    "100%@2201,100%@2201,100%@2201,100%@2201] EMC_FREQ 1%@2133 GR3D_FREQ 14%@[407,407] "
    "VIC_FREQ 115 NVDLA0_FREQ @1600 APE 174 CV0@73.625C CPU@77.281C Tboard@62C SOC2@70C "
    "Tdiode@62.25C SOC0@69.531C CV1@72.5C GPU@69.125C tj@77.281C SOC1@68.968C CV2@67.25C "
    "VDD_GPU_SOC 3150mW/2971mW VDD_CPU_CV 14312mW/12415mW VIN_SYS_5V0 4968mW/5048mW "
    "VDDQ_VDD2_1V8AO 1091mW/1091mW"
)
# AGX Orin developer kit, JetPack 7 form: rails read instant/average/max.
ORIN_AGX_JP7 = (
    "07-25-2026 09:08:28 RAM 20642/62817MB (lfb 1x2MB) "
    "CPU [23%@2201,10%@2201,4%@2201,14%@2201,30%@2201,18%@2201,10%@2201,10%@2201,33%@2201,"
    "7%@2201,5%@2201,27%@2201] EMC_FREQ 3%@3199 GR3D_FREQ 12%@[1300,1300] NVENC0 off NVDEC0 off "
    "NVJPG0 off NVJPG1 off VIC off OFA off NVDLA0 off NVDLA1 off PVA0_FREQ off APE 174 "
    "cpu@52.968C/52.968C soc2@48.406C/48.406C soc0@49.531C/49.531C gpu@47.625C/47.625C "
    "VDD_GPU_SOC 5139mW/5139mW/5139mW VDD_CPU_CV 3268mW/3268mW/3268mW "
    "VIN_SYS_5V0 5500mW/5500mW/5500mW"
)
# Orin Nano: the VDD_IN input rail carries the whole module.
ORIN_NANO = (
    "10-08-2026 04:35:02 RAM 6712/7620MB (lfb 12x4MB) SWAP 369/3810MB (cached 8MB) "
    "CPU [38%@1497,2%@729,1%@729,0%@729,1%@729,0%@729] EMC_FREQ 61%@2133 "
    "GR3D_FREQ 99%@[612] NVDEC off NVJPG off VIC off OFA off APE 200 "
    "cpu@57.125C soc2@55.093C soc0@56.625C gpu@58.625C tj@58.312C soc1@55.937C "
    "VDD_IN 16321mW/11204mW VDD_CPU_GPU_CV 7104mW/4944mW VDD_SOC 3120mW/3659mW"
)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


# --------------------------------------------------------------------------- power trace


def test_power_trace_integrates_piecewise_linearly() -> None:
    trace = PowerTrace()
    for t, w in [(0.0, 10.0), (1.0, 30.0), (2.0, 30.0)]:
        trace.add(t, w)
    assert trace.energy(0.0, 2.0) == (pytest.approx(50.0), 1)  # 20 J ramp + 30 J flat
    # 0.5 s ramping 20 W -> 30 W, then 0.5 s at 30 W
    assert trace.energy(0.5, 1.5)[0] == pytest.approx(0.5 * 25 + 0.5 * 30)
    assert trace.energy(2.0, 4.0)[0] == pytest.approx(60.0)  # held after the last sample
    trace.add(1.5, 99.0)  # out of order: ignored
    assert len(trace) == 3
    with pytest.raises(MeterError, match="no power samples"):
        PowerTrace().energy(0, 1)


# --------------------------------------------------------------------------- NVML


class FakeNvml:
    """NvmlApi replaying what NVML returns (millijoules since driver load, milliwatts)."""

    def __init__(
        self, energy_mj: list[int] | None, power_mw: list[int] | None, limit_mw: int = 450_000
    ) -> None:
        self.energy: Iterator[int] | None = iter(energy_mj) if energy_mj is not None else None
        self.power: Iterator[int] | None = iter(power_mw) if power_mw is not None else None
        self.limit_mw = limit_mw
        self.closed = False

    def device_count(self) -> int:
        return 1

    def name(self, index: int) -> str:
        return "NVIDIA GeForce RTX 4090"

    def total_energy_mj(self, index: int) -> int:
        if self.energy is None:
            raise NvmlNotSupported("nvmlDeviceGetTotalEnergyConsumption")
        return next(self.energy)

    def power_mw(self, index: int) -> int:
        if self.power is None:
            raise NvmlNotSupported("nvmlDeviceGetPowerUsage")
        return next(self.power)

    def power_limit_mw(self, index: int) -> int:
        return self.limit_mw

    def close(self) -> None:
        self.closed = True


def test_nvml_energy_counter() -> None:
    clock = FakeClock()
    # probe, start, stop: 7,412,530.118 J since load, then +61.375 J over 0.25 s (245.5 W)
    api = FakeNvml(energy_mj=[7_412_530_118, 7_412_530_118, 7_412_591_493], power_mw=[])
    meter = NvmlMeter(lambda: api, clock=clock)
    assert meter.available()
    assert meter.source == "nvml-energy-counter"
    meter.start()
    clock.advance(0.25)
    reading = meter.stop()
    assert reading == Reading(61.375, 0.25, "nvml-energy-counter", "gpu-board", 2, "gpus 0")
    assert reading.watts == pytest.approx(245.5)
    meter.close()
    assert api.closed


def test_nvml_falls_back_to_sampled_power() -> None:
    clock = FakeClock()
    # An older driver without the counter: probe, start sample, one poll, stop sample (mW)
    api = FakeNvml(energy_mj=None, power_mw=[28_346, 100_000, 300_000, 100_000])
    meter = NvmlMeter(lambda: api, period_s=3600, clock=clock)  # the poller never fires here
    assert meter.available()
    assert meter.source == "nvml-power-sampled"
    meter.start()  # 100 W at t0
    clock.advance(1.0)
    meter.sample()  # 300 W at t0 + 1
    clock.advance(1.0)
    reading = meter.stop()  # 100 W at t0 + 2
    assert reading.joules == pytest.approx(400.0)  # two trapezoids of 200 J
    assert reading.source == "nvml-power-sampled"
    assert reading.measured
    meter.close()


def test_nvml_on_jetson_orin_is_unavailable() -> None:
    # Orin's NVML answers NotSupported for both the counter and power.
    api = FakeNvml(energy_mj=None, power_mw=None)
    meter = NvmlMeter(lambda: api)
    assert not meter.available()
    assert api.closed


def test_nvml_without_a_driver_is_unavailable() -> None:
    def no_driver() -> FakeNvml:
        raise MeterError("NVML cannot start: Driver Not Loaded")

    assert not NvmlMeter(no_driver).available()
    assert nvml_power_limit_w(no_driver) is None
    assert nvml_power_limit_w(lambda: FakeNvml([], [], limit_mw=350_000)) == 350.0


# --------------------------------------------------------------------------- RAPL

# Real max_energy_range_uj values of an Intel package and its DRAM domain.
PKG_RANGE = 262_143_328_850
DRAM_RANGE = 65_712_999_613


def _zone(path: Path, name: str, energy: int, max_range: int) -> Path:
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy}\n")
    (path / "max_energy_range_uj").write_text(f"{max_range}\n")
    return path


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    root = tmp_path / "powercap"
    pkg = _zone(root / "intel-rapl:0", "package-0", 41_802_113_764, PKG_RANGE)
    _zone(pkg / "intel-rapl:0:0", "core", 12_000_000_000, PKG_RANGE)  # inside the package
    _zone(pkg / "intel-rapl:0:1", "dram", 7_220_441_205, DRAM_RANGE)
    _zone(root / "intel-rapl:1", "psys", 99_000_000_000, PKG_RANGE)  # overlaps: left out
    _zone(root / "intel-rapl-mmio:0", "package-0", 5, PKG_RANGE)  # same counter again
    (root / "intel-rapl").mkdir()  # the control-type directory itself
    return root


def _set(path: Path, value: int) -> None:
    (path / "energy_uj").write_text(f"{value}\n")


def test_rapl_sums_package_and_dram(powercap: Path) -> None:
    zones = find_zones(powercap)
    assert [z.name for z in zones] == ["package-0@intel-rapl:0", "dram@intel-rapl:0:1"]
    clock = FakeClock()
    meter = RaplMeter(powercap, poll_s=0, clock=clock)
    assert meter.available()
    meter.start()
    _set(powercap / "intel-rapl:0", 41_802_113_764 + 12_500_000)  # +12.5 J
    _set(powercap / "intel-rapl:0" / "intel-rapl:0:1", 7_220_441_205 + 1_500_000)  # +1.5 J
    clock.advance(0.5)
    reading = meter.stop()
    assert reading.joules == pytest.approx(14.0)
    assert reading.seconds == pytest.approx(0.5)
    assert (reading.source, reading.scope) == ("rapl", "cpu-package+dram")
    assert "package-0" in reading.detail and "dram" in reading.detail


def test_rapl_counter_wrap_around(powercap: Path) -> None:
    pkg = powercap / "intel-rapl:0"
    _set(pkg, PKG_RANGE - 2_000_000)  # 2 J before the wrap
    meter = RaplMeter(powercap, poll_s=0, clock=FakeClock())
    meter.start()
    _set(pkg, 3_000_000)  # wrapped, then 3 J more
    assert meter.stop().joules == pytest.approx(5.0)
    assert wrapped_delta(PKG_RANGE - 10, 5, PKG_RANGE) == 15


def test_rapl_counts_several_wraps_when_polled(powercap: Path) -> None:
    pkg = powercap / "intel-rapl:0"
    meter = RaplMeter(powercap, poll_s=0, clock=FakeClock())
    _set(pkg, 0)
    meter.start()
    for _ in range(3):  # three full laps, each seen by a poll half-way round
        _set(pkg, PKG_RANGE // 2)
        meter._accumulate()
        _set(pkg, 0)
        meter._accumulate()
    assert meter.stop().joules == pytest.approx(3 * PKG_RANGE / 1e6)


def test_rapl_unreadable_or_absent_is_unavailable(tmp_path: Path, powercap: Path) -> None:
    assert not RaplMeter(tmp_path / "nowhere").available()
    (powercap / "intel-rapl:0" / "energy_uj").unlink()  # as when only root may read it
    assert not RaplMeter(powercap).available()


# --------------------------------------------------------------------------- Jetson


def test_tegrastats_lines_give_the_module_power() -> None:
    rails = parse_tegrastats_rails(ORIN_AGX_JP5)
    assert rails == {
        "VDD_GPU_SOC": 3150,
        "VDD_CPU_CV": 14312,
        "VIN_SYS_5V0": 4968,
        "VDDQ_VDD2_1V8AO": 1091,
    }
    # AGX Orin has no input rail: the rails are summed (as jtop does)
    assert total_power_w(rails) == (
        pytest.approx(23.521),
        "VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0+VDDQ_VDD2_1V8AO",
    )
    jp7 = total_power_w(parse_tegrastats_rails(ORIN_AGX_JP7))
    assert jp7 == (pytest.approx(13.907), "VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0")
    # Orin Nano: VDD_IN is the total; its sub-rails are not added again
    assert total_power_w(parse_tegrastats_rails(ORIN_NANO)) == (pytest.approx(16.321), "VDD_IN")
    assert total_power_w(parse_tegrastats_rails("RAM 100/1000MB CPU [1%@729]")) is None


def _fake_tegrastats(lines: list[str], period_s: float = 0.02) -> list[str]:
    """A process that prints the recorded lines over and over, like tegrastats does."""
    code = textwrap.dedent(f"""
        import itertools, sys, time
        for line in itertools.cycle({lines!r}):
            print(line, flush=True)
            time.sleep({period_s})
    """)
    return [sys.executable, "-u", "-c", code]


def test_tegrastats_meter_integrates_the_printed_power() -> None:
    meter = TegrastatsMeter(_fake_tegrastats([ORIN_AGX_JP7]), period_s=0.02)
    try:
        assert meter.available()
        meter.start()
        time.sleep(0.2)
        reading = meter.stop()
    finally:
        meter.close()
    assert reading.source == "tegrastats" and reading.measured
    assert reading.watts == pytest.approx(13.907)
    assert reading.samples >= 3
    assert "VDD_GPU_SOC" in reading.detail


def test_tegrastats_without_power_rails_is_unavailable() -> None:
    meter = TegrastatsMeter(
        _fake_tegrastats(["RAM 100/1000MB CPU [1%@729]"]), first_line_timeout_s=0.5
    )
    assert not meter.available()
    assert not TegrastatsMeter(["/nonexistent/tegrastats"]).available()


class FakeJtop:
    """jtop's ``power`` dict (jetson-stats 4.x shape), rail values from ORIN_AGX_JP7."""

    def __init__(self, totals_mw: list[int]) -> None:
        self.totals = iter(totals_mw)
        self.closed = False

    @property
    def power(self) -> dict:
        rails = {
            name: {
                "volt": 19_000,
                "curr": mw * 1000 // 19_000,
                "power": mw,
                "avg": mw,
                "online": True,
                "type": "I2C",
            }
            for name, mw in parse_tegrastats_rails(ORIN_AGX_JP7).items()
        }
        total = next(self.totals)
        return {"rail": rails, "tot": {"power": total, "avg": total}}

    def close(self) -> None:
        self.closed = True


def test_jtop_meter_integrates_the_total() -> None:
    clock = FakeClock()
    handle = FakeJtop([13_907, 10_000, 30_000])  # probe, start, stop
    meter = JtopMeter(lambda: handle, period_s=3600, clock=clock)
    assert meter.available()
    meter.start()
    clock.advance(2.0)
    reading = meter.stop()
    assert reading.joules == pytest.approx(40.0)  # (10 W + 30 W) / 2 over 2 s
    assert (reading.source, reading.scope) == ("jtop", "module")
    assert "VDD_CPU_CV" in reading.detail
    meter.close()
    assert handle.closed
    with pytest.raises(MeterError, match="no total"):
        jtop_total_w({"rail": {}, "tot": {}})


def test_jtop_without_its_service_is_unavailable() -> None:
    def no_service() -> FakeJtop:
        raise MeterError("jtop cannot connect to its service")

    assert not JtopMeter(no_service).available()


# --------------------------------------------------------------------------- modelled

FIGURES = DeviceFigures(
    compute_flops_per_s=1e12, memory_bytes_per_s=1e11, idle_power_w=9, peak_power_w=60
)


def test_modelled_meter_is_never_labelled_measured() -> None:
    clock = FakeClock()
    meter = ModelledMeter(FIGURES, label="orin-agx-64gb/MAXN", clock=clock)
    assert meter.available()
    meter.start()
    clock.advance(2.5)
    reading = meter.stop()
    assert reading.joules == pytest.approx(150.0)  # 2.5 s x 60 W
    assert reading.source == "modelled"
    assert not reading.measured
    assert "orin-agx-64gb/MAXN" in reading.detail
    with pytest.raises(MeterError):
        meter.stop()


def _charged(meter: ModelledMeter, work: Any) -> Reading:
    meter.start()
    work()
    return meter.stop()


def test_a_modelled_meter_on_a_cpu_charges_the_model_threads_cpu_time() -> None:
    """Experts sharing cores stretch each other's wall time; a modelled meter charges the
    time the measuring thread was on a core, so neither waiting nor another thread's work
    is charged, and the same work costs the same joules with or without competition."""
    device = load_device_class("cpu-generic")
    meter = choose_meter(device, prefer="modelled")
    assert isinstance(meter, ModelledMeter) and meter.model_clock is thread_cpu_seconds
    watts = device.figures().peak_power_w

    # Waiting (here: sleeping) is no work of this thread's: nearly nothing is charged.
    slept = _charged(meter, lambda: time.sleep(0.05))
    assert slept.seconds < 0.01 and slept.joules == pytest.approx(slept.seconds * watts)
    assert "cpu s" in slept.detail

    # A busy-loop thread's CPU time is its own, not the measuring thread's.
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    spinners = [threading.Thread(target=spin, daemon=True) for _ in range(2)]
    for t in spinners:
        t.start()
    try:
        beside = _charged(meter, lambda: stop.wait(0.1))
        assert beside.seconds < 0.01

        def work() -> None:  # pure Python: it holds a core only while it runs
            sum(i * i for i in range(300_000))

        contended = min(_charged(meter, work).joules for _ in range(3))
    finally:
        stop.set()
        for t in spinners:
            t.join()
    alone = min(_charged(meter, work).joules for _ in range(3))
    # the CPU time of the same work, whatever else ran (its wall time is not looked at)
    assert contended == pytest.approx(alone, rel=0.5)


def test_a_gpu_class_without_a_power_reading_charges_wall_time() -> None:
    device = load_device_class("rtx4090")
    meter = METERS["modelled"](device, None)
    assert isinstance(meter, ModelledMeter) and meter.model_clock is not thread_cpu_seconds


# --------------------------------------------------------------------------- choosing


class Scripted(Meter):
    def __init__(self, source: str, ok: bool, log: list[str]) -> None:
        self.source = source  # type: ignore[assignment]
        self.ok = ok
        self.log = log

    def available(self) -> bool:
        self.log.append(f"probe {self.source}")
        return self.ok

    def start(self) -> None: ...

    def stop(self) -> Reading:
        return Reading(0, 0, self.source, "test")

    def close(self) -> None:
        self.log.append(f"close {self.source}")


def test_choose_meter_takes_the_first_available_in_file_order() -> None:
    rtx = load_device_class("rtx4090", REPO_CONFIGS)
    log: list[str] = []
    registry = {
        "nvml": lambda d, m: Scripted("nvml-energy-counter", False, log),
        "rapl": lambda d, m: Scripted("rapl", True, log),
        "modelled": METERS["modelled"],
    }
    meter = choose_meter(rtx, registry=registry)
    assert meter.source == "rapl"
    assert log == ["probe nvml-energy-counter", "close nvml-energy-counter", "probe rapl"]
    with pytest.raises(ConfigError, match="unknown energy meter 'geiger'"):
        choose_meter(rtx, prefer="geiger", registry=registry)
    with pytest.raises(ConfigError, match="'nvml' is not available"):
        choose_meter(rtx, prefer="nvml", registry=registry)


def test_modelled_is_the_last_resort_with_the_modes_figures() -> None:
    orin = load_device_class("orin-agx-64gb", REPO_CONFIGS)
    registry: dict[str, MeterFactory] = {
        name: (lambda d, m: Scripted("jtop", False, [])) for name in ("jtop", "tegrastats")
    }
    registry["modelled"] = METERS["modelled"]
    meter = choose_meter(orin, "15W", registry=registry)
    assert isinstance(meter, ModelledMeter)
    assert meter.figures == orin.figures("15W")


def test_every_meter_a_file_names_exists() -> None:
    assert set(METERS) == set(get_args(MeterName))
    for device in load_device_classes(REPO_CONFIGS).values():
        assert set(device.meters) <= set(METERS)
    # Every source a meter can report is one the protocol accepts.
    sources = {
        "nvml-energy-counter",
        "nvml-power-sampled",
        "jtop",
        "tegrastats",
        "rapl",
        "modelled",
    }
    assert sources == set(METER_SOURCES)


def test_this_machine_gets_a_meter_that_says_what_it_is() -> None:
    # Whatever this box has, the chosen meter's readings carry its own label.
    meter = choose_meter(load_device_class("cpu-generic", REPO_CONFIGS))
    try:
        meter.start()
        reading = meter.stop()
    finally:
        meter.close()
    assert reading.source == meter.source
    assert reading.measured == (meter.source != "modelled")
