"""The optional parts of ``moe2-edge-controller``: a plain install runs ask, agents, profile,
optimize --problem, push, sync, models and moe2-http; these need an extra, imported only by
the commands that use them, and a command without its extra says which one to install.

    require("torch", "train", "moe2ctl train")   # ConfigError naming the pip command
"""

from __future__ import annotations

import importlib.util

from moe2.shared.errors import ConfigError

EXTRAS = {
    "train": "gate training and export, sentence embeddings, packaged benchmarks",
    "eval": "moe2ctl eval's plot",
    "postgres": "a postgresql:// registry",
    "experts": "moe2ctl experts: clustering, LoRA fine-tuning of domain experts",
    "demo": "moe2ctl demo: the agent (with the ONNX gate) and the train extra",
}


def require(module: str, extra: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{what} needs {module}, which comes with the {extra!r} extra: "
            f"pip install 'moe2-edge-controller[{extra}]'"
        )
