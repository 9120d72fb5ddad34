"""The llama.cpp backend, on llama-cpp-python's low-level bindings (the llama.h C API).

One model, one llama context per Sequence (each context is one KV cache); all calls happen
on the agent's single model thread. The high-level ``Llama`` class is not used: it keeps one
history per model and cannot return logits of chosen positions, which scoring needs.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np

from moe2.agent.backend import AdapterMeta, ModelBackend, ModelInfo, Sequence, log_softmax
from moe2.shared.errors import ContextOverflow, InvalidToken, ModelError

if TYPE_CHECKING:
    from moe2.agent.config import AgentConfig

log = logging.getLogger(__name__)

_FTYPE_NAMES = {
    int(getattr(llama_cpp, n)): n.removeprefix("LLAMA_FTYPE_")
    .removeprefix("MOSTLY_")
    .removeprefix("ALL_")
    for n in dir(llama_cpp)
    if n.startswith("LLAMA_FTYPE_") and isinstance(getattr(llama_cpp, n), int)
}

_backend_ready = False

# Largest number of logit rows one decode may return while scoring: bounds memory to
# about 64 MB of float32 whatever the vocabulary size.
_SCORE_LOGIT_FLOATS = 16 << 20


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        # llama.cpp logs every tensor at load; keep errors only unless debugging.
        logging.getLogger("llama-cpp-python").setLevel(
            logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR
        )
        llama_cpp.llama_backend_init()
        _backend_ready = True


class LlamaCppBackend(ModelBackend):
    def __init__(self, config: AgentConfig) -> None:
        _init_backend()
        self._path = Path(config.model)
        self._n_threads = config.n_threads or max(1, os.cpu_count() or 1)
        # llama_flash_attn_type: -1 auto, 0 disabled, 1 enabled
        if config.flash_attn == "on":
            self._flash_attn = 1
        elif config.flash_attn == "off" or config.n_gpu_layers == 0:
            self._flash_attn = 0
        else:
            self._flash_attn = -1
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = config.n_gpu_layers if config.n_gpu_layers >= 0 else 1 << 30
        model = llama_cpp.llama_model_load_from_file(str(self._path).encode(), mparams)
        if not model:
            raise ModelError(f"llama.cpp could not load {self._path} (not a supported GGUF?)")
        self._model = model
        # A LoRA adapter (a domain expert of this base) goes on every context we create.
        # llama.cpp frees it together with the model.
        self._adapters: ctypes.Array[Any] | None = None  # (1,) llama_adapter_lora pointers
        self._adapter_scales: ctypes.Array[ctypes.c_float] | None = None  # (1,)
        adapter = None
        if config.lora is not None:
            adapter = self._load_adapter(config.lora, config.lora_scale)
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        self._n_ctx = min(config.n_ctx, n_ctx_train) if n_ctx_train > 0 else config.n_ctx
        self._n_batch = min(512, self._n_ctx)
        self._scratch: LlamaSequence | None = None
        self.info = self._read_info(adapter)

    # ------------------------------------------------------------------ metadata

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def _load_adapter(self, path: Path, scale: float) -> AdapterMeta:
        handle = llama_cpp.llama_adapter_lora_init(self._model, str(path).encode())
        if not handle:
            llama_cpp.llama_model_free(self._model)
            self._model = None
            raise ModelError(
                f"llama.cpp could not apply the LoRA adapter {path} to {self._path} (not an "
                "adapter GGUF, or made for another base model? the agent log has llama.cpp's "
                "reason)"
            )
        self._adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
        self._adapter_scales = (ctypes.c_float * 1)(scale)

        def meta(key: str) -> str | None:
            buf = ctypes.create_string_buffer(1024)
            n = llama_cpp.llama_adapter_meta_val_str(handle, key.encode(), buf, len(buf))
            return buf.value.decode("utf-8", "replace") if n >= 0 else None

        return AdapterMeta(meta("general.name"), meta("moe2.expert.cluster"), scale)

    def _read_info(self, adapter: AdapterMeta | None) -> ModelInfo:
        vocab = self._vocab
        texts = []
        for i in range(self._n_vocab):
            raw = llama_cpp.llama_vocab_get_text(vocab, i)
            texts.append(raw.decode("utf-8", "replace") if raw else "")
        tok_hash = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
        eos = sorted(i for i in range(self._n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i))
        bos = int(llama_cpp.llama_vocab_bos(vocab))
        ftype_raw = self._meta("general.file_type")
        quant = _FTYPE_NAMES.get(int(ftype_raw), f"ftype-{ftype_raw}") if ftype_raw else "unknown"
        tmpl = llama_cpp.llama_model_chat_template(self._model, None)
        return ModelInfo(
            name=self._meta("general.name") or self._path.stem,
            architecture=self._meta("general.architecture") or "unknown",
            quantization=quant,
            n_ctx=self._n_ctx,
            n_vocab=self._n_vocab,
            n_params=int(llama_cpp.llama_model_n_params(self._model)),
            model_bytes=int(llama_cpp.llama_model_size(self._model)),
            tokenizer_hash=tok_hash,
            bos_id=bos if bos >= 0 else None,
            eos_ids=tuple(eos),
            add_bos=bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
            chat_template=tmpl.decode("utf-8", "replace") if tmpl else None,
            adapter=adapter,
        )

    # ------------------------------------------------------------------ tokens

    def tokenize(self, text: str | bytes, *, add_bos: bool, special: bool = False) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        n_max = len(data) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:  # buffer too small: -n is the size needed
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            raise ModelError(f"tokenization failed ({n})")
        return list(buf[:n])

    def _check_tokens(self, tokens: Seq[int]) -> None:
        for t in tokens:
            if not 0 <= t < self._n_vocab:
                raise InvalidToken(
                    f"token id {t} is outside the vocabulary (0..{self._n_vocab - 1})"
                )

    def detokenize(self, tokens: Seq[int]) -> str:
        self._check_tokens(tokens)
        n = len(tokens)
        arr = (llama_cpp.llama_token * max(n, 1))(*tokens)
        size = max(64, n * 16)
        while True:
            buf = ctypes.create_string_buffer(size)
            got = llama_cpp.llama_detokenize(self._vocab, arr, n, buf, size, False, False)
            if got >= 0:
                return buf.raw[:got].decode("utf-8", "replace")
            size = -got + 1

    def piece_bytes(self, token: int) -> bytes:
        self._check_tokens([token])
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # longer than the buffer: -n is the size needed
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[: max(n, 0)]

    # ------------------------------------------------------------------ sequences

    def new_sequence(self) -> LlamaSequence:
        return LlamaSequence(self)

    def _new_context(self) -> llama_cpp.llama_context_p:
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self._n_ctx
        cparams.n_batch = self._n_batch
        cparams.n_ubatch = self._n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = self._n_threads
        cparams.n_threads_batch = self._n_threads
        cparams.flash_attn_type = self._flash_attn
        ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not ctx:
            raise ModelError("llama.cpp could not create a context (out of memory?)")
        if self._adapters is not None:
            rc = llama_cpp.llama_set_adapters_lora(ctx, self._adapters, 1, self._adapter_scales)
            if rc != 0:
                llama_cpp.llama_free(ctx)
                raise ModelError(f"llama.cpp could not set the LoRA adapter ({rc})")
        return ctx

    def score(self, prompt: Seq[int], target: Seq[int]) -> np.ndarray:
        if not prompt:
            raise ModelError("scoring needs a non-empty prompt")
        self._check_tokens(prompt)
        self._check_tokens(target)
        if len(prompt) + len(target) > self._n_ctx:
            raise ContextOverflow(
                f"prompt ({len(prompt)}) + target ({len(target)}) tokens exceed the context "
                f"of {self._n_ctx}"
            )
        if self._scratch is None:
            self._scratch = LlamaSequence(self)
        seq = self._scratch
        seq.truncate(0)
        history = [*prompt, *target]
        # Logits are needed at the positions that predict each target token:
        # position len(prompt)-1+t predicts target[t].
        first = len(prompt) - 1
        wanted = set(range(first, first + len(target)))
        out = np.empty(len(target), dtype=np.float64)
        chunk = max(1, min(self._n_batch, _SCORE_LOGIT_FLOATS // self._n_vocab))
        pos = 0
        while pos < len(history):
            end = min(len(history), pos + chunk)
            rows = seq._decode(history[pos:end], [p in wanted for p in range(pos, end)])
            for row in rows:  # batch index row holds the logits of position pos + row
                t = pos + row - first
                out[t] = float(log_softmax(seq._logits(row))[target[t]])
            pos = end
        seq.truncate(0)
        return out

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None


class LlamaSequence(Sequence):
    def __init__(self, backend: LlamaCppBackend) -> None:
        self._b = backend
        self._ctx: llama_cpp.llama_context_p | None = backend._new_context()
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(backend._n_batch, 0, 1)
        self._tokens: list[int] = []

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def _decode(self, tokens: Seq[int], want_logits: Seq[bool]) -> list[int]:
        """Append ``tokens`` (at most n_batch); returns batch indices that produced logits."""
        b = self._batch
        n0 = len(self._tokens)
        b.n_tokens = len(tokens)
        rows = []
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = n0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = bool(want_logits[i])
            if want_logits[i]:
                rows.append(i)
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            llama_cpp.llama_memory_seq_rm(self._mem, 0, n0, -1)
            raise ModelError(f"llama_decode failed with status {rc}")
        self._tokens.extend(tokens)
        return rows

    def _logits(self, row: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self._b._n_vocab,))

    def extend(self, tokens: Seq[int]) -> np.ndarray:
        if not tokens:
            raise ModelError("extend needs at least one token")
        self._b._check_tokens(tokens)
        if len(self._tokens) + len(tokens) > self._b._n_ctx:
            raise ContextOverflow(
                f"{len(self._tokens)} tokens of history + {len(tokens)} new exceed the context "
                f"size {self._b._n_ctx}"
            )
        n0 = len(self._tokens)
        step = self._b._n_batch
        try:
            for start in range(0, len(tokens), step):
                part = tokens[start : start + step]
                last = start + step >= len(tokens)
                self._decode(part, [last and i == len(part) - 1 for i in range(len(part))])
        except ModelError:
            self.truncate(n0)
            raise
        return log_softmax(self._logits(len(part) - 1))

    def truncate(self, n: int) -> None:
        if n < len(self._tokens):
            llama_cpp.llama_memory_seq_rm(self._mem, 0, n, -1)
            del self._tokens[n:]

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
