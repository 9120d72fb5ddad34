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
from typing import TYPE_CHECKING

import llama_cpp
import numpy as np

from moe2.agent.backend import ModelBackend, ModelInfo, Sequence, log_softmax
from moe2.agent.offload import (
    LogCapture,
    check_offload,
    describe,
    device_summary,
    list_devices,
    parse_load_log,
)
from moe2.shared.errors import ConfigError, ContextOverflow, InvalidToken, ModelError

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

# Choices scored side by side, each on a sequence of its own behind the shared prompt.
_CHOICE_SEQS = 64


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
        elif config.flash_attn == "off" or requested == 0:
            self._flash_attn = 0
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
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        self._n_ctx = min(config.n_ctx, n_ctx_train) if n_ctx_train > 0 else config.n_ctx
        self._n_batch = min(512, self._n_ctx)
        self._scratch: LlamaSequence | None = None
        self._choices: _ChoiceContext | None = None  # created on the first score_choices
        self.info = self._read_info()

    # ------------------------------------------------------------------ metadata

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def _read_info(self) -> ModelInfo:
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

    def _new_context(self, n_seq_max: int = 1) -> llama_cpp.llama_context_p:
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self._n_ctx
        cparams.n_batch = self._n_batch
        cparams.n_ubatch = self._n_batch
        cparams.n_seq_max = n_seq_max
        # Sequences share one pool of n_ctx cells (else each would get n_ctx / n_seq_max).
        cparams.kv_unified = n_seq_max > 1
        cparams.n_threads = self._n_threads
        cparams.n_threads_batch = self._n_threads
        cparams.flash_attn_type = self._flash_attn
        ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not ctx:
            raise ModelError("llama.cpp could not create a context (out of memory?)")
        return ctx

    def _scratch_sequence(self) -> LlamaSequence:
        if self._scratch is None:
            self._scratch = LlamaSequence(self)
        return self._scratch

    def _rows(
        self, seq: LlamaSequence, tokens: Seq[int], wanted: set[int]
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Append ``tokens`` to ``seq``; yields (index into tokens, next-token log-probs after
        it) for each wanted index, in order."""
        chunk = max(1, min(self._n_batch, _SCORE_LOGIT_FLOATS // self._n_vocab))
        for pos in range(0, len(tokens), chunk):
            end = min(len(tokens), pos + chunk)
            rows = seq._decode(tokens[pos:end], [i in wanted for i in range(pos, end)])
            for row in rows:  # batch index row holds the logits of position pos + row
                yield pos + row, log_softmax(seq._logits(row))

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
        # Logits are needed at the positions that predict each target token:
        # position len(prompt)-1+t predicts target[t].
        first = len(prompt) - 1
        out = np.empty(len(target), dtype=np.float64)
        try:
            wanted = set(range(first, first + len(target)))
            for i, lp in self._rows(seq, [*prompt, *target], wanted):
                out[i - first] = float(lp[target[i - first]])
        finally:
            seq.truncate(0)
        return out

    def score_choices(self, prompt: Seq[int], targets: Seq[Seq[int]]) -> list[np.ndarray]:
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
        together = len(prompt) + sum(len(t) - 1 for t in targets)
        if len(targets) <= _CHOICE_SEQS and together <= self._n_ctx:
            if self._choices is None:
                self._choices = _ChoiceContext(self)
            return self._choices.score(prompt, targets)
        return self._score_in_turn(prompt, targets)

    def _score_in_turn(self, prompt: Seq[int], targets: Seq[Seq[int]]) -> list[np.ndarray]:
        """One target after the other behind the same cached prompt (when they do not fit
        the context together)."""
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

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None
        if self._choices is not None:
            self._choices.close()
            self._choices = None
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


class _ChoiceContext:
    """A llama context where the options of one question are scored side by side: the prompt
    is decoded once on sequence 0, its cache cells are shared with sequences 1..N-1
    (``llama_memory_seq_cp`` copies no data), and every option's tokens go after it on a
    sequence of their own, in as few batches as the logit budget allows (usually one)."""

    def __init__(self, backend: LlamaCppBackend) -> None:
        self._b = backend
        self._ctx: llama_cpp.llama_context_p | None = backend._new_context(_CHOICE_SEQS)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(backend._n_batch, 0, 1)

    def _decode(self, entries: Seq[tuple[int, int, int, bool]]) -> None:
        """Decode (token, position, sequence, wants logits) entries as one batch."""
        b = self._batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = want
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            raise ModelError(f"llama_decode failed with status {rc}")

    def _logprobs(self, row: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, row)
        return log_softmax(np.ctypeslib.as_array(ptr, shape=(self._b._n_vocab,)))

    def score(self, prompt: Seq[int], targets: Seq[Seq[int]]) -> list[np.ndarray]:
        n_batch = self._b._n_batch
        chunk = max(1, min(n_batch, _SCORE_LOGIT_FLOATS // self._b._n_vocab))
        n = len(prompt)
        outs = [np.empty(len(t), dtype=np.float64) for t in targets]
        llama_cpp.llama_memory_clear(self._mem, False)
        try:
            for start in range(0, n, n_batch):
                part = range(start, min(n, start + n_batch))
                self._decode([(prompt[i], i, 0, i == n - 1) for i in part])
            first = self._logprobs(n - 1 - part.start)  # the prompt's last position
            for o, target in enumerate(targets):
                outs[o][0] = float(first[target[0]])
                if o > 0:
                    llama_cpp.llama_memory_seq_cp(self._mem, 0, o, -1, -1)
            # Position n + j of option o predicts its token j + 1.
            rest = [(o, j) for o, t in enumerate(targets) for j in range(len(t) - 1)]
            for start in range(0, len(rest), chunk):
                part_oj = rest[start : start + chunk]
                self._decode([(targets[o][j], n + j, o, True) for o, j in part_oj])
                for row, (o, j) in enumerate(part_oj):
                    outs[o][j + 1] = float(self._logprobs(row)[targets[o][j + 1]])
        finally:
            llama_cpp.llama_memory_clear(self._mem, False)
        return outs

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
