"""The one mixing rule's pure arithmetic (docs/method.md), shared by the controller (gate
training, the optimizer and evaluation, on stored scores: ``moe2.controller.mixing``) and the
gateway (multiple-choice answers scored live: ``moe2.agent.gateway.choices``).

Per token when every expert mixed shares one tokenizer (one vocabulary hash): the fused
probability of target token t is Σ_n ω_n p_{n,t} (eq. 13). Per sequence otherwise: token ids
of different vocabularies do not line up, so each expert's whole-target likelihood Π_t p_{n,t}
is mixed as one unit. Everything stays in log space::

    level = level_of([frozenset({h_a}), frozenset({h_b})])       # "token" | "sequence"
    u = units(logp, level, "sample 3 option 1")                  # (experts, units) nats
    ll = mixture_loglik(log_w[:, None], u)                       # Σ_u log Σ_n ω_n p_{n,u}

A "unit" is a token (per-token mixing) or the whole target (per-sequence mixing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from moe2.shared.errors import ConfigError

Level = Literal["token", "sequence"]
TOKEN: Level = "token"
SEQUENCE: Level = "sequence"

FloatArray = NDArray[np.float64]


def level_of(tokenizers: Sequence[frozenset[str]]) -> Level:
    """Per token iff every expert's scores (each a set of tokenizer hashes: one per stored
    option, or the one hash of a live expert) carry one and the same tokenizer hash."""
    hashes: frozenset[str] = frozenset().union(*tokenizers)
    return TOKEN if len(hashes) == 1 else SEQUENCE


def units(logp: FloatArray, level: Level, where: str) -> FloatArray:
    """(experts, units) log-probabilities (nats) of one target from its (experts, tokens)
    scores, NaN-padded where an expert's tokenization is shorter."""
    if level == TOKEN:
        if np.isnan(logp).any():
            raise ConfigError(
                f"{where}: the experts share one tokenizer hash but scored different token "
                "counts for the same target"
            )
        return logp
    return np.asarray(np.nansum(logp, axis=1, keepdims=True), dtype=np.float64)


def steps(logp: FloatArray) -> int:
    """Generation steps T of one target from its (experts, tokens) NaN-padded scores: its token
    count (across vocabularies the longest tokenization, since the fused answer ends when the
    slowest expert's does)."""
    return int(np.count_nonzero(~np.isnan(logp), axis=1).max())


def logsumexp(z: FloatArray, axis: int) -> FloatArray:
    """log Σ exp(z) along ``axis`` (removed), exact for −inf entries and all-−inf rows."""
    top = np.max(z, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.exp(z - top).sum(axis=axis, keepdims=True)) + top
    return np.asarray(np.squeeze(out, axis=axis), dtype=np.float64)


def mixture_loglik(log_w: FloatArray, logp: FloatArray) -> FloatArray:
    """Σ_u log Σ_n ω_n p_{n,u}: ``log_w`` and ``logp`` broadcast with experts on axis -2 and
    units on axis -1 (e.g. log_w (experts, 1), logp (experts, units)) -> the leading axes."""
    return np.asarray(logsumexp(log_w + logp, axis=-2).sum(axis=-1), dtype=np.float64)


def padded(rows: Sequence[Sequence[float]]) -> FloatArray:
    """(experts, tokens) NaN-padded array of each expert's per-token log-probabilities."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
