"""The one mixing rule: how the experts' stored target log-probabilities are fused
(docs/method.md, "The loss").

Per token when every expert *mixed* scored the sample with the same tokenizer (one vocabulary
hash): the fused probability of target token t is Σ_n ω_n p_{n,t} (eq. 13). Per sequence
otherwise: token ids of different vocabularies do not line up, so each expert's whole-target
likelihood Π_t p_{n,t} is mixed as one unit. The choice is made per sample from the tokenizer
hashes the registry stored with the scores (``Score.tokenizer_hash``), never from token counts,
by ``moe2.shared.mixing.level_of`` over the experts that take part (those with a weight), as
the gateway makes it over the experts it chose: two experts of one family fuse per token even
in a fleet that also holds another family. Gate training, the optimizer and evaluation all take
their arrays from ``mix`` below::

    mixed = mix(registry.score_table("tiny"))
    ll = mixed.option_loglik(log_w)        # (samples, options) fused log-likelihood, nats
    loss = mixed.loss(log_w)               # eq. 13 on the correct options, mean over samples

A "unit" is a token (per-token samples) or the whole target (per-sequence samples). ``logp`` and
``mask`` hold the units of the level over *all* experts (the gate trains with S = N, and the
optimizer's objective is stated on them); ``option_loglik`` takes each sample's level over the
experts mixed. The arithmetic (the level, units, the log-space mixture) lives in
``moe2.shared.mixing``, shared with the gateway's multiple-choice answers; this module lays
stored scores out for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from moe2.controller.registry.db import ScoreTable
from moe2.shared.errors import ConfigError
from moe2.shared.mixing import (
    SEQUENCE,
    TOKEN,
    Level,
    level_of,
    logsumexp,
    mixture_loglik,
    steps,
    units,
)

__all__ = [
    "GATE_FLOOR",
    "SEQUENCE",
    "TOKEN",
    "Level",
    "Mixed",
    "level_of",
    "mix",
    "mixture_loglik",
    "normalise",
    "steps",
    "units",
]

# A gate value of exactly 0 would make an expert's weight 0 even alone (0/0 in a singleton):
# floor it. Weights are renormalised over the experts mixed, so the floor only matters there.
GATE_FLOOR = 1e-30


def normalise(gate: NDArray[np.float64]) -> NDArray[np.float64]:
    """(samples, experts) gate values floored at GATE_FLOOR and renormalised to sum to 1."""
    g = np.maximum(np.asarray(gate, dtype=np.float64), GATE_FLOOR)
    return np.asarray(g / g.sum(axis=1, keepdims=True))


@dataclass
class Mixed:
    """A score table in the units of the mixing rule, dense and padded.

    ``logp``: (samples, options, experts, units) nats, 0 where masked; ``mask``: (samples,
    options, units); ``per_token``: (samples,) True where all experts together mix per token;
    ``steps``: (samples, options) generation steps T of each option (all experts).

    From a score table (``mix``) also, per expert: ``tokenizers`` (samples × experts hash
    sets), ``raw`` (samples, options, experts, tokens) log-probabilities NaN-padded,
    ``n_tokens`` (samples, options, experts) and ``prompt_tokens`` (samples, experts, -1 where
    unknown): what a subset's own level and each expert's real work need. Arrays built by hand
    without them mix every subset at ``per_token``'s level.
    """

    experts: list[str]
    sample_idx: NDArray[np.int64]  # (samples,) position of each sample in its dataset
    prompts: list[str]
    choices: list[tuple[str, ...]]  # the options' texts (one target for free answers)
    apps: list[str]
    logp: NDArray[np.float64]
    mask: NDArray[np.bool_]
    n_options: NDArray[np.int64]  # (samples,)
    answer: NDArray[np.int64]  # (samples,) index of the correct option
    per_token: NDArray[np.bool_]  # (samples,)
    steps: NDArray[np.int64]  # (samples, options)
    tokenizers: list[list[frozenset[str]]] | None = None  # samples × experts
    raw: NDArray[np.float64] | None = None  # (samples, options, experts, tokens), NaN-padded
    n_tokens: NDArray[np.int64] | None = None  # (samples, options, experts)
    prompt_tokens: NDArray[np.int64] | None = None  # (samples, experts), -1: unknown

    @property
    def n_samples(self) -> int:
        return len(self.prompts)

    def select(self, idx: Sequence[int] | NDArray[np.integer]) -> Mixed:
        """The samples at positions ``idx`` (in this object's order)."""
        ix = np.asarray(idx, dtype=np.int64)
        return Mixed(
            list(self.experts),
            self.sample_idx[ix],
            [self.prompts[i] for i in ix],
            [self.choices[i] for i in ix],
            [self.apps[i] for i in ix],
            self.logp[ix],
            self.mask[ix],
            self.n_options[ix],
            self.answer[ix],
            self.per_token[ix],
            self.steps[ix],
            None if self.tokenizers is None else [self.tokenizers[i] for i in ix],
            None if self.raw is None else self.raw[ix],
            None if self.n_tokens is None else self.n_tokens[ix],
            None if self.prompt_tokens is None else self.prompt_tokens[ix],
        )

    def levels(self, mixed: NDArray[np.bool_]) -> NDArray[np.bool_]:
        """(samples,) True where the experts marked in ``mixed`` (samples, experts) share one
        tokenizer, so that they mix per token (``moe2.shared.mixing.level_of``)."""
        if self.tokenizers is None:
            return self.per_token.copy()
        out = np.empty(self.n_samples, dtype=bool)
        for i, (hashes, on) in enumerate(zip(self.tokenizers, mixed, strict=True)):
            taking = [h for h, m in zip(hashes, on, strict=True) if m]
            out[i] = bool(taking) and level_of(taking) == TOKEN
        return out

    def answer_steps(
        self, mixed: NDArray[np.bool_], option: NDArray[np.int64]
    ) -> NDArray[np.int64]:
        """(samples,) T of each sample's ``option`` answered by the experts in ``mixed``
        (samples, experts): its token count, the longest tokenization across vocabularies."""
        rows = np.arange(self.n_samples)
        if self.n_tokens is None:
            return self.steps[rows, option]
        counts = np.where(mixed, self.n_tokens[rows, option], 0)  # (samples, experts)
        return np.asarray(counts.max(axis=1), dtype=np.int64)

    def target(self, i: int, option: int | None = None) -> NDArray[np.float64]:
        """(experts, units) log-probabilities of sample i's option (default: the correct one)."""
        o = int(self.answer[i]) if option is None else option
        n = int(self.mask[i, o].sum())
        return self.logp[i, o, :, :n]

    def option_loglik(self, log_w: NDArray[np.float64]) -> NDArray[np.float64]:
        """(samples, options) fused log-likelihood of every option under (samples, experts)
        log weights (rows of log ω: −inf for experts left out), at the level of the experts
        mixed (those with a finite weight); −inf for padded options."""
        mixed = logsumexp(log_w[:, None, :, None] + self.logp, axis=2)  # (samples, options, units)
        ll = np.where(self.mask, mixed, 0.0).sum(-1)
        # A subset of one tokenizer in a sample all experts mix per sequence: per token.
        finer = self.levels(np.isfinite(log_w)) & ~self.per_token
        if finer.any():
            assert self.raw is not None  # levels() differ only with the per-expert arrays
            ix = np.flatnonzero(finer)
            raw = self.raw[ix]  # (k, options, experts, tokens)
            ref = np.argmax(np.isfinite(log_w[ix]), axis=1)  # an expert mixed, per sample
            mask = ~np.isnan(raw[np.arange(ix.size), :, ref])  # (k, options, tokens)
            z = log_w[ix][:, None, :, None] + np.nan_to_num(raw, nan=0.0)
            fused = np.where(mask, logsumexp(z, axis=2), 0.0).sum(-1)  # (k, options)
            ll[ix, : fused.shape[1]] = fused
        present = np.arange(self.logp.shape[1])[None, :] < self.n_options[:, None]
        return np.where(present, ll, -np.inf)

    def loss(self, log_w: NDArray[np.float64]) -> float:
        """Eq. 13 on the correct options, mean over samples (nats)."""
        ll = self.option_loglik(log_w)
        return float(-ll[np.arange(self.n_samples), self.answer].mean())


def mix(table: ScoreTable, dataset: str = "") -> Mixed:
    """The table's scores in mixing units; the level is decided per sample (``level_of``)."""
    n, e = len(table.samples), len(table.experts)
    if n == 0:
        raise ConfigError(f"dataset {dataset!r} has no fully scored samples to mix")
    opts = max(len(o) for o in table.logp)
    per_token = np.array([level_of(h) == TOKEN for h in table.tokenizers], dtype=bool)
    width = 1
    longest = max(a.shape[1] for per in table.logp for a in per)
    for i, per in enumerate(table.logp):
        if per_token[i]:
            width = max(width, *(a.shape[1] for a in per))
    logp = np.zeros((n, opts, e, width))
    mask = np.zeros((n, opts, width), dtype=bool)
    step = np.zeros((n, opts), dtype=np.int64)
    raw = np.full((n, opts, e, longest), np.nan)
    n_tokens = np.zeros((n, opts, e), dtype=np.int64)
    for i, (smp, per) in enumerate(zip(table.samples, table.logp, strict=True)):
        level: Level = TOKEN if per_token[i] else SEQUENCE
        for o, a in enumerate(per):
            where = f"{dataset or 'dataset'} sample {smp.idx} option {o}"
            counts = np.count_nonzero(~np.isnan(a), axis=1)  # (experts,)
            _same_counts(table.tokenizers[i], counts, where)
            u = units(a, level, where)
            logp[i, o, :, : u.shape[1]] = u
            mask[i, o, : u.shape[1]] = True
            step[i, o] = steps(a)
            raw[i, o, :, : a.shape[1]] = a
            n_tokens[i, o] = counts
    return Mixed(
        experts=list(table.experts),
        sample_idx=np.array([s.idx for s in table.samples], dtype=np.int64),
        prompts=[s.prompt for s in table.samples],
        choices=[tuple(s.targets) for s in table.samples],
        apps=[s.app for s in table.samples],
        logp=logp,
        mask=mask,
        n_options=np.array([len(o) for o in table.logp], dtype=np.int64),
        answer=np.array([s.answer for s in table.samples], dtype=np.int64),
        per_token=per_token,
        steps=step,
        tokenizers=[list(h) for h in table.tokenizers],
        raw=raw,
        n_tokens=n_tokens,
        prompt_tokens=(
            np.vstack(table.prompt_tokens)
            if table.prompt_tokens
            else np.full((n, e), -1, dtype=np.int64)
        ),
    )


def _same_counts(
    tokenizers: Sequence[frozenset[str]], counts: NDArray[np.int64], where: str
) -> None:
    """Experts of one tokenizer must have scored the same number of tokens for a target, or
    mixing them per token would misalign."""
    seen: dict[str, int] = {}
    for hashes, count in zip(tokenizers, counts, strict=True):
        if len(hashes) != 1:
            continue
        (h,) = hashes
        if seen.setdefault(h, int(count)) != int(count):
            raise ConfigError(
                f"{where}: experts share one tokenizer hash but stored different token counts "
                "for the same target; delete and re-collect these scores"
            )
