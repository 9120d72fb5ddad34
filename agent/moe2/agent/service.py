"""What the agent does with one validated RPC request (runs on the model thread)."""

from __future__ import annotations

import time
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from moe2.agent.backend import ModelBackend
from moe2.agent.chat import ChatRenderer
from moe2.agent.sessions import SessionManager
from moe2.shared import protocol as p
from moe2.shared.errors import BadMessage, Cancelled, ConfigError

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
    ) -> None:
        self.agent_id = agent_id
        self.default_top_k = default_top_k
        self.backend = backend
        self.sessions = SessionManager(backend, max_sessions, session_idle_s)
        # False while the agent stops: new sessions are refused (``cancelled``), the open ones
        # are served until their gateways close them.
        self.accepting = True
        self._piece = lru_cache(maxsize=1 << 16)(backend.piece)
        self._vocab_reply: p.VocabReply | None = None  # computed once, on first request
        self.profiler: SelfProfiler | None = None  # set by the daemon; None: cannot profile
        self.chat = ChatRenderer(backend)
        self.tokens_evaluated = 0  # by open and step, for the metrics

    def handle(self, req: Any) -> p.Message:
        if isinstance(req, p.OpenRequest):
            return self._open(req)
        if isinstance(req, p.StepRequest):
            return self._step(req)
        if isinstance(req, p.CloseRequest):
            self.sessions.close(req.session)
            return p.CloseReply(session=req.session)
        if isinstance(req, p.ScoreRequest):
            return self._score(req)
        if isinstance(req, p.ScoreChoicesRequest):
            return self._score_choices(req)
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

    def _open(self, req: p.OpenRequest) -> p.DistributionReply:
        if not self.accepting:
            raise Cancelled(f"agent {self.agent_id} is stopping and opens no new session")
        if req.messages is not None:
            tokens = self.chat.tokens(req.messages)
        else:
            tokens = self._prompt_tokens(req.prompt, req.tokens, req.add_bos)
        t0 = time.perf_counter()
        sid, seq, logprobs = self.sessions.open(tokens)
        ms = (time.perf_counter() - t0) * 1e3
        self.tokens_evaluated += len(tokens)
        return p.DistributionReply(
            op="open",
            session=sid,
            n_tokens=len(seq.tokens),
            dist=self.distribution(logprobs, req.top_k, req.full, req.with_pieces),
            compute_ms=ms,
        )

    def _step(self, req: p.StepRequest) -> p.DistributionReply:
        seq = self.sessions.get(req.session)
        if req.rewind_to is not None:
            if req.rewind_to > len(seq.tokens):
                raise BadMessage(
                    f"rewind_to={req.rewind_to} is beyond the history of {len(seq.tokens)} tokens"
                )
            seq.truncate(req.rewind_to)
        tokens = req.tokens
        if tokens is None:
            tokens = self.backend.tokenize(req.text_bytes() or b"", add_bos=False)
            if not tokens:
                raise BadMessage("the step text tokenizes to nothing")
        t0 = time.perf_counter()
        logprobs = seq.extend(tokens)
        ms = (time.perf_counter() - t0) * 1e3
        self.tokens_evaluated += len(tokens)
        return p.DistributionReply(
            op="step",
            session=req.session,
            n_tokens=len(seq.tokens),
            dist=self.distribution(logprobs, req.top_k, req.full, req.with_pieces),
            compute_ms=ms,
        )

    def _vocab(self) -> p.VocabReply:
        if self._vocab_reply is None:
            pieces = [self.backend.piece_bytes(t) for t in range(self.backend.info.n_vocab)]
            self._vocab_reply = p.encode_vocab(self.backend.info.tokenizer_hash, pieces)
        return self._vocab_reply

    def _score(self, req: p.ScoreRequest) -> p.ScoreReply:
        prompt = self._prompt_tokens(req.prompt, req.prompt_tokens, req.add_bos)
        target = (
            req.target_tokens
            if req.target_tokens is not None
            else self.backend.tokenize(req.target or "", add_bos=False)
        )
        if not target:
            raise BadMessage("the target is empty")
        t0 = time.perf_counter()
        logprobs = self.backend.score(prompt, target)
        ms = (time.perf_counter() - t0) * 1e3
        return p.ScoreReply(target_tokens=list(target), logprobs=logprobs.tolist(), compute_ms=ms)

    def _score_choices(self, req: p.ScoreChoicesRequest) -> p.ScoreChoicesReply:
        prompt = self._prompt_tokens(req.prompt, req.prompt_tokens, req.add_bos)
        if req.targets_tokens is not None:
            targets = req.targets_tokens
        else:
            targets = [self.backend.tokenize(t, add_bos=False) for t in req.targets or []]
            empty = [i for i, t in enumerate(targets) if not t]
            if empty:
                raise BadMessage(f"target(s) {empty} tokenize to nothing")
        t0 = time.perf_counter()
        logprobs = self.backend.score_choices(prompt, targets)
        ms = (time.perf_counter() - t0) * 1e3
        return p.ScoreChoicesReply(
            prompt_tokens=len(prompt),
            targets_tokens=[list(t) for t in targets],
            logprobs=[lp.tolist() for lp in logprobs],
            compute_ms=ms,
        )

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
