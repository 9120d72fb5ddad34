"""A LoRA adapter merged into its base: one stand-alone GGUF, optionally quantised.

For boxes that should not carry base + adapter (or a llama.cpp build without adapter
support). Each adapted weight becomes ``W + scale * (alpha / rank) * B A`` in F32 (its
quantised original dequantised first); every other tensor and all metadata are copied as they
are. ``quantize`` then runs llama.cpp's own quantiser over the file (through the agent's
llama-cpp-python) to the type asked for.

    merged = merge(Path("base.gguf"), Path("expert.gguf"), Path("expert-merged.gguf"))
    small = quantize(merged, Path("expert-Q4_1.gguf"), "Q4_1")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe2.controller.experts.lora_gguf import read_adapter
from moe2.shared.errors import ConfigError, Moe2Error

QUANT_TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_1", "Q4_0")


def merge(
    base: Path, adapter: Path, out: Path, scale: float = 1.0, name: str | None = None
) -> Path:
    import gguf

    reader = gguf.GGUFReader(str(base))
    arch_field = reader.fields.get("general.architecture")
    arch = str(arch_field.contents()) if arch_field is not None else ""
    lora = read_adapter(adapter)  # rows as stored: already in the base's GGUF order
    if lora.architecture != arch:
        raise ConfigError(f"{adapter} is for {lora.architecture!r}, {base} is {arch!r}")
    tensors = {t.name: t for t in reader.tensors}
    missing = sorted(set(lora.pairs) - set(tensors))
    if missing:
        raise ConfigError(f"{adapter} adapts tensors the base lacks ({missing[:3]}): wrong base?")

    def merged(name: str) -> np.ndarray:
        t, pair = tensors[name], lora.pairs[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)  # (out, in)
        delta = (scale * lora.alpha / lora.rank) * (pair.b.astype(np.float64) @ pair.a)
        if w.shape != delta.shape:
            raise ConfigError(f"{name}: base {w.shape} and adapter {delta.shape} differ")
        return (w + delta).astype(np.float32)

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    for field in reader.fields.values():
        # the writer adds the architecture itself; GGUF.* are the reader's header fields
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        value = field.contents()
        if field.name == "general.name" and name is not None:
            value = name
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    f32 = np.dtype(np.float32)
    for t in reader.tensors:
        if t.name in lora.pairs:
            shape = (int(t.shape[1]), int(t.shape[0])) if len(t.shape) == 2 else tuple(t.shape)
            n = int(np.prod(shape))
            writer.add_tensor_info(t.name, shape, f32, n * 4, gguf.GGMLQuantizationType.F32)
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        data = merged(t.name) if t.name in lora.pairs else t.data
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    partial.replace(out)
    return out


def quantize(src: Path, out: Path, qtype: str, threads: int = 0) -> Path:
    """llama.cpp's quantiser (``llama_model_quantize``) from ``src`` to ``qtype``."""
    if qtype not in QUANT_TYPES:
        raise ConfigError(
            f"unknown quantisation {qtype!r}; expected one of {', '.join(QUANT_TYPES)}"
        )
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError(
            "quantising needs llama-cpp-python (pip install moe2-edge-agent)"
        ) from None
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}"))
    params.nthread = threads
    params.allow_requantize = True  # tensors the merge kept in the base's quantised type
    partial = out.with_name(out.name + ".partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), params)
    if rc != 0:
        partial.unlink(missing_ok=True)
        raise Moe2Error(f"llama.cpp could not quantise {src} to {qtype} (status {rc})")
    partial.replace(out)
    return out
