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
from moe2.agent.sampling import draft_distribution, greedy_draft
from moe2.shared import protocol as p
from moe2.shared.errors import Moe2Error

Encode = Callable[[np.ndarray], Any]  # (n_vocab,) log-probs -> the distribution sent


class Draft(Task):
    """Feed tokens, then draft up to ``gamma`` tokens one evaluation per tick, each drawn
    from the distribution as it will be sent (so the gateway knows what it was drawn from).
    The last drafted token is not evaluated: the next request feeds it, or rewinds."""

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
    ) -> None:
        self.seq = seq
        self.gamma = gamma
        self.encode = encode
        self.temperature, self.top_p, self.rng = temperature, top_p, rng
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
            self.abandon(res)
            return
        del self._pending[: self._sent]
        if self._pending:
            return  # a long feed, in chunks
        dist = self.encode(res[-1])
        if self.temperature > 0:
            ids, q = draft_distribution(dist, self.temperature, self.top_p)
            token = int(ids[self.rng.choice(len(ids), p=q)])
        else:
            token = greedy_draft(dist)
        self.drafted.append(token)
        self.dists.append(dist)
        self.lengths.append(len(self.seq))
        full = len(self.seq) + 1 > self.n_ctx
        if len(self.drafted) >= self.gamma or token in self.eos or full:
            self._finished = True
        else:
            self._pending = [token]

    def abandon(self, error: Exception) -> None:
        self.error = error
        self.seq.truncate(self.n0)

    def finish(self) -> p.Message:
        try:
            if self.error is not None:
                raise self.error
            return self._finish(self)
        finally:
            if self._cleanup is not None:
                self._cleanup()


Pair = tuple[list[int], list[int]]  # (prompt ids, target ids)

# Targets of one prompt branched from its cache at once: bounds the sequences one task holds
# (a 64-option question scores its options in waves, each wave after its own prompt pass).
MAX_BRANCHES = 16


class _Group:
    """The samples of one task that share a prompt: the prompt is evaluated once, on the
    first member's sequence, and every member's target goes on a sequence branched from its
    cache (``Sequence.share``), side by side in the same ticks."""

    def __init__(self, prompt: list[int], members: list[int]) -> None:
        self.prompt = prompt
        self.members = members  # sample indices, at most MAX_BRANCHES
        self.seqs: list[Sequence] = []
        self.first: Evaluate | None = None  # the prompt pass
        self.branches: list[tuple[int, Evaluate | None]] = []  # (sample, its target's pass)


class ScoreMany(Task):
    """Teacher-forced scores of several (prompt, target) pairs. Pairs with the same prompt
    (the options of one question, in ``score_choices`` or in a ``score_many`` batch) evaluate
    that prompt once: its last row scores every target's first token, and each target's other
    tokens are evaluated on a sequence that shares the prompt's KV cells. So a 4-option
    question costs L + Σ_o (len_o - 1) tokens, not 4 L + Σ_o len_o. A pair alone with its
    prompt is one pass over both. Up to ``parallel`` sequences (at least one group's worth)
    run in the same ticks. ``share=False`` scores every pair alone (what it cost before; for
    comparison)."""

    def __init__(
        self,
        backend: ModelBackend,
        samples: Seq[Pair | Moe2Error],
        finish: Callable[[list[p.ScoreResult]], p.Message],
        *,
        parallel: int = 4,
        chunk: int = 512,
        share: bool = True,
    ) -> None:
        self.results: list[p.ScoreResult | None] = [None] * len(samples)
        self._pairs: dict[int, Pair] = {}
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(samples):
            if isinstance(s, Moe2Error):
                self.results[i] = _failed(s)
            else:
                self._pairs[i] = s
                key = tuple(s[0]) if share else (i, *s[0])
                by_prompt.setdefault(key, []).append(i)
        self._todo: list[_Group] = []  # in the order of each prompt's first sample
        for members in by_prompt.values():
            prompt = self._pairs[members[0]][0]
            for k in range(0, len(members), MAX_BRANCHES):
                self._todo.append(_Group(list(prompt), members[k : k + MAX_BRANCHES]))
        self._todo.reverse()  # pop() takes groups in order
        self.chunk = chunk  # tokens per sequence and tick (bounds logit rows)
        widest = max((len(g.members) for g in self._todo), default=0)
        self._free: list[Sequence] = [
            backend.new_sequence() for _ in range(min(max(parallel, widest), len(self._pairs)))
        ]
        self._running: list[_Group] = []
        self._values: dict[int, list[float]] = {i: [] for i in self._pairs}
        self._finish = finish
        # (sample, or -1 for a prompt pass; its evaluation) given parts this tick, in order
        self._tick: list[tuple[int, Evaluate]] = []

    @property
    def done(self) -> bool:
        return self.error is not None or (not self._todo and not self._running)

    def need(self) -> int:
        queued = sum(
            len(g.prompt) + sum(len(self._pairs[i][1]) - 1 for i in g.members) for g in self._todo
        )
        running = 0
        for g in self._running:
            if g.first is not None:
                running += g.first.need()
            running += sum(ev.need() for _, ev in g.branches if ev is not None)
        return queued + running

    def _start_groups(self) -> None:
        # A group starts when all the sequences it needs are free (or, wider than this task's
        # sequences, when they all are), so a started group never waits for another.
        while self._todo and (len(self._free) >= len(self._todo[-1].members) or not self._running):
            g = self._todo.pop()
            take = min(len(g.members), len(self._free))
            g.seqs = [self._free.pop() for _ in range(take)]
            if len(g.members) == 1:  # alone: the prompt and its target in one pass
                (i,) = g.members
                target = self._pairs[i][1]
                first = len(g.prompt) - 1  # the row after token first + t predicts target[t]
                tokens = [*g.prompt, *target[:-1]]
                ev = Evaluate(g.seqs[0], tokens, range(first, first + len(target)))
                g.branches.append((i, ev))
            else:
                g.first = Evaluate(g.seqs[0], g.prompt, [len(g.prompt) - 1])
            self._running.append(g)

    def _branch(self, g: _Group) -> None:
        """The prompt is in: score every member's first token, start the rest."""
        assert g.first is not None
        (last,) = g.first.out  # (n_vocab,) log-probs after the prompt
        g.first = None
        n = len(g.prompt)
        source = g.seqs[0]
        others = g.seqs[1:]
        shared = [seq.share(source, n) for seq in others]
        lanes = [*others, source]  # the prompt's own sequence extends last, after the copies
        for k, i in enumerate(g.members):
            if k >= len(lanes):  # more members than sequences: a wave of their own
                self._todo.append(_Group(g.prompt, g.members[k:]))
                break
            target = self._pairs[i][1]
            self._values[i].append(float(last[target[0]]))
            seq = lanes[k]
            if len(target) == 1:
                g.branches.append((i, None))
            elif seq is source or shared[k]:
                g.branches.append((i, Evaluate(seq, target[:-1], range(len(target) - 1))))
            else:  # no shared cache (another context): the prompt again on this sequence
                rows = range(n, n + len(target) - 1)
                g.branches.append((i, Evaluate(seq, [*g.prompt, *target[:-1]], rows)))

    def parts(self, tokens: int, rows: int) -> list[DecodePart]:
        self._start_groups()
        out: list[DecodePart] = []
        self._tick = []
        for g in self._running:
            work: list[tuple[int, Evaluate | None]] = (
                [(-1, g.first)] if g.first is not None else g.branches
            )
            for i, ev in work:
                if ev is None or ev.done or tokens <= 0:
                    continue
                got = ev.parts(min(tokens, self.chunk), rows)
                if got:
                    self._tick.append((i, ev))
                    out += got
                    tokens -= len(got[0].tokens)
                    rows -= len(got[0].rows)
        return out

    def take(self, results: list[list[np.ndarray] | Exception]) -> None:
        for (i, ev), res in zip(self._tick, results):
            ev.take([res])
            if i >= 0:  # a target's rows: keep one number per row, not the row
                target = self._pairs[i][1]
                vals = self._values[i]
                for lp in ev.out:
                    vals.append(float(lp[target[len(vals)]]))
                ev.out.clear()
        still: list[_Group] = []
        for g in self._running:
            if g.first is not None:
                if g.first.error is not None:
                    self._fail(g.members, g.first.error)
                    self._release(g)
                    continue
                if not g.first.done:
                    still.append(g)
                    continue
                self._branch(g)
            pending = False
            for i, branch in g.branches:
                if self.results[i] is not None:
                    continue
                if branch is not None and not branch.done:
                    pending = True
                elif branch is not None and branch.error is not None:
                    self._fail([i], branch.error)
                else:
                    self._scored(i)
            if pending:
                still.append(g)
            else:
                self._release(g)
        self._running = still

    def _scored(self, i: int) -> None:
        self.results[i] = p.ScoreResult(target_tokens=self._pairs[i][1], logprobs=self._values[i])

    def _fail(self, members: Seq[int], err: Exception) -> None:
        if not isinstance(err, Moe2Error):
            raise err
        for i in members:
            self.results[i] = _failed(err)

    def _release(self, g: _Group) -> None:
        for seq in g.seqs:
            seq.truncate(0)
            self._free.append(seq)
        g.seqs = []

    def finish(self) -> p.Message:
        for seq in [*self._free, *(s for g in self._running for s in g.seqs)]:
            seq.close()
        self._free, self._running = [], []
        if self.error is not None:
            raise self.error
        return self._finish([r for r in self.results if r is not None])


def _failed(exc: Moe2Error) -> p.ScoreResult:
    return p.ScoreResult(error=p.ErrorBody(code=exc.code, message=exc.message))
