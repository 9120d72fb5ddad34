"""Continuous batching on the model thread: every request that needs the model becomes a
``Task`` advanced a chunk per tick, and each tick evaluates every active task's chunk in one
``backend.decode_batch`` call (one ``llama_decode`` for all sessions of a context), the way
llama.cpp's server runs parallel slots. Aggregate tokens/s then grows with concurrent
sessions instead of serialising them.

    scheduler = Scheduler(backend, service.start, on_done)
    scheduler.submit(job)          # a job: .request (and whatever on_done needs)
    while not scheduler.idle:
        scheduler.tick()           # one decode for all active tasks; replies as they finish

Requests of one session run in arrival order (a step waits for the session's previous
request); requests that need no model (tokenize, ping, close...) are answered at once, in
order with the session's other requests.

A task's model time (``compute_s``, what its reply reports and its energy is of) is read from
the scheduler's ``clock`` around each tick's decode: wall time by default, the model thread's
CPU time where energy is modelled on a CPU (``Meter.model_clock``); ``wall_s`` always holds
the wall time, which ``on_model_time`` hears before each reply (the agent's own handling of a
request is its time less that).
"""

from __future__ import annotations

import abc
import logging
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from moe2.agent.backend import DecodePart, ModelBackend, Sequence
from moe2.shared import protocol as p
from moe2.shared.errors import InternalError, Moe2Error

log = logging.getLogger(__name__)

# Logit rows returned by one tick, in floats: bounds memory (64 MB of float32) whatever the
# vocabulary (a 150k vocabulary: about 100 rows per tick).
MAX_LOGIT_FLOATS = 16 << 20


class Task(abc.ABC):
    """The model work of one request."""

    compute_s = 0.0  # model time of the ticks this task took part in (the scheduler's clock)
    wall_s = 0.0  # wall seconds of those ticks
    error: Exception | None = None

    @property
    @abc.abstractmethod
    def done(self) -> bool: ...

    @abc.abstractmethod
    def parts(self, tokens: int, rows: int) -> list[DecodePart]:
        """What to evaluate this tick: at most ``tokens`` tokens and ``rows`` logit rows in
        all (at least one token when any budget is left and work remains)."""

    @abc.abstractmethod
    def take(self, results: list[list[np.ndarray] | Exception]) -> None:
        """The results of this tick's parts, in order."""

    def need(self) -> int:
        """Tokens still to evaluate, as far as known (orders tasks: small ones first)."""
        return 1

    @abc.abstractmethod
    def finish(self) -> p.Message:
        """The reply, once done; raises the Moe2Error the request failed with."""


class Evaluate(Task):
    """Append tokens to a sequence in chunks; log-probs after each position in ``rows``.

    On an error the sequence is rolled back to where it started."""

    def __init__(
        self,
        seq: Sequence,
        tokens: Seq[int],
        rows: Seq[int],
        finish: Callable[[Evaluate], p.Message] | None = None,
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        self.seq = seq
        self.tokens = list(tokens)
        self.rows = list(rows)  # ascending indices into tokens
        self.out: list[np.ndarray] = []
        self.n0 = len(seq)
        self._pos = 0
        self._row = 0  # rows before this are evaluated
        self._chunk: tuple[int, int] = (0, 0)
        self._finish = finish
        self._cleanup = cleanup

    @property
    def done(self) -> bool:
        return self.error is not None or self._pos >= len(self.tokens)

    def need(self) -> int:
        return len(self.tokens) - self._pos

    def parts(self, tokens: int, rows: int) -> list[DecodePart]:
        end = min(len(self.tokens), self._pos + tokens)
        # Rows in [pos, end): keep at most `rows` of them, cutting the chunk after the last.
        r = self._row
        while r < len(self.rows) and self.rows[r] < end and r - self._row < rows:
            r += 1
        if r < len(self.rows) and self.rows[r] < end:  # out of row budget: stop before row r
            end = self.rows[r]
        if end <= self._pos:
            return []
        self._chunk = (end, r)
        want = [x - self._pos for x in self.rows[self._row : r]]
        return [DecodePart(self.seq, self.tokens[self._pos : end], want)]

    def take(self, results: list[list[np.ndarray] | Exception]) -> None:
        (res,) = results
        if isinstance(res, Exception):
            self.error = res
            self.seq.truncate(self.n0)
            return
        self.out += res
        self._pos, self._row = self._chunk

    def finish(self) -> p.Message:
        try:
            if self.error is not None:
                raise self.error
            if self._finish is None:
                raise InternalError("this evaluation is part of another task")
            return self._finish(self)
        finally:
            if self._cleanup is not None:
                self._cleanup()


class Scheduler:
    """Runs tasks together, one ``decode_batch`` per tick; see the module docstring."""

    def __init__(
        self,
        backend: ModelBackend,
        start: Callable[[Any], Task | p.Message],  # request -> its task, or the reply now
        on_done: Callable[[Any, p.Message], None],  # (job, reply)
        *,
        n_batch: int = 512,
        clock: Callable[[], float] = time.perf_counter,  # model time, read on this thread
        on_model_time: Callable[[Any, float], None] | None = None,  # (job, wall s of its ticks)
    ) -> None:
        self.backend = backend
        self._start = start
        self._on_done = on_done
        self.clock = clock
        self._on_model_time = on_model_time
        self.n_batch = n_batch
        self.max_rows = max(1, MAX_LOGIT_FLOATS // max(1, backend.info.n_vocab))
        self._active: list[tuple[Any, Task, str | None]] = []
        self._busy: dict[str, deque[Any]] = {}  # session -> jobs waiting behind its task
        self.ticks = 0
        self.decoded_tokens = 0

    @property
    def idle(self) -> bool:
        return not self._active

    def submit(self, job: Any) -> None:
        key = getattr(job.request, "session", None)
        if key is not None and key in self._busy:
            self._busy[key].append(job)
            return
        self._begin(job, key)

    def _begin(self, job: Any, key: str | None) -> None:
        while True:
            try:
                work = self._start(job.request)
            except Exception as exc:
                work = _error_reply(job.request, exc)
            if isinstance(work, Task):
                self._active.append((job, work, key))
                if key is not None:
                    self._busy.setdefault(key, deque())
                return
            self._on_done(job, work)
            # Answered at once: the session's next waiting job (if any) may start.
            queue = self._busy.get(key) if key is not None else None
            if not queue:
                if key is not None:
                    self._busy.pop(key, None)
                return
            job = queue.popleft()

    def tick(self) -> None:
        """Evaluate one chunk of every active task, in one batch; reply to those done."""
        if not self._active:
            return
        tokens, rows = self.n_batch, self.max_rows
        plan: list[tuple[Task, int, int]] = []  # (task, first part, part count)
        parts: list[DecodePart] = []
        for _job, task, _key in sorted(self._active, key=lambda a: a[1].need()):
            if tokens <= 0 or task.done:
                continue
            got = task.parts(tokens, rows)
            plan.append((task, len(parts), len(got)))
            parts += got
            tokens -= sum(len(x.tokens) for x in got)
            rows -= sum(len(x.rows) for x in got)
        t0, c0 = time.perf_counter(), self.clock()
        results: list[list[np.ndarray] | Exception]
        try:
            results = self.backend.decode_batch(parts) if parts else []
        except Exception as exc:  # a bug must cost this tick's requests, not the agent
            log.exception("decode of %d parts failed", len(parts))
            results = [InternalError(f"{type(exc).__name__}: {exc}")] * len(parts)
        wall, spent = time.perf_counter() - t0, self.clock() - c0
        self.ticks += 1
        self.decoded_tokens += sum(len(x.tokens) for x in parts)
        for task, first, count in plan:
            task.compute_s += spent
            task.wall_s += wall
            if count:
                try:
                    task.take(results[first : first + count])
                except Exception as exc:
                    log.exception("a task failed to take its results")
                    task.error = exc
        finished = [a for a in self._active if a[1].done]
        self._active = [a for a in self._active if not a[1].done]
        for job, task, key in finished:
            try:
                reply = task.finish()
            except Exception as exc:
                reply = _error_reply(job.request, exc)
            if self._on_model_time is not None:
                self._on_model_time(job, task.wall_s)
            self._on_done(job, reply)
            if key is not None:
                queue = self._busy.get(key)
                if queue:
                    self._begin(queue.popleft(), key)
                else:
                    self._busy.pop(key, None)

    def run(self, job: Any) -> None:
        """Submit one job and tick until nothing is active (a synchronous caller)."""
        self.submit(job)
        while not self.idle:
            self.tick()


def _error_reply(request: Any, exc: Exception) -> p.ErrorReply:
    op = getattr(request, "op", None)
    if isinstance(exc, Moe2Error):
        return p.error_reply(exc.code, exc.message, op)
    log.error("request %s failed", op, exc_info=exc)
    err = InternalError(f"{type(exc).__name__}: {exc}")
    return p.error_reply(err.code, err.message, op)
