"""Speculative fused decoding: the same answer as per-token fusion for a fraction of the
round trips.

A round: the highest-weighted expert (the drafter) is fed the last chosen token X and drafts
γ tokens d_1..d_γ locally (one ``draft`` request); then every other chosen expert is fed X,
d_1..d_{γ-1} in one forward pass and returns its distribution after each (one ``verify``
request each, all at once). The gateway now holds every expert's distribution at γ
positions, fuses each (eq. 29, exactly as per-token fusion does) and walks them:

* greedy: d_{i+1} is accepted while it is the fused argmax at position i; the first
  disagreement is replaced by the fused choice there;
* sampling (temperature, top-p): d_{i+1} is accepted with probability min(1, P_i/q_i) where
  P_i is the distribution per-token fusion samples from at position i and q_i the one the
  drafter drew d_{i+1} from (``moe2.agent.sampling``, computed by both sides from the same
  numbers); on rejection the token is drawn from the normalised residual max(0, P_i − q_i).
  Each emitted token then has exactly the distribution P_i (Leviathan et al. 2023).

The chosen token at the stopping position becomes the next X; sessions holding more (the
rest of a draft) are rewound (``rewind_to``) to that position in the next request. A round
emits between 1 and γ tokens for two round trips; γ adapts to the measured acceptance rate,
round trip and drafting cost (``GammaController``), and a round falls back to a per-token
step when that is cheaper, when the answer has one token left, or near a full context.

What is guaranteed. Given the experts' distributions, the decisions are per-token fusion's,
position by position, so the answer is token-for-token the per-token answer (greedy) or has
exactly its distribution (sampling). The distributions themselves: a verifier computes its
positions in one batched forward pass. On the CPU the agent runs llama.cpp with flash
attention, which computes each token's attention on its own, so on quantized models the
batched pass gives bit-identical logits to single steps (checked on SmolLM2 and Gemma-3);
F32/F16 weights take another matmul path in a batch, 1e-6 apart in log-probability (the
tiny test experts), so only a fused tie within that could break differently. Without flash
attention the attention itself differs by up to 0.1 in probability on SmolLM2 and greedy
answers do diverge. On a GPU
llama.cpp picks kernels by batch size, so the last bits may differ and a fused near-tie can
break differently. Across vocabularies, an expert is fed a drafted token's bytes the way
per-token fusion would feed it (its top-k token with those bytes, else its lowest id, else
the bytes to tokenize), which depends on its distribution one position earlier: the gateway
feeds a guess in the batch, checks it against that rule afterwards, and accepts nothing past
a position where the guess was wrong, so the history every expert sees is per-token fusion's.

    spec = Speculation(generation)
    finish = spec.run(open_replies, picks, max_tokens)
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from moe2.agent.gateway.fusion import END, Fused, check_dist, choose
from moe2.agent.sampling import draft_distribution, sampling_distribution
from moe2.shared import protocol as p
from moe2.shared.errors import (
    BadMessage,
    ContextOverflow,
    DeadlineExceeded,
    Moe2Error,
    NoExperts,
    RequestTimeout,
)

if TYPE_CHECKING:
    from moe2.agent.gateway.generation import FinishReason, Generation

log = logging.getLogger(__name__)


@dataclass
class SpeculationStats:
    rounds: int = 0  # speculative rounds (draft + verify)
    steps: int = 0  # per-token steps taken instead
    tested: int = 0  # drafted tokens put to the acceptance test
    accepted: int = 0
    gamma_total: int = 0  # sum of γ over rounds
    ahead_used: int = 0  # drafts made while the previous round was verified, then used
    ahead_wasted: int = 0  # ... and thrown away (the previous draft was not all accepted)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.tested if self.tested else 0.0

    @property
    def mean_gamma(self) -> float:
        return self.gamma_total / self.rounds if self.rounds else 0.0


class GammaMemory:
    """What a gateway has learned about drafting, per set of experts, across prompts: the
    draft length, acceptance and costs of the last answers start the next one (thread-safe:
    prompts are generated concurrently; a controller is copied in and stored back)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[tuple[str, ...], GammaController] = {}

    def start(self, experts: Iterable[str], start: int, max_gamma: int) -> GammaController:
        key = tuple(sorted(experts))
        with self._lock:
            known = self._known.get(key)
            return copy.copy(known) if known is not None else GammaController(start, max_gamma)

    def remember(self, experts: Iterable[str], control: GammaController) -> None:
        with self._lock:
            self._known[tuple(sorted(experts))] = copy.copy(control)


class GammaController:
    """Chooses the draft length γ that maximises expected tokens per second.

    With acceptance rate α per drafted token, a round of γ emits E(γ) = (1 − α^γ)/(1 − α)
    tokens on average (accepted ones, plus the correction at the first rejection) and takes
    T(γ) = O + γ·c: O the round's fixed cost (two round trips, the verification pass,
    queueing), c the drafter's cost per drafted token, both measured (exponential averages).
    A per-token step takes about O/2 + c for one token; it is chosen when that is faster,
    with a speculative round every ``probe_every`` steps to keep α measured.
    """

    def __init__(self, start: int, max_gamma: int, *, decay: float = 0.8) -> None:
        self.gamma = start
        self.max_gamma = max_gamma
        self.decay = decay
        # Acceptance counts, decayed; the prior is 0.8 with the weight of two tokens.
        self._accepted, self._tested = 1.6, 2.0
        self.fixed_ms: float | None = None
        self.draft_ms: float | None = None  # per drafted token
        self.per_token = False
        self._since_probe = 0
        self.probe_every = 8

    @property
    def alpha(self) -> float:
        return min(self._accepted / self._tested, 0.9999)

    def expected_tokens(self, gamma: int) -> float:
        a = self.alpha
        return (1 - a**gamma) / (1 - a)

    def update(
        self,
        tested: int,
        accepted: int,
        gamma: int,
        wall_ms: float | None = None,
        draft_ms: float = 0.0,
    ) -> None:
        """Count a round's acceptances; with its timing (``wall_ms``: draft sent to the
        last verification in) choose the next γ. A pipelined round's draft was made while
        the previous round was verified, so it has no such timing."""
        d = self.decay
        self._accepted = d * self._accepted + accepted
        self._tested = d * self._tested + tested
        if wall_ms is None:
            if self.draft_ms is not None:
                self._choose()
            return
        per = draft_ms / max(1, gamma)
        fixed = max(0.0, wall_ms - draft_ms)
        self.draft_ms = per if self.draft_ms is None else d * self.draft_ms + (1 - d) * per
        self.fixed_ms = fixed if self.fixed_ms is None else d * self.fixed_ms + (1 - d) * fixed
        self._choose()

    def _choose(self) -> None:
        assert self.fixed_ms is not None and self.draft_ms is not None
        best, best_rate = 1, 0.0
        for g in range(1, self.max_gamma + 1):
            rate = self.expected_tokens(g) / (self.fixed_ms + g * self.draft_ms + 1e-6)
            if rate > best_rate:
                best, best_rate = g, rate
        self.gamma = best
        step_rate = 1.0 / (self.fixed_ms / 2 + self.draft_ms + 1e-6)
        self.per_token = step_rate > best_rate
        self._since_probe = 0

    def next_is_per_token(self) -> bool:
        if not self.per_token:
            return False
        self._since_probe += 1
        return self._since_probe < self.probe_every


@dataclass
class _Position:
    """Where one expert's session stands: the history length at the current position, the
    tokens it holds (more when a draft left some), its distribution there."""

    length: int
    held: int
    dist: Any

    def rewind(self) -> int | None:
        return self.length if self.held > self.length else None


@dataclass
class _Ahead:
    """A draft asked for before the previous one was verified: the drafter continues from
    its own last drafted token, which is then the next X if the whole draft is accepted."""

    drafter: str
    future: Future[p.DistributionsReply]
    gamma: int
    key: Any  # the X it assumes


class _Unfeedable:
    """The key of a drafted control token without text: never a fusion candidate."""


class Speculation:
    def __init__(self, gen: Generation, memory: GammaMemory | None = None) -> None:
        self.g = gen
        cfg = gen.config
        self.memory = memory
        self._experts = list(gen.weights)
        self.control = (
            memory.start(self._experts, cfg.speculative_gamma, cfg.speculative_max_gamma)
            if memory is not None
            else GammaController(cfg.speculative_gamma, cfg.speculative_max_gamma)
        )
        self.stats = SpeculationStats()
        self.at: dict[str, _Position] = {}
        self.ahead: _Ahead | None = None
        self.pipeline = cfg.speculative_pipeline

    # ------------------------------------------------------------------ the loop

    def run(
        self, replies: Mapping[str, p.DistributionReply], picks: list[Any], max_tokens: int
    ) -> FinishReason:
        g = self.g
        self.at = {
            n: _Position(r.n_tokens, r.n_tokens, r.dist)
            for n, r in replies.items()
            if n in g.weights
        }
        live = {n: pos.dist for n, pos in self.at.items() if n in g.weights}
        if not live:
            raise NoExperts("no expert answered")
        try:
            return self._run(live, picks, max_tokens)
        finally:
            if self.memory is not None and self.stats.rounds:
                self.memory.remember(self._experts, self.control)

    def _run(self, live: dict[str, Any], picks: list[Any], max_tokens: int) -> FinishReason:
        g = self.g
        fused = g._fuse(live, 0)
        pick = self._choose(fused, 0)
        if not g.accept_pick(pick, picks):
            return "stop"
        while len(picks) < max_tokens:
            left = max_tokens - len(picks)
            gamma = min(self.control.gamma, left, self._room(pick))
            if self.ahead is not None:  # drafted while the last round was verified
                outcome = self._round(pick, picks, self.ahead.gamma, max_tokens)
            elif gamma < 2 or self.control.next_is_per_token():
                outcome = self._step(pick, picks)
            else:
                outcome = self._round(pick, picks, gamma, max_tokens)
            if isinstance(outcome, str):
                return outcome
            pick = outcome[0]
        return "length"

    def _choose(self, fused: Fused, step: int) -> Any:
        g = self.g
        if g.on_step is not None:
            g.on_step(step, fused)
        return fused.keys[choose(fused, g.sampling.temperature, g.sampling.top_p, g._rng)]

    def _room(self, pick: Any) -> int:
        """Most tokens a round may draft. One vocabulary: what the fullest context leaves
        (the verifiers take γ tokens). Across vocabularies the verifiers' feeds are cut to
        their room instead (``_round``); 0 when X itself might not fit an expert: a
        per-token step then ends the answer exactly where per-token fusion would."""
        g = self.g
        room = 1 << 30
        for name in g.weights:
            free = g.infos[name].n_ctx - self.at[name].length
            room = min(room, free if g.by_id else (1 << 30 if free >= _cost(pick) else 0))
        return room

    def _options(self) -> dict[str, Any]:
        return self.g._options()

    # ------------------------------------------------------------------ a per-token step

    def _step(self, pick: Any, picks: list[Any]) -> FinishReason | tuple[Any]:
        """One token the per-token way (one round trip to every expert)."""
        g = self.g
        self.stats.steps += 1
        futures = {}
        for name in g.weights:
            pos = self.at[name]
            piece = g.feed_piece(name, pick, pos.dist)
            sid = g.sessions[name]
            opts = self._options()
            if pos.rewind() is not None:
                opts["rewind_to"] = pos.rewind()
            req = (
                p.StepRequest(session=sid, tokens=[piece], **opts)
                if isinstance(piece, int)
                else p.StepRequest.with_bytes(sid, piece, **opts)
            )
            futures[name] = g.rpc.call_async(name, req)
        try:
            replies = g._gather(futures, len(picks))
        except ContextOverflow:
            return "context"
        for name, r in replies.items():
            self.at[name] = _Position(r.n_tokens, r.n_tokens, r.dist)
        live = {n: r.dist for n, r in replies.items() if n in g.weights}
        if not live:
            raise NoExperts("no expert answered")
        fused = g._fuse(live, len(picks))
        nxt = self._choose(fused, len(picks))
        if not g.accept_pick(nxt, picks):
            return "stop"
        return (nxt,)

    # ------------------------------------------------------------------ a speculative round

    def _round(
        self, pick: Any, picks: list[Any], gamma: int, max_tokens: int
    ) -> FinishReason | tuple[Any]:
        g = self.g
        t0 = time.perf_counter()
        ahead, self.ahead = self.ahead, None
        draft: p.DistributionsReply | FinishReason | None = None
        if ahead is not None and ahead.drafter in g.weights:
            self.stats.ahead_used += 1
            drafter = ahead.drafter
            draft = self._take_draft(drafter, ahead.future, gamma, len(picks))
            if isinstance(draft, str):
                return draft
        while draft is None:  # a drafter that fails is dropped and the next one drafts
            ahead = None
            drafter = max(g.weights, key=lambda n: g.weights[n])
            pos = self.at[drafter]
            piece = g.feed_piece(drafter, pick, pos.dist)
            fut = self._send_draft(drafter, piece, pos.rewind(), gamma)
            draft = self._take_draft(drafter, fut, gamma, len(picks))
            if isinstance(draft, str):
                return draft
        assert isinstance(draft, p.DistributionsReply)
        m = len(draft.drafted)
        keys = [self._key(drafter, t) for t in draft.drafted]
        # Every other expert: X, then its guess for each drafted key but the last.
        fed: dict[str, list[int | bytes]] = {}
        futures: dict[str, Future[p.DistributionsReply]] = {}
        for name in g.weights:
            if name == drafter:
                continue
            pos = self.at[name]
            pieces: list[int | bytes] = [g.feed_piece(name, pick, pos.dist)]
            free = g.infos[name].n_ctx - pos.length - _cost(pieces[0])
            for key in keys[: m - 1]:
                guess = self._guess(name, key)
                if guess is None or _cost(guess) > free:
                    break  # what cannot be fed (or would not fit) is not verified
                free -= _cost(guess)
                pieces.append(guess)
            fed[name] = pieces
            req = p.VerifyRequest(
                session=g.sessions[name],
                rewind_to=pos.rewind(),
                feed=p.VerifyRequest.encode_pieces(pieces),
                **self._options(),
            )
            futures[name] = g.rpc.call_async(name, req, timeout=self._limit(gamma))
        self._draft_ahead(drafter, draft, keys, len(picks), max_tokens)
        verified = self._collect(futures, fed, len(picks), gamma)
        if isinstance(verified, str):
            return verified
        wall_ms = (time.perf_counter() - t0) * 1e3
        # How far every expert's distributions are the ones per-token fusion would see.
        valid = m
        if not g.by_id:
            valid = min(valid, self._drafter_valid(drafter, draft, keys))
            for name, r in verified.items():
                valid = min(valid, self._verifier_valid(name, r, fed[name], keys))
        rows: dict[str, tuple[list[Any], list[int], int]] = {
            drafter: (draft.dists, draft.lengths, draft.n_tokens)
        }
        rows.update({n: (r.dists, r.lengths, r.n_tokens) for n, r in verified.items()})
        tested = accepted = 0
        outcome: FinishReason | tuple[Any] | None = None
        for i in range(valid):
            live = {n: rows[n][0][i] for n in g.weights if n in rows}
            if not live:
                raise NoExperts("no expert answered")
            step = len(picks)
            fused = g._fuse(live, step)
            if g.on_step is not None:
                g.on_step(step, fused)
            ok, chosen = self._decide(fused, keys[i], draft.dists[i], drafter)
            tested += 1
            accepted += ok
            if not g.accept_pick(chosen, picks):
                outcome = "stop"
                break
            if len(picks) >= max_tokens:
                outcome = "length"
                break
            if ok and i + 1 < valid:
                continue
            for n in g.weights:  # the next round starts at position i
                if n in rows:
                    dists, lengths, held = rows[n]
                    self.at[n] = _Position(lengths[i], held, dists[i])
            outcome = (chosen,)
            if self.ahead is not None and not (i == m - 1 and chosen == self.ahead.key):
                # The draft ahead assumed another X: wasted; the drafter's session holds
                # it (or will), so the next request rewinds whatever it holds.
                self.ahead = None
                self.stats.ahead_wasted += 1
                if drafter in self.at:
                    self.at[drafter].held = 1 << 30
            break
        if not isinstance(outcome, tuple):
            self.ahead = None
        self.stats.rounds += 1
        self.stats.gamma_total += gamma
        self.stats.tested += tested
        self.stats.accepted += accepted
        if ahead is None:
            self.control.update(tested, accepted, m, wall_ms, draft.compute_ms)
        else:
            self.control.update(tested, accepted, m)
        if outcome is None:
            raise NoExperts("no expert answered")
        return outcome

    def _draft_ahead(
        self, drafter: str, draft: p.DistributionsReply, keys: list[Any], at: int, max_tokens: int
    ) -> None:
        """While the others verify this draft, ask the drafter to continue from its last
        drafted token (worth it when drafts are mostly accepted: the next draft is then
        ready when the verification is in, and drafting overlaps verifying)."""
        g = self.g
        m = len(keys)
        if not self.pipeline or self.control.alpha < 0.6 or not isinstance(keys[-1], bytes | int):
            return
        last = draft.drafted[-1]
        if last in g.eos[drafter]:
            return
        if g.feed_piece(drafter, keys[-1], draft.dists[-1]) != last:
            return  # per-token fusion would feed the drafter another token for those bytes
        left = max_tokens - at - m  # tokens left if this whole draft is accepted
        room = min(g.infos[n].n_ctx - self.at[n].length - m for n in g.weights if n in self.at)
        gamma = min(self.control.gamma, left, room if g.by_id else 1 << 30)
        if gamma < 2:
            return
        fut = self._send_draft(drafter, last, None, gamma)
        self.ahead = _Ahead(drafter, fut, gamma, keys[-1])

    def _send_draft(
        self, drafter: str, piece: int | bytes, rewind_to: int | None, gamma: int
    ) -> Future[p.DistributionsReply]:
        g = self.g
        req = p.DraftRequest(
            session=g.sessions[drafter],
            rewind_to=rewind_to,
            feed=p.DraftRequest.encode_pieces([piece]),
            gamma=gamma,
            temperature=g.sampling.temperature,
            top_p=g.sampling.top_p,
            seed=int(g._rng.integers(1 << 62)),
            **self._options(),
        )
        # A draft sent ahead is waited for after the round in flight: twice the limit.
        return g.rpc.call_async(drafter, req, timeout=2 * self._limit(gamma))

    def _take_draft(
        self, drafter: str, fut: Future[p.DistributionsReply], gamma: int, at: int
    ) -> p.DistributionsReply | FinishReason | None:
        """The drafter's reply; None when it failed and was dropped (another drafts)."""
        g = self.g
        try:
            reply = self._wait(fut, gamma)
            g.spent(drafter, reply.compute_ms)
            if not 1 <= len(reply.drafted) <= gamma:
                raise BadMessage(f"drafted {len(reply.drafted)} tokens, asked for {gamma}")
            n_vocab = g.infos[drafter].n_vocab
            if any(not 0 <= t < n_vocab for t in reply.drafted):
                raise BadMessage("a drafted token is outside the vocabulary")
            for dist in reply.dists:
                check_dist(dist, n_vocab)
            self._check_kind(reply)
            return reply
        except ContextOverflow:
            return "context"
        except Moe2Error as exc:
            self._failed(drafter, exc, at)
            return None

    def _collect(
        self,
        futures: dict[str, Future[p.DistributionsReply]],
        fed: dict[str, list[int | bytes]],
        at: int,
        gamma: int,
    ) -> dict[str, p.DistributionsReply] | FinishReason:
        g = self.g
        out: dict[str, p.DistributionsReply] = {}
        for name, fut in futures.items():
            try:
                reply = self._wait(fut, gamma)
                g.spent(name, reply.compute_ms)
                if len(reply.dists) != len(fed[name]):
                    raise BadMessage(
                        f"{len(reply.dists)} distributions for {len(fed[name])} fed pieces"
                    )
                for dist in reply.dists:
                    check_dist(dist, g.infos[name].n_vocab)
                self._check_kind(reply)
                out[name] = reply
            except ContextOverflow:
                return "context"
            except Moe2Error as exc:
                self._failed(name, exc, at)
        return out

    def _check_kind(self, reply: p.DistributionsReply) -> None:
        if not self.g.by_id and any(not isinstance(d, p.TopKDist) for d in reply.dists):
            raise BadMessage("sent a full distribution to a cross-vocabulary fusion")

    def _limit(self, gamma: int) -> float:
        # A round's requests evaluate up to γ tokens: allow for that on top of a step's time.
        return self.g.config.step_timeout_s * (1 + gamma / 16)

    def _wait(self, fut: Future[p.DistributionsReply], gamma: int) -> p.DistributionsReply:
        g = self.g
        limit = self._limit(gamma)
        end = time.monotonic() + limit
        if g.deadline is not None:
            end = min(end, g.deadline)
        try:
            return g.rpc.wait(fut, max(0.0, end - time.monotonic()))
        except RequestTimeout:
            if g.deadline is not None and time.monotonic() >= g.deadline:
                raise DeadlineExceeded("the prompt's deadline passed during generation") from None
            raise RequestTimeout(f"no reply within {limit:g} s") from None

    def _failed(self, name: str, exc: Moe2Error, at: int) -> None:
        if isinstance(exc, DeadlineExceeded):
            raise exc
        reason = exc.message if isinstance(exc, RequestTimeout) else f"{exc.code}: {exc.message}"
        self.g._drop(name, reason, at)

    # ------------------------------------------------------------------ decisions

    def _decide(self, fused: Fused, key: Any, drafted_from: Any, drafter: str) -> tuple[bool, Any]:
        """(accepted, the chosen key) at one position: the drafted key or its replacement."""
        g = self.g
        temp, top_p = g.sampling.temperature, g.sampling.top_p
        if temp <= 0.0 or len(fused.probs) == 1:
            chosen = fused.keys[choose(fused, temp, top_p, g._rng)]
            return chosen == key, chosen
        keep, probs = sampling_distribution(fused.probs, temp, top_p)
        target = {fused.keys[j]: float(pr) for j, pr in zip(keep.tolist(), probs)}
        ids, q = draft_distribution(drafted_from, temp, top_p)
        proposal: dict[Any, float] = {}
        for t, qq in zip(ids.tolist(), q):
            k = self._key(drafter, t)
            proposal[k] = proposal.get(k, 0.0) + float(qq)
        qb = proposal.get(key, 0.0)
        if qb > 0.0 and g._rng.random() * qb < target.get(key, 0.0):
            return True, key
        keys = list(target)
        resid = np.array([max(0.0, target[k] - proposal.get(k, 0.0)) for k in keys])
        total = float(resid.sum())
        if total <= 0.0 or not math.isfinite(total):  # P == q: the draft was never rejected
            resid, total = np.array([target[k] for k in keys]), 1.0
        return False, keys[int(g._rng.choice(len(keys), p=resid / resid.sum()))]

    # ------------------------------------------------------------------ keys and feeding

    def _key(self, name: str, token: int) -> Any:
        """A token of expert ``name`` as a fusion key: its id (one vocabulary), else its
        bytes, END for an end-of-generation token."""
        g = self.g
        if g.by_id:
            return token
        if token in g.eos[name]:
            return END
        piece = g._pieces[name][token]
        return piece if piece else _Unfeedable()

    def _guess(self, name: str, key: Any) -> int | bytes | None:
        """What to feed ``name`` for a drafted key before its distribution one position
        earlier is known (checked afterwards); None when the key cannot be fed."""
        g = self.g
        if g.by_id:
            return int(key)
        if not isinstance(key, bytes):
            return None
        # Where one text has several tokens (a byte-fallback token and a normal one), the
        # normal one comes later in the vocabulary and is the one a model predicts.
        own = g.vocabs[name].by_bytes_last.get(key)
        if own is not None and own not in g.eos[name]:
            return own
        return g.feed_piece(name, key, None)

    def _drafter_valid(self, drafter: str, draft: p.DistributionsReply, keys: list[Any]) -> int:
        for i in range(1, len(keys)):
            if not isinstance(keys[i - 1], bytes):
                return i
            if self.g.feed_piece(drafter, keys[i - 1], draft.dists[i - 1]) != draft.drafted[i - 1]:
                return i
        return len(keys)

    def _verifier_valid(
        self, name: str, reply: p.DistributionsReply, fed: list[int | bytes], keys: list[Any]
    ) -> int:
        for i in range(1, len(fed)):
            if self.g.feed_piece(name, keys[i - 1], reply.dists[i - 1]) != fed[i]:
                return i
        return len(fed)


def _cost(piece: Any) -> int:
    """Most tokens feeding a piece can take: one id, or bytes tokenized (one token per byte
    at worst, plus a word-boundary marker some tokenizers add)."""
    return len(piece) + 1 if isinstance(piece, bytes) else 1
