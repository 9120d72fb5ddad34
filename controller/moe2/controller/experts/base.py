"""The base model experts are fine-tuned from, in Hugging Face transformers, offline.

Either a GGUF file the fleet already serves (transformers dequantises the llama, qwen2 and
gemma architectures, so the adapter is trained against the very weights llama.cpp runs) or a
local Hugging Face checkpoint folder (its GGUF conversion is what the fleet must serve).
Nothing is downloaded: the tokenizer and config come from the file or folder.

    base = describe(Path("SmolLM2-135M-Instruct.Q4_1.gguf"))   # metadata only, fast
    model, tok = load(base)                                     # float32 torch module
    tok = load_tokenizer(base)                                  # the tokenizer alone
    tok.encode("Question: ...", bos=True)                       # token ids

Token ids come from llama.cpp itself for a GGUF base (when the agent package is installed, as
``moe2-edge-controller[experts]`` has it), so an expert is trained on exactly the ids an agent
scores and generates: transformers' tokenizer rebuilt from a SentencePiece-style GGUF vocabulary
(llama 2, mistral, gemma) splits a leading space differently from llama.cpp (" fish" is one
token for it, two for llama.cpp). GPT-2-style vocabularies (SmolLM2, qwen2) agree.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from moe2.controller.experts.lora_gguf import SUPPORTED_ARCHITECTURES
from moe2.shared.errors import ConfigError
from moe2.shared.files import sha256_file

# transformers model_type -> the llama.cpp architecture its GGUF conversion gets
_HF_TO_GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",  # converted as llama, with the same Q/K row permutation
    "qwen2": "qwen2",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}


@dataclass(frozen=True)
class BaseModelRef:
    path: Path  # a .gguf file or a Hugging Face checkpoint folder
    kind: str  # "gguf" | "hf"
    architecture: str  # llama.cpp's name: llama, qwen2, gemma3...
    name: str
    n_head: int
    n_head_kv: int
    sha256: str | None  # of a GGUF file
    tokenizer_hash: str | None  # sha256 over the vocabulary, as agents announce it (GGUF)


def describe(path: Path) -> BaseModelRef:
    """What a base model is, from its metadata alone (no weights loaded)."""
    if path.is_file():
        return _describe_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _describe_hf(path)
    raise ConfigError(
        f"base model {path} is neither a GGUF file nor a Hugging Face checkpoint folder "
        "(with config.json)"
    )


def _describe_gguf(path: Path) -> BaseModelRef:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable GGUF file: {exc}") from None

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = str(field("general.architecture") or "")
    if field("general.type") == "adapter":
        raise ConfigError(f"{path} is an adapter, not a base model")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{path}: architecture {arch!r} is not supported for fine-tuning; expected one of "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    n_head = int(field(f"{arch}.attention.head_count") or 0)
    n_head_kv = int(field(f"{arch}.attention.head_count_kv") or n_head)
    tokens = field("tokenizer.ggml.tokens")
    tok_hash = (
        hashlib.sha256("\x00".join(str(t) for t in tokens).encode()).hexdigest() if tokens else None
    )
    return BaseModelRef(
        path=path,
        kind="gguf",
        architecture=arch,
        name=str(field("general.name") or path.stem),
        n_head=n_head,
        n_head_kv=n_head_kv,
        sha256=sha256_file(path),
        tokenizer_hash=tok_hash,
    )


def _describe_hf(path: Path) -> BaseModelRef:
    cfg = json.loads((path / "config.json").read_text())
    model_type = str(cfg.get("model_type", ""))
    text = cfg.get("text_config") or cfg  # multimodal configs nest the language model
    arch = _HF_TO_GGUF_ARCH.get(model_type)
    if arch is None:
        raise ConfigError(
            f"{path}: model_type {model_type!r} is not supported; expected one of "
            f"{', '.join(sorted(_HF_TO_GGUF_ARCH))}"
        )
    n_head = int(text["num_attention_heads"])
    return BaseModelRef(
        path=path,
        kind="hf",
        architecture=arch,
        name=path.name,
        n_head=n_head,
        n_head_kv=int(text.get("num_key_value_heads") or n_head),
        sha256=None,
        tokenizer_hash=None,
    )


class Tokenizer(Protocol):
    def encode(self, text: str, *, bos: bool) -> list[int]:
        """Token ids of ``text``; ``bos``: as the start of a prompt (BOS where the model
        wants one), else as a continuation (an answer scored after a prompt)."""
        ...


class LlamaCppTokenizer:
    """The tokenizer agents use: llama.cpp's, on the GGUF's vocabulary."""

    def __init__(self, path: Path) -> None:
        from moe2.agent.config import AgentConfig
        from moe2.agent.llama import LlamaCppBackend

        self._backend = LlamaCppBackend(AgentConfig(model=path, n_threads=1, n_ctx=64))
        self._add_bos = self._backend.info.add_bos

    def encode(self, text: str, *, bos: bool) -> list[int]:
        return self._backend.tokenize(text, add_bos=bos and self._add_bos)

    def close(self) -> None:
        self._backend.close()


class HfTokenizer:
    def __init__(self, tok: Any) -> None:
        self._tok = tok

    def encode(self, text: str, *, bos: bool) -> list[int]:
        return list(self._tok(text, add_special_tokens=bos)["input_ids"])


def _hf_source(base: BaseModelRef) -> tuple[str, dict[str, Any]]:
    """(folder, from_pretrained kwargs) of a base; only local files are read."""
    # Make any hub access an error rather than a download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs: dict[str, Any] = {"local_files_only": True}
    folder = base.path
    if base.kind == "gguf":
        folder, kwargs["gguf_file"] = base.path.parent, base.path.name
    return str(folder), kwargs


def load_tokenizer(base: BaseModelRef) -> Tokenizer:
    """llama.cpp's tokenizer for a GGUF base when the agent package is there, else the
    Hugging Face one (no model weights are loaded)."""
    if base.kind == "gguf":
        try:
            return LlamaCppTokenizer(base.path)
        except ImportError:
            pass
    from transformers import AutoTokenizer

    folder, kwargs = _hf_source(base)
    try:
        return HfTokenizer(AutoTokenizer.from_pretrained(folder, **kwargs))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"transformers could not load {base.path}'s tokenizer: {exc}") from None


def load_model(base: BaseModelRef, device: str = "cpu") -> Any:
    """A float32 causal LM on ``device``; offline."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
    folder, kwargs = _hf_source(base)
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"transformers could not load {base.path}: {exc}") from None
    model.to(device)
    return model


def load(base: BaseModelRef, device: str = "cpu") -> tuple[Any, Tokenizer]:
    """(model, tokenizer): a float32 causal LM on ``device`` and its tokenizer; offline."""
    return load_model(base, device), load_tokenizer(base)
