"""One fused generation (paper Algorithm 3): open a session on each chosen expert, then per
token ask all of them at once, fuse, pick, and feed the pick back to every expert.

Experts that fail or stay silent past the step timeout are dropped and the others'
weights renormalised; generation ends on an end-of-generation token, ``max_tokens``, a full
context, or the prompt's deadline (an error).

    gen = Generation(rpc, infos, {"a": 0.7, "b": 0.3}, settings)
    result = gen.run("the fox eats", max_tokens=16)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from moe2.agent.gateway.fusion import END, Fused, choose, fuse_by_id, fuse_by_text
from moe2.agent.gateway.gate import renormalise
from moe2.shared import protocol as p
from moe2.shared.errors import (
    ContextOverflow,
    DeadlineExceeded,
    Moe2Error,
    RequestTimeout,
)
from moe2.shared.errors import NoExperts as NoExpertsLeft
from moe2.shared.mqtt import RpcClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    step_timeout_s: float = 5.0
    open_timeout_s: float = 30.0  # the first step processes the whole prompt
    top_k: int = 64
    full_vocab_limit: int = 8192
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # "stop" | "length" | "context"
    weights: dict[str, float]  # final weights of the experts still answering
    tokens: int
    fusion: Literal["token-id", "token-text"]
    dropped: list[p.DroppedExpert] = field(default_factory=list)


class Generation:
    def __init__(
        self,
        rpc: RpcClient,
        infos: Mapping[str, p.AgentInfo],
        weights: Mapping[str, float],
        settings: GenerationSettings,
        *,
        deadline: float | None = None,  # time.monotonic() value
        on_delta: Callable[[str], None] | None = None,
        on_step: Callable[[int, Fused], None] | None = None,  # for tests and tracing
    ) -> None:
        self.rpc = rpc
        self.infos = dict(infos)
        self.weights = renormalise(dict(weights))
        self.s = settings
        self.deadline = deadline
        self.on_delta = on_delta
        self.on_step = on_step
        self.dropped: list[p.DroppedExpert] = []
        self.sessions: dict[str, str] = {}
        hashes = {self.infos[n].tokenizer_hash for n in self.weights}
        self.by_id = len(hashes) == 1
        self.fusion: Literal["token-id", "token-text"] = "token-id" if self.by_id else "token-text"
        first = self.infos[next(iter(self.weights))]
        self.n_vocab = first.n_vocab
        self.full = self.by_id and self.n_vocab <= settings.full_vocab_limit
        self.eos = {n: list(self.infos[n].eos_ids) for n in self.weights}
        self._pieces: dict[int, str] = {}
        self._rng = np.random.default_rng(settings.seed)

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
            raise NoExpertsLeft(
                "every expert chosen for this prompt failed: "
                + "; ".join(f"{d.id}: {d.reason}" for d in self.dropped)
            )

    def _gather(self, futures: dict[str, Future[Any]], at: int) -> dict[str, Any]:
        """Replies of one step, dropping experts that fail or time out."""
        limit = self.s.open_timeout_s if at == 0 else self.s.step_timeout_s
        step_end = time.monotonic() + limit
        if self.deadline is not None:
            step_end = min(step_end, self.deadline)
        replies: dict[str, Any] = {}
        for name, fut in futures.items():
            try:
                replies[name] = self.rpc.wait(fut, max(0.0, step_end - time.monotonic()))
            except ContextOverflow:
                raise
            except RequestTimeout:
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    raise DeadlineExceeded(
                        "the prompt's deadline passed during generation"
                    ) from None
                self._drop(name, f"no reply within {limit:g} s", at)
            except Moe2Error as exc:
                self._drop(name, f"{exc.code}: {exc.message}", at)
        return replies

    def _request_options(self) -> dict[str, Any]:
        if self.full:
            return {"full": True}
        return {"top_k": self.s.top_k, "with_pieces": True}

    # ------------------------------------------------------------------ the loop

    def run(self, prompt: str, max_tokens: int) -> GenerationResult:
        opts = self._request_options()
        futures = {
            n: self.rpc.call_async(n, p.OpenRequest(prompt=prompt, **opts)) for n in self.weights
        }
        generated_ids: list[int] = []
        generated_text: list[str] = []
        finish = "length"
        try:
            replies = self._gather(futures, 0)
            for name, r in replies.items():
                self.sessions[name] = r.session
            for step in range(max_tokens):
                live = {n: r for n, r in replies.items() if n in self.weights}
                if not live:
                    raise NoExpertsLeft("no expert answered")
                dists = {n: r.dist for n, r in live.items()}
                if self.by_id:
                    fused = fuse_by_id(dists, self.weights, self.n_vocab)
                else:
                    fused = fuse_by_text(dists, self.weights, self.eos)
                if self.on_step is not None:
                    self.on_step(step, fused)
                pick = fused.keys[choose(fused, self.s.temperature, self.s.top_p, self._rng)]
                if self.by_id:
                    self._learn_pieces(dists)
                    if any(pick in e for e in self.eos.values()):
                        finish = "stop"
                        break
                    generated_ids.append(int(pick))
                    if self.on_delta is not None:
                        self.on_delta(self._piece(int(pick)))
                else:
                    if pick == END:
                        finish = "stop"
                        break
                    generated_text.append(pick)
                    if self.on_delta is not None:
                        self.on_delta(pick)
                if step + 1 == max_tokens:
                    break
                futures = {}
                for name in self.weights:
                    futures[name] = self.rpc.call_async(
                        name, self._step_request(name, pick, dists.get(name), opts)
                    )
                replies = self._gather(futures, step + 1)
        except ContextOverflow:
            finish = "context"
        finally:
            for name, sid in self.sessions.items():
                self.rpc.call_async(name, p.CloseRequest(session=sid))
        if self.by_id:
            text = self._detokenize(generated_ids)
            n_tokens = len(generated_ids)
        else:
            text = "".join(generated_text)
            n_tokens = len(generated_text)
        return GenerationResult(
            text, finish, dict(self.weights), n_tokens, self.fusion, self.dropped
        )

    def _step_request(self, name: str, pick: Any, dist: Any, opts: dict[str, Any]) -> p.StepRequest:
        sid = self.sessions[name]
        if self.by_id:
            return p.StepRequest(session=sid, tokens=[int(pick)], **opts)
        # Across vocabularies: the expert's own token for that text when it has one,
        # else let the expert tokenize the text.
        if dist is not None and dist.pieces is not None:
            for t, piece in zip(dist.ids, dist.pieces):
                if piece == pick and t not in self.eos[name]:
                    return p.StepRequest(session=sid, tokens=[t], **opts)
        return p.StepRequest(session=sid, text=pick, **opts)

    def _learn_pieces(self, dists: Mapping[str, Any]) -> None:
        for d in dists.values():
            if isinstance(d, p.TopKDist) and d.pieces is not None:
                for t, piece in zip(d.ids, d.pieces):
                    self._pieces.setdefault(t, piece)

    def _any_expert(self) -> str:
        return next(iter(self.weights))

    def _piece(self, token: int) -> str:
        if token not in self._pieces:
            reply = self.rpc.call(
                self._any_expert(),
                p.DetokenizeRequest(tokens=[token], pieces=True),
                timeout=self.s.step_timeout_s,
            )
            self._pieces[token] = (reply.pieces or [""])[0]
        return self._pieces[token]

    def _detokenize(self, ids: list[int]) -> str:
        if not ids:
            return ""
        try:
            reply = self.rpc.call(
                self._any_expert(), p.DetokenizeRequest(tokens=ids), timeout=self.s.step_timeout_s
            )
            return str(reply.text)
        except Moe2Error:  # the expert died after the last step: pieces are close enough
            return "".join(self._piece_or_empty(t) for t in ids)

    def _piece_or_empty(self, token: int) -> str:
        return self._pieces.get(token, "")
