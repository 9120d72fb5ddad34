"""Jetson power: jetson-stats (``jtop``, optional) or, without it, ``tegrastats`` output.

Both report rail power in milliwatts; the total is the input rail where the board has one
(``VDD_IN`` on Orin NX/Nano and Xavier NX, ``POM_5V_IN`` on Nano/TX2), else the sum of all rails
(AGX Orin has no input rail: VDD_GPU_SOC + VDD_CPU_CV + VIN_SYS_5V0 [+ VDDQ_VDD2_1V8AO]), which
is also how jtop totals them. Carrier board and power supply losses are not seen.

A tegrastats line (AGX Orin, JetPack 5)::

    ... VDD_GPU_SOC 3150mW/2971mW VDD_CPU_CV 14312mW/12415mW VIN_SYS_5V0 4968mW/5048mW ...

Each rail reads ``instant/average`` (JetPack 7 adds ``/max``); only the instant is used: the
average runs over tegrastats' whole lifetime.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from moe2.agent.meters.base import Clock, MeterError, Reading, SampledMeter

log = logging.getLogger(__name__)

INPUT_RAILS = ("VDD_IN", "POM_5V_IN")  # a rail that carries the whole module by itself
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)mW/\d+mW")


def parse_tegrastats_rails(line: str) -> dict[str, float]:
    """Rail name -> instantaneous milliwatts in one tegrastats line."""
    return {name: float(mw) for name, mw in _RAIL.findall(line)}


def total_power_w(rails_mw: Mapping[str, float]) -> tuple[float, str] | None:
    """(total watts, rails used) from rail milliwatts; None when there are no rails."""
    for name in INPUT_RAILS:
        if name in rails_mw:
            return rails_mw[name] / 1000.0, name
    if not rails_mw:
        return None
    return sum(rails_mw.values()) / 1000.0, "+".join(rails_mw)


# --------------------------------------------------------------------------- jtop


class JtopLike(Protocol):
    """What the meter uses of ``jtop.jtop``: the latest power dict, and closing it."""

    @property
    def power(self) -> Mapping[str, Any]: ...
    def close(self) -> None: ...


def _open_jtop() -> JtopLike:
    try:
        from jtop import jtop  # jetson-stats, optional
    except ImportError:
        raise MeterError("jetson-stats is not installed (pip install jetson-stats)") from None
    handle = jtop(interval=0.1)  # seconds between the service's updates
    try:
        handle.start()  # needs the jtop service (jetson_stats.service) running
    except Exception as exc:  # jtop raises its own JtopException, and OSError on the socket
        raise MeterError(f"jtop cannot connect to its service: {exc}") from None
    return handle


def jtop_total_w(power: Mapping[str, Any]) -> tuple[float, str]:
    """(watts, rails) from jtop's ``power`` dict: {"rail": {name: {...}}, "tot": {"power": mW}}."""
    tot = power.get("tot") or {}
    if "power" not in tot:
        raise MeterError("jtop reports no total power (no INA3221 rails found)")
    rails = tot.get("name") or "+".join(power.get("rail", {}))
    return float(tot["power"]) / 1000.0, str(rails)


class JtopMeter(SampledMeter):
    source = "jtop"
    scope = "module"

    def __init__(
        self,
        open_jtop: Callable[[], JtopLike] = _open_jtop,
        *,
        period_s: float = 0.1,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(period_s, clock)
        self._open = open_jtop
        self._jtop: JtopLike | None = None
        self._rails = ""

    def available(self) -> bool:
        if self._jtop is not None:
            return True
        try:
            handle = self._open()
        except MeterError:
            return False
        try:
            _, self._rails = jtop_total_w(handle.power)
        except MeterError:
            handle.close()
            return False
        self._jtop = handle
        return True

    def read_watts(self) -> float:
        if self._jtop is None and not self.available():
            raise MeterError("jtop is not available")
        assert self._jtop is not None
        watts, self._rails = jtop_total_w(self._jtop.power)
        return watts

    def detail(self) -> str:
        return f"rails {self._rails}"

    def close(self) -> None:
        super().close()
        if self._jtop is not None:
            with contextlib.suppress(Exception):
                self._jtop.close()
            self._jtop = None


# --------------------------------------------------------------------------- tegrastats


class TegrastatsMeter(SampledMeter):
    """Runs ``tegrastats --interval <ms>`` while open and integrates the power it prints."""

    source = "tegrastats"
    scope = "module"

    def __init__(
        self,
        command: Sequence[str] | None = None,
        *,
        period_s: float = 0.1,
        first_line_timeout_s: float = 3.0,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(period_s, clock)
        self._command = list(command) if command is not None else None
        self._first_line_timeout_s = first_line_timeout_s
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._first = threading.Event()
        self._rails = ""
        self._error: str | None = None

    def _argv(self) -> list[str] | None:
        if self._command is not None:
            return self._command
        exe = shutil.which("tegrastats")
        if exe is None and os.access("/usr/bin/tegrastats", os.X_OK):  # not on a service's PATH
            exe = "/usr/bin/tegrastats"
        return [exe, "--interval", str(max(1, round(self.period_s * 1000)))] if exe else None

    def available(self) -> bool:
        if self._proc is not None and self._proc.poll() is None:
            return True
        argv = self._argv()
        if argv is None:
            return False
        try:
            self._proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1
            )
        except OSError:
            return False
        self._reader = threading.Thread(target=self._read_lines, name="tegrastats", daemon=True)
        self._reader.start()
        if not self._first.wait(self._first_line_timeout_s):
            log.info("tegrastats printed no power rails: %s", self._error or "no output")
            self.close()
            return False
        return True

    def _read_lines(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            total = total_power_w(parse_tegrastats_rails(line))
            if total is None:
                self._error = "a line without power rails"
                continue
            watts, self._rails = total
            self._last_watts = watts
            self.trace.add(self.clock(), watts)
            self._first.set()

    def read_watts(self) -> float:
        # tegrastats pushes samples to the reader thread; the latest one is the reading.
        watts = getattr(self, "_last_watts", None)
        if watts is None:
            raise MeterError("tegrastats has not printed a power sample yet")
        return float(watts)

    def start(self) -> None:
        if not self.available():
            raise MeterError("tegrastats is not available or prints no power rails")
        self._t0 = self.clock()

    def stop(self) -> Reading:
        if self._t0 is None:
            raise MeterError("stop() without start()")
        t1 = self.clock()
        joules, inside = self.trace.energy(self._t0, t1)
        seconds, self._t0 = t1 - self._t0, None
        return Reading(joules, seconds, self.source, self.scope, inside, f"rails {self._rails}")

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=2)
        if self._reader is not None:
            self._reader.join(timeout=2)  # it ends at EOF once the process is gone
            self._reader = None
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        self._first.clear()
