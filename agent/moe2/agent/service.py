"""What the agent does with one validated RPC request (runs on the model thread).

Requests without model work are answered at once; the others become a ``Task`` that the
scheduler (``batching.py``) runs batched with every other session's work.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from moe2.agent.backend import ModelBackend, Sequence
from moe2.agent.batching import MAX_LOGIT_FLOATS, Evaluate, Scheduler, Task
from moe2.agent.chat import ChatRenderer
from moe2.agent.sessions import SessionManager
from moe2.agent.tasks import Draft, Pair, ScoreMany
from moe2.shared import protocol as p
from moe2.shared.errors import (
    BadMessage,
    Cancelled,
    ConfigError,
    ContextOverflow,
    InvalidToken,
    Moe2Error,
    error_from_reply,
)

if TYPE_CHECKING:
    from moe2.agent.profiler import SelfProfiler


class AgentService:
    def __init__(
        self,
        agent_id: str,
        backend: ModelBackend,
        max_sessions: int,
        default_top_k: int = 40,
        session_idle_s: float = 60.0,
        *,
        score_parallel: int = 4,  # samples of a score_many evaluated together
        model_clock: Callable[[], float] = time.perf_counter,  # what compute_ms reports
    ) -> None:
        self.agent_id = agent_id
        self.default_top_k = default_top_k
        self.backend = backend
        self.sessions = SessionManager(backend, max_sessions, session_idle_s)
        # False while the agent stops: new sessions are refused (``cancelled``), the open ones
        # are served until their gateways close them.
        self.accepting = True
        self.score_parallel = score_parallel
        self._piece = lru_cache(maxsize=1 << 16)(backend.piece)
        self._piece_bytes = lru_cache(maxsize=1 << 16)(backend.piece_bytes)
        self._vocab_reply: p.VocabReply | None = None  # computed once, on first request
        self.profiler: SelfProfiler | None = None  # set by the daemon; None: cannot profile
        self.chat = ChatRenderer(backend)
        self.tokens_evaluated = 0  # by open, step, verify and draft, for the metrics
        self._eos = set(backend.info.eos_ids)
        self._alone = Scheduler(
            backend, self.start, lambda job, reply: job.done(reply), clock=model_clock
        )

    def handle(self, req: Any) -> p.Message:
        """The reply to one request, run alone (tools and tests; the daemon batches); an
        error is raised as its ``Moe2Error``."""
        job = _Sync(req)
        self._alone.run(job)
        assert job.reply is not None
        if isinstance(job.reply, p.ErrorReply):
            raise error_from_reply(job.reply.error.code, job.reply.error.message)
        return job.reply

    def start(self, req: Any, owner: str | None = None) -> Task | p.Message:
        """The reply now, or the task that will produce it; raises Moe2Error. ``owner``: the
        requester, whose sessions are freed when it is gone."""
        if isinstance(req, p.OpenRequest):
            return self._open(req, owner)
        if isinstance(req, p.StepRequest):
            return self._step(req)
        if isinstance(req, p.VerifyRequest):
            return self._verify(req)
        if isinstance(req, p.DraftRequest):
            return self._draft(req)
        if isinstance(req, p.CloseRequest):
            self.sessions.close(req.session)
            return p.CloseReply(session=req.session)
        if isinstance(req, p.ScoreRequest):
            return self._score(req)
        if isinstance(req, p.ScoreChoicesRequest):
            return self._score_choices(req)
        if isinstance(req, p.ScoreManyRequest):
            return self._score_many(req)
        if isinstance(req, p.TokenizeRequest):
            return p.TokenizeReply(
                tokens=self.backend.tokenize(req.text, add_bos=req.add_bos, special=req.special)
            )
        if isinstance(req, p.DetokenizeRequest):
            pieces = [self._piece(t) for t in req.tokens] if req.pieces else None
            return p.DetokenizeReply(text=self.backend.detokenize(req.tokens), pieces=pieces)
        if isinstance(req, p.VocabRequest):
            return self._vocab()
        if isinstance(req, p.PingRequest):
            return p.PingReply(agent_id=self.agent_id, active_sessions=len(self.sessions))
        if isinstance(req, p.ProfileRequest):
            return self._profile(req)
        raise BadMessage(f"unhandled request type {type(req).__name__}")

    # ------------------------------------------------------------------ helpers

    def _prompt_tokens(
        self, text: str | None, tokens: list[int] | None, add_bos: bool | None
    ) -> list[int]:
        if tokens is not None:
            return tokens
        bos = self.backend.info.add_bos if add_bos is None else add_bos
        ids = self.backend.tokenize(text or "", add_bos=bos)
        if not ids:
            raise BadMessage("the prompt tokenizes to nothing; give some text or add_bos=true")
        return ids

    def distribution(
        self, logprobs: np.ndarray, top_k: int | None, full: bool, with_pieces: bool
    ) -> Any:
        if full:
            return p.encode_full(logprobs)
        dist = p.encode_topk(logprobs, top_k or self.default_top_k)
        if with_pieces:
            dist = dist.model_copy(update={"pieces": [self._piece(i) for i in dist.ids]})
        return dist

    def _encoder(self, req: Any) -> Callable[[np.ndarray], Any]:
        return lambda lp: self.distribution(lp, req.top_k, req.full, req.with_pieces)

    def _check_tokens(self, ids: list[int]) -> None:
        n_vocab = self.backend.info.n_vocab
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise InvalidToken(f"token id {bad} is outside the vocabulary (0..{n_vocab - 1})")

    def _check_room(self, seq: Sequence, n: int) -> None:
        n_ctx = self.backend.info.n_ctx
        if len(seq) + n > n_ctx:
            raise ContextOverflow(
                f"{len(seq)} tokens of history + {n} new exceed the context size {n_ctx}"
            )

    def _session(self, sid: str, rewind_to: int | None) -> Sequence:
        seq = self.sessions.get(sid)
        if rewind_to is not None:
            if rewind_to > len(seq):
                raise BadMessage(
                    f"rewind_to={rewind_to} is beyond the history of {len(seq)} tokens"
                )
            seq.truncate(rewind_to)
        return seq

    def _hold(self, sid: str) -> Callable[[], None]:
        """Mark a session in use by a task (never evicted under it); returns the release."""
        self.sessions.busy.add(sid)
        return lambda: self.sessions.busy.discard(sid)

    def _feed_tokens(self, pieces: list[int | bytes]) -> list[list[int]]:
        out = []
        for piece in pieces:
            if isinstance(piece, int):
                out.append([piece])
                continue
            ids = self.backend.tokenize(piece, add_bos=False)
            if not ids:
                raise BadMessage("a fed piece tokenizes to nothing")
            out.append(ids)
        return out

    # ------------------------------------------------------------------ sessions

    def _open(self, req: p.OpenRequest, owner: str | None = None) -> Evaluate:
        if not self.accepting:
            raise Cancelled(f"agent {self.agent_id} is stopping and opens no new session")
        if req.messages is not None:
            tokens = self.chat.tokens(req.messages)
        else:
            tokens = self._prompt_tokens(req.prompt, req.tokens, req.add_bos)
        self._check_tokens(tokens)
        if len(tokens) > self.backend.info.n_ctx:
            raise ContextOverflow(
                f"the prompt's {len(tokens)} tokens exceed the context size "
                f"{self.backend.info.n_ctx}"
            )
        sid, seq = self.sessions.reserve(owner)
        release = self._hold(sid)
        encode = self._encoder(req)

        def reply(ev: Evaluate) -> p.DistributionReply:
            return p.DistributionReply(
                op="open",
                session=sid,
                n_tokens=len(seq),
                dist=encode(ev.out[-1]),
                compute_ms=ev.compute_s * 1e3,
            )

        def cleanup() -> None:
            release()
            if ev.error is not None:
                self.sessions.discard(sid)

        ev = Evaluate(seq, tokens, [len(tokens) - 1], reply, cleanup)
        self.tokens_evaluated += len(tokens)
        return ev

    def _step(self, req: p.StepRequest) -> Evaluate:
        seq = self._session(req.session, req.rewind_to)
        tokens = req.tokens
        if tokens is None:
            tokens = self.backend.tokenize(req.text_bytes() or b"", add_bos=False)
            if not tokens:
                raise BadMessage("the step text tokenizes to nothing")
        self._check_tokens(tokens)
        self._check_room(seq, len(tokens))
        encode = self._encoder(req)

        def reply(ev: Evaluate) -> p.DistributionReply:
            return p.DistributionReply(
                op="step",
                session=req.session,
                n_tokens=len(seq),
                dist=encode(ev.out[-1]),
                compute_ms=ev.compute_s * 1e3,
            )

        self.tokens_evaluated += len(tokens)
        return Evaluate(seq, tokens, [len(tokens) - 1], reply, self._hold(req.session))

    def _verify(self, req: p.VerifyRequest) -> Evaluate:
        seq = self._session(req.session, req.rewind_to)
        pieces = self._feed_tokens(req.pieces())
        flat = [t for piece in pieces for t in piece]
        self._check_tokens(flat)
        self._check_room(seq, len(flat))
        ends = list(itertools.accumulate(len(x) for x in pieces))
        n0 = len(seq)
        encode = self._encoder(req)

        def reply(ev: Evaluate) -> p.DistributionsReply:
            return p.DistributionsReply(
                op="verify",
                session=req.session,
                dists=[encode(lp) for lp in ev.out],
                lengths=[n0 + e for e in ends],
                n_tokens=len(seq),
                compute_ms=ev.compute_s * 1e3,
            )

        self.tokens_evaluated += len(flat)
        return Evaluate(seq, flat, [e - 1 for e in ends], reply, self._hold(req.session))

    def _draft(self, req: p.DraftRequest) -> Draft:
        seq = self._session(req.session, req.rewind_to)
        feed = [t for piece in self._feed_tokens(req.pieces()) for t in piece]
        self._check_tokens(feed)
        self._check_room(seq, len(feed))

        def reply(task: Draft) -> p.DistributionsReply:
            return p.DistributionsReply(
                op="draft",
                session=req.session,
                dists=task.dists,
                lengths=task.lengths,
                drafted=task.drafted,
                n_tokens=len(seq),
                compute_ms=task.compute_s * 1e3,
            )

        return Draft(
            seq,
            feed,
            req.gamma,
            self._encoder(req),
            temperature=req.temperature,
            top_p=req.top_p,
            rng=np.random.default_rng(req.seed),
            eos=self._eos,
            n_ctx=self.backend.info.n_ctx,
            finish=reply,
            cleanup=self._hold(req.session),
            seed=req.seed or 0,
            position=req.position,
            keys=req.keys,
            piece=self._piece_bytes,
        )

    # ------------------------------------------------------------------ scoring

    def _pair(self, req: p.ScoreRequest | p.ScoreSample) -> Pair:
        prompt = self._prompt_tokens(req.prompt, req.prompt_tokens, req.add_bos)
        target = (
            req.target_tokens
            if req.target_tokens is not None
            else self.backend.tokenize(req.target or "", add_bos=False)
        )
        if not target:
            raise BadMessage("the target is empty")
        self._check_tokens([*prompt, *target])
        if len(prompt) + len(target) > self.backend.info.n_ctx:
            raise ContextOverflow(
                f"prompt ({len(prompt)}) + target ({len(target)}) tokens exceed the context "
                f"of {self.backend.info.n_ctx}"
            )
        return list(prompt), list(target)

    def _score(self, req: p.ScoreRequest) -> ScoreMany:
        pair = self._pair(req)

        def reply(results: list[p.ScoreResult]) -> p.ScoreReply:
            (r,) = results
            if r.error is not None:
                raise error_from_reply(r.error.code, r.error.message)
            return p.ScoreReply(
                target_tokens=r.target_tokens,
                logprobs=r.logprobs,
                compute_ms=task.compute_s * 1e3,
            )

        task = ScoreMany(self.backend, [pair], reply, parallel=1, chunk=self._score_chunk())
        return task

    def _score_many(self, req: p.ScoreManyRequest) -> ScoreMany:
        pairs: list[Pair | Moe2Error] = []
        for sample in req.samples:
            try:
                pairs.append(self._pair(sample))
            except Moe2Error as exc:  # this sample's own error; the others are scored
                pairs.append(exc)

        def reply(results: list[p.ScoreResult]) -> p.ScoreManyReply:
            return p.ScoreManyReply(results=results, compute_ms=task.compute_s * 1e3)

        task = ScoreMany(
            self.backend, pairs, reply, parallel=self.score_parallel, chunk=self._score_chunk()
        )
        return task

    def _score_chunk(self) -> int:
        """Tokens per sample and tick while scoring: bounds the logit rows returned."""
        return max(1, min(512, MAX_LOGIT_FLOATS // self.backend.info.n_vocab))

    # ------------------------------------------------------------------ the rest

    def _vocab(self) -> p.VocabReply:
        if self._vocab_reply is None:
            pieces = [self.backend.piece_bytes(t) for t in range(self.backend.info.n_vocab)]
            self._vocab_reply = p.encode_vocab(self.backend.info.tokenizer_hash, pieces)
        return self._vocab_reply

    def _score_choices(self, req: p.ScoreChoicesRequest) -> ScoreMany:
        """The options of one question, each scored after the same prompt, side by side in
        the same ticks (each on a sequence of its own, batched with whatever else runs)."""
        prompt = self._prompt_tokens(req.prompt, req.prompt_tokens, req.add_bos)
        if req.targets_tokens is not None:
            targets = [list(t) for t in req.targets_tokens]
        else:
            targets = [self.backend.tokenize(t, add_bos=False) for t in req.targets or []]
            empty = [i for i, t in enumerate(targets) if not t]
            if empty:
                raise BadMessage(f"target(s) {empty} tokenize to nothing")
        if not prompt:
            raise BadMessage("scoring needs a non-empty prompt")
        self._check_tokens([*prompt, *(t for target in targets for t in target)])
        longest = max(len(t) for t in targets)
        if len(prompt) + longest > self.backend.info.n_ctx:
            raise ContextOverflow(
                f"prompt ({len(prompt)}) + longest target ({longest}) tokens exceed the context "
                f"of {self.backend.info.n_ctx}"
            )

        def reply(results: list[p.ScoreResult]) -> p.ScoreChoicesReply:
            for r in results:
                if r.error is not None:
                    raise error_from_reply(r.error.code, r.error.message)
            return p.ScoreChoicesReply(
                prompt_tokens=len(prompt),
                targets_tokens=[r.target_tokens for r in results],
                logprobs=[r.logprobs for r in results],
                compute_ms=task.compute_s * 1e3,
            )

        pairs: list[Pair | Moe2Error] = [(list(prompt), t) for t in targets]
        task = ScoreMany(
            self.backend,
            pairs,
            reply,
            parallel=self.score_parallel,
            chunk=self._score_chunk(),
        )
        return task

    def _profile(self, req: p.ProfileRequest) -> p.ProfileReply:
        """Measure this agent now; the daemon publishes the profile when ``req.publish``."""
        if self.profiler is None:
            raise ConfigError(f"agent {self.agent_id} has no profiler set up")
        overrides = req.model_dump(
            include={"points", "prompt_lengths", "repeats", "decode_tokens", "max_prompt_fraction"},
            exclude_none=True,
        )
        try:
            settings = self.profiler.settings_with(overrides)
        except ConfigError as exc:  # what the peer asked for does not fit this model
            raise BadMessage(f"invalid profile request: {exc.message}") from None
        return p.ProfileReply(profile=self.profiler.run(settings), published=req.publish)

    def close(self) -> None:
        self.sessions.close_all()
        self.backend.close()


@dataclass
class _Sync:
    """A job for ``AgentService.handle``: the request and, once answered, its reply."""

    request: Any
    reply: p.Message | None = None

    def done(self, reply: p.Message) -> None:
        self.reply = reply


# Characters per token when a request's text is not tokenized yet (an underestimate of the
# tokens for most text and tokenizers: backpressure then refuses late rather than early).
_CHARS_PER_TOKEN = 4


def work_tokens(req: Any) -> int | None:
    """Tokens of model work ``req`` asks for, estimated before it is tokenized (text:
    ``_CHARS_PER_TOKEN`` characters a token); None: no model work (tokenize, close...)."""

    def text(t: str | None, ids: list[int] | None) -> int:
        return len(ids) if ids is not None else max(1, len(t or "") // _CHARS_PER_TOKEN)

    if isinstance(req, p.OpenRequest):
        if req.messages is not None:
            return max(1, sum(len(m.content) for m in req.messages) // _CHARS_PER_TOKEN)
        return text(req.prompt, req.tokens)
    if isinstance(req, p.StepRequest):
        return text(req.text or req.text_b64, req.tokens)
    if isinstance(req, p.DraftRequest):
        return len(req.feed) + req.gamma
    if isinstance(req, p.VerifyRequest):
        return len(req.feed)
    if isinstance(req, p.ScoreRequest | p.ScoreSample):
        return text(req.prompt, req.prompt_tokens) + text(req.target, req.target_tokens)
    if isinstance(req, p.ScoreManyRequest):
        # Samples that share a prompt evaluate it once (``tasks.ScoreMany``).
        prompts: dict[tuple[int, ...] | str, int] = {}
        targets = 0
        for s in req.samples:
            key = tuple(s.prompt_tokens) if s.prompt_tokens is not None else s.prompt or ""
            prompts[key] = text(s.prompt, s.prompt_tokens)
            targets += text(s.target, s.target_tokens)
        return sum(prompts.values()) + targets
    if isinstance(req, p.ScoreChoicesRequest):
        if req.targets_tokens is not None:
            options = sum(len(t) for t in req.targets_tokens)
        else:
            options = sum(text(t, None) for t in req.targets or [])
        return text(req.prompt, req.prompt_tokens) + options
    return None
