"""Speculative fused decoding: per-token fusion's answer for fewer round trips.

A round drafts and verifies. Each drafter (the highest-weighted expert, or with
``drafters > 1`` the top experts, each its own continuation) is fed the frontier's token X
and drafts γ tokens d_1..d_γ locally (one ``draft`` request); then every expert is fed X
and the tokens of every branch it did not draft (one ``verify`` request per branch, one
forward pass each) and returns its distribution after each. The gateway now holds every
expert's distribution along every branch (a token tree), fuses position after position
(eq. 29, exactly as per-token fusion does) and walks the tree: the token chosen at position
i (greedy, or the keyed draw of ``moe2.agent.sampling``) is emitted; while it is the next
token of some branch the walk goes on along the branches that agree, otherwise it stops
there, and the chosen token becomes the next X. Sessions holding more (the rest of a draft,
another branch) are rewound in the next request, which always names the history length it
extends (``rewind_to``), so a request sent again after a reconnect applies once.

Drafters draw their own tokens with the gateway's keyed draw, so a drafted token is
accepted exactly when per-token fusion would have chosen it (the Gumbel coupling for sampled
answers): a round emits 1 to γ tokens, and they are per-token fusion's tokens.

What is guaranteed. The decisions are per-token fusion's, position by position, on the
distributions the experts return: greedy and seeded sampled answers are token for token the
per-token answers when the distributions agree, and sampled answers have exactly per-token
fusion's distribution. A verifier computes its positions in one batched forward pass; on
the CPU the agent runs llama.cpp with flash attention (``moe2.agent.llama``), which keeps
each token's attention its own, so on quantized models the batched logits are bit-identical
to single steps (checked on SmolLM2-135M Q4_1 in batches, next to other sessions and after
rewinds); weights in F32/F16 (the tiny
test experts) take another float32 matmul kernel in a batch (llamafile's sgemm, from two
tokens on) than for one token, which sums in another order: the logits then differ by the
rounding of float32 sums (a few 1e-7 relative), so a greedy near-tie within that can break
the other way, and the answers may part there. On a GPU llama.cpp picks kernels by batch
size too: the same holds. Across vocabularies, an expert is fed a drafted token's bytes the
way per-token fusion would feed it (its top-k token with those bytes, else its lowest id,
else the bytes to tokenize), which depends on its distribution one position earlier: the
gateway feeds a guess, checks it against that rule afterwards, and accepts nothing past a
position where the guess was wrong.

How much to speculate is decided per round by the ``CostModel`` of ``plans.py``.

    decoder = AdaptiveDecoder(memory.get(experts, config), config)
    finish = decoder.decode(frontier)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from moe2.agent.gateway.config import GatewayConfig
from moe2.agent.gateway.decoding import (
    Decoder,
    DecodingStats,
    FinishReason,
    Frontier,
    Position,
    step,
)
from moe2.agent.gateway.fusion import Piece, TokenKey
from moe2.agent.gateway.plans import CostModel, Plan
from moe2.shared import protocol as p
from moe2.shared.errors import BadMessage, ContextOverflow

log = logging.getLogger(__name__)

Distribution = p.TopKDist | p.FullDist
# Drafting ahead (while the others verify) pays when the whole draft is accepted often.
AHEAD_MIN_ACCEPTANCE = 0.6


# --------------------------------------------------------------------------- a round


@dataclass
class _Row:
    """One expert's distributions along one branch: ``pre`` (any replay, then X) was fed
    first, then ``path``; ``dists[j]``/``lengths[j]`` are the distribution and history
    length after X and ``path[:j]``. Positions below ``valid`` are what per-token fusion
    would see."""

    pre: tuple[Piece, ...]
    path: list[Piece]
    dists: list[Distribution]
    lengths: list[int]
    valid: int


@dataclass
class _Branch:
    drafter: str
    draft: p.DistributionsReply
    keys: list[TokenKey]  # the drafted tokens as keys, cut before the first unfeedable one


@dataclass
class _Ahead:
    """A draft asked for before the previous one was verified: the drafter continues from
    its own last drafted token, which is then the next X if the whole draft is accepted."""

    drafter: str
    future: Future[p.DistributionsReply]
    gamma: int
    key: TokenKey  # the X it assumes
    length: int  # the drafter's history length it extends
    pre: tuple[Piece, ...]  # what it fed first (that X)


@dataclass
class _Outcome:
    finish: FinishReason | None
    emitted: int
    first: tuple[int, int]
    later: tuple[int, int]


class Round:
    """Draft and verify once, from the frontier (see the module docstring)."""

    def __init__(self, frontier: Frontier, stats: DecodingStats, pipeline: bool) -> None:
        self.fr = frontier
        self.stats = stats
        self.pipeline = pipeline
        self.ahead: _Ahead | None = None

    def _limit(self, gamma: int) -> float:
        # A round's requests evaluate up to γ tokens: allow for that on top of a step's time.
        return self.fr.pool.config.step_timeout_s * (1 + gamma / 16)

    def run(
        self, drafters: Sequence[str], gamma: int, ahead_ok: bool
    ) -> tuple[_Outcome, float, float] | None:
        """(outcome, wall ms or -1 when drafted ahead, slowest drafter's ms), or None when
        no draft came (the drafters were dropped): a per-token step then goes on.
        ``ahead_ok``: with one branch, the drafter drafts on while the others verify."""
        try:
            return self._run(drafters, gamma, ahead_ok)
        except ContextOverflow:  # the history filled an expert's context: the answer ends
            self._forget_ahead(wasted=False)
            return _Outcome("context", 0, (0, 0), (0, 0)), -1.0, 0.0

    def _forget_ahead(self, wasted: bool) -> None:
        if self.ahead is not None:
            self.ahead.future.cancel()
            self.stats.ahead_wasted += wasted
        self.ahead = None

    def _run(
        self, drafters: Sequence[str], gamma: int, ahead_ok: bool
    ) -> tuple[_Outcome, float, float] | None:
        fr, pool = self.fr, self.fr.pool
        t0 = time.perf_counter()
        ahead, self.ahead = self.ahead, None
        pres: dict[str, tuple[Piece, ...]] = {}
        if ahead is not None and ahead.drafter in pool and ahead.key == fr.last:
            self.stats.ahead_used += 1
            pres[ahead.drafter] = ahead.pre
            gamma = ahead.gamma
            branches = self._branches(self._drafts({ahead.drafter: ahead.future}, gamma))
        else:
            if ahead is not None:
                self.stats.ahead_wasted += 1
                ahead.future.cancel()
            ahead = None
            futures = {}
            for name in [d for d in drafters if d in pool]:
                pres[name] = tuple(fr.pieces(name))
                futures[name] = self._send_draft(name, fr.at[name].length, pres[name], gamma)
            branches = self._branches(self._drafts(futures, gamma))
        if not branches:
            return None
        # A branch that another one continues teaches nothing more: not verified apart.
        kept: list[_Branch] = []
        for b in sorted(branches, key=lambda x: -len(x.keys)):  # stable: by weight in ties
            if not any(o.keys[: len(b.keys)] == b.keys for o in kept):
                kept.append(b)
        rows: list[dict[str, _Row]] = []
        requests: dict[tuple[str, int], Future[p.DistributionsReply]] = {}
        fed: dict[tuple[str, int], tuple[tuple[Piece, ...], list[Piece]]] = {}
        last_request: dict[str, int] = {}  # expert -> the branch its session ends on
        opts = fr.align.options
        for i, b in enumerate(kept):
            rows.append({b.drafter: self._drafter_row(b, pres[b.drafter])})
            last_request[b.drafter] = i
        for i, b in enumerate(kept):
            for name in pool.names:
                if name == b.drafter:
                    continue
                pos = fr.at[name]
                pre = tuple(fr.pieces(name))
                free = pool.infos[name].n_ctx - pos.length - sum(fr.align.cost(x) for x in pre)
                path: list[Piece] = []
                for key in b.keys[: len(b.keys) - 1]:
                    guess = fr.align.guess(name, key)
                    if guess is None or fr.align.cost(guess) > free:
                        break  # what cannot be fed (or would not fit) is not verified
                    free -= fr.align.cost(guess)
                    path.append(guess)
                req = p.VerifyRequest(
                    session=pool.sessions[name],
                    rewind_to=pos.length,
                    feed=p.VerifyRequest.encode_pieces([*pre, *path]),
                    top_k=opts.top_k,
                    full=opts.full,
                )
                requests[(name, i)] = pool.send(name, req, self._limit(gamma))
                fed[(name, i)] = (pre, path)
                last_request[name] = i
        if len(kept) == 1 and self.pipeline and ahead_ok:
            self._draft_ahead(kept[0], gamma)

        def fits(name: str, i: int, reply: p.DistributionsReply) -> None:
            pre, path = fed[(name, i)]
            if len(reply.dists) != len(pre) + len(path):
                raise BadMessage(
                    f"{len(reply.dists)} distributions for {len(pre) + len(path)} fed pieces"
                )
            for d in reply.dists:
                fr.align.check(name, d)

        verified = pool.gather(requests, fr.position, self._limit(gamma), check=fits)
        for (name, i), reply in verified.items():
            pre, path = fed[(name, i)]
            n = len(pre) - 1  # the replay's distributions come before position 0
            dists = list(reply.dists[n:])
            rows[i][name] = _Row(
                pre,
                path,
                dists,
                list(reply.lengths[n:]),
                self._valid(name, kept[i].keys, path, dists),
            )
        wall_ms = (time.perf_counter() - t0) * 1e3 if ahead is None else -1.0
        draft_ms = max((b.draft.compute_ms for b in kept), default=0.0)
        outcome = self._walk(kept, rows, last_request)
        if outcome.finish is not None or outcome.emitted == 0:
            self._forget_ahead(wasted=False)
        elif self.ahead is not None and not (
            len(kept[0].keys) == outcome.emitted and self.ahead.key == fr.last
        ):  # the whole draft was not accepted: the draft made ahead assumed another X
            self._forget_ahead(wasted=True)
        self.stats.rounds += 1
        self.stats.tree_rounds += len(kept) > 1
        self.stats.gamma_total += gamma
        return outcome, wall_ms, draft_ms

    # -------------------------------------------------------------- drafting

    def _send_draft(
        self, name: str, length: int, pre: tuple[Piece, ...], gamma: int
    ) -> Future[p.DistributionsReply]:
        fr = self.fr
        s = fr.picker.sampling
        opts = fr.align.options
        req = p.DraftRequest(
            session=fr.pool.sessions[name],
            rewind_to=length,
            feed=p.DraftRequest.encode_pieces(list(pre)),
            gamma=gamma,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=fr.picker.seed,
            position=fr.position,
            keys=fr.align.key_kind,
            top_k=opts.top_k,
            full=opts.full,
        )
        return fr.pool.send(name, req, self._limit(gamma))

    def _drafts(
        self, futures: Mapping[str, Future[p.DistributionsReply]], gamma: int
    ) -> dict[str, p.DistributionsReply]:
        fr = self.fr

        def fits(name: str, tag: int, reply: p.DistributionsReply) -> None:
            if not 1 <= len(reply.drafted) <= gamma:
                raise BadMessage(f"drafted {len(reply.drafted)} tokens, asked for {gamma}")
            n_vocab = fr.pool.infos[name].n_vocab
            if any(not 0 <= t < n_vocab for t in reply.drafted):
                raise BadMessage("a drafted token is outside the vocabulary")
            for d in reply.dists:
                fr.align.check(name, d)

        got = fr.pool.gather(
            {(n, 0): f for n, f in futures.items()}, fr.position, self._limit(gamma), check=fits
        )
        return {n: r for (n, _), r in got.items()}

    def _branches(self, drafts: Mapping[str, p.DistributionsReply]) -> list[_Branch]:
        out = []
        for name in self.fr.pool.names:
            draft = drafts.get(name)
            if draft is None:
                continue
            keys: list[TokenKey] = []
            for t in draft.drafted:
                key = self.fr.align.key(name, t)
                if key is None:
                    break
                keys.append(key)
            out.append(_Branch(name, draft, keys))
        return out

    def _drafter_row(self, b: _Branch, pre: tuple[Piece, ...]) -> _Row:
        d = b.draft
        path: list[Piece] = list(d.drafted[: len(d.drafted) - 1])
        valid = len(d.dists)
        align = self.fr.align
        for i in range(1, len(d.dists)):
            key = b.keys[i - 1] if i - 1 < len(b.keys) else None
            if (
                key is None
                or align.is_end(key)
                or align.feed(b.drafter, key, d.dists[i - 1]) != d.drafted[i - 1]
            ):
                valid = i  # per-token fusion would feed it another token for those bytes
                break
        return _Row(pre, path, list(d.dists), list(d.lengths), valid)

    def _valid(
        self, name: str, keys: list[TokenKey], path: list[Piece], dists: Sequence[Distribution]
    ) -> int:
        """Positions of a verifier's row that per-token fusion would see: its guess for each
        key is what it would have been fed, given its distribution one position earlier."""
        for i in range(1, len(dists)):
            if self.fr.align.feed(name, keys[i - 1], dists[i - 1]) != path[i - 1]:
                return i
        return len(dists)

    def _draft_ahead(self, b: _Branch, gamma: int) -> None:
        """While the others verify this draft, ask the drafter to continue from its last
        drafted token (worth it when drafts are mostly accepted: the next draft is then
        ready when the verification is in, and drafting overlaps verifying)."""
        fr = self.fr
        d = b.draft
        m = len(d.drafted)
        if len(b.keys) < m or fr.align.is_end(b.keys[-1]):
            return
        if fr.align.feed(b.drafter, b.keys[-1], d.dists[-1]) != d.drafted[-1]:
            return  # per-token fusion would feed the drafter another token for those bytes
        left = fr.left - m  # tokens left if this whole draft is accepted
        room = min(
            fr.pool.infos[n].n_ctx - fr.at[n].length - m for n in fr.pool.weights if n in fr.at
        )
        g = min(gamma, left, room)
        if g < 2:
            return
        last: tuple[Piece, ...] = (d.drafted[-1],)
        saved = fr.picker
        req = p.DraftRequest(
            session=fr.pool.sessions[b.drafter],
            rewind_to=d.n_tokens,
            feed=p.DraftRequest.encode_pieces(list(last)),
            gamma=g,
            temperature=saved.sampling.temperature,
            top_p=saved.sampling.top_p,
            seed=saved.seed,
            position=fr.position + m,
            keys=fr.align.key_kind,
            top_k=fr.align.options.top_k,
            full=fr.align.options.full,
        )
        # waited for after the round in flight, by the next round: twice a round's limit
        fut = fr.pool.send(b.drafter, req, 2 * self._limit(g))
        self.ahead = _Ahead(b.drafter, fut, g, b.keys[-1], d.n_tokens, last)

    # -------------------------------------------------------------- the walk

    def _walk(
        self, branches: list[_Branch], rows: list[dict[str, _Row]], last: Mapping[str, int]
    ) -> _Outcome:
        """Fuse and choose position after position along the branches that agree with the
        choices; move the frontier to the last position chosen."""
        fr, pool = self.fr, self.fr.pool
        live = list(range(len(branches)))
        src: dict[str, int] = {}
        first = [0, 0]
        later = [0, 0]
        emitted = 0
        finish: FinishReason | None = None
        i = 0
        while True:
            dists: dict[str, Distribution] = {}
            here: dict[str, int] = {}
            for name in pool.weights:
                for b in live:
                    row = rows[b].get(name)
                    if row is not None and i < row.valid:
                        dists[name] = row.dists[i]
                        here[name] = b
                        break
            if len(dists) < len(pool.weights):
                break  # not every expert's distribution is known here: stop before it
            fused = fr.fuse(dists)
            key = fr.choose(fused)
            drafted = [b for b in live if i < len(branches[b].keys)]
            counts = first if i == 0 else later
            counts[1] += bool(drafted)
            src = here
            emitted += 1
            finish = fr.take(key, fused)
            if finish is not None:
                break
            live = [b for b in drafted if branches[b].keys[i] == key]
            counts[0] += bool(live)
            if not live:
                break
            i += 1
        self.stats.tested += first[1] + later[1]
        self.stats.accepted += first[0] + later[0]
        if emitted and finish is None:
            self._move(emitted - 1, src, rows, last)
        return _Outcome(finish, emitted, (first[0], first[1]), (later[0], later[1]))

    def _move(
        self, at: int, src: Mapping[str, int], rows: list[dict[str, _Row]], last: Mapping[str, int]
    ) -> None:
        """Each expert's session at position ``at`` of the branch its distribution came
        from; a session that ends on another branch is rewound to where the two part and
        fed the rest again (``Position.replay``)."""
        fr = self.fr
        for name, b in src.items():
            row = rows[b][name]
            held = rows[last.get(name, b)].get(name, row)
            common = 0
            while common < at and common < len(held.path) and held.path[common] == row.path[common]:
                common += 1
            if held is row or common >= at:
                fr.at[name] = Position(row.lengths[at], row.dists[at])
            else:
                replay = tuple(row.path[common:at])
                fr.at[name] = Position(held.lengths[common], row.dists[at], replay)


# --------------------------------------------------------------------------- decoders


class SpeculativeDecoder(Decoder):
    """Rounds with the given drafters' plan whenever γ ≥ 2 fits, γ from the cost model."""

    name = "speculative"
    plans: tuple[Plan, ...] = ("linear",)

    def __init__(self, model: CostModel, config: GatewayConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config

    def allowed(self, frontier: Frontier) -> list[Plan]:
        """The plans it may choose from; with one expert a tree is one branch."""
        if len(frontier.pool.weights) > 1:
            return list(self.plans)
        return list(dict.fromkeys("linear" if x == "tree" else x for x in self.plans))

    def decode(self, frontier: Frontier) -> FinishReason:
        rounds = Round(frontier, self.stats, self.config.speculative_pipeline)
        while True:
            limit = min(frontier.left, frontier.room(), self.config.speculative_max_gamma)
            if rounds.ahead is not None and rounds.ahead.key == frontier.last:
                plan: Plan = "linear"
                gamma = rounds.ahead.gamma
            else:
                plan, gamma = self.model.plan(self.allowed(frontier), limit)
            finish = self._advance(frontier, rounds, plan, gamma)
            if finish is not None:
                return finish

    def _advance(
        self, frontier: Frontier, rounds: Round, plan: Plan, gamma: int
    ) -> FinishReason | None:
        if plan != "step":
            drafters = frontier.pool.names
            if plan == "linear":
                drafters = drafters[:1]
            linear = self.model.modes["linear"]
            ahead_ok = min(linear.first.value, linear.later.value) >= AHEAD_MIN_ACCEPTANCE
            got = rounds.run(drafters, gamma, ahead_ok)
            if got is not None:
                outcome, wall_ms, draft_ms = got
                if outcome.emitted or outcome.finish is not None:
                    self.model.round_done(
                        plan,
                        outcome.first,
                        outcome.later,
                        gamma,
                        outcome.emitted,
                        wall_ms if wall_ms >= 0 else None,
                        draft_ms,
                    )
                    return outcome.finish
        rounds.ahead = None
        t0 = time.perf_counter()
        self.stats.steps += 1
        finish = step(frontier)
        self.model.step_done((time.perf_counter() - t0) * 1e3)
        return finish


class TreeDecoder(SpeculativeDecoder):
    """Every chosen expert drafts its own continuation; all verify the union."""

    name = "tree"
    plans = ("tree",)


class AdaptiveDecoder(SpeculativeDecoder):
    """Per round the fastest of a per-token step, one drafter, or every expert drafting, as
    measured for this set of experts."""

    name = "auto"
    plans = ("step", "linear", "tree")
