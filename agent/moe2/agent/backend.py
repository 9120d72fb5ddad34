"""The seam between the agent and an inference engine.

A backend loads one model and hands out ``Sequence`` objects, each an independent KV cache:
``extend`` appends tokens and returns the log-probabilities of the next token, reusing
everything already evaluated, so a step costs the same at history 10 and 1,000.

    backend = open_backend("llama.cpp", config)
    seq = backend.new_sequence()
    logprobs = seq.extend(backend.tokenize("Hello", add_bos=True))   # (n_vocab,) float32
    logprobs = seq.extend([int(logprobs.argmax())])

Several sequences' work can go through one call, which a backend may run as one forward pass
(llama.cpp: one ``llama_decode`` over several sequence ids), so concurrent sessions share
the cost of reading the weights:

    out = backend.decode_batch([DecodePart(seq_a, [17], [0]), DecodePart(seq_b, [5, 9], [0, 1])])
    out[1]   # [logprobs after 5, logprobs after 9], or the exception that part raised
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from moe2.agent.config import AgentConfig
    from moe2.agent.offload import Offload


@dataclass(frozen=True)
class AdapterMeta:
    """A LoRA adapter applied on top of the model, as its file describes itself."""

    name: str | None  # general.name
    cluster: str | None  # moe2.expert.cluster
    scale: float


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    quantization: str  # "Q4_K_M", "F32", ...
    n_ctx: int
    n_vocab: int
    n_params: int  # parameters, for the modelled cost estimate
    model_bytes: int  # size of the weights in memory, bytes
    tokenizer_hash: str
    bos_id: int | None
    eos_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str | None
    bos_text: str | None = None  # the BOS token's text, as a chat template writes it
    eos_text: str | None = None  # the EOS token's text
    adapter: AdapterMeta | None = None


@dataclass(frozen=True)
class DecodePart:
    """Tokens to append to one sequence, and which of them to return next-token
    log-probabilities after."""

    seq: Sequence
    tokens: Seq[int]
    rows: Seq[int]  # indices into ``tokens``, ascending


class Sequence(abc.ABC):
    """One KV cache holding one token history."""

    @property
    @abc.abstractmethod
    def tokens(self) -> list[int]:
        """The history evaluated so far (a copy)."""

    def __len__(self) -> int:
        return len(self.tokens)

    @abc.abstractmethod
    def extend(self, tokens: Seq[int]) -> np.ndarray:
        """Evaluate ``tokens`` after the history; (n_vocab,) float32 next-token log-probs.

        Raises ContextOverflow (history unchanged) or InvalidToken."""

    def evaluate(self, tokens: Seq[int], rows: Seq[int]) -> list[np.ndarray]:
        """Append ``tokens``; the next-token log-probs after each ``tokens[r]``, r in ``rows``
        (ascending). On an error the history is unchanged."""
        n0 = len(self.tokens)
        out: list[np.ndarray] = []
        start = 0
        try:
            for r in rows:
                out.append(self.extend(tokens[start : r + 1]))
                start = r + 1
            if start < len(tokens):
                self.extend(tokens[start:])
        except Exception:
            self.truncate(n0)
            raise
        return out

    @abc.abstractmethod
    def truncate(self, n: int) -> None:
        """Forget everything after the first ``n`` tokens."""

    def share(self, source: Sequence, n: int) -> bool:
        """Make this empty sequence's history the first ``n`` tokens of ``source`` without
        evaluating them again, when the backend can copy one sequence's KV cache to another
        (llama.cpp: sequences of one context). False when it cannot: evaluate them instead."""
        return False

    @abc.abstractmethod
    def close(self) -> None:
        """Release the KV cache."""


class ModelBackend(abc.ABC):
    info: ModelInfo
    offload: Offload | None = None  # where the model runs; None: the backend cannot tell

    @abc.abstractmethod
    def tokenize(self, text: str | bytes, *, add_bos: bool, special: bool = False) -> list[int]:
        """Token ids of ``text`` (bytes are taken as they are: they may end mid-character)."""

    @abc.abstractmethod
    def detokenize(self, tokens: Seq[int]) -> str: ...

    @abc.abstractmethod
    def piece_bytes(self, token: int) -> bytes:
        """The bytes one token adds to the output (b"" for control tokens)."""

    def piece(self, token: int) -> str:
        """The text of one token, for people (a partial UTF-8 byte shows as U+FFFD)."""
        return self.piece_bytes(token).decode("utf-8", "replace")

    @abc.abstractmethod
    def new_sequence(self) -> Sequence: ...

    def decode_batch(self, parts: Seq[DecodePart]) -> list[list[np.ndarray] | Exception]:
        """Every part's wanted log-probs, or the exception that part raised (the others are
        unaffected). This default runs the parts one after another."""
        out: list[list[np.ndarray] | Exception] = []
        for part in parts:
            try:
                out.append(part.seq.evaluate(part.tokens, part.rows))
            except Exception as exc:  # handed to the part's owner, not lost
                out.append(exc)
        return out

    @abc.abstractmethod
    def score(self, prompt: Seq[int], target: Seq[int]) -> np.ndarray:
        """(len(target),) log p(target_t | prompt, target_<t), teacher forced, one pass."""

    def score_choices(self, prompt: Seq[int], targets: Seq[Seq[int]]) -> list[np.ndarray]:
        """``score`` of each target after the same prompt; a backend that can keep the
        prompt's cache between targets overrides this to evaluate the prompt once."""
        return [self.score(prompt, t) for t in targets]

    @abc.abstractmethod
    def close(self) -> None: ...


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(n_vocab,) float32 logits -> float32 natural-log probabilities."""
    x = logits.astype(np.float32, copy=True)
    m = float(x.max())
    x -= m
    x -= np.float32(np.log(np.exp(x, dtype=np.float32).sum(dtype=np.float64)))
    return x


BackendFactory = Callable[["AgentConfig"], ModelBackend]


def _llama_cpp(config: AgentConfig) -> ModelBackend:
    from moe2.agent.llama import LlamaCppBackend  # imported lazily: loads a native library

    return LlamaCppBackend(config)


BACKENDS: dict[str, BackendFactory] = {"llama.cpp": _llama_cpp}


def open_backend(name: str, config: AgentConfig) -> ModelBackend:
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}"
        ) from None
    return factory(config)
