"""A trained gate run with ONNX Runtime: the sentence encoder and the gate head that the
controller exported (protocol/gates.py), tokenised with the ``tokenizers`` package.

Needs the agent's ``gate`` extra (onnxruntime, tokenizers); on a Jetson or an RTX box
install onnxruntime-gpu instead and the CUDA / TensorRT execution providers are used.

    gate = OnnxGate(manifest, {"embedding": b"...", "head": b"...", "tokenizer": b"..."})
    gate.values("bake the cake", ["cook-1", "zoo-1"])   # (2,) positive
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moe2.agent.gateway.gate import Gate
from moe2.shared import protocol as p
from moe2.shared.errors import ConfigError

# Most preferred first; whatever this onnxruntime build has is used, CPU always.
PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


def _session(model: bytes, providers: list[str]) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(model, providers=providers)
    except Exception:  # a GPU provider that cannot start here: fall back to the CPU
        if providers == ["CPUExecutionProvider"]:
            raise
        return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


class OnnxGate(Gate):
    def __init__(self, manifest: p.GateManifest, files: dict[str, bytes]) -> None:
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
        available = set(ort.get_available_providers())
        wanted = [pr for pr in PREFERRED_PROVIDERS if pr in available]
        self._embedding = _session(files["embedding"], wanted)
        self._head = _session(files["head"], wanted)
        self.providers = list(self._embedding.get_providers())
        tok = Tokenizer.from_str(files["tokenizer"].decode("utf-8"))
        tok.enable_truncation(max_length=manifest.max_length)
        tok.enable_padding(pad_id=0, pad_token="[PAD]")  # as the controller trained it
        self._tok = tok

    def probabilities(self, prompt: str) -> np.ndarray:
        """(len(self.experts),) gate values g(x), summing to 1."""
        enc = self._tok.encode(prompt)
        ids = np.array([enc.ids], dtype=np.int64)
        mask = np.array([enc.attention_mask], dtype=np.int64)
        (e,) = self._embedding.run(None, {"input_ids": ids, "attention_mask": mask})
        (g,) = self._head.run(None, {"embedding": e})
        return np.asarray(g[0], dtype=np.float64)

    def values(self, prompt: str, experts: Sequence[str]) -> np.ndarray:
        # An expert the gate was not trained with gets the uniform value 1/N: neither
        # favoured nor excluded (push a gate trained with it to route to it properly).
        g = self.probabilities(prompt)
        neutral = 1.0 / len(self.experts)
        out = np.array([g[self._index[n]] if n in self._index else neutral for n in experts])
        return np.clip(out, 1e-12, None)
