"""The agent's own time per request: what a request spends here beyond its model's work.

Every request an answer is made of (``open``, ``step``, ``score_choices``) is decoded,
scheduled, answered and its reply encoded and published; on a tiny model that handling is
more than the model's work, so a promise without it is broken by construction. Measured on
the requests served: from receipt (before decoding) to the reply published, less the wall
time of the model work (``Task.wall_s``). A ``ping`` goes the same way with no model work: a
link's round trip (what the gateway measures with pings, eqs. 5-6) already holds that much,
so what is announced is each operation's time beyond a ping's, and a request costs
``link + overhead + model`` with nothing counted twice.

Before anything is served, ``probe`` seeds the figures by running requests through the same
path in process (decoded from the wire, scheduled, answered, the reply encoded; pings too),
so the first profile already carries them (each operation's median); served requests replace
the probe's figure of an operation as soon as there are any (their mean: what a promise of
expected delay needs).

    times = RequestTimes()
    times.seed(probe(service))                 # after profiling, on the model thread
    times.served("step", 0.0009)               # receipt to reply, less the model's wall time
    times.figure()                             # RequestOverhead(seconds={"step": ...}, ...)
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from moe2.agent.batching import Scheduler
from moe2.agent.gateway.config import GatewayConfig
from moe2.agent.profiler import FILLER_TEXT
from moe2.agent.service import AgentService
from moe2.shared import protocol as p
from moe2.shared.costmodel import RequestOverhead

OPS = ("open", "step", "score_choices")  # the requests answers are made of (answercost)
PING = "ping"
WINDOW = 256  # requests of each operation the figure is a mean of
# A figure is announced again when an operation's mean moved by this much (relative) and by
# at least MOVED_S, when served requests replace the probe's figure, or when it rests on twice
# as many requests as the one announced (a mean of 1, 2, 4 ... requests: few announcements).
MOVED = 0.15
MOVED_S = 20e-6


class RequestTimes:
    """Per operation, the seconds the last ``WINDOW`` requests spent here beyond their model
    work, less what a ping spends (thread-safe)."""

    def __init__(self, window: int = WINDOW) -> None:
        self._served: dict[str, deque[float]] = {op: deque(maxlen=window) for op in OPS}
        self._seeded: dict[str, list[float]] = {}
        self._pings: deque[float] = deque(maxlen=window)
        self._seed_ping = 0.0
        self._lock = threading.Lock()

    def seed(self, samples: Iterable[tuple[str, float]]) -> None:
        """The probe's (op, seconds) samples, pings among them; replaces earlier seeds. A
        probe is a handful of requests: each operation's median stands for it (one request
        the machine held up for milliseconds would otherwise be most of the figure)."""
        by_op: dict[str, list[float]] = {}
        for op, seconds in samples:
            by_op.setdefault(op, []).append(seconds)
        pings = by_op.pop(PING, [])
        base = statistics.median(pings) if pings else 0.0
        seeded = {op: [statistics.median(v) - base] for op, v in by_op.items() if op in OPS}
        with self._lock:
            self._seed_ping = base
            self._seeded = seeded

    def served(self, op: str, seconds: float) -> None:
        """A request of ``op`` served in ``seconds`` beyond its model work (receipt to reply
        published, less the model's wall time)."""
        with self._lock:
            if op == PING:
                self._pings.append(seconds)
            elif op in self._served:
                # Beyond a ping of the same path: served pings when any came (the gateway's
                # link probes), else the probe's.
                base = statistics.fmean(self._pings) if self._pings else self._seed_ping
                self._served[op].append(seconds - base)

    def figure(self) -> RequestOverhead | None:
        """Each operation's mean over the requests served (where any, else the probe's
        median); None before either."""
        with self._lock:
            seconds: dict[str, float] = {}
            count = 0
            for op in OPS:
                values = list(self._served[op]) or self._seeded.get(op, [])
                if values:
                    seconds[op] = max(0.0, statistics.fmean(values))
                    count += len(values)
        return RequestOverhead(seconds=seconds, requests=count) if seconds else None


def moved(old: RequestOverhead | None, new: RequestOverhead | None) -> bool:
    """Whether ``new`` is worth announcing over ``old``."""
    if new is None:
        return False
    if old is None or set(new.seconds) != set(old.seconds) or new.requests >= 2 * old.requests:
        return True
    for op, s in new.seconds.items():
        before = old.seconds[op]
        if abs(s - before) > max(MOVED_S, MOVED * before):
            return True
    return False


@dataclass
class _ProbeJob:
    request: Any
    reply: p.Message | None = None
    model_s: float = 0.0


def probe(
    service: AgentService,
    model_clock: Callable[[], float] = time.perf_counter,
    rounds: int = 6,
    steps: int = 4,
) -> list[tuple[str, float]]:
    """(op, seconds beyond the model) of requests run through the agent's request path in
    process, as a gateway sends them (bin1 where it can, its default distribution options):
    ``rounds`` of a ping, an open, ``steps`` steps and a 4-option ``score_choices``. Runs on
    the model thread, while nothing else is served."""
    defaults = GatewayConfig.model_fields
    top_k = int(defaults["top_k"].default)
    full = service.backend.info.n_vocab <= int(defaults["full_vocab_limit"].default)
    options: dict[str, Any] = {"full": True} if full else {"top_k": top_k}
    sched = Scheduler(
        service.backend,
        service.start,
        lambda job, reply: setattr(job, "reply", reply),
        clock=model_clock,
        on_model_time=lambda job, wall: setattr(job, "model_s", wall),
    )

    def timed(request: p.Message) -> tuple[float, Any]:
        t0 = time.monotonic()
        job = _ProbeJob(p.decode_request(p.encode_rpc(request, "bin1"), 1 << 30))
        sched.run(job)
        assert job.reply is not None
        p.encode_rpc(job.reply, "bin1")
        seconds = time.monotonic() - t0 - job.model_s
        if isinstance(job.reply, p.ErrorReply):
            raise RuntimeError(f"overhead probe: {job.reply.error.code}: {job.reply.error.message}")
        return seconds, job.reply

    text = FILLER_TEXT[:80]
    choices = [" the river", " the sea", " the old mill", " the farmer"]
    out: list[tuple[str, float]] = []
    for _ in range(rounds):
        out.append((PING, timed(p.PingRequest())[0]))
        seconds, opened = timed(p.OpenRequest(prompt=text, **options))
        out.append(("open", seconds))
        session = opened.session
        try:
            for _ in range(steps):
                token = _top(opened.dist)
                seconds, opened = timed(p.StepRequest(session=session, tokens=[token], **options))
                out.append(("step", seconds))
        finally:
            service.start(p.CloseRequest(session=session))
        out.append(("score_choices", timed(p.ScoreChoicesRequest(prompt=text, targets=choices))[0]))
    return out


def _top(dist: Any) -> int:
    """The most likely token of a distribution as sent."""
    if isinstance(dist, p.TopKDist):
        return int(dist.ids[0])
    return int(dist.logprobs().argmax())
