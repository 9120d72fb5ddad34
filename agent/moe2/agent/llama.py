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
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np

from moe2.agent.backend import (
    AdapterMeta,
    DecodePart,
    ModelBackend,
    ModelInfo,
    Sequence,
    log_softmax,
)
from moe2.agent.offload import (
    LogCapture,
    check_offload,
    describe,
    device_summary,
    list_devices,
    parse_load_log,
)
from moe2.shared.errors import (
    Busy,
    ConfigError,
    ContextOverflow,
    InvalidToken,
    ModelError,
    Moe2Error,
)

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
# llama.cpp's log, read while a model loads (placement); the ctypes callback must stay alive.
_CAPTURE = LogCapture()
_log_callback = None

# Largest number of logit rows one decode may return while scoring: bounds memory to
# about 64 MB of float32 whatever the vocabulary size.
_SCORE_LOGIT_FLOATS = 16 << 20

_LLAMA_MAX_SEQ = 256  # llama.cpp's limit on sequence ids per context
_SCRATCH_SLOTS = 6  # sequence ids beyond the sessions: scoring in parallel, profiling


def _init_backend() -> None:
    global _backend_ready, _log_callback
    if not _backend_ready:
        # llama.cpp logs every tensor at load: captured for the placement, passed on to
        # Python logging at DEBUG (moe2.agent.offload), never printed otherwise.
        @llama_cpp.llama_log_callback
        def _on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            _CAPTURE(level, text)

        _log_callback = _on_log
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _backend_ready = True


class LlamaCppBackend(ModelBackend):
    def __init__(self, config: AgentConfig) -> None:
        _init_backend()
        self._path = Path(config.model)
        self._n_threads = config.n_threads or max(1, os.cpu_count() or 1)
        requested = config.gpu_layers()  # ConfigError: unknown device class
        # llama_flash_attn_type: -1 auto, 0 disabled, 1 enabled
        if config.flash_attn == "on":
            self._flash_attn = 1
        elif config.flash_attn == "off":
            self._flash_attn = 0
        elif requested == 0:
            # On the CPU, flash attention makes batched evaluation bit-identical to single
            # steps (exact speculative fusion, sessions independent of each other).
            self._flash_attn = 1 if config.batching else 0
        else:
            self._flash_attn = -1
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = requested if requested >= 0 else 1 << 30
        _CAPTURE.start()
        try:
            model = llama_cpp.llama_model_load_from_file(str(self._path).encode(), mparams)
        finally:
            load_log = _CAPTURE.stop()
        if not model:
            raise ModelError(f"llama.cpp could not load {self._path} (not a supported GGUF?)")
        self._model = model
        self.offload = describe(
            parse_load_log(load_log),
            list_devices(Path(llama_cpp.__file__).parent / "lib"),
            int(llama_cpp.llama_model_n_layer(model)),
            requested,
            bool(llama_cpp.llama_supports_gpu_offload()),
        )
        log.info(
            "%s on %s: %d of %d layers on a GPU, %.0f MiB of weights in GPU memory; devices: %s",
            self._path.name,
            self.offload.backend,
            self.offload.gpu_layers,
            self.offload.n_layers,
            self.offload.vram_bytes / 2**20,
            device_summary(self.offload.devices) or "unknown",
        )
        try:
            check_offload(self.offload, required=config.require_gpu_offload)
        except ConfigError:
            llama_cpp.llama_model_free(model)
            self._model = None
            raise
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
        self._contexts: list[_Context] = []
        # With batching, one context holds every session plus a few scratch sequences
        # (scoring, profiling), and KV cells for every session's full context plus one.
        sessions = config.max_sessions if config.batching else 0
        self._n_slots = min(_LLAMA_MAX_SEQ, sessions + _SCRATCH_SLOTS) if sessions else 1
        self._n_cells = self._n_ctx * (sessions + 1)
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
        eos_id = int(llama_cpp.llama_vocab_eos(vocab))
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
            bos_text=texts[bos] if 0 <= bos < self._n_vocab else None,
            eos_text=texts[eos_id] if 0 <= eos_id < self._n_vocab else None,
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
        for ctx in self._contexts:
            seq = ctx.take_slot()
            if seq is not None:
                return seq
        # The first context holds every session and the scratch sequences; more (one
        # sequence each, as before batching) only when a caller holds more sequences.
        if self._contexts:
            ctx = _Context(self, n_slots=1, n_cells=self._n_ctx)
        else:
            ctx = _Context(self, n_slots=self._n_slots, n_cells=self._n_cells)
        self._contexts.append(ctx)
        seq = ctx.take_slot()
        assert seq is not None
        return seq

    def decode_batch(self, parts: Seq[DecodePart]) -> list[list[np.ndarray] | Exception]:
        """One ``llama_decode`` per context (and per ``n_batch`` tokens) for all parts."""
        out: list[list[np.ndarray] | Exception | None] = [None] * len(parts)
        by_ctx: dict[int, list[int]] = {}
        seen: set[int] = set()
        for i, part in enumerate(parts):
            seq = part.seq
            if not isinstance(seq, LlamaSequence) or seq._ctx is None or seq._b is not self:
                out[i] = ModelError("the sequence is closed or not from this backend")
                continue
            if id(seq) in seen:
                out[i] = ModelError("a sequence may appear once per batch")
                continue
            seen.add(id(seq))
            try:
                self._check_tokens(part.tokens)
                seq._check_room(len(part.tokens))
                if not part.tokens:
                    raise ModelError("nothing to evaluate")
            except Moe2Error as exc:
                out[i] = exc
                continue
            by_ctx.setdefault(id(seq._ctx), []).append(i)
        for idxs in by_ctx.values():
            ctx = parts[idxs[0]].seq._ctx  # type: ignore[attr-defined]
            for i, res in zip(idxs, ctx.decode([parts[i] for i in idxs])):
                out[i] = res
        return [r if r is not None else ModelError("not evaluated") for r in out]

    def _scratch_sequence(self) -> Sequence:
        if self._scratch is None:
            self._scratch = self.new_sequence()
        return self._scratch

    def _rows(
        self, seq: Sequence, tokens: Seq[int], wanted: set[int]
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Append ``tokens`` to ``seq``; yields (index into tokens, next-token log-probs after
        it) for each wanted index, in order."""
        chunk = self.score_chunk
        for pos in range(0, len(tokens), chunk):
            end = min(len(tokens), pos + chunk)
            rows = [i - pos for i in range(pos, end) if i in wanted]
            for r, lp in zip(rows, seq.evaluate(tokens[pos:end], rows)):
                yield pos + r, lp

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
        seq = self._scratch_sequence()
        seq.truncate(0)
        history = [*prompt, *target]
        # Logits are needed at the positions that predict each target token:
        # position len(prompt)-1+t predicts target[t].
        first = len(prompt) - 1
        out = np.empty(len(target), dtype=np.float64)
        chunk = self.score_chunk
        try:
            for pos in range(0, len(history), chunk):
                end = min(len(history), pos + chunk)
                rows = [r - pos for r in range(max(pos, first), min(end, first + len(target)))]
                got = seq.evaluate(history[pos:end], rows)
                for r, lp in zip(rows, got):
                    t = pos + r - first
                    out[t] = float(lp[target[t]])
        finally:
            seq.truncate(0)
        return out

    def score_choices(self, prompt: Seq[int], targets: Seq[Seq[int]]) -> list[np.ndarray]:
        """Each target after the same prompt, the prompt evaluated once: the targets go one
        after the other behind its cached cells on the scratch sequence."""
        if not prompt:
            raise ModelError("scoring needs a non-empty prompt")
        if not targets or not all(targets):
            raise ModelError("scoring needs non-empty targets")
        self._check_tokens(prompt)
        for target in targets:
            self._check_tokens(target)
        longest = max(len(t) for t in targets)
        if len(prompt) + longest > self._n_ctx:
            raise ContextOverflow(
                f"prompt ({len(prompt)}) + longest target ({longest}) tokens exceed the context "
                f"of {self._n_ctx}"
            )
        seq = self._scratch_sequence()
        seq.truncate(0)
        outs = []
        try:
            ((_, first),) = list(self._rows(seq, prompt, {len(prompt) - 1}))
            for target in targets:
                seq.truncate(len(prompt))
                out = np.empty(len(target), dtype=np.float64)
                out[0] = float(first[target[0]])
                for i, lp in self._rows(seq, target[:-1], set(range(len(target) - 1))):
                    out[i + 1] = float(lp[target[i + 1]])
                outs.append(out)
        finally:
            seq.truncate(0)
        return outs

    @property
    def score_chunk(self) -> int:
        """Tokens per decode while scoring: bounds the logit rows returned at once."""
        return max(1, min(self._n_batch, _SCORE_LOGIT_FLOATS // self._n_vocab))

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None
        for ctx in self._contexts:
            ctx.free()
        self._contexts.clear()
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None


class _Context:
    """One llama context: ``n_slots`` sequence ids sharing one unified KV cache of
    ``n_cells`` cells, evaluated together by one ``llama_decode`` per batch.

    Why unified, with flash attention on the CPU (measured on 2 loaded CPU cores, one run,
    SmolLM2-135M Q4_1, one thread): these are the only settings found under which a token's
    logits are the same bit for bit alone, in a batch of its session's tokens, next to other
    sessions and after a rewind, which exact speculative fusion needs. Without flash
    attention a unified cache makes every step attend over every live session's cells,
    masked (a 10-token session's step 2x next to seven 200-token ones) and differs from a
    single step by up to 0.8 in a logit; a KV stream per sequence in float32 is bit-identical
    until a session that was stepped token by token is rewound and verified in a batch (up
    to 1.3 in a logit). The price of flash attention is long histories: a step at 1,000
    tokens costs 1.9-2.2x one at 10 (1.3-1.45x for those others). Eight sequences x one
    token cost about the same in one decode with streams as unified.
    """

    def __init__(self, backend: LlamaCppBackend, n_slots: int, n_cells: int) -> None:
        self._b = backend
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_cells
        cparams.n_batch = backend._n_batch
        cparams.n_ubatch = backend._n_batch
        cparams.n_seq_max = n_slots
        cparams.kv_unified = True
        cparams.n_threads = backend._n_threads
        cparams.n_threads_batch = backend._n_threads
        cparams.flash_attn_type = backend._flash_attn
        ctx = llama_cpp.llama_init_from_model(backend._model, cparams)
        if not ctx:
            raise ModelError("llama.cpp could not create a context (out of memory?)")
        if backend._adapters is not None:  # the domain expert's LoRA, on every context
            rc = llama_cpp.llama_set_adapters_lora(
                ctx, backend._adapters, 1, backend._adapter_scales
            )
            if rc != 0:
                llama_cpp.llama_free(ctx)
                raise ModelError(f"llama.cpp could not set the LoRA adapter ({rc})")
        self.ctx: llama_cpp.llama_context_p | None = ctx
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.n_cells = n_cells
        self._batch = llama_cpp.llama_batch_init(backend._n_batch, 0, 1)
        self._free = list(range(n_slots - 1, -1, -1))  # seq ids; pop() gives the lowest
        self.seqs: dict[int, LlamaSequence] = {}

    def take_slot(self) -> LlamaSequence | None:
        if not self._free or self.ctx is None:
            return None
        seq = LlamaSequence(self._b, self, self._free.pop())
        self.seqs[seq.seq_id] = seq
        return seq

    def release(self, seq: LlamaSequence) -> None:
        llama_cpp.llama_memory_seq_rm(self.mem, seq.seq_id, 0, -1)
        self.seqs.pop(seq.seq_id, None)
        self._free.append(seq.seq_id)

    def cells_used(self) -> int:
        return sum(len(s._tokens) for s in self.seqs.values())

    def decode(self, parts: Seq[DecodePart]) -> list[list[np.ndarray] | Exception]:
        """Evaluate parts of this context's sequences, ``n_batch`` tokens per decode."""
        out: list[list[np.ndarray] | Exception] = [[] for _ in parts]
        room = self.n_cells - self.cells_used()
        todo: list[tuple[int, int]] = []  # (part, token index) in evaluation order
        for i, part in enumerate(parts):
            if len(part.tokens) > room:
                out[i] = Busy(
                    f"the KV cache has room for {room} more tokens across all sessions; "
                    f"retry when sessions close"
                )
                continue
            room -= len(part.tokens)
            todo += [(i, j) for j in range(len(part.tokens))]
        n0 = {i: len(parts[i].seq) for i in range(len(parts))}
        wanted = [set(part.rows) for part in parts]
        b = self._batch
        step = self._b._n_batch
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            rows: list[tuple[int, int]] = []  # (part, batch row) with logits
            for k, (i, j) in enumerate(chunk):
                seq = parts[i].seq
                assert isinstance(seq, LlamaSequence)
                b.token[k] = parts[i].tokens[j]
                b.pos[k] = n0[i] + j
                b.n_seq_id[k] = 1
                b.seq_id[k][0] = seq.seq_id
                want = j in wanted[i]
                b.logits[k] = want
                if want:
                    rows.append((i, k))
            b.n_tokens = len(chunk)
            rc = llama_cpp.llama_decode(self.ctx, b)
            if rc != 0:
                # Nothing of this chunk stays; parts already partly evaluated roll back.
                failed = {i for i, _ in todo[start:]}
                for i in failed:
                    llama_cpp.llama_memory_seq_rm(self.mem, parts[i].seq.seq_id, n0[i], -1)  # type: ignore[attr-defined]
                    done = len(parts[i].seq) - n0[i]
                    if done:
                        del parts[i].seq._tokens[n0[i] :]  # type: ignore[attr-defined]
                    out[i] = ModelError(f"llama_decode failed with status {rc}")
                todo = [(i, j) for i, j in todo if i not in failed]
                break
            for i, k in rows:
                res = out[i]
                assert isinstance(res, list)
                res.append(log_softmax(self._logits(k)))
            for i, j in chunk:
                parts[i].seq._tokens.append(parts[i].tokens[j])  # type: ignore[attr-defined]
        return out

    def _logits(self, row: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self._b._n_vocab,))

    def free(self) -> None:
        if self.ctx:
            for seq in list(self.seqs.values()):
                seq._ctx = None
            self.seqs.clear()
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None


class LlamaSequence(Sequence):
    """One sequence id of a shared context: its own token history (positions from 0)."""

    def __init__(self, backend: LlamaCppBackend, ctx: _Context, seq_id: int) -> None:
        self._b = backend
        self._ctx: _Context | None = ctx
        self.seq_id = seq_id
        self._tokens: list[int] = []

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def _check_room(self, n: int) -> None:
        if len(self._tokens) + n > self._b._n_ctx:
            raise ContextOverflow(
                f"{len(self._tokens)} tokens of history + {n} new exceed the context "
                f"size {self._b._n_ctx}"
            )

    def evaluate(self, tokens: Seq[int], rows: Seq[int]) -> list[np.ndarray]:
        (res,) = self._b.decode_batch([DecodePart(self, tokens, rows)])
        if isinstance(res, Exception):
            raise res
        return res

    def extend(self, tokens: Seq[int]) -> np.ndarray:
        if not tokens:
            raise ModelError("extend needs at least one token")
        return self.evaluate(tokens, [len(tokens) - 1])[0]

    def share(self, source: Sequence, n: int) -> bool:
        # One context's sequences share its KV cells: copying tags the source's first n cells
        # with this sequence's id too (no tensor copy); later tokens of either are their own.
        if (
            not isinstance(source, LlamaSequence)
            or self._ctx is None
            or source._ctx is not self._ctx
            or self._tokens
            or not 0 < n <= len(source._tokens)
        ):
            return False
        llama_cpp.llama_memory_seq_cp(self._ctx.mem, source.seq_id, self.seq_id, 0, n)
        self._tokens = source._tokens[:n]
        return True

    def truncate(self, n: int) -> None:
        if n < len(self._tokens) and self._ctx is not None:
            llama_cpp.llama_memory_seq_rm(self._ctx.mem, self.seq_id, n, -1)
            del self._tokens[n:]

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.release(self)
            self._ctx = None
            self._tokens.clear()
