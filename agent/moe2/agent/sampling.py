"""The distribution a token is drawn from, shared by the gateway (picking from the fused
distribution) and an agent drafting tokens for speculative fusion, so both sides compute it
from the same numbers and the gateway knows exactly with which probability a drafted token
was drawn.

    keep, q = sampling_distribution(probs, temperature=0.8, top_p=0.95)
    index = keep[rng.choice(len(keep), p=q)]       # an index into probs
"""

from __future__ import annotations

import numpy as np

from moe2.shared import protocol as p


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


def own_candidates(dist: p.TopKDist | p.FullDist) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) of one expert's distribution as sent on the wire: its
    top-k ids in their order (the tail left out), or every id of a full distribution."""
    if isinstance(dist, p.FullDist):
        lp = dist.logprobs()
        return np.arange(lp.shape[0]), np.exp(lp.astype(np.float64))
    return np.asarray(dist.ids, dtype=np.int64), np.exp(np.asarray(dist.logprobs, np.float64))


def draft_distribution(
    dist: p.TopKDist | p.FullDist, temperature: float, top_p: float
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) a drafter samples its next token from (temperature > 0)."""
    ids, probs = own_candidates(dist)
    keep, q = sampling_distribution(probs, temperature, top_p)
    return ids[keep], q


def greedy_draft(dist: p.TopKDist | p.FullDist) -> int:
    """The drafter's greedy token: the first most probable id, in the order sent."""
    ids, probs = own_candidates(dist)
    return int(ids[int(np.argmax(probs))])
