"""Token-level fusion of next-token distributions (eq. 29), and how the chosen experts'
tokens meet (``Alignment``).

Same vocabulary (``ById``): F(t) = Σ_n ω_n p_n(t) by token id. A top-k reply leaves the other
tokens' probabilities unknown except for their total (the tail), which is spread evenly over
them: exact when every expert sends its full distribution, an approximation otherwise.

Different vocabularies (``ByText``): align by token text, as raw bytes (as UniTE does, but on
bytes, so byte tokens that hold part of a UTF-8 character align only with the same bytes):
each candidate in the union of the experts' top-k lists gets Σ_n ω_n p_n(bytes), where p_n is
expert n's probability of a token whose text is exactly those bytes (0 when none is in its
top-k); end-of-generation tokens of every expert map to one ``END`` key. A chosen key is fed
to each expert as its own token: the first of its top-k with those bytes, else its lowest id
spelling them, else the bytes for it to tokenize (``ByText.feed``).

    align = alignment(infos, vocabs, ["a", "b"], config)
    fused = align.fuse({"a": dist_a, "b": dist_b}, {"a": 0.6, "b": 0.4})
    key = fused.keys[int(fused.probs.argmax())]
    align.feed("b", key, dist_b)       # what expert b is fed for it: an id, or bytes
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from moe2.agent.gateway.config import GatewayConfig
from moe2.agent.gateway.vocab import Vocab
from moe2.agent.sampling import END, End, KeyKind, TokenKey, key_codes
from moe2.shared import protocol as p
from moe2.shared.errors import BadMessage

__all__ = ["END", "ById", "ByText", "Fused", "TokenKey", "alignment", "check_dist"]

Distribution = p.TopKDist | p.FullDist
Piece = int | bytes  # what an expert is fed: one of its token ids, or bytes to tokenize


@dataclass(frozen=True)
class Fused:
    keys: list[TokenKey]  # token ids (one vocabulary) or bytes / END (across vocabularies)
    probs: np.ndarray  # (len(keys),) fused probabilities of those keys (sum <= 1)

    def top(self, n: int) -> list[tuple[TokenKey, float]]:
        """The ``n`` most probable keys with their probabilities, most probable first."""
        if n <= 0 or not self.keys:
            return []
        idx = np.argsort(-self.probs, kind="stable")[:n]
        return [(self.keys[i], float(self.probs[i])) for i in idx.tolist()]


@dataclass(frozen=True)
class DistOptions:
    """What each request asks an expert to send back."""

    full: bool  # the whole distribution (exact fusion), else the top-k
    top_k: int | None


def check_dist(dist: Distribution, n_vocab: int) -> None:
    """BadMessage unless ``dist`` fits a vocabulary of ``n_vocab`` tokens."""
    if isinstance(dist, p.FullDist):
        if dist.n_vocab != n_vocab:
            raise BadMessage(f"full distribution over {dist.n_vocab} tokens, expected {n_vocab}")
    elif dist.ids and max(dist.ids) >= n_vocab:
        raise BadMessage(f"token id {max(dist.ids)} is outside the vocabulary of {n_vocab}")


def fuse_by_id(
    dists: Mapping[str, Distribution], weights: Mapping[str, float], n_vocab: int
) -> Fused:
    """Weighted mixture over token ids of experts sharing one vocabulary."""
    if all(isinstance(d, p.FullDist) for d in dists.values()):
        mix = np.zeros(n_vocab, dtype=np.float64)
        for name, d in dists.items():
            assert isinstance(d, p.FullDist)
            mix += weights[name] * np.exp(d.logprobs().astype(np.float64))
        return Fused(list(range(n_vocab)), mix)
    keys: dict[int, int] = {}
    for d in dists.values():
        ids = d.ids if isinstance(d, p.TopKDist) else []
        for t in ids:
            keys.setdefault(t, len(keys))
    probs = np.zeros(len(keys), dtype=np.float64)
    for name, d in dists.items():
        w = weights[name]
        if isinstance(d, p.FullDist):
            full = d.logprobs()
            probs += w * np.exp(full[list(keys)].astype(np.float64))
            continue
        row = np.full(len(keys), d.tail / max(1, n_vocab - len(d.ids)))  # unknown: even tail
        for t, lp in zip(d.ids, d.logprobs):
            row[keys[t]] = np.exp(lp)
        probs += w * row
    return Fused(list(keys), probs)


def fuse_by_text(
    dists: Mapping[str, p.TopKDist],
    weights: Mapping[str, float],
    pieces: Mapping[str, Sequence[bytes]],  # expert -> the bytes of each of its token ids
    eos: Mapping[str, Sequence[int]],
) -> Fused:
    """Weighted mixture over token texts (bytes) of experts with different vocabularies."""
    keys: dict[bytes | End, int] = {}
    rows: dict[str, dict[bytes | End, float]] = {}
    for name, d in dists.items():
        row: dict[bytes | End, float] = {}
        end_ids = set(eos[name])
        vocab = pieces[name]
        for t, lp in zip(d.ids, d.logprobs):
            key: bytes | End = END if t in end_ids else vocab[t]
            if not key:
                continue  # control tokens without text cannot be aligned
            row[key] = row.get(key, 0.0) + float(np.exp(lp))
            keys.setdefault(key, len(keys))
        rows[name] = row
    probs = np.zeros(len(keys), dtype=np.float64)
    for name, row in rows.items():
        for key, pr in row.items():
            probs[keys[key]] += weights[name] * pr
    return Fused(list(keys), probs)


class Alignment(abc.ABC):
    """How the tokens of a set of experts meet: the fusion, the keys a chosen token goes by,
    and what each expert is fed for a key."""

    kind: Literal["token-id", "token-text"]
    key_kind: KeyKind

    def __init__(
        self,
        infos: Mapping[str, p.AgentInfo],
        vocabs: Mapping[str, Vocab],
        experts: Sequence[str],
        options: DistOptions,
    ) -> None:
        self.infos = {n: infos[n] for n in experts}
        self.vocabs = {n: vocabs[n] for n in experts}
        self.options = options
        self.eos = {n: list(infos[n].eos_ids) for n in experts}
        self.pieces = {n: vocabs[n].pieces for n in experts}

    @abc.abstractmethod
    def fuse(self, dists: Mapping[str, Distribution], weights: Mapping[str, float]) -> Fused:
        """The fused distribution of the experts' distributions at one position."""

    @abc.abstractmethod
    def key(self, name: str, token: int) -> TokenKey | None:
        """Expert ``name``'s token as a fusion key (None: a control token without text,
        which no fusion can choose)."""

    @abc.abstractmethod
    def feed(self, name: str, key: TokenKey, dist: Distribution | None) -> Piece:
        """What to feed expert ``name`` for the chosen ``key``, given its distribution at
        the position the key was chosen at (None: not known)."""

    @abc.abstractmethod
    def guess(self, name: str, key: TokenKey) -> Piece | None:
        """What to feed ``name`` for a drafted key before its distribution one position
        earlier is known (checked afterwards with ``feed``); None when it cannot be fed."""

    @abc.abstractmethod
    def is_end(self, key: TokenKey) -> bool: ...

    @abc.abstractmethod
    def text(self, key: TokenKey) -> bytes:
        """The bytes ``key`` adds to the answer."""

    def codes(self, keys: Sequence[TokenKey]) -> np.ndarray:
        return key_codes(keys)

    def check(self, name: str, dist: Distribution) -> None:
        """BadMessage unless ``dist`` can take part in this fusion."""
        check_dist(dist, self.vocabs[name].n_vocab)

    @staticmethod
    def cost(piece: Piece) -> int:
        """Most tokens feeding a piece can take: one id, or bytes tokenized (one token per
        byte at worst, plus a word-boundary marker some tokenizers add)."""
        return len(piece) + 1 if isinstance(piece, bytes) else 1


class ById(Alignment):
    """Experts of one vocabulary: a key is a token id."""

    kind = "token-id"
    key_kind = "id"

    def __init__(
        self,
        infos: Mapping[str, p.AgentInfo],
        vocabs: Mapping[str, Vocab],
        experts: Sequence[str],
        options: DistOptions,
    ) -> None:
        super().__init__(infos, vocabs, experts, options)
        first = experts[0]
        self.n_vocab = vocabs[first].n_vocab  # the table's, not what an info claims
        self._pieces = vocabs[first].pieces
        self._eos = {t for ids in self.eos.values() for t in ids}

    def fuse(self, dists: Mapping[str, Distribution], weights: Mapping[str, float]) -> Fused:
        return fuse_by_id(dists, weights, self.n_vocab)

    def key(self, name: str, token: int) -> TokenKey:
        return token

    def feed(self, name: str, key: TokenKey, dist: Distribution | None) -> Piece:
        assert isinstance(key, int)
        return key

    def guess(self, name: str, key: TokenKey) -> Piece:
        assert isinstance(key, int)
        return key

    def is_end(self, key: TokenKey) -> bool:
        return isinstance(key, End) or key in self._eos

    def text(self, key: TokenKey) -> bytes:
        return self._pieces[key] if isinstance(key, int) else b""


class ByText(Alignment):
    """Experts of different vocabularies: a key is the bytes of a token (END for the end)."""

    kind = "token-text"
    key_kind = "bytes"

    def fuse(self, dists: Mapping[str, Distribution], weights: Mapping[str, float]) -> Fused:
        topk = {n: d for n, d in dists.items() if isinstance(d, p.TopKDist)}
        return fuse_by_text(topk, weights, self.pieces, self.eos)

    def check(self, name: str, dist: Distribution) -> None:
        super().check(name, dist)
        if not isinstance(dist, p.TopKDist):  # text fusion works on top-k lists
            raise BadMessage("sent a full distribution to a cross-vocabulary fusion")

    def key(self, name: str, token: int) -> TokenKey | None:
        if token in self.eos[name]:
            return END
        piece = self.pieces[name][token]
        return piece if piece else None

    def feed(self, name: str, key: TokenKey, dist: Distribution | None) -> Piece:
        assert isinstance(key, bytes)
        eos = self.eos[name]
        pieces = self.pieces[name]
        if isinstance(dist, p.TopKDist):
            for t in dist.ids:
                if pieces[t] == key and t not in eos:
                    return t
        own = self.vocabs[name].by_bytes.get(key)
        if own is not None and own not in eos:
            return own
        return bytes(key)

    def guess(self, name: str, key: TokenKey) -> Piece | None:
        if not isinstance(key, bytes):
            return None
        # Where one text has several tokens (a byte-fallback token and a normal one), the
        # normal one comes later in the vocabulary and is the one a model predicts.
        own = self.vocabs[name].by_bytes_last.get(key)
        if own is not None and own not in self.eos[name]:
            return own
        return self.feed(name, key, None)

    def is_end(self, key: TokenKey) -> bool:
        return isinstance(key, End)

    def text(self, key: TokenKey) -> bytes:
        return key if isinstance(key, bytes) else b""


def alignment(
    infos: Mapping[str, p.AgentInfo],
    vocabs: Mapping[str, Vocab],
    experts: Sequence[str],
    config: GatewayConfig,
) -> Alignment:
    """By id when every expert has the same tokenizer, else by text; full distributions
    (exact fusion) when one vocabulary is small enough, else the top-k."""
    if len({infos[n].tokenizer_hash for n in experts}) == 1:
        full = vocabs[experts[0]].n_vocab <= config.full_vocab_limit
        opts = DistOptions(full=full, top_k=None if full else config.top_k)
        return ById(infos, vocabs, experts, opts)
    return ByText(infos, vocabs, experts, DistOptions(full=False, top_k=config.top_k))
