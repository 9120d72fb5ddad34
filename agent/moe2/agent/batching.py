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

Nothing is computed for nobody: with a ``drop`` hook (the daemon's: the request's deadline
passed, its requester is gone, the agent stops), a job is answered with the hook's error
instead of being started, and a task in progress is stopped at its next tick (its session
rolled back). ``compute_s`` counts the model time of every tick, ``wasted_s`` the share of it
spent on tasks nobody got the answer of (stopped, or finished after their deadline), and
``late_s`` the share spent in ticks begun after a task's deadline had passed: nothing, with a
drop hook, beyond the tick in flight when the deadline passes. ``seconds_per_token``, what
backpressure expects work to take before a deadline, is of wall time.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe2.agent.backend import DecodePart, ModelBackend, Sequence
from moe2.shared import protocol as p
from moe2.shared.errors import InternalError, Moe2Error

log = logging.getLogger(__name__)

# Logit rows returned by one tick, in floats: bounds memory (64 MB of float32) whatever the
# vocabulary (a 150k vocabulary: about 100 rows per tick).
MAX_LOGIT_FLOATS = 16 << 20


@dataclass(frozen=True)
class Drop:
    """Why a job is dropped (``reason``: a metric label) and the error it is answered with."""

    reason: str
    error: Exception


class Task(abc.ABC):
    """The model work of one request."""

    compute_s = 0.0  # model time of the ticks this task took part in (the scheduler's clock)
    wall_s = 0.0  # wall seconds of those ticks
    cost_s = 0.0  # its share of those ticks' model time, by tokens evaluated
    error: Exception | None = None
    dropped: Drop | None = None  # stopped before its end (deadline, requester gone...)

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

    def abandon(self, error: Exception) -> None:
        """Stop here: nothing more is computed, ``finish`` raises ``error`` (and cleans up)."""
        self.error = error


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
            self.abandon(res)
            return
        self.out += res
        self._pos, self._row = self._chunk

    def abandon(self, error: Exception) -> None:
        self.error = error
        self.seq.truncate(self.n0)

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
        start: Callable[..., Task | p.Message],  # (request, requester) -> task, or reply now
        on_done: Callable[[Any, p.Message], None],  # (job, reply)
        *,
        n_batch: int = 512,
        clock: Callable[[], float] = time.perf_counter,  # model time, read on this thread
        on_model_time: Callable[[Any, float], None] | None = None,  # (job, wall s of its ticks)
        # (job, running) -> why to drop it now, before it starts or at a tick of its task
        drop: Callable[[Any, bool], Drop | None] | None = None,
        on_drop: Callable[[Any, Drop, float], None] | None = None,  # (job, why, seconds lost)
        late: Callable[[Any], bool] | None = None,  # job -> its answer comes too late
    ) -> None:
        self.backend = backend
        self._start = start
        self._on_done = on_done
        self.clock = clock
        self._on_model_time = on_model_time
        self._drop = drop
        self._on_drop = on_drop
        self._late = late
        self.n_batch = n_batch
        self.max_rows = max(1, MAX_LOGIT_FLOATS // max(1, backend.info.n_vocab))
        self._active: list[tuple[Any, Task, str | None]] = []
        self._busy: dict[str, deque[Any]] = {}  # session -> jobs waiting behind its task
        self.ticks = 0
        self.decoded_tokens = 0
        self.last_tasks = 0  # tasks that took part in the last tick
        self.last_tick_s = 0.0  # its decode time
        self.compute_s = 0.0  # model time of every tick
        self.wasted_s = 0.0  # of which spent on tasks whose answer nobody got
        self.late_s = 0.0  # of which in ticks begun after the task's deadline
        # Wall seconds per token evaluated, recent ticks weighted by their tokens (None: no tick
        # yet): what the daemon's backpressure expects work to take.
        self.seconds_per_token: float | None = None
        # Tokens each active task still needs, as of the last tick (read by other threads).
        self.needs: tuple[int, ...] = ()

    @property
    def idle(self) -> bool:
        return not self._active

    def gather_window(self, arrived: int, max_s: float) -> float:
        """Seconds worth waiting, once idle, for the next requests of the sessions that
        shared the last tick (``arrived`` are in): their clients answer within a round trip,
        and a tick that waits for them serves them together instead of in alternating
        halves. 0 when the last tick served one task, or when they are all in."""
        if self.last_tasks <= 1 or arrived >= self.last_tasks:
            return 0.0
        return min(max_s, 0.25 * self.last_tick_s)

    def drop_all(self, why: Drop) -> int:
        """Answer every active and waiting job with ``why`` at once (the agent stops)."""
        n = 0
        for job, task, _key in self._active:
            task.abandon(why.error)
            with contextlib.suppress(Exception):  # raises why.error; releases what it held
                task.finish()
            self._dropped(job, why, task.cost_s)
            n += 1
        for queue in self._busy.values():
            for job in queue:
                self._dropped(job, why, 0.0)
                n += 1
        self._active, self._busy, self.needs = [], {}, ()
        return n

    def _dropped(self, job: Any, why: Drop, lost_s: float) -> None:
        self.wasted_s += lost_s
        if self._on_drop is not None:
            self._on_drop(job, why, lost_s)
        err = why.error
        self._on_done(job, _error_reply(job.request, err))

    def submit(self, job: Any) -> None:
        key = getattr(job.request, "session", None)
        if key is not None and key in self._busy:
            self._busy[key].append(job)
            return
        self._begin(job, key)

    def _begin(self, job: Any, key: str | None) -> None:
        while True:
            why = self._drop(job, False) if self._drop is not None else None
            if why is not None:
                self._dropped(job, why, 0.0)
                work: Task | p.Message | None = None
            else:
                try:
                    work = self._start(job.request, getattr(job, "requester", None))
                except Exception as exc:
                    work = _error_reply(job.request, exc)
            if isinstance(work, Task):
                self._active.append((job, work, key))
                if key is not None:
                    self._busy.setdefault(key, deque())
                return
            if work is not None:
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
        if self._drop is not None:
            for job, task, _key in self._active:
                why = None if task.done else self._drop(job, True)
                if why is not None:  # stopped here; answered with the others below
                    task.abandon(why.error)
                    self._dropped_running(job, why, task)
        if not self._active:
            return
        tokens, rows = self.n_batch, self.max_rows
        plan: list[tuple[Task, int, int, bool]] = []  # (task, first part, part count, late)
        parts: list[DecodePart] = []
        for job, task, _key in sorted(self._active, key=lambda a: a[1].need()):
            if tokens <= 0 or task.done:
                continue
            got = task.parts(tokens, rows)
            late = self._late is not None and self._late(job)
            plan.append((task, len(parts), len(got), late))
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
        self.last_tasks, self.last_tick_s = len(plan), wall
        self.ticks += 1
        n_tokens = sum(len(x.tokens) for x in parts)
        self.decoded_tokens += n_tokens
        self.compute_s += spent
        if n_tokens:
            self._measure(wall, n_tokens)
        for task, first, count, late in plan:
            task.compute_s += spent
            task.wall_s += wall
            if n_tokens:
                share = spent * sum(len(x.tokens) for x in parts[first : first + count]) / n_tokens
                task.cost_s += share
                if late:  # a tick begun after its deadline: what the drop hook prevents
                    self.late_s += share
            if count:
                try:
                    task.take(results[first : first + count])
                except Exception as exc:
                    log.exception("a task failed to take its results")
                    task.error = exc
        finished = [a for a in self._active if a[1].done]
        self._active = [a for a in self._active if not a[1].done]
        self.needs = tuple(sorted(t.need() for _, t, _ in self._active))
        for job, task, key in finished:
            try:
                reply = task.finish()
            except Exception as exc:
                reply = _error_reply(job.request, exc)
            if task.dropped is None and self._late is not None and self._late(job):
                self.wasted_s += task.cost_s  # finished, but after its requester gave up
            if self._on_model_time is not None:
                self._on_model_time(job, task.wall_s)
            self._on_done(job, reply)
            if key is not None:
                queue = self._busy.get(key)
                if queue:
                    self._begin(queue.popleft(), key)
                else:
                    self._busy.pop(key, None)

    def _dropped_running(self, job: Any, why: Drop, task: Task) -> None:
        """A task stopped mid-way: counted now, answered when the tick collects it."""
        task.dropped = why
        self.wasted_s += task.cost_s
        if self._on_drop is not None:
            self._on_drop(job, why, task.cost_s)

    def _measure(self, seconds: float, tokens: int) -> None:
        """Update ``seconds_per_token``: ticks weighted by tokens, the last ~2,000 tokens."""
        rate = seconds / tokens
        if self.seconds_per_token is None:
            self.seconds_per_token = rate
        else:
            w = min(1.0, tokens / 2000)
            self.seconds_per_token += w * (rate - self.seconds_per_token)

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
