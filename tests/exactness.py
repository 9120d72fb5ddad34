"""What "the same answer" means between two decoders, for tests: the same fused distributions
within a tolerance derived from float32 kernels, and the same choices up to a near-tie.

A batched evaluation (speculative verification) and a one-token step of the same history
compute the same sums in another order (llama.cpp's float32 matmul takes llamafile's sgemm
from two rows on, ggml's vec_dot for one). A float32 dot product of length n is within
γ_n·Σ|a_i·b_i| of its exact value, γ_n = n·u/(1 - n·u), u = 2^-24 (Higham, Accuracy and
Stability of Numerical Algorithms, §3.1), so two orders are within 2·γ_n of each other,
relative to Σ|a_i·b_i|. Taking that sum at the logits' own scale R (the spread of the
log-probabilities at the position), and one such reduction per block (attention and MLP of
every layer, and the output layer: L of them, the longest of length n = n_ff), the logits of
the two evaluations differ by at most δ = 2·L·γ_n·R, a log-probability (logit minus
log-sum-exp) by 2δ, and a probability p by p·(e^{2δ} - 1). For the tiny experts (2 layers,
n_ff 256) and R ≈ 20 that is about 0.6% of p: the differences seen on x86 CPUs are below
1e-6 absolute, thousands of times less, but the bound is the kernels', not one CPU's. A
fused distribution F = Σ ω_n p_n inherits it: |ΔF| ≤ F·(e^{2δ} - 1). With top-k lists a key
at the edge of an expert's list may be in one evaluation's list and not the other's: its
fused probability then moves by at most the k-th probability of that list, which is 1/k at
most.

    tally = Tally()
    same_answer(base, other, Sampling(), top_k=None, tally=tally, label="tree")
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moe2.agent.gateway.fusion import Fused
from moe2.agent.gateway.generation import GenerationResult, Sampling
from moe2.agent.sampling import gumbel, key_codes, sampling_distribution

U = 2.0**-24  # float32 unit roundoff


@dataclass(frozen=True)
class Depth:
    """What the tolerance needs of a model: its blocks and longest reduction."""

    n_layer: int
    n_ff: int


TINY = Depth(n_layer=2, n_ff=256)  # controller.experts.tiny.TinySpec


def relative_tolerance(spread: float, depth: Depth = TINY) -> float:
    """e^{2δ} - 1 for log-probabilities spread over ``spread`` nats (see above)."""
    n = depth.n_ff
    gamma_n = n * U / (1 - n * U)
    blocks = 2 * depth.n_layer + 1
    delta = 2 * blocks * gamma_n * spread
    return math.expm1(2 * delta)


def spread_of(fused: Fused) -> float:
    lp = np.log(fused.probs[fused.probs > 0])
    return float(lp.max() - lp.min())


def near_tie(fused: Fused, sampling: Sampling, position: int, depth: Depth = TINY) -> bool:
    """Whether the choice at this position could go either way within the tolerance."""
    tol = relative_tolerance(spread_of(fused), depth)
    if sampling.temperature <= 0:
        top = np.sort(fused.probs)[-2:]
        return len(top) == 2 and top[1] - top[0] <= (top[0] + top[1]) * tol
    keep, q = sampling_distribution(fused.probs, sampling.temperature, sampling.top_p)
    codes = key_codes([fused.keys[i] for i in keep.tolist()])
    score = np.sort(np.log(q) + gumbel(sampling.seed or 0, position, codes))[-2:]
    # a log-probability moves by log(1 + tol) at most, sharpened by 1/T, for either key
    return len(score) == 2 and score[1] - score[0] <= 2 * math.log1p(tol) / sampling.temperature


@dataclass
class Tally:
    compared: int = 0  # positions whose choices were compared
    ties: int = 0  # answers that parted at a near-tie (allowed)
    rounds: int = 0
    tree_rounds: int = 0
    tested: int = 0
    accepted: int = 0


def same_answer(
    base: tuple[GenerationResult, list[Fused]],
    other: tuple[GenerationResult, list[Fused]],
    sampling: Sampling,
    *,
    top_k: int | None,  # None: full distributions
    tally: Tally,
    label: str,
    depth: Depth = TINY,
) -> None:
    """``other`` (a decoder's answer and the fused distributions it chose from) against
    ``base`` (per-token decoding's): the same distributions within the tolerance, position
    by position, and the same choices until the first near-tie, where they may part."""
    (b, b_steps), (o, o_steps) = base, other
    st = o.speculation
    assert st is not None
    tally.rounds += st.rounds
    tally.tree_rounds += st.tree_rounds
    tally.tested += st.tested
    tally.accepted += st.accepted
    edge = 0.0 if top_k is None else 1.0 / top_k
    for i, (x, y) in enumerate(zip(b_steps, o_steps)):
        px, py = dict(zip(x.keys, x.probs.tolist())), dict(zip(y.keys, y.probs.tolist()))
        tol = relative_tolerance(max(spread_of(x), spread_of(y)), depth)
        for key in px.keys() & py.keys():
            assert abs(px[key] - py[key]) <= px[key] * tol + edge, (label, i, key)
        pick_b = b.picks[i] if i < len(b.picks) else None
        pick_o = o.picks[i] if i < len(o.picks) else None
        if pick_b != pick_o:
            assert near_tie(x, sampling, i, depth), (
                f"{label} chose {pick_o!r} where per-token chose {pick_b!r} at {i}"
            )
            tally.ties += 1
            return
        tally.compared += 1
    assert o.picks == b.picks and o.text == b.text, label
    assert o.finish_reason == b.finish_reason, label
