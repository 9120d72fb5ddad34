"""Device classes: the firmware-configs/ data files, loaded, validated and detected.

One YAML file per class (``orin-agx-64gb.yaml``, ``rtx4090.yaml``, ``cpu-generic.yaml``) holds
the hardware figures the cost model needs per power mode and the settings ansible applies.

    device = load_device_class("orin-agx-64gb")
    device.figures("30W").memory_bytes_per_s      # 2.048e11
    detect_device_class().device_class            # "cpu-generic" on a plain PC
    resolve_device_class("auto")                  # (DeviceClass, "detected (...)")

The folder is ``$MOE2_FIRMWARE_CONFIGS`` when set, else the files shipped inside this package
(``moe2/shared/firmware_configs``; the repository's top-level ``firmware-configs`` links there,
so a copy of ``shared/`` alone builds a complete distribution).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moe2.shared.costmodel import DeviceFigures
from moe2.shared.errors import ConfigError
from moe2.shared.protocol.base import NAME_PATTERN, describe_error

log = logging.getLogger(__name__)

ENV_VAR = "MOE2_FIRMWARE_CONFIGS"
_PACKAGED = Path(__file__).resolve().parent / "firmware_configs"
_CHECKOUT = Path(__file__).resolve().parents[3] / "firmware-configs"

# Meter names an agent knows (moe2.agent.meters.METERS); a file may list them in any order.
MeterName = Literal["nvml", "jtop", "tegrastats", "rapl", "modelled"]
DeviceKind = Literal["jetson", "nvidia-dgpu", "cpu"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PowerMode(_Strict):
    """One power setting of a class and the figures that hold in it."""

    nvpmodel_id: int | None = Field(default=None, ge=0, description="`nvpmodel -m <id>` (Jetson)")
    nvpmodel_name: str | None = Field(default=None, description="name `nvpmodel -q` prints")
    power_limit_w: float | None = Field(default=None, gt=0, description="`nvidia-smi -pl` watts")
    cpu_online_cores: int | None = Field(default=None, ge=1)
    cpu_max_mhz: float | None = Field(default=None, gt=0)
    gpu_max_mhz: float | None = Field(default=None, gt=0)
    emc_max_mhz: float | None = Field(default=None, gt=0, description="memory controller clock")
    figures: DeviceFigures


class Detect(_Strict):
    """How to recognise the class on a box; any one match is enough."""

    device_tree_compatible: list[str] = []  # exact entries of /proc/device-tree/compatible
    device_tree_model: list[str] = []  # substrings of /proc/device-tree/model
    gpu_name: list[str] = []  # substrings of an NVML device name
    fallback: bool = False  # chosen when nothing else matches (one class only)


class Apply(_Strict):
    """Box-wide settings ansible applies, whatever the mode."""

    jetson_clocks: bool | None = None  # run `jetson_clocks` after setting the mode
    gpu_persistence_mode: bool | None = None  # `nvidia-smi -pm 1`
    cpu_governor: str | None = None  # cpufreq governor for every core


class DeviceClass(_Strict):
    schema_version: Literal[1]
    device_class: str = Field(pattern=NAME_PATTERN)
    description: str
    kind: DeviceKind
    detect: Detect = Detect()
    meters: list[MeterName] = Field(min_length=1)
    apply: Apply = Apply()
    default_mode: str
    modes: dict[str, PowerMode] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> DeviceClass:
        if self.default_mode not in self.modes:
            raise ValueError(
                f"default_mode {self.default_mode!r} is not one of the modes: "
                f"{', '.join(self.modes)}"
            )
        if self.meters[-1] != "modelled":
            raise ValueError("meters must end with 'modelled', the fallback that always works")
        for name, mode in self.modes.items():
            if self.kind == "jetson" and mode.nvpmodel_id is None:
                raise ValueError(f"mode {name!r}: a jetson mode needs nvpmodel_id")
            if self.kind == "nvidia-dgpu" and mode.power_limit_w is None:
                raise ValueError(f"mode {name!r}: an nvidia-dgpu mode needs power_limit_w")
        return self

    def mode(self, name: str | None = None) -> PowerMode:
        """The named mode (the default when None); ConfigError names the valid ones."""
        key = self.default_mode if name is None else name
        try:
            return self.modes[key]
        except KeyError:
            raise ConfigError(
                f"device class {self.device_class!r} has no power mode {key!r}; "
                f"expected one of: {', '.join(self.modes)}"
            ) from None

    def figures(self, mode: str | None = None) -> DeviceFigures:
        return self.mode(mode).figures

    def mode_for_nvpmodel(self, mode_id: int | None, name: str | None = None) -> str | None:
        """The mode key for what ``nvpmodel -q`` reports (by id, else by name)."""
        for key, mode in self.modes.items():
            if mode_id is not None and mode.nvpmodel_id == mode_id:
                return key
        for key, mode in self.modes.items():
            if name is not None and name in (mode.nvpmodel_name, key):
                return key
        return None

    def mode_for_power_limit(self, watts: float, tolerance_w: float = 1.0) -> str | None:
        """The mode whose power limit is within ``tolerance_w`` of ``watts``."""
        for key, mode in self.modes.items():
            if mode.power_limit_w is not None and abs(mode.power_limit_w - watts) <= tolerance_w:
                return key
        return None


# --------------------------------------------------------------------------- loading


def firmware_configs_dir() -> Path:
    """Where the device class files are: $MOE2_FIRMWARE_CONFIGS, else the packaged copy."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env)
        if not path.is_dir():
            raise ConfigError(f"{ENV_VAR}={env} is not a directory")
        return path
    for path in (_PACKAGED, _CHECKOUT):
        if path.is_dir():
            return path
    raise ConfigError(
        f"no firmware-configs folder: set {ENV_VAR}, or reinstall moe2-edge-shared "
        f"(it ships the files in {_PACKAGED})"
    )


def load_device_file(path: Path) -> DeviceClass:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"device class file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"device class file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"device class file {path} must hold a mapping at the top level")
    try:
        device = DeviceClass.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid device class file {path}: {describe_error(exc)}") from None
    if device.device_class != path.stem:
        raise ConfigError(
            f"{path}: device_class {device.device_class!r} must equal the file name {path.stem!r}"
        )
    return device


def load_device_classes(directory: Path | None = None) -> dict[str, DeviceClass]:
    """Every ``*.yaml`` class in the folder, by name."""
    folder = directory or firmware_configs_dir()
    classes = {p.stem: load_device_file(p) for p in sorted(folder.glob("*.yaml"))}
    if not classes:
        raise ConfigError(f"no device class files (*.yaml) in {folder}")
    fallbacks = [name for name, c in classes.items() if c.detect.fallback]
    if len(fallbacks) > 1:
        raise ConfigError(f"only one device class may be the fallback, got {', '.join(fallbacks)}")
    return classes


def load_device_class(name: str, directory: Path | None = None) -> DeviceClass:
    folder = directory or firmware_configs_dir()
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(
            f"unknown device class {name!r}; expected one of: {', '.join(known)} (in {folder})"
        )
    return load_device_file(path)


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Detection:
    device_class: str
    evidence: str  # what was seen, for logs and the agent's announcement


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return None


def nvml_gpu_names() -> list[str]:
    """Names of the NVIDIA GPUs NVML sees; empty without a driver or nvidia-ml-py."""
    try:
        import pynvml  # nvidia-ml-py, optional
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        names = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        return names
    except pynvml.NVMLError:
        return []
    finally:
        pynvml.nvmlShutdown()


def detect_device_class(
    classes: Mapping[str, DeviceClass] | None = None,
    *,
    root: Path = Path("/"),
    gpu_names: Callable[[], list[str]] = nvml_gpu_names,
) -> Detection:
    """The class of this machine: a Jetson by its device tree, an NVIDIA GPU by its NVML name,
    else the fallback class. A recognised Jetson or GPU that no file describes is an error
    (using a CPU box's figures for it would be silently wrong)."""
    known = dict(classes) if classes is not None else load_device_classes()
    dt = root / "proc" / "device-tree"
    model = (_read(dt / "model") or "").replace("\x00", "").strip()
    compatible = [c for c in (_read(dt / "compatible") or "").split("\x00") if c]
    tegra_release = (root / "etc" / "nv_tegra_release").is_file()
    is_jetson = (
        tegra_release
        or "jetson" in model.lower()
        or any(c.startswith("nvidia,tegra") for c in compatible)
    )

    if is_jetson:
        for name, device in known.items():
            rules = device.detect
            if set(rules.device_tree_compatible) & set(compatible) or any(
                s in model for s in rules.device_tree_model
            ):
                return Detection(name, f"device tree model {model!r}, compatible {compatible}")
        raise ConfigError(
            f"this is a Jetson ({model or 'model unknown'}; compatible {compatible}) but no "
            f"device class file matches it; set device_class to one of: {', '.join(known)}"
        )

    names = gpu_names()
    for gpu in names:
        for name, device in known.items():
            if any(s in gpu for s in device.detect.gpu_name):
                return Detection(name, f"NVML GPU {gpu!r}")
    if names:
        raise ConfigError(
            f"NVIDIA GPU(s) {names} match no device class file; set device_class to one of: "
            f"{', '.join(known)}"
        )

    for name, device in known.items():
        if device.detect.fallback:
            return Detection(name, "no Jetson device tree and no NVIDIA GPU")
    raise ConfigError(f"no device class is marked as the fallback among: {', '.join(known)}")


def resolve_device_class(name: str, directory: Path | None = None) -> tuple[DeviceClass, str]:
    """The class an agent is told, or with ``"auto"`` the one detected here; with how it was
    chosen, for the log. ConfigError names the valid classes."""
    if name != "auto":
        return load_device_class(name, directory), "configured"
    classes = load_device_classes(directory)
    found = detect_device_class(classes)
    return classes[found.device_class], f"detected ({found.evidence})"


# --------------------------------------------------------------------------- power mode

_NVPMODEL_NAME = re.compile(r"NV Power Mode:\s*(\S+)")


def parse_nvpmodel_query(text: str) -> tuple[str | None, int | None]:
    """(name, id) from ``nvpmodel -q`` output ("NV Power Mode: MAXN" then the id line)."""
    m = _NVPMODEL_NAME.search(text)
    name = m.group(1) if m else None
    mode_id = None
    for line in text.splitlines():
        if line.strip().isdigit():
            mode_id = int(line.strip())
            break
    return name, mode_id


def _run_nvpmodel() -> str | None:
    try:
        out = subprocess.run(
            ["nvpmodel", "-q"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def jetson_power_mode(
    device: DeviceClass, query: Callable[[], str | None] = _run_nvpmodel
) -> str | None:
    """The current nvpmodel mode of a Jetson as a key of ``device.modes`` (None if unknown)."""
    text = query()
    if text is None:
        return None
    name, mode_id = parse_nvpmodel_query(text)
    return device.mode_for_nvpmodel(mode_id, name)
