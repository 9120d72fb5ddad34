"""Which ONNX Runtime providers run a trained gate, with which options, from the provider
lists onnxruntime builds report. No GPU here: the GPU lists are recorded from
onnxruntime-gpu 1.20 (an RTX 4090 PC with TensorRT 10, a Jetson AGX Orin with NVIDIA's
JetPack 6 wheel, which has no TensorRT provider); the CPU list is this machine's."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe2.agent.gateway.onnxgate import CPU, CUDA, TRT, provider_plan
from moe2.shared.errors import ConfigError

RTX_TRT = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
JETSON = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_ONLY = ["AzureExecutionProvider", "CPUExecutionProvider"]


def names(plan: list) -> list[str]:
    return [x if isinstance(x, str) else x[0] for x in plan]


def test_auto_prefers_tensorrt_with_cache_and_shape_profile(tmp_path: Path) -> None:
    plan = provider_plan(RTX_TRT, "auto", tmp_path, "embedding", 256)
    assert names(plan) == [TRT, CUDA, CPU]
    trt = dict(plan[0][1])
    assert trt["trt_engine_cache_enable"] and trt["trt_engine_cache_path"] == str(
        tmp_path / "embedding"
    )
    # batch 1, 1..max_length tokens, optimised for a typical prompt: no engine is built for
    # a new prompt length on the prompt's path
    assert trt["trt_profile_min_shapes"] == "input_ids:1x1,attention_mask:1x1"
    assert trt["trt_profile_opt_shapes"] == "input_ids:1x64,attention_mask:1x64"
    assert trt["trt_profile_max_shapes"] == "input_ids:1x256,attention_mask:1x256"
    head = provider_plan(RTX_TRT, "auto", tmp_path, "head", 256)[0][1]
    assert "trt_profile_min_shapes" not in head  # static shapes: no profile needed
    short = provider_plan(RTX_TRT, "auto", tmp_path, "embedding", 32)[0][1]
    assert short["trt_profile_opt_shapes"] == "input_ids:1x32,attention_mask:1x32"


def test_jetson_and_cpu_lists(tmp_path: Path) -> None:
    assert names(provider_plan(JETSON, "auto", tmp_path, "embedding", 256)) == [CUDA, CPU]
    assert names(provider_plan(CPU_ONLY, "auto", tmp_path, "embedding", 256)) == [CPU]
    assert names(provider_plan(RTX_TRT, "cuda", tmp_path, "embedding", 256)) == [CUDA, CPU]
    assert names(provider_plan(RTX_TRT, "cpu", tmp_path, "embedding", 256)) == [CPU]


def test_asking_for_a_provider_the_build_lacks_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"moe2-edge-agent\[tensorrt\]"):
        provider_plan(JETSON, "tensorrt", tmp_path, "embedding", 256)
    with pytest.raises(ConfigError, match=r"moe2-edge-agent\[gpu\]"):
        provider_plan(CPU_ONLY, "cuda", tmp_path, "embedding", 256)
