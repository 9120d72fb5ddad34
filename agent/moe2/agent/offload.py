"""Where the model runs: which compute backend, how many layers went to a GPU, how much VRAM.

llama.cpp says so only in its load log and through ggml's device API, neither of which
llama-cpp-python turns into values: a CPU-only wheel on an RTX 4090 loads the same model
without a word. So the agent reads both: the devices ggml reports (``ggml_backend_dev_*``,
through ctypes on the libraries llama-cpp-python ships) and the lines llama.cpp logs while
loading the weights::

    llama_model_load_from_file_impl: using device CUDA0 (NVIDIA GeForce RTX 4090) - 23010 MiB free
    load_tensors: layer   0 assigned to device CUDA0, is_swa = 0
    load_tensors: offloaded 31/31 layers to GPU
    load_tensors:        CUDA0 model buffer size =    92.10 MiB
    load_tensors:   CPU_Mapped model buffer size =    11.81 MiB

and checks at start-up that what was asked for happened (``check_offload``).
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from moe2.shared.errors import ConfigError

log = logging.getLogger(__name__)

DeviceKind = Literal["cpu", "gpu", "igpu", "accel"]
_KINDS: dict[int, DeviceKind] = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}  # ggml_backend_dev_type

_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_ASSIGNED = re.compile(r"layer\s+(\d+) assigned to device (\S+?),")
_BUFFER = re.compile(r"(\S+) model buffer size =\s+([\d.]+) MiB")
_USING = re.compile(r"using device (\S+) \((.*?)\).*?(\d+) MiB free")


@dataclass(frozen=True)
class BackendDevice:
    name: str  # ggml's name: "CPU", "CUDA0", "Metal", "Vulkan0"
    description: str  # "NVIDIA GeForce RTX 4090", "Orin", "AMD EPYC"
    kind: DeviceKind
    memory_free: int | None = None  # bytes
    memory_total: int | None = None  # bytes


@dataclass(frozen=True)
class LoadLog:
    """What llama.cpp's load log says about placement."""

    offloaded: int | None = None  # "offloaded N/M layers to GPU" (N), None: no such line
    offloadable: int | None = None  # M: repeating layers + the output layer
    assigned: dict[int, str] = field(default_factory=dict)  # layer -> device name
    buffers_mib: dict[str, float] = field(default_factory=dict)  # buffer -> MiB of weights
    using: list[BackendDevice] = field(default_factory=list)  # GPUs llama.cpp chose

    @property
    def gpu_layers(self) -> int:
        """Layers (output layer included) placed on a non-CPU device."""
        if self.assigned:
            return sum(1 for dev in self.assigned.values() if not _is_cpu(dev))
        return self.offloaded or 0


def _is_cpu(name: str) -> bool:
    return name.upper().startswith("CPU")


def parse_load_log(text: str) -> LoadLog:
    offloaded = offloadable = None
    assigned: dict[int, str] = {}
    buffers: dict[str, float] = {}
    using: list[BackendDevice] = []
    for line in text.splitlines():
        if m := _OFFLOADED.search(line):
            offloaded, offloadable = int(m.group(1)), int(m.group(2))
        elif m := _ASSIGNED.search(line):
            assigned[int(m.group(1))] = m.group(2)
        elif m := _BUFFER.search(line):
            buffers[m.group(1)] = buffers.get(m.group(1), 0.0) + float(m.group(2))
        elif m := _USING.search(line):
            using.append(BackendDevice(m.group(1), m.group(2), "gpu", int(m.group(3)) << 20, None))
    return LoadLog(offloaded, offloadable, assigned, buffers, using)


@dataclass(frozen=True)
class Offload:
    """The placement announced in the agent's info and checked at start-up."""

    backend: str  # "CPU", "CUDA", "Metal", "Vulkan"...: where the weights mostly are
    supports_gpu_offload: bool  # this llama.cpp build can offload at all
    n_layers: int  # offloadable layers: the model's repeating layers + the output layer
    gpu_layers: int  # of those, on a GPU
    requested_layers: int  # what the configuration asked for (clipped to n_layers)
    vram_bytes: int  # model weights in GPU buffers
    devices: list[BackendDevice]  # what ggml reports, CPU included

    @property
    def on_gpu(self) -> bool:
        return self.gpu_layers > 0


def describe(
    load: LoadLog,
    devices: list[BackendDevice],
    n_layer: int,
    requested: int,
    supports_gpu_offload: bool,
) -> Offload:
    """Combine the load log, the device list and the model's layer count."""
    n_layers = load.offloadable or n_layer + 1
    gpu_layers = min(load.gpu_layers, n_layers)
    gpu_buffers = {k: v for k, v in load.buffers_mib.items() if not _is_cpu(k)}
    if gpu_layers and gpu_buffers:
        biggest = max(gpu_buffers, key=lambda k: gpu_buffers[k])
        backend = re.sub(r"\d+$", "", biggest)  # "CUDA0" -> "CUDA"
    elif gpu_layers:
        backend = next((re.sub(r"\d+$", "", d.name) for d in devices if d.kind != "cpu"), "GPU")
    else:
        backend = "CPU"
    known = {d.name for d in devices}
    return Offload(
        backend=backend,
        supports_gpu_offload=supports_gpu_offload,
        n_layers=n_layers,
        gpu_layers=gpu_layers,
        requested_layers=min(requested, n_layers) if requested >= 0 else n_layers,
        vram_bytes=int(sum(gpu_buffers.values()) * (1 << 20)),
        devices=[*devices, *(d for d in load.using if d.name not in known)],
    )


def check_offload(offload: Offload, *, required: bool) -> None:
    """Raise ConfigError (or warn when not ``required``) when layers asked on a GPU are not
    there: a CPU-only llama-cpp-python build, no GPU visible, or not enough memory."""
    if offload.requested_layers == 0 or offload.gpu_layers >= offload.requested_layers:
        return
    if not offload.supports_gpu_offload:
        why = (
            "this llama-cpp-python was built without GPU support (a CPU-only wheel, or no GPU "
            'visible to it); reinstall it with CMAKE_ARGS="-DGGML_CUDA=on" (ansible does on '
            "GPU hosts)"
        )
    else:
        why = "llama.cpp placed fewer layers than asked (not enough GPU memory?)"
    message = (
        f"{offload.requested_layers} of {offload.n_layers} layers were to run on the GPU but "
        f"{offload.gpu_layers} do: {why}; set n_gpu_layers = 0 to run on the CPU on purpose"
    )
    if required:
        raise ConfigError(message)
    log.warning("%s", message)


# ---------------------------------------------------------------------------- ggml devices


def list_devices(lib_dir: Path) -> list[BackendDevice]:
    """The devices ggml reports (``ggml_backend_dev_*``); [] when the API is not there."""
    try:
        ggml = ctypes.CDLL(str(lib_dir / "libggml.so"))
        base = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
        ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
        ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        for fn in (base.ggml_backend_dev_name, base.ggml_backend_dev_description):
            fn.restype = ctypes.c_char_p
            fn.argtypes = [ctypes.c_void_p]
        base.ggml_backend_dev_type.restype = ctypes.c_int
        base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        base.ggml_backend_dev_memory.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.POINTER(ctypes.c_size_t),
        ]
    except (OSError, AttributeError) as exc:  # another build layout: the log still tells
        log.debug("ggml device API unavailable: %s", exc)
        return []
    out = []
    for i in range(int(ggml.ggml_backend_dev_count())):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(
            BackendDevice(
                name=(base.ggml_backend_dev_name(dev) or b"?").decode(),
                description=(base.ggml_backend_dev_description(dev) or b"").decode(),
                kind=_KINDS.get(int(base.ggml_backend_dev_type(dev)), "accel"),
                memory_free=int(free.value) or None,
                memory_total=int(total.value) or None,
            )
        )
    return out


class LogCapture:
    """llama.cpp's log, kept while a model loads (and passed on to Python logging at DEBUG)."""

    def __init__(self) -> None:
        self._parts: list[str] | None = None

    def __call__(self, level: int, text: bytes) -> None:
        piece = text.decode("utf-8", "replace")
        if self._parts is not None:
            self._parts.append(piece)
        if log.isEnabledFor(logging.DEBUG) and piece.strip():
            log.debug("llama.cpp: %s", piece.rstrip())

    def start(self) -> None:
        self._parts = []

    def stop(self) -> str:
        text = "".join(self._parts or [])
        self._parts = None
        return text


def device_summary(devices: Iterable[BackendDevice]) -> str:
    return ", ".join(
        f"{d.name} ({d.description}"
        + (f", {d.memory_total / 2**30:.1f} GiB" if d.memory_total and d.kind != "cpu" else "")
        + ")"
        for d in devices
    )
