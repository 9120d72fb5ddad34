"""Where the model runs: llama.cpp's load log and ggml's devices turned into the placement the
agent announces, and the start-up check. No GPU here: the CUDA and Jetson cases are recorded
llama.cpp load logs (the lines llama.cpp b6xxx prints, as llama-cpp-python 0.3.x bundles it);
the CPU case is checked live on this machine's build."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend
from moe2.agent.offload import (
    BackendDevice,
    check_offload,
    describe,
    parse_load_log,
)
from moe2.shared.errors import ConfigError

# An RTX 4090 box, SmolLM2-135M (30 repeating layers + the output layer), n_gpu_layers=-1.
CUDA_LOG = (
    "llama_model_load_from_file_impl: using device CUDA0 (NVIDIA GeForce RTX 4090) "
    "(0000:01:00.0) - 23010 MiB free\n"
) + """\
llama_model_loader: loaded meta data with 33 key-value pairs and 273 tensors
load_tensors: loading model tensors, this can take a while... (mmap = true)
""" + "".join(
    f"load_tensors: layer {i:3d} assigned to device CUDA0, is_swa = 0\n" for i in range(31)
) + """\
load_tensors: offloading 30 repeating layers to GPU
load_tensors: offloading output layer to GPU
load_tensors: offloaded 31/31 layers to GPU
load_tensors:        CUDA0 model buffer size =    92.10 MiB
load_tensors:   CPU_Mapped model buffer size =    11.81 MiB
"""

# A Jetson AGX Orin, Qwen2.5-Coder-0.5B (24 + 1 layers), n_gpu_layers=12: a partial offload.
JETSON_LOG = """\
llama_model_load_from_file_impl: using device CUDA0 (Orin) (0000:00:00.0) - 54213 MiB free
""" + "".join(
    f"load_tensors: layer {i:3d} assigned to device {'CUDA0' if i >= 13 else 'CPU'}, is_swa = 0\n"
    for i in range(25)
) + """\
load_tensors: offloading 12 repeating layers to GPU
load_tensors: offloaded 12/25 layers to GPU
load_tensors:        CUDA0 model buffer size =   171.37 MiB
load_tensors:   CPU_Mapped model buffer size =   291.08 MiB
"""

# A CPU-only wheel asked for every layer (the case issue 14 found silent): no "offloaded"
# line, every layer on the CPU.
CPU_WHEEL_LOG = "".join(
    f"load_tensors: layer {i:3d} assigned to device CPU, is_swa = 0\n" for i in range(31)
) + "load_tensors:   CPU_Mapped model buffer size =    92.10 MiB\n"

CPU = BackendDevice("CPU", "AMD EPYC", "cpu", 25 << 30, 25 << 30)
RTX = BackendDevice("CUDA0", "NVIDIA GeForce RTX 4090", "gpu", 23010 << 20, 24564 << 20)


def test_cuda_load_log_all_layers() -> None:
    load = parse_load_log(CUDA_LOG)
    assert (load.offloaded, load.offloadable, load.gpu_layers) == (31, 31, 31)
    off = describe(load, [CPU, RTX], n_layer=30, requested=-1, supports_gpu_offload=True)
    assert off.backend == "CUDA" and off.on_gpu
    assert (off.gpu_layers, off.n_layers, off.requested_layers) == (31, 31, 31)
    assert off.vram_bytes == int(92.10 * 2**20)
    check_offload(off, required=True)  # what was asked happened


def test_jetson_partial_offload_counts_assigned_layers() -> None:
    load = parse_load_log(JETSON_LOG)
    assert load.gpu_layers == 12
    off = describe(load, [], n_layer=24, requested=12, supports_gpu_offload=True)
    assert off.backend == "CUDA" and off.gpu_layers == 12 and off.n_layers == 25
    # ggml's device list was unavailable: the device llama.cpp logged stands in for it
    assert [d.description for d in off.devices] == ["Orin"]
    check_offload(off, required=True)


def test_cpu_only_wheel_on_a_gpu_box_refuses_to_start() -> None:
    off = describe(parse_load_log(CPU_WHEEL_LOG), [CPU], 30, -1, supports_gpu_offload=False)
    assert off.backend == "CPU" and off.gpu_layers == 0 and off.requested_layers == 31
    with pytest.raises(ConfigError, match=r"without GPU support.*DGGML_CUDA=on"):
        check_offload(off, required=True)
    check_offload(off, required=False)  # warns only


def test_fewer_layers_than_asked_on_a_gpu_build() -> None:
    off = describe(parse_load_log(JETSON_LOG), [CPU], 24, -1, supports_gpu_offload=True)
    with pytest.raises(ConfigError, match=r"12 do: llama\.cpp placed fewer"):
        check_offload(off, required=True)


def test_gpu_by_default_only_where_the_device_class_has_one(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert AgentConfig(model=model, device_class="rtx4090").gpu_layers() == -1
    assert AgentConfig(model=model, device_class="orin-agx-64gb").gpu_layers() == -1
    assert AgentConfig(model=model, device_class="cpu-generic").gpu_layers() == 0
    assert AgentConfig(model=model, device_class="rtx4090", n_gpu_layers=8).gpu_layers() == 8


def test_live_cpu_build_reports_cpu(tiny_models: dict[str, Path]) -> None:
    """This machine's CPU build: placement read from the real load log and ggml devices."""
    b = LlamaCppBackend(AgentConfig(model=tiny_models["animals"], n_threads=1))
    try:
        off = b.offload
        assert off is not None and off.backend == "CPU" and off.gpu_layers == 0
        assert off.n_layers >= 2 and off.requested_layers == 0
        assert any(d.kind == "cpu" for d in off.devices)
    finally:
        b.close()
    # Asking for the GPU on a CPU-only build fails at start, with the fix in the message.
    with pytest.raises(ConfigError, match="n_gpu_layers = 0"):
        LlamaCppBackend(AgentConfig(model=tiny_models["animals"], n_threads=1, n_gpu_layers=-1))
    relaxed = LlamaCppBackend(
        AgentConfig(
            model=tiny_models["animals"], n_threads=1, n_gpu_layers=-1, require_gpu_offload=False
        )
    )
    assert relaxed.offload is not None and relaxed.offload.gpu_layers == 0
    relaxed.close()
