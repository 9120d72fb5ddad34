"""Model work that takes more than one evaluation: drafting tokens (speculative fusion) and
scoring several samples at once. Both run as ``batching.Task`` s, so the scheduler batches
them with every other session's work.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from moe2.agent.backend import DecodePart, ModelBackend, Sequence
from moe2.agent.batching import Evaluate, Task
from moe2.agent.sampling import KeyKind, draft_token, stream_draft
from moe2.shared import protocol as p
from moe2.shared.errors import Moe2Error

Encode = Callable[[np.ndarray], Any]  # (n_vocab,) log-probs -> the distribution sent


class Draft(Task):
    """Feed tokens, then draft up to ``gamma`` tokens one evaluation per tick, each drawn
    from the distribution as it will be sent (so the gateway knows what it was drawn from):
    with an answer ``position``, by the keyed draw the gateway makes (``draft_token``),
    else from ``rng``. The last drafted token is not evaluated: the next request feeds it,
    or rewinds."""

    def __init__(
        self,
        seq: Sequence,
        feed: Seq[int],
        gamma: int,
        encode: Encode,
        *,
        temperature: float,
        top_p: float,
        rng: np.random.Generator,
        eos: set[int],
        n_ctx: int,
        finish: Callable[[Draft], p.Message],
        cleanup: Callable[[], None] | None = None,
        seed: int = 0,
        position: int | None = None,  # answer position of the first drafted token
        keys: KeyKind = "id",
        piece: Callable[[int], bytes] | None = None,  # token id -> bytes (keys="bytes")
    ) -> None:
        self.seq = seq
        self.gamma = gamma
        self.encode = encode
        self.temperature, self.top_p, self.rng = temperature, top_p, rng
        self.seed, self.position, self.keys, self.piece = seed, position, keys, piece
        self.eos, self.n_ctx = eos, n_ctx
        self.n0 = len(seq)
        self.drafted: list[int] = []
        self.dists: list[Any] = []
        self.lengths: list[int] = []
        self._pending = list(feed)  # tokens still to evaluate before the next draw
        self._sent = 0
        self._finished = False
        self._finish = finish
        self._cleanup = cleanup

    @property
    def done(self) -> bool:
        return self._finished or self.error is not None

    def need(self) -> int:
        return len(self._pending) + self.gamma - len(self.drafted)

    def parts(self, tokens: int, rows: int) -> list[DecodePart]:
        n = min(tokens, len(self._pending))
        last = n == len(self._pending)
        if n == 0 or (last and rows < 1):
            self._sent = 0
            return []
        self._sent = n
        return [DecodePart(self.seq, self._pending[:n], [n - 1] if last else [])]

    def take(self, results: list[list[np.ndarray] | Exception]) -> None:
        (res,) = results
        if isinstance(res, Exception):
            self.error = res
            self.seq.truncate(self.n0)
            return
        del self._pending[: self._sent]
        if self._pending:
            return  # a long feed, in chunks
        dist = self.encode(res[-1])
        if self.position is None:
            token = stream_draft(dist, self.temperature, self.top_p, self.rng)
        else:
            token = draft_token(
                dist,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=self.seed,
                position=self.position + len(self.drafted),
                keys=self.keys,
                piece=self.piece,
                eos=frozenset(self.eos),
            )
        self.drafted.append(token)
        self.dists.append(dist)
        self.lengths.append(len(self.seq))
        full = len(self.seq) + 1 > self.n_ctx
        if len(self.drafted) >= self.gamma or token in self.eos or full:
            self._finished = True
        else:
            self._pending = [token]

    def finish(self) -> p.Message:
        try:
            if self.error is not None:
                raise self.error
            return self._finish(self)
        finally:
            if self._cleanup is not None:
                self._cleanup()


Pair = tuple[list[int], list[int]]  # (prompt ids, target ids)


class ScoreMany(Task):
    """Teacher-forced scores of several (prompt, target) pairs, ``parallel`` at a time on
    sequences of their own, evaluated in the same ticks."""

    def __init__(
        self,
        backend: ModelBackend,
        samples: Seq[Pair | Moe2Error],
        finish: Callable[[list[p.ScoreResult]], p.Message],
        *,
        parallel: int = 4,
        chunk: int = 512,
    ) -> None:
        self.results: list[p.ScoreResult | None] = [None] * len(samples)
        self._pairs: dict[int, Pair] = {}
        for i, s in enumerate(samples):
            if isinstance(s, Moe2Error):
                self.results[i] = _failed(s)
            else:
                self._pairs[i] = s
        self._todo = sorted(self._pairs, reverse=True)  # pop() takes samples in order
        self.chunk = chunk  # tokens per sample and tick (bounds logit rows)
        self._free: list[Sequence] = [
            backend.new_sequence() for _ in range(min(parallel, len(self._todo)))
        ]
        self._running: list[tuple[int, Evaluate, list[float]]] = []
        self._finish = finish
        self._tick_parts: list[int] = []

    @property
    def done(self) -> bool:
        return self.error is not None or (not self._todo and not self._running)

    def need(self) -> int:
        queued = sum(len(a) + len(b) for i in self._todo for a, b in [self._pairs[i]])
        return queued + sum(ev.need() for _, ev, _ in self._running)

    def parts(self, tokens: int, rows: int) -> list[DecodePart]:
        while self._todo and self._free:
            i = self._todo.pop()
            prompt, target = self._pairs[i]
            first = len(prompt) - 1  # the position first + t predicts target[t]
            rows_wanted = range(first, first + len(target))
            ev = Evaluate(self._free.pop(), [*prompt, *target], rows_wanted)
            self._running.append((i, ev, []))
        out: list[DecodePart] = []
        self._tick_parts = []
        for k, (_i, ev, _vals) in enumerate(self._running):
            if tokens <= 0:
                break
            got = ev.parts(min(tokens, self.chunk), rows)
            if got:
                self._tick_parts.append(k)
                out += got
                tokens -= len(got[0].tokens)
                rows -= len(got[0].rows)
        return out

    def take(self, results: list[list[np.ndarray] | Exception]) -> None:
        for k, res in zip(self._tick_parts, results):
            i, ev, vals = self._running[k]
            ev.take([res])
            target = self._pairs[i][1]
            for lp in ev.out:  # keep one number per row, not the row
                vals.append(float(lp[target[len(vals)]]))
            ev.out.clear()
        still = []
        for i, ev, vals in self._running:
            if not ev.done:
                still.append((i, ev, vals))
                continue
            err = ev.error
            if err is None:
                self.results[i] = p.ScoreResult(target_tokens=self._pairs[i][1], logprobs=vals)
            elif isinstance(err, Moe2Error):
                self.results[i] = _failed(err)
            else:
                raise err
            ev.seq.truncate(0)
            self._free.append(ev.seq)
        self._running = still

    def finish(self) -> p.Message:
        for seq in [*self._free, *(ev.seq for _, ev, _ in self._running)]:
            seq.close()
        self._free, self._running = [], []
        if self.error is not None:
            raise self.error
        return self._finish([r for r in self.results if r is not None])


def _failed(exc: Moe2Error) -> p.ScoreResult:
    return p.ScoreResult(error=p.ErrorBody(code=exc.code, message=exc.message))
