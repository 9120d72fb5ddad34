"""Token-level fusion of next-token distributions (eq. 29) and sampling.

Same vocabulary: F(t) = Σ_n ω_n p_n(t) by token id. A top-k reply leaves the other tokens'
probabilities unknown except for their total (the tail), which is spread evenly over them:
exact when every expert sends its full distribution, an approximation otherwise.

Different vocabularies: align by token text, as raw bytes (as UniTE does, but on bytes, so
byte tokens that hold part of a UTF-8 character align only with the same bytes): each
candidate in the union of the experts' top-k lists gets Σ_n ω_n p_n(bytes), where p_n is
expert n's probability of a token whose text is exactly those bytes (0 when none is in its
top-k); end-of-generation tokens of every expert map to one ``END`` key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from moe2.agent.sampling import sampling_distribution
from moe2.shared import protocol as p
from moe2.shared.errors import BadMessage


class _End:
    """The one key every expert's end-of-generation tokens fuse under."""

    def __repr__(self) -> str:
        return "END"


END: Final = _End()
TextKey = bytes | _End


@dataclass(frozen=True)
class Fused:
    keys: list  # token ids (same vocabulary) or TextKeys (cross vocabulary)
    probs: np.ndarray  # (len(keys),) fused probabilities of those keys (sum <= 1)


def check_dist(dist: p.TopKDist | p.FullDist, n_vocab: int) -> None:
    """BadMessage unless ``dist`` fits a vocabulary of ``n_vocab`` tokens."""
    if isinstance(dist, p.FullDist):
        if dist.n_vocab != n_vocab:
            raise BadMessage(f"full distribution over {dist.n_vocab} tokens, expected {n_vocab}")
    elif dist.ids and max(dist.ids) >= n_vocab:
        raise BadMessage(f"token id {max(dist.ids)} is outside the vocabulary of {n_vocab}")


def fuse_by_id(
    dists: Mapping[str, p.TopKDist | p.FullDist], weights: Mapping[str, float], n_vocab: int
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
    keys: dict[TextKey, int] = {}
    rows: dict[str, dict[TextKey, float]] = {}
    for name, d in dists.items():
        row: dict[TextKey, float] = {}
        end_ids = set(eos[name])
        vocab = pieces[name]
        for t, lp in zip(d.ids, d.logprobs):
            key: TextKey = END if t in end_ids else vocab[t]
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


def choose(fused: Fused, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Index into ``fused.keys`` of the next token: greedy at temperature 0, else sampled from
    p^(1/T) restricted to the smallest set whose mass reaches ``top_p``."""
    probs = fused.probs
    if temperature <= 0.0 or len(probs) == 1:
        return int(np.argmax(probs))
    keep, qk = sampling_distribution(probs, temperature, top_p)
    return int(keep[rng.choice(len(keep), p=qk)])
