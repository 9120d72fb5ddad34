"""A trained gate run with ONNX Runtime: the sentence encoder and the gate head that the
controller exported (protocol/gates.py), tokenised with the ``tokenizers`` package.

Needs one of the agent's extras: ``gate`` (CPU onnxruntime), ``gpu`` (onnxruntime-gpu: the
CUDA execution provider) or ``tensorrt`` (onnxruntime-gpu + TensorRT). Which providers run it
is ``[gateway] gate_providers``: ``auto`` takes TensorRT, then CUDA, then the CPU, whichever
this onnxruntime build has. TensorRT engines are built for the encoder's shape profile (batch
1, 1 to ``max_length`` tokens, optimised for 64) and cached on disk (``gate_engine_cache``,
keyed by the model's hash), and the gate is run once at the shortest, typical and longest
input when it is installed, so no engine is ever built on a prompt's path.

    gate = OnnxGate(manifest, {"embedding": b"...", "head": b"...", "tokenizer": b"..."})
    gate.values("bake the cake", ["cook-1", "zoo-1"])   # (2,) positive
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from moe2.agent.gateway.gate import Gate
from moe2.shared import protocol as p
from moe2.shared.errors import ConfigError

log = logging.getLogger(__name__)

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Most preferred first; whatever this onnxruntime build has is used, CPU always.
PREFERRED_PROVIDERS = (TRT, CUDA, CPU)
ProviderChoice = Literal["auto", "tensorrt", "cuda", "cpu"]
_CHOICES: dict[str, tuple[str, ...]] = {
    "auto": PREFERRED_PROVIDERS,
    "tensorrt": (TRT, CUDA, CPU),
    "cuda": (CUDA, CPU),
    "cpu": (CPU,),
}
OPT_TOKENS = 64  # the shape TensorRT optimises the encoder for: a typical prompt

Provider = str | tuple[str, dict[str, Any]]


def _shapes(tokens: int) -> str:
    return f"input_ids:1x{tokens},attention_mask:1x{tokens}"


def provider_plan(
    available: Sequence[str],
    choice: ProviderChoice,
    cache_dir: Path,
    part: str,
    max_length: int,
) -> list[Provider]:
    """The providers (with their options) one of the gate's models runs with, from what
    ``onnxruntime.get_available_providers()`` lists. ``part`` is "embedding" (dynamic token
    axis: needs a TensorRT shape profile) or "head" (static shapes).

    Raises ConfigError when ``choice`` names a provider this build lacks."""
    have = set(available)
    wanted = _CHOICES[choice]
    if choice != "auto" and wanted[0] not in have:
        raise ConfigError(
            f"gate_providers = {choice!r} but this onnxruntime has {', '.join(available)}: "
            + (
                "pip install 'moe2-edge-agent[tensorrt]'"
                if wanted[0] == TRT
                else "pip install 'moe2-edge-agent[gpu]' (Jetson: NVIDIA's onnxruntime-gpu wheel)"
            )
        )
    plan: list[Provider] = []
    for name in wanted:
        if name not in have:
            continue
        if name == TRT:
            opts: dict[str, Any] = {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache_dir / part),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache_dir / part),
                "trt_fp16_enable": True,
            }
            if part == "embedding":
                opt = min(OPT_TOKENS, max_length)
                opts |= {
                    "trt_profile_min_shapes": _shapes(1),
                    "trt_profile_opt_shapes": _shapes(opt),
                    "trt_profile_max_shapes": _shapes(max_length),
                }
            plan.append((name, opts))
        elif name == CUDA:
            plan.append((name, {"device_id": 0}))
        else:
            plan.append(name)
    if CPU not in [x if isinstance(x, str) else x[0] for x in plan]:
        plan.append(CPU)
    return plan


def _session(model: bytes, providers: list[Provider]) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # The gateway shares its box with an expert (often its own agent) that starts work the
    # moment the gate is done: ONNX Runtime's threads must sleep when idle, not spin for
    # milliseconds on the cores the experts then need (that slowed every expert's step).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model, opts, providers=providers)
    except Exception as exc:  # a GPU provider that cannot start here: fall back to the CPU
        if providers == [CPU]:
            raise
        log.warning("gate providers %s failed (%s); running the gate on the CPU", providers, exc)
        return ort.InferenceSession(model, opts, providers=[CPU])


class OnnxGate(Gate):
    def __init__(
        self,
        manifest: p.GateManifest,
        files: dict[str, bytes],
        providers: ProviderChoice = "auto",
        engine_cache: Path | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ConfigError(
                f"cannot run a trained gate: {exc.name} is missing "
                "(pip install 'moe2-edge-agent[gate]')"
            ) from None
        self.version = manifest.version
        self.experts = list(manifest.experts)
        self._index = {name: i for i, name in enumerate(self.experts)}
        available = list(ort.get_available_providers())
        cache = engine_cache or Path.home() / ".cache" / "moe2" / "tensorrt"
        n = manifest.max_length
        emb = provider_plan(available, providers, cache, "embedding", n)
        head = provider_plan(available, providers, cache, "head", n)
        if TRT in available and providers in ("auto", "tensorrt"):
            for part in ("embedding", "head"):
                (cache / part).mkdir(parents=True, exist_ok=True)
        self._embedding = _session(files["embedding"], emb)
        self._head = _session(files["head"], head)
        self.providers = list(self._embedding.get_providers())
        tok = Tokenizer.from_str(files["tokenizer"].decode("utf-8"))
        tok.enable_truncation(max_length=manifest.max_length)
        tok.enable_padding(pad_id=0, pad_token="[PAD]")  # as the controller trained it
        self._tok = tok
        self._warm_up(n)

    def _warm_up(self, max_length: int) -> None:
        """Run the shortest, typical and longest inputs now: TensorRT builds (or loads from
        its cache) the engine of each profile, CUDA loads its kernels, at install time."""
        for tokens in sorted({1, min(OPT_TOKENS, max_length), max_length}):
            ids = np.zeros((1, tokens), dtype=np.int64)
            (e,) = self._embedding.run(None, {"input_ids": ids, "attention_mask": ids + 1})
            self._head.run(None, {"embedding": e})

    def probabilities(self, prompt: str) -> np.ndarray:
        """(len(self.experts),) gate values g(x), summing to 1."""
        enc = self._tok.encode(prompt)
        ids = np.array([enc.ids], dtype=np.int64)
        mask = np.array([enc.attention_mask], dtype=np.int64)
        (e,) = self._embedding.run(None, {"input_ids": ids, "attention_mask": mask})
        (g,) = self._head.run(None, {"embedding": e})
        return np.asarray(g[0], dtype=np.float64)

    def tokens(self, prompt: str) -> int:
        return len(self._tok.encode(prompt).ids)

    def values(self, prompt: str, experts: Sequence[str]) -> np.ndarray:
        # An expert the gate was not trained with gets the uniform value 1/N: neither
        # favoured nor excluded (push a gate trained with it to route to it properly).
        g = self.probabilities(prompt)
        neutral = 1.0 / len(self.experts)
        out = np.array([g[self._index[n]] if n in self._index else neutral for n in experts])
        return np.clip(out, 1e-12, None)
