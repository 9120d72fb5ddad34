"""The tiny fleet in-process, for tests that need stored scores and profiles but not MQTT:
what `moe2ctl collect` stores (the MQTT path has its own test in test_collect.py) and what
the agents' modelled profiles say, placed on a Table I-like fleet."""

from __future__ import annotations

import time
from collections.abc import Mapping

from moe2.agent.backend import ModelInfo
from moe2.agent.llama import LlamaCppBackend
from moe2.agent.profiler import ProfilerSettings, estimate_profile
from moe2.controller.registry import Registry
from moe2.shared import protocol as p
from moe2.shared.costmodel import ModelFigures
from moe2.shared.devices import load_device_class

# Who runs where and at which size (billions of parameters, 4-bit weights): two fast, hungry
# RTX 4090 boxes and two slow, frugal Jetson AGX Orins, as in the paper's testbed.
PLACEMENT: dict[str, tuple[str, float]] = {
    "animals": ("rtx4090", 7.0),
    "code": ("rtx4090", 3.0),
    "cooking": ("orin-agx-64gb", 7.0),
    "arithmetic": ("orin-agx-64gb", 3.0),
}


def score_directly(reg: Registry, dataset: str, backends: Mapping[str, LlamaCppBackend]) -> None:
    """Every expert's teacher-forced log-probabilities of every option, as collect stores
    them (one tokenization shared by the experts of one vocabulary)."""
    first = next(iter(backends.values()))
    rows = []
    for s in reg.samples(dataset):
        prompt = first.tokenize(s.prompt, add_bos=first.info.add_bos)
        for o, target in enumerate(s.targets):
            ids = first.tokenize(target, add_bos=False)
            for name, b in backends.items():
                rows.append(
                    {
                        "sample_id": s.id,
                        "expert": name,
                        "option": o,
                        "tokenizer_hash": b.info.tokenizer_hash,
                        "tokens": ids,
                        "logprobs": b.score(prompt, ids),
                        "prompt_tokens": len(prompt),
                    }
                )
    reg.add_scores(rows)


def register_experts(
    reg: Registry,
    models: Mapping[str, ModelInfo],
    placement: Mapping[str, tuple[str, float]] = PLACEMENT,
) -> None:
    """Agent rows as `moe2ctl sync` stores them (``models``: each expert's backend info), with
    modelled profiles for ``placement``."""
    for name, mi in models.items():
        device, billions = placement[name]
        reg.upsert_agent_info(
            p.AgentInfo(
                agent_id=name,
                model=mi.name,
                model_file=f"{name}.gguf",
                architecture=mi.architecture,
                quantization=mi.quantization,
                n_ctx=mi.n_ctx,
                n_vocab=mi.n_vocab,
                tokenizer_hash=mi.tokenizer_hash,
                bos_id=mi.bos_id,
                eos_ids=list(mi.eos_ids),
                add_bos=mi.add_bos,
                device_class=device,
                software_version="test",
                max_sessions=4,
                started_at=time.time(),
            )
        )
        reg.set_agent_state(name, "online")
        figures = load_device_class(device).figures()
        model = ModelFigures(n_params=billions * 1e9, weight_bytes=billions * 0.56e9)
        reg.set_agent_profile(
            estimate_profile(
                model,
                figures,
                ProfilerSettings(),
                agent_id=name,
                model_name=f"{name}-{billions:g}b",
                n_ctx=mi.n_ctx,
                device_class=device,
                power_mode=None,
            )
        )
