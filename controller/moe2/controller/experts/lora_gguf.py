"""LoRA adapters as GGUF files that llama.cpp applies at run time on top of an unchanged base.

A fleet ships one base GGUF and a megabyte-sized adapter per expert; the agent loads both
(``moe2-agent --model base.gguf --lora expert.gguf``). The file holds, per adapted weight
``W`` (GGUF name ``blk.3.attn_q.weight``), two F32 tensors:

    blk.3.attn_q.weight.lora_a   numpy (rank, in)    # ggml ne = [in, rank]
    blk.3.attn_q.weight.lora_b   numpy (out, rank)   # ggml ne = [rank, out]

and llama.cpp computes ``W x + scale * (alpha / rank) * B (A x)``: the same ``A``/``B`` layout
and ``alpha / rank`` scaling as peft's ``lora_A``/``lora_B``. Metadata: general.type=adapter,
general.architecture = the base's, adapter.type=lora, adapter.lora.alpha, plus ``moe2.*`` keys
that say which base, cluster and data split the expert comes from.

Rope layout. For llama-architecture models llama.cpp's converter reorders the rows of the Q
and K projections inside every head (llama.cpp rotates adjacent pairs (2i, 2i+1), Hugging
Face rotates (i, i + d/2)); transformers undoes that when it loads a GGUF. A delta trained in
Hugging Face space therefore has its output rows, i.e. ``B``'s rows, put back into GGUF order
here. qwen2 and gemma GGUFs keep Hugging Face's order.

    write_adapter(path, tensors, AdapterMeta(architecture="llama", alpha=32.0, ...),
                  n_head=9, n_head_kv=3)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moe2.shared.errors import ConfigError

# Hugging Face module (inside a decoder layer) -> GGUF tensor, the same for llama, qwen2
# and the gemma family.
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TARGET_MODULES = tuple(k.split(".")[1] for k in HF_TO_GGUF)  # q_proj ... down_proj

# Architectures whose GGUF conversion permutes the Q/K rows for llama.cpp's rope.
ROPE_PERMUTED = frozenset({"llama"})
SUPPORTED_ARCHITECTURES = frozenset({"llama", "qwen2", "gemma", "gemma2", "gemma3"})

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn\.\w+|mlp\.\w+)$")

# Our own metadata keys (strings), read back by the agent to announce the adapter.
KEY_NAME = "general.name"
KEY_CLUSTER = "moe2.expert.cluster"
KEY_CLUSTERING = "moe2.expert.clustering"
KEY_BASE_SHA256 = "moe2.base.sha256"
KEY_BASE_FILE = "moe2.base.file"
KEY_SPLIT = "moe2.train.split"


def gguf_name(hf_module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` (any prefix) -> ``blk.3.attn_q.weight``."""
    m = _LAYER_RE.search(hf_module)
    if m is None or m.group(2) not in HF_TO_GGUF:
        raise ConfigError(
            f"cannot map {hf_module!r} to a GGUF tensor; LoRA targets must be among "
            f"{', '.join(TARGET_MODULES)}"
        )
    return f"blk.{m.group(1)}.{HF_TO_GGUF[m.group(2)]}.weight"


def to_gguf_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows (axis 0, heads * head_dim of them) of a Q or K projection from Hugging
    Face's rope layout to llama.cpp's: within each head, GGUF row 2i is HF row i and GGUF row
    2i+1 is HF row i + head_dim/2."""
    out_dim = rows.shape[0]
    if out_dim % n_head or (out_dim // n_head) % 2:
        raise ConfigError(f"{out_dim} rows do not split into {n_head} heads of even width")
    half = out_dim // n_head // 2
    r = rows.reshape(n_head, 2, half, *rows.shape[1:])  # [head, which half, i, ...]
    return np.ascontiguousarray(r.swapaxes(1, 2).reshape(rows.shape))  # [head, i, half, ...]


def from_gguf_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of ``to_gguf_rows``."""
    out_dim = rows.shape[0]
    half = out_dim // n_head // 2
    r = rows.reshape(n_head, half, 2, *rows.shape[1:])
    return np.ascontiguousarray(r.swapaxes(1, 2).reshape(rows.shape))


@dataclass(frozen=True)
class AdapterMeta:
    architecture: str  # the base's general.architecture
    alpha: float  # llama.cpp scales B·A by alpha / rank, as peft does
    name: str = "moe2-expert"
    cluster: str | None = None  # "3" or a user's label
    clustering: str | None = None  # name of the clustering in the registry
    base_sha256: str | None = None  # sha256 of the base GGUF the expert was trained on
    base_file: str | None = None
    split: str | None = None  # which data the expert saw, e.g. "mmlu:dev+validation"
    extra: Mapping[str, str] = field(default_factory=dict)  # more "moe2.*" string keys


@dataclass(frozen=True)
class LoraPair:
    a: np.ndarray  # (rank, in), Hugging Face layout (peft lora_A.weight)
    b: np.ndarray  # (out, rank) (peft lora_B.weight)


def write_adapter(
    path: Path,
    pairs: Mapping[str, LoraPair],
    meta: AdapterMeta,
    *,
    n_head: int,
    n_head_kv: int,
) -> Path:
    """Write ``pairs`` ({Hugging Face module name: (A, B)}) as a llama.cpp LoRA GGUF."""
    import gguf

    if meta.architecture not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"architecture {meta.architecture!r} is not supported for GGUF adapters; expected "
            f"one of {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    if not pairs:
        raise ConfigError("the adapter has no LoRA tensors")
    permute = meta.architecture in ROPE_PERMUTED
    tensors: dict[str, np.ndarray] = {}
    for module, pair in sorted(pairs.items()):
        a = np.asarray(pair.a, dtype=np.float32)
        b = np.asarray(pair.b, dtype=np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ConfigError(
                f"{module}: lora_a {a.shape} and lora_b {b.shape} are not (rank, in), (out, rank)"
            )
        name = gguf_name(module)
        if permute and name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = n_head if ".attn_q." in name else n_head_kv
            b = to_gguf_rows(b, heads)
        tensors[name + ".lora_a"] = np.ascontiguousarray(a)
        tensors[name + ".lora_b"] = np.ascontiguousarray(b)

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), meta.architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(meta.alpha))
    writer.add_name(meta.name)
    for key, value in (
        (KEY_CLUSTER, meta.cluster),
        (KEY_CLUSTERING, meta.clustering),
        (KEY_BASE_SHA256, meta.base_sha256),
        (KEY_BASE_FILE, meta.base_file),
        (KEY_SPLIT, meta.split),
        *meta.extra.items(),
    ):
        if value is not None:
            writer.add_string(key, str(value))
    for name, arr in tensors.items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(path)
    return path


@dataclass(frozen=True)
class AdapterFile:
    """An adapter read back: metadata and the pairs in Hugging Face layout."""

    architecture: str
    alpha: float
    metadata: dict[str, str]  # every string-valued key
    pairs: dict[str, LoraPair]  # GGUF weight name -> (A, B), rows back in HF order

    @property
    def rank(self) -> int:
        return next(iter(self.pairs.values())).a.shape[0]


def read_adapter(path: Path, *, n_head: int = 0, n_head_kv: int = 0) -> AdapterFile:
    """Read a LoRA GGUF; with ``n_head``/``n_head_kv`` the Q/K rows of a llama adapter are
    put back into Hugging Face order (without them they stay as stored)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable GGUF file: {exc}") from None
    strings: dict[str, str] = {}
    alpha: float | None = None
    for key, f in reader.fields.items():
        if not f.types:
            continue
        if f.types[0] == gguf.GGUFValueType.STRING:
            strings[key] = str(f.contents())
        elif key == gguf.Keys.Adapter.LORA_ALPHA:
            alpha = float(f.contents())
    if strings.get("general.type") != "adapter" or strings.get(gguf.Keys.Adapter.TYPE) != "lora":
        raise ConfigError(f"{path} is not a LoRA adapter GGUF (general.type/adapter.type)")
    arch = strings.get("general.architecture", "")
    raw: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        base, _, part = t.name.rpartition(".")
        # GGUFReader gives numpy arrays in ggml's order reversed: (rank, in) / (out, rank).
        raw.setdefault(base, {})[part] = np.array(t.data, dtype=np.float32).reshape(
            tuple(int(x) for x in reversed(t.shape))
        )
    pairs: dict[str, LoraPair] = {}
    for base, parts in raw.items():
        if set(parts) != {"lora_a", "lora_b"}:
            raise ConfigError(f"{path}: tensor {base} lacks its lora_a/lora_b pair")
        b = parts["lora_b"]
        if n_head and arch in ROPE_PERMUTED and base.endswith((".attn_q.weight", ".attn_k.weight")):
            b = from_gguf_rows(b, n_head if ".attn_q." in base else n_head_kv)
        pairs[base] = LoraPair(parts["lora_a"], b)
    return AdapterFile(arch, float(alpha or 0.0), strings, pairs)
