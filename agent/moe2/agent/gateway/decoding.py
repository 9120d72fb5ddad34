"""Fused decoding: where a generation stands (``Frontier``), the answer it builds
(``Answer``), how a token is chosen (``Picker``) and the ``Decoder`` seam with its
per-token implementation; speculative decoders are in ``speculative.py``.

Every decoder makes the same decisions: the token at answer position i is chosen from the
fused distribution of the chosen experts' distributions after the answer's first i tokens
(eq. 29), greedily or by the keyed draw of ``moe2.agent.sampling`` (a function of the seed,
i and that distribution only). Decoders differ in how many round trips they spend to learn
those distributions, not in what they choose, so their answers are the same token for token
given the same distributions (speculative ones get them from batched evaluations, which
agree with single steps up to the rounding of float32 sums; see ``speculative.py``).

    frontier = Frontier(pool, align, Picker(sampling, align), Answer(align, on_chunk), 64)
    finish = frontier.start(opened)                 # the first token, from the open replies
    finish = finish or PerTokenDecoder().decode(frontier)
"""

from __future__ import annotations

import abc
import codecs
import math
import secrets
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from moe2.agent.gateway.experts import ExpertPool
from moe2.agent.gateway.fusion import Alignment, Fused, Piece, TokenKey
from moe2.agent.sampling import End, draw
from moe2.shared import protocol as p
from moe2.shared.errors import BadMessage, ContextOverflow, NoExperts

FinishReason = Literal["stop", "length", "context"]
Distribution = p.TopKDist | p.FullDist


@dataclass(frozen=True)
class Sampling:
    """A prompt's own choices (from the PromptRequest)."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a random one per prompt


@dataclass
class Position:
    """One expert's session at the frontier: its history length, its next-token
    distribution there, and pieces a branch not taken left to feed again (a tree round
    left the session on another branch: it is rewound to ``length``, then fed ``replay``,
    then the frontier's token)."""

    length: int
    dist: Distribution
    replay: tuple[Piece, ...] = ()


@dataclass
class DecodingStats:
    steps: int = 0  # per-token steps
    rounds: int = 0  # speculative rounds (draft + verify), one drafter or several
    tree_rounds: int = 0  # ... of which with several drafters
    tested: int = 0  # drafted tokens put to the test
    accepted: int = 0
    gamma_total: int = 0  # sum of the draft length γ over rounds
    ahead_used: int = 0  # drafts made while the previous round was verified, then used
    ahead_wasted: int = 0  # ... and thrown away (the previous draft was not all accepted)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.tested if self.tested else 0.0

    @property
    def mean_gamma(self) -> float:
        return self.gamma_total / self.rounds if self.rounds else 0.0


class Picker:
    """Chooses the token at each answer position from a fused distribution."""

    def __init__(self, sampling: Sampling, align: Alignment) -> None:
        self.sampling = sampling
        self.align = align
        self.seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)

    @property
    def greedy(self) -> bool:
        return self.sampling.temperature <= 0.0

    def pick(self, fused: Fused, position: int) -> TokenKey:
        s = self.sampling
        codes = _NO_CODES if self.greedy else self.align.codes(fused.keys)
        return fused.keys[draw(fused.probs, codes, s.temperature, s.top_p, self.seed, position)]


_NO_CODES = np.empty(0, dtype=np.uint64)  # greedy decoding draws nothing


class Answer:
    """The chosen tokens: streamed as UTF-8 text (a character split over byte tokens is
    emitted whole), with each token's fused log-probability when asked."""

    def __init__(
        self,
        align: Alignment,
        on_chunk: Callable[[str, list[p.TokenLogprob]], None] | None = None,
        top_logprobs: int | None = None,  # None: no log-probabilities
    ) -> None:
        self.align = align
        self.on_chunk = on_chunk
        self.top_logprobs = top_logprobs
        self.picks: list[TokenKey] = []
        self.logprobs: list[p.TokenLogprob] | None = [] if top_logprobs is not None else None
        self.stamps: list[float] = []  # time.monotonic() of each pick
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text: list[str] = []
        self._unsent: list[p.TokenLogprob] = []

    def __len__(self) -> int:
        return len(self.picks)

    @property
    def text(self) -> str:
        return "".join(self._text)

    def add(self, key: TokenKey, fused: Fused) -> bool:
        """Add a chosen token (and stream it); False when it ends the answer."""
        if self.align.is_end(key):
            return False
        self.picks.append(key)
        self.stamps.append(time.monotonic())
        if self.logprobs is not None and self.top_logprobs is not None:
            entry = self._logprob(key, fused, self.top_logprobs)
            self.logprobs.append(entry)
            self._unsent.append(entry)
        self._emit(self._decoder.decode(self.align.text(key)))
        return True

    def finish(self) -> None:
        """The end: bytes of an unfinished character come out as U+FFFD."""
        self._emit(self._decoder.decode(b"", final=True), last=True)

    def _emit(self, delta: str, last: bool = False) -> None:
        if delta:
            self._text.append(delta)
        if self.on_chunk is not None and (delta or (last and self._unsent)):
            sent, self._unsent = self._unsent, []
            self.on_chunk(delta, sent)

    def _logprob(self, key: TokenKey, fused: Fused, top: int) -> p.TokenLogprob:
        probs = dict(zip(fused.keys, fused.probs.tolist()))
        alternatives = [self._entry(k, pr) for k, pr in fused.top(top)]
        chosen = self._entry(key, probs.get(key, 0.0))
        return p.TokenLogprob(
            token=chosen.token,
            logprob=chosen.logprob,
            bytes=chosen.bytes,
            top_logprobs=alternatives,
        )

    def _entry(self, key: TokenKey, prob: float) -> p.TopLogprob:
        logprob = math.log(prob) if prob > 0 else -9999.0  # OpenAI's stand-in for -inf
        if isinstance(key, End):
            return p.TopLogprob(token="", logprob=logprob, bytes=None)
        data = self.align.text(key)
        return p.TopLogprob(
            token=data.decode("utf-8", "replace"), logprob=logprob, bytes=list(data)
        )


class Frontier:
    """Where decoding stands: the answer so far, the last chosen token (not yet fed to the
    experts) and each expert's session."""

    def __init__(
        self,
        pool: ExpertPool,
        align: Alignment,
        picker: Picker,
        answer: Answer,
        max_tokens: int,
        on_step: Callable[[int, Fused], None] | None = None,  # for tests and tracing
    ) -> None:
        self.pool = pool
        self.align = align
        self.picker = picker
        self.answer = answer
        self.max_tokens = max_tokens
        self.on_step = on_step
        self.at: dict[str, Position] = {}
        self.last: TokenKey = 0  # set by start()

    @property
    def position(self) -> int:
        """Answer position of the next token to choose."""
        return len(self.answer)

    @property
    def left(self) -> int:
        return self.max_tokens - len(self.answer)

    def fuse(self, dists: Mapping[str, Distribution]) -> Fused:
        return self.align.fuse(dists, self.pool.weights)

    def choose(self, fused: Fused, position: int | None = None) -> TokenKey:
        at = self.position if position is None else position
        if self.on_step is not None:
            self.on_step(at, fused)
        return self.picker.pick(fused, at)

    def take(self, key: TokenKey, fused: Fused) -> FinishReason | None:
        """Add the chosen ``key``; the finish reason when the answer ends with it."""
        if not self.answer.add(key, fused):
            return "stop"
        self.last = key
        return "length" if self.left <= 0 else None

    def start(self, opened: Mapping[str, p.DistributionReply]) -> FinishReason | None:
        """The first token, from the distributions the open requests returned."""
        self.at = {n: Position(r.n_tokens, r.dist) for n, r in opened.items() if n in self.pool}
        if not self.at:
            raise NoExperts("no expert answered")
        fused = self.fuse({n: pos.dist for n, pos in self.at.items()})
        return self.take(self.choose(fused), fused)

    def pieces(self, name: str) -> list[Piece]:
        """What ``name`` is fed to reach the frontier's token: any replay, then the token."""
        pos = self.at[name]
        return [*pos.replay, self.align.feed(name, self.last, pos.dist)]

    def room(self) -> int:
        """Tokens a round may add to every session: what the fullest context leaves after
        the frontier's pieces (0 when those might not fit: a per-token step then ends the
        answer where per-token fusion would)."""
        room = 1 << 30
        for name in self.pool.weights:
            pos = self.at[name]
            need = sum(self.align.cost(x) for x in self.pieces(name))
            free = self.pool.infos[name].n_ctx - pos.length - need
            room = min(room, free if free >= 0 else -1)
        return max(0, room + 1)  # the frontier's token is the round's first


class Decoder(abc.ABC):
    """A way to fill in the answer from the frontier on: ``decode`` returns the finish
    reason. Decoders choose the same tokens; they differ in the round trips they spend."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.stats = DecodingStats()

    @abc.abstractmethod
    def decode(self, frontier: Frontier) -> FinishReason: ...


def step(frontier: Frontier) -> FinishReason | None:
    """One token the per-token way: one round trip to every expert (feed the frontier's
    token, get the next distribution), then fuse and choose. Every request names the
    history length it extends (``rewind_to``), so one sent again after a reconnect applies
    once."""
    fr = frontier
    pool = fr.pool
    opts = fr.align.options
    replay = any(fr.at[n].replay for n in pool.weights)
    limit = pool.config.step_timeout_s
    futures = {}
    for name in pool.weights:
        pos = fr.at[name]
        sid = pool.sessions[name]
        pieces = fr.pieces(name)
        if replay:  # a branch not taken is fed again first: several pieces, the last dist
            verify = p.VerifyRequest(
                session=sid,
                rewind_to=pos.length,
                feed=p.VerifyRequest.encode_pieces(pieces),
                top_k=opts.top_k,
                full=opts.full,
            )
            futures[(name, 0)] = _last_dist(pool.send(name, verify, limit))
            continue
        (piece,) = pieces
        if isinstance(piece, int):
            req = p.StepRequest(
                session=sid,
                tokens=[piece],
                rewind_to=pos.length,
                top_k=opts.top_k,
                full=opts.full,
            )
        else:
            req = p.StepRequest.with_bytes(
                sid, piece, rewind_to=pos.length, top_k=opts.top_k, full=opts.full
            )
        futures[(name, 0)] = pool.send(name, req, limit)

    def fits(name: str, tag: int, reply: p.DistributionReply) -> None:
        fr.align.check(name, reply.dist)

    try:
        replies = pool.gather(futures, fr.position, limit, check=fits)
    except ContextOverflow:
        return "context"
    for (name, _), r in replies.items():
        fr.at[name] = Position(r.n_tokens, r.dist)
    live = {n: fr.at[n].dist for n in pool.weights}
    fused = fr.fuse(live)
    return fr.take(fr.choose(fused), fused)


def _last_dist(fut: Future[p.DistributionsReply]) -> Future[p.DistributionReply]:
    """A verify of several pieces seen as a step: its last distribution."""
    out: Future[p.DistributionReply] = Future()

    def done(f: Future[p.DistributionsReply]) -> None:
        if f.cancelled():
            out.cancel()
            return
        exc = f.exception()
        if exc is not None:
            out.set_exception(exc)
            return
        r = f.result()
        if not r.dists:
            out.set_exception(BadMessage("a verify reply without distributions"))
            return
        out.set_result(
            p.DistributionReply(
                op="step",
                session=r.session,
                n_tokens=r.n_tokens,
                dist=r.dists[-1],
                compute_ms=r.compute_ms,
            )
        )

    fut.add_done_callback(done)
    return out


class PerTokenDecoder(Decoder):
    """Every token one round trip to every expert."""

    name = "per-token"

    def decode(self, frontier: Frontier) -> FinishReason:
        while True:
            self.stats.steps += 1
            finish = step(frontier)
            if finish is not None:
                return finish
