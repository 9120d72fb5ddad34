"""One fused generation (paper Algorithm 3): open a session on each chosen expert, then per
token ask all of them at once, fuse, pick, and feed the pick back to every expert.

By default the tokens after the first come from speculative rounds (``speculative.py``: the
top expert drafts, the others verify, the same answer for fewer round trips); with
``decoding = "per-token"`` every token is one round trip to every expert.

Experts that fail, stay silent past the step timeout, go offline (their last will: dropped at
once, not at the timeout) or send a distribution that does not fit their vocabulary are
dropped and the others' weights renormalised; an expert that is full (``busy``: its sessions
are all in use by other gateways) is asked again until the open timeout. Generation ends on an
end-of-generation token, ``max_tokens``, a full context, or the prompt's deadline (an error).
Token texts come from the vocabulary tables the gateway holds (``vocab.py``), so the loop
makes no request besides open, step and close; the answer is the bytes of the chosen tokens,
decoded as UTF-8 incrementally (a character split over byte tokens is emitted whole).

    gen = Generation(rpc, infos, vocabs, {"a": 0.7, "b": 0.3}, config, Sampling())
    result = gen.run("the fox eats", max_tokens=16)
    result = gen.run(None, 16, messages=[ChatMessage(role="user", content="Hi")])
"""

from __future__ import annotations

import codecs
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from moe2.agent.gateway.config import GatewayConfig
from moe2.agent.gateway.fusion import END, Fused, check_dist, choose, fuse_by_id, fuse_by_text
from moe2.agent.gateway.gate import renormalise
from moe2.agent.gateway.vocab import Vocab
from moe2.shared import protocol as p
from moe2.shared.errors import (
    Busy,
    Cancelled,
    ContextOverflow,
    DeadlineExceeded,
    Moe2Error,
    NoExperts,
    RequestTimeout,
)
from moe2.shared.mqtt import RpcClient

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from moe2.agent.gateway.speculative import GammaMemory, Speculation, SpeculationStats

# While waiting for a reply, how often to look whether its expert is still online, seconds.
_ALIVE_CHECK_S = 0.2
# Retries of an open an expert refused as full: first wait, and the longest, seconds.
_BUSY_RETRY_S = (0.05, 1.0)

FinishReason = Literal["stop", "length", "context"]


@dataclass(frozen=True)
class Sampling:
    """A prompt's own choices (from the PromptRequest)."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    weights: dict[str, float]  # final weights of the experts still answering
    tokens: int
    fusion: Literal["token-id", "token-text"]
    dropped: list[p.DroppedExpert] = field(default_factory=list)
    picks: list[Any] = field(default_factory=list)  # chosen ids (by id) or bytes (by text)
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # per expert, from its open
    step_seconds: list[float] = field(default_factory=list)  # each fused step, asked to fused
    speculation: SpeculationStats | None = None  # when decoded speculatively
    compute_ms: dict[str, float] = field(default_factory=dict)  # model time each expert reported
    # Seconds spent waiting for the experts' replies (send to the last reply), per-token
    # decoding only (None: speculative); the rest of the latency is the gateway's own.
    waited_s: float | None = None


class Generation:
    def __init__(
        self,
        rpc: RpcClient,
        infos: Mapping[str, p.AgentInfo],
        vocabs: Mapping[str, Vocab],  # expert -> its vocabulary table
        weights: Mapping[str, float],
        config: GatewayConfig,
        sampling: Sampling = Sampling(),
        *,
        deadline: float | None = None,  # time.monotonic() value
        on_delta: Callable[[str], None] | None = None,
        on_step: Callable[[int, Fused], None] | None = None,  # for tests and tracing
        alive: Callable[[str], bool] = lambda name: True,  # False: its last will came
        abandoned: Callable[[], bool] = lambda: False,  # True: the gateway gives up (stop)
        gamma_memory: GammaMemory | None = None,  # the gateway's, across prompts
    ) -> None:
        self.rpc = rpc
        self.infos = dict(infos)
        self.vocabs = dict(vocabs)
        self.weights = renormalise(dict(weights))
        self.config = config
        for name in self.weights:
            rpc.use_codec(self.infos[name], config.rpc_codec)
        self.sampling = sampling
        self.deadline = deadline
        self.on_delta = on_delta
        self.on_step = on_step
        self.alive = alive
        self.abandoned = abandoned
        self.dropped: list[p.DroppedExpert] = []
        self.sessions: dict[str, str] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.compute_ms: dict[str, float] = {}  # model time each expert reported (costs)
        self.waited_s = 0.0  # waiting for replies: sent to the last one in
        # History length of each session after its last reply: a step names it (rewind_to),
        # so a step sent again after a reconnect appends its token once, not twice.
        self.history: dict[str, int] = {}
        hashes = {self.infos[n].tokenizer_hash for n in self.weights}
        self.by_id = len(hashes) == 1
        self.fusion: Literal["token-id", "token-text"] = "token-id" if self.by_id else "token-text"
        first = next(iter(self.weights))
        self.n_vocab = self.vocabs[first].n_vocab  # the table's, not what an info claims
        self.full = self.by_id and self.n_vocab <= config.full_vocab_limit
        self.eos = {n: list(self.infos[n].eos_ids) for n in self.weights}
        self.eos_any = {t for ids in self.eos.values() for t in ids}
        self._pieces = {n: self.vocabs[n].pieces for n in self.weights}
        self._rng = np.random.default_rng(sampling.seed)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text: list[str] = []
        self.speculation: Speculation | None = None
        self.gamma_memory = gamma_memory
        self._retry_after = 0.0  # the longest wait a busy expert asked for (seconds)

    # ------------------------------------------------------------------ helpers

    def _drop(self, name: str, reason: str, at: int) -> None:
        if name in self.weights:
            log.warning("dropping expert %s at token %d: %s", name, at, reason)
            del self.weights[name]
            self.weights = renormalise(self.weights)
            self.dropped.append(p.DroppedExpert(id=name, reason=reason, at_token=at))
            sid = self.sessions.pop(name, None)
            if sid is not None:  # best effort: it may be dead
                self.rpc.call_async(name, p.CloseRequest(session=sid))
        if not self.weights:
            reasons = "; ".join(f"{d.id}: {d.reason}" for d in self.dropped)
            if all(d.reason.startswith("context_overflow") for d in self.dropped):
                raise ContextOverflow(
                    f"the prompt is longer than every expert's context: {reasons}"
                )
            if all(d.reason.startswith("busy") for d in self.dropped):
                raise Busy(f"every expert chosen for this prompt is full: {reasons}")
            raise NoExperts(f"every expert chosen for this prompt failed: {reasons}")

    def _wait(self, name: str, fut: Future[p.DistributionReply], until: float) -> Any:
        """The reply, waiting until ``until`` at most, but failing at once when the expert
        goes offline or the gateway abandons the prompt."""
        while True:
            if self.abandoned():
                raise Cancelled("the gateway is stopping and abandoned this prompt")
            if not self.alive(name):
                raise ExpertOffline(f"expert {name} went offline")
            left = until - time.monotonic()
            if left <= 0:
                raise RequestTimeout("no reply in time")
            try:
                return fut.result(timeout=min(left, _ALIVE_CHECK_S))
            except TimeoutError:
                continue

    def _gather(
        self, futures: dict[str, Future[p.DistributionReply]], at: int, busy: set[str] | None = None
    ) -> dict[str, p.DistributionReply]:
        """Replies of one step that fit their expert's vocabulary; drops the others. With
        ``busy`` (the open), experts that answered ``busy`` are put there, not dropped."""
        limit = self.config.open_timeout_s if at == 0 else self.config.step_timeout_s
        step_end = time.monotonic() + limit
        if self.deadline is not None:
            step_end = min(step_end, self.deadline)
        replies: dict[str, p.DistributionReply] = {}
        for name, fut in futures.items():
            try:
                reply = self._wait(name, fut, step_end)
                self.spent(name, reply.compute_ms)
                check_dist(reply.dist, self.vocabs[name].n_vocab)
                replies[name] = reply
            except ContextOverflow:
                if at > 0:
                    raise  # the history filled an expert's context: the answer ends here
                self._drop(name, "context_overflow: the prompt does not fit its context", at)
            except RequestTimeout:
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    raise DeadlineExceeded(
                        "the prompt's deadline passed during generation"
                    ) from None
                self._drop(name, f"no reply within {limit:g} s", at)
            except ExpertOffline as exc:
                self._drop(name, f"offline: {exc.message} (its last will said so)", at)
            except Busy as exc:
                if busy is None:
                    self._drop(name, f"{exc.code}: {exc.message}", at)
                else:
                    busy.add(name)
                    self._retry_after = max(self._retry_after, exc.retry_after_s or 0.0)
            except Cancelled as exc:  # the expert stops, or went offline while we waited
                if self.abandoned():
                    raise
                self._drop(name, f"{exc.code}: {exc.message}", at)
            except Moe2Error as exc:
                self._drop(name, f"{exc.code}: {exc.message}", at)
        return replies

    def spent(self, name: str, ms: float) -> None:
        """``name`` reported ``ms`` of model time for this answer (what its energy is of)."""
        self.compute_ms[name] = self.compute_ms.get(name, 0.0) + ms

    def _open(
        self, prompt: str | None, messages: list[p.ChatMessage] | None = None
    ) -> dict[str, p.DistributionReply]:
        """Open a session on every chosen expert; an expert that is full is asked again
        (backing off, or after the time its ``busy`` reply asked for) until the open
        timeout, then dropped."""
        opts = self._options()
        request = p.OpenRequest(prompt=prompt, messages=messages, **opts)
        until = time.monotonic() + self.config.open_timeout_s
        if self.deadline is not None:
            until = min(until, self.deadline)
        replies: dict[str, p.DistributionReply] = {}
        todo = list(self.weights)
        pause = _BUSY_RETRY_S[0]
        while todo:
            busy: set[str] = set()
            sent = time.monotonic()
            futures = {n: self.rpc.call_async(n, request, deadline=until) for n in todo}
            got = self._gather(futures, 0, busy)
            self.waited_s += time.monotonic() - sent
            for name, reply in got.items():
                replies[name] = reply
                self.sessions[name] = reply.session  # closed in run()'s finally
                self.prompt_tokens[name] = reply.n_tokens
                self.history[name] = reply.n_tokens
            todo = sorted(busy)
            if not todo:
                break
            pause = max(pause, self._retry_after)
            self._retry_after = 0.0
            if time.monotonic() + pause >= until:
                for name in todo:
                    self._drop(name, "busy: every session of the expert stayed in use", 0)
                break
            time.sleep(pause)
            pause = min(pause * 2, _BUSY_RETRY_S[1])
        return replies

    def _options(self) -> dict[str, Any]:
        return {"full": True} if self.full else {"top_k": self.config.top_k}

    def _emit(self, data: bytes) -> None:
        delta = self._decoder.decode(data)
        if delta:
            self._text.append(delta)
            if self.on_delta is not None:
                self.on_delta(delta)

    # ------------------------------------------------------------------ the loop

    def run(
        self, prompt: str | None, max_tokens: int, messages: list[p.ChatMessage] | None = None
    ) -> GenerationResult:
        """Generate from ``prompt``, or from ``messages``, which each expert renders with its
        own chat template."""
        picks: list[Any] = []
        steps: list[float] = []
        finish: FinishReason = "length"
        asked = time.monotonic()
        try:
            replies = self._open(prompt, messages)
            if self.config.decoding == "speculative" and max_tokens > 1:
                from moe2.agent.gateway.speculative import Speculation

                self.speculation = Speculation(self, self.gamma_memory)
                opened = time.monotonic()
                finish = self.speculation.run(replies, picks, max_tokens)
                # Rounds yield several tokens at once: each token's share of their time.
                steps.append(opened - asked)
                if len(picks) > 1:
                    steps += [(time.monotonic() - opened) / (len(picks) - 1)] * (len(picks) - 1)
            else:
                finish = self._per_token(replies, picks, max_tokens, steps, asked)
        finally:
            for name, sid in self.sessions.items():
                self.rpc.call_async(name, p.CloseRequest(session=sid))
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._text.append(tail)
            if self.on_delta is not None:
                self.on_delta(tail)
        return GenerationResult(
            "".join(self._text),
            finish,
            dict(self.weights),
            len(picks),
            self.fusion,
            self.dropped,
            picks,
            {n: t for n, t in self.prompt_tokens.items() if n in self.weights},
            steps,
            self.speculation.stats if self.speculation is not None else None,
            dict(self.compute_ms),
            self.waited_s if self.speculation is None else None,
        )

    def _per_token(
        self,
        replies: dict[str, p.DistributionReply],
        picks: list[Any],
        max_tokens: int,
        steps: list[float],
        asked: float,  # time.monotonic() when the first distributions were asked for
    ) -> FinishReason:
        """The plain loop: one round trip to every expert per token; ``steps`` gets each
        step's seconds, asked to fused."""
        for step in range(max_tokens):
            live = {n: r.dist for n, r in replies.items() if n in self.weights}
            if not live:
                raise NoExperts("no expert answered")
            fused = self._fuse(live, step)
            steps.append(time.monotonic() - asked)
            if self.on_step is not None:
                self.on_step(step, fused)
            pick = fused.keys[
                choose(fused, self.sampling.temperature, self.sampling.top_p, self._rng)
            ]
            if not self.accept_pick(pick, picks):
                return "stop"
            if step + 1 == max_tokens:
                break
            asked = time.monotonic()
            futures = {
                name: self.rpc.call_async(name, self._step_request(name, pick, live.get(name)))
                for name in self.weights
            }
            try:
                replies = self._gather(futures, step + 1)
                self.waited_s += time.monotonic() - asked
                for name, r in replies.items():
                    self.history[name] = r.n_tokens
            except ContextOverflow:
                return "context"
        return "length"

    def is_end(self, pick: Any) -> bool:
        return pick is END or (self.by_id and pick in self.eos_any)

    def accept_pick(self, pick: Any, picks: list[Any]) -> bool:
        """Add a chosen token to the answer (and stream it); False when it ends it."""
        if self.is_end(pick):
            return False
        picks.append(pick)
        self._emit(self._pieces[next(iter(self.weights))][pick] if self.by_id else pick)
        return True

    def _fuse(self, live: dict[str, Any], step: int) -> Fused:
        if self.by_id:
            return fuse_by_id(live, self.weights, self.n_vocab)
        bad = [n for n, d in live.items() if not isinstance(d, p.TopKDist)]
        for name in bad:  # text fusion works on top-k lists
            self._drop(name, "sent a full distribution to a cross-vocabulary fusion", step)
            del live[name]
        return fuse_by_text(live, self.weights, self._pieces, self.eos)

    def _step_request(self, name: str, pick: Any, dist: Any) -> p.StepRequest:
        piece = self.feed_piece(name, pick, dist)
        sid = self.sessions[name]
        opts = {**self._options(), "rewind_to": self.history[name]}
        if isinstance(piece, int):
            return p.StepRequest(session=sid, tokens=[piece], **opts)
        return p.StepRequest.with_bytes(sid, piece, **opts)

    def feed_piece(self, name: str, pick: Any, dist: Any) -> int | bytes:
        """What to feed expert ``name`` for the chosen token ``pick``, given the expert's
        distribution at the position it was chosen at: the id itself (one vocabulary);
        across vocabularies the expert's own token for those bytes when it has one (the
        first in its top-k, else any), else the bytes for it to tokenize."""
        if self.by_id:
            return int(pick)
        eos = self.eos[name]
        pieces = self._pieces[name]
        if isinstance(dist, p.TopKDist):
            for t in dist.ids:
                if pieces[t] == pick and t not in eos:
                    return t
        own = self.vocabs[name].by_bytes.get(pick)
        if own is not None and own not in eos:
            return own
        return bytes(pick)


class ExpertOffline(Moe2Error):
    """The expert's last will came while we waited for it (a drop reason, never a reply)."""

    code = "offline"
