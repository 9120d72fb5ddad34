"""How a token is drawn, shared by the gateway (picking from the fused distribution) and an
agent drafting tokens for speculative fusion, so both sides compute it from the same numbers.

A token is named by a key: its id when the chosen experts share one vocabulary, else its
bytes, with ``END`` for every expert's end-of-generation tokens (``TokenKey``).

Greedy decoding takes the most probable key. Sampling (temperature > 0, top-p) draws the
token at answer position ``i`` by the Gumbel-max trick with noise that is a hash of
(seed, i, key), not a draw from a random stream::

    keep, q = sampling_distribution(probs, temperature=0.8, top_p=0.95)
    index = keep[argmax(log q + G(seed, i, key of each kept index))]     # draw(...)

That is an exact sample of q (Gumbel-max), and it consumes nothing: the token at position i
depends on the seed, i and the distribution there, never on what was computed before or how
long it took. So a seeded prompt gives the same text under any load, and a drafter that
draws from its own distribution with the same noise proposes the very token the gateway will
draw from the fused one whenever the two draws agree (the Gumbel coupling: at least
(1 - TV)/(1 + TV) of the time for distributions at total variation TV): speculative
decoding then accepts a drafted token exactly when per-token decoding would have drawn it,
and its answers are per-token answers, token for token, sampled or greedy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Final, Literal

import numpy as np

from moe2.shared import protocol as p


class End:
    """The one key every expert's end-of-generation tokens fuse under."""

    def __repr__(self) -> str:
        return "END"


END: Final = End()
TokenKey = int | bytes | End
KeyKind = Literal["id", "bytes"]  # how the keys of one generation are made

_M64 = (1 << 64) - 1
_END_CODE: Final = int.from_bytes(
    hashlib.blake2b(b"", digest_size=8, person=b"moe2-end").digest(), "little"
)


def bytes_code(piece: bytes) -> int:
    """A stable 64-bit code of a token's bytes (the same in every process and version)."""
    return int.from_bytes(
        hashlib.blake2b(piece, digest_size=8, person=b"moe2-key").digest(), "little"
    )


def key_codes(keys: Sequence[TokenKey]) -> np.ndarray:
    """(len(keys),) uint64 codes of fusion keys: ids as they are, bytes hashed, END fixed."""
    out = np.empty(len(keys), dtype=np.uint64)
    for i, key in enumerate(keys):
        if isinstance(key, End):
            out[i] = _END_CODE
        elif isinstance(key, bytes):
            out[i] = bytes_code(key)
        else:
            out[i] = key
    return out


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def gumbel(seed: int, position: int, codes: np.ndarray) -> np.ndarray:
    """(len(codes),) standard Gumbel noise, a pure function of (seed, position, code)."""
    pos = _mix(np.array([position & _M64], dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    base = _mix(np.array([seed & _M64], dtype=np.uint64) ^ pos)
    bits = _mix(_mix(codes.astype(np.uint64) ^ base) + np.uint64(0xD1B54A32D192ED03))
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1)
    return -np.log(-np.log(u))


def sampling_distribution(
    probs: np.ndarray, temperature: float, top_p: float
) -> tuple[np.ndarray, np.ndarray]:
    """(indices kept, their probabilities summing to 1): ``probs`` (n,) sharpened to
    p^(1/T) and restricted to the smallest set whose mass reaches ``top_p``, most probable
    first. Temperature must be > 0 (greedy is an argmax, not a distribution)."""
    with np.errstate(divide="ignore"):
        logits = np.log(np.maximum(probs, 1e-300)) / temperature
    q = np.exp(logits - logits.max())
    q /= q.sum()
    order = np.argsort(-q, kind="stable")
    if top_p < 1.0:
        cum = np.cumsum(q[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]
    else:
        keep = order
    return keep, q[keep] / q[keep].sum()


def draw(
    probs: np.ndarray,
    codes: np.ndarray,
    temperature: float,
    top_p: float,
    seed: int,
    position: int,
) -> int:
    """Index into ``probs`` (n,) of the token at answer ``position``: the most probable at
    temperature 0 (the first of equals), else the keyed Gumbel-max draw described above
    (``codes`` (n,): each index's key code)."""
    if temperature <= 0.0 or len(probs) == 1:
        return int(np.argmax(probs))
    keep, q = sampling_distribution(probs, temperature, top_p)
    with np.errstate(divide="ignore"):
        score = np.log(q) + gumbel(seed, position, codes[keep])
    return int(keep[int(np.argmax(score))])


def own_candidates(dist: p.TopKDist | p.FullDist) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) of one expert's distribution as sent on the wire: its
    top-k ids in their order (the tail left out), or every id of a full distribution."""
    if isinstance(dist, p.FullDist):
        lp = dist.logprobs()
        return np.arange(lp.shape[0]), np.exp(lp.astype(np.float64))
    return np.asarray(dist.ids, dtype=np.int64), np.exp(np.asarray(dist.logprobs, np.float64))


def draft_token(
    dist: p.TopKDist | p.FullDist,
    *,
    temperature: float,
    top_p: float,
    seed: int,
    position: int,
    keys: KeyKind = "id",
    piece: Callable[[int], bytes] | None = None,  # token id -> its bytes (keys="bytes")
    eos: frozenset[int] = frozenset(),
) -> int:
    """The token a drafter proposes at answer ``position``, drawn from its own distribution
    exactly as the gateway draws from the fused one (``draw``): by id, or, when the gateway
    fuses by text, over its tokens merged by bytes (END for end-of-generation tokens; tokens
    without text left out), then the first id of the drawn key in the order sent (the id
    per-token fusion would feed it)."""
    ids, probs = own_candidates(dist)
    if keys == "id":
        return int(ids[draw(probs, ids.astype(np.uint64), temperature, top_p, seed, position)])
    if piece is None:
        raise ValueError("drafting by bytes needs the token pieces")
    first: dict[bytes | End, int] = {}  # key -> the first id of it, in the order sent
    mass: dict[bytes | End, float] = {}
    for t, pr in zip(ids.tolist(), probs.tolist()):
        key: bytes | End = END if t in eos else piece(t)
        if not key:
            continue  # a control token without text: never a fusion candidate
        first.setdefault(key, t)
        mass[key] = mass.get(key, 0.0) + pr
    if not first:
        return int(ids[int(np.argmax(probs))])
    names = list(first)
    pick = draw(
        np.array([mass[k] for k in names]), key_codes(names), temperature, top_p, seed, position
    )
    return first[names[pick]]


def stream_draft(
    dist: p.TopKDist | p.FullDist, temperature: float, top_p: float, rng: np.random.Generator
) -> int:
    """A drafted token drawn from a random stream (requests without an answer position, from
    gateways of an earlier version): greedy at temperature 0."""
    ids, probs = own_candidates(dist)
    if temperature <= 0.0:
        return int(ids[int(np.argmax(probs))])
    keep, q = sampling_distribution(probs, temperature, top_p)
    return int(ids[keep][rng.choice(len(keep), p=q)])
