"""The experts of one generation: their sessions, weights and RPC calls, and dropping the
ones that fail.

Every request of a generation goes through ``ExpertPool.send`` and every wait through
``ExpertPool.gather``, which waits for all the experts asked at once: a reply that arrived
is used whatever happened to the others, and only an expert that failed or missed its time
is dropped (its weight goes to the others, renormalised). Each request carries the time it
is waited for as its deadline (``timeout_ms`` on the wire, never past the prompt's), so an
agent does not start, or stops, work whose answer nobody would use. Why an expert is dropped is an
error of ``moe2.shared.errors`` and recorded by its code:

- ``timeout``: no reply within the step (or open) timeout; ``offline``: its last will came;
- ``busy`` (at the open, after retrying until the open timeout, each retry after the time
  the agent's reply asked for, or backing off), ``context_overflow`` (the
  prompt does not fit its context), ``cancelled`` (it is stopping), ``bad_request`` (a reply
  that does not fit its vocabulary), or whatever error it answered.

When every expert is gone the generation fails with ``ContextOverflow`` (every one was too
small for the prompt), ``Busy`` (every one was full) or ``NoExperts``. The prompt's own
deadline, passed while waiting, is ``DeadlineExceeded``; the gateway abandoning the prompt
(``abandoned``: it stops, or the client cancelled the prompt) is ``Cancelled``. A session
whose open is answered after the pool stopped waiting for it (abandoned, the deadline, the
expert dropped meanwhile) is closed when that answer comes, not left for the agent to reclaim.

    pool = ExpertPool(rpc, infos, {"a": 0.7, "b": 0.3}, config, deadline=t_end)
    opened = pool.open(p.OpenRequest(prompt="the fox eats", full=True), align.check)
    limit = config.step_timeout_s
    futures = {("a", 0): pool.send("a", step_a, limit), ("b", 0): pool.send("b", step_b, limit)}
    replies = pool.gather(futures, at=1, limit_s=limit)
    pool.close()
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Protocol, TypeVar

from moe2.agent.gateway.config import GatewayConfig
from moe2.agent.gateway.gate import renormalise
from moe2.shared import protocol as p
from moe2.shared.errors import (
    Busy,
    Cancelled,
    ContextOverflow,
    DeadlineExceeded,
    ExpertOffline,
    Moe2Error,
    NoExperts,
    RequestTimeout,
)
from moe2.shared.protocol.rpc import _Reply, _Request

log = logging.getLogger(__name__)

R = TypeVar("R", bound=_Reply)
Distribution = p.TopKDist | p.FullDist
K = TypeVar("K", bound=Hashable)

# While waiting for replies, how often to look whether their experts are still online and
# whether the gateway abandoned the prompt, seconds.
_ALIVE_CHECK_S = 0.2
# Retries of an open an expert refused as full: first wait, and the longest, seconds.
_BUSY_RETRY_S = (0.05, 1.0)


class Rpc(Protocol):
    """What a generation needs of the RPC client (``moe2.shared.mqtt.RpcClient``)."""

    def call_async(
        self, agent_id: str, request: _Request[R], *, deadline: float | None = None
    ) -> Future[R]: ...

    def use_codec(self, agent: p.AgentInfo, preferred: str = ...) -> str: ...


class ExpertPool:
    def __init__(
        self,
        rpc: Rpc,
        infos: Mapping[str, p.AgentInfo],
        weights: Mapping[str, float],
        config: GatewayConfig,
        *,
        deadline: float | None = None,  # time.monotonic() value
        alive: Callable[[str], bool] = lambda name: True,  # False: its last will came
        abandoned: Callable[[], bool] = lambda: False,  # True: the gateway gives up (stop)
    ) -> None:
        self.rpc = rpc
        self.infos = dict(infos)
        self.weights = renormalise(dict(weights))
        self.config = config
        self.deadline = deadline
        self.alive = alive
        self.abandoned = abandoned
        self.dropped: list[p.DroppedExpert] = []
        self.sessions: dict[str, str] = {}
        self.prompt_tokens: dict[str, int] = {}  # per expert, from its open
        self.compute_ms: dict[str, float] = {}  # model time each expert reported (costs)
        self.waited_s = 0.0  # seconds spent in gather: waiting for the experts' replies
        for name in self.weights:
            rpc.use_codec(self.infos[name], config.rpc_codec)

    @property
    def names(self) -> list[str]:
        """The experts still answering, the highest weight first."""
        return sorted(self.weights, key=lambda n: -self.weights[n])

    def __contains__(self, name: str) -> bool:
        return name in self.weights

    # ------------------------------------------------------------------ calls

    def send(self, name: str, request: _Request[R], limit_s: float | None) -> Future[R]:
        """Ask expert ``name``: the one place a generation's requests leave the gateway.
        ``limit_s``: how long its reply will be waited for from now, its deadline (capped
        by the prompt's); None: the RPC client's default (a close, which goes on after the
        prompt's deadline)."""
        if limit_s is None:
            return self.rpc.call_async(name, request)
        end = time.monotonic() + limit_s
        if self.deadline is not None:
            end = min(end, self.deadline)
        return self.rpc.call_async(name, request, deadline=end)

    def gather(
        self,
        futures: Mapping[tuple[str, K], Future[R]],
        at: int,  # answer position, for the record of a drop
        limit_s: float,
        *,
        check: Callable[[str, K, R], None] | None = None,  # raises Moe2Error: a bad reply
        # At the open: experts that answered busy, not dropped, with the seconds they asked
        # the gateway to wait before asking again (0: they did not say).
        busy: dict[str, float] | None = None,
        late: Callable[[str, R], None] | None = None,  # a reply that comes after the wait
    ) -> dict[tuple[str, K], R]:
        """The replies of (expert, tag) requests sent at once, waited for together for up to
        ``limit_s`` (and the prompt's deadline). An expert whose reply failed, did not pass
        ``check`` or did not come is dropped with all its requests; the others' replies are
        returned even when one of them stalls. ``ContextOverflow`` after the open ends the
        answer (raised: the history filled an expert's context). A request no longer waited
        for (its expert dropped, or the wait ended by an exception) is cancelled, or with
        ``late``, handed its reply when that comes."""
        entered = time.monotonic()
        end = entered + limit_s
        if self.deadline is not None:
            end = min(end, self.deadline)
        pending = dict(futures)
        replies: dict[tuple[str, K], R] = {}
        failed: set[str] = set()

        def let_go(name: str, fut: Future[R]) -> None:
            if late is None:
                fut.cancel()
                return

            def came(f: Future[R]) -> None:
                if not f.cancelled() and f.exception() is None:
                    late(name, f.result())

            fut.add_done_callback(came)

        def fail(name: str, error: Moe2Error) -> None:
            failed.add(name)
            for key in [k for k in pending if k[0] == name]:
                let_go(name, pending.pop(key))
            if busy is not None and isinstance(error, Busy):
                busy[name] = error.retry_after_s or 0.0
            else:
                self.drop(name, error, at)

        try:
            while True:
                for key, fut in list(pending.items()):
                    if key not in pending or not fut.done():
                        continue
                    del pending[key]
                    name, tag = key
                    if name in failed:
                        continue
                    try:
                        reply = fut.result()
                        if isinstance(reply, p.DistributionReply | p.DistributionsReply):
                            # model time spent for this answer, whatever comes of the reply
                            spent = self.compute_ms.get(name, 0.0) + reply.compute_ms
                            self.compute_ms[name] = spent
                        if check is not None:
                            check(name, tag, reply)
                    except ContextOverflow as exc:
                        if at > 0:
                            raise  # the answer ends here ("context")
                        fail(name, exc)
                    except Cancelled as exc:  # the expert stops, or we were told to give up
                        if self.abandoned():
                            raise
                        fail(name, exc)
                    except Moe2Error as exc:
                        fail(name, exc)
                    else:
                        replies[key] = reply
                if not pending:
                    break
                if self.abandoned():
                    raise Cancelled("the gateway is stopping and abandoned this prompt")
                for name in {k[0] for k in pending}:
                    if not self.alive(name):
                        fail(name, ExpertOffline(f"expert {name} went offline (its last will)"))
                left = end - time.monotonic()
                if not pending or left <= 0:
                    break
                wait(
                    list(pending.values()),
                    timeout=min(left, _ALIVE_CHECK_S),
                    return_when=FIRST_COMPLETED,
                )
            if pending:
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    raise DeadlineExceeded("the prompt's deadline passed during generation")
                for name in sorted({k[0] for k in pending}):
                    fail(name, RequestTimeout(f"no reply within {limit_s:g} s"))
        finally:
            for (name, _), fut in pending.items():
                let_go(name, fut)
            self.waited_s += time.monotonic() - entered
        return {k: r for k, r in replies.items() if k[0] not in failed and k[0] in self.weights}

    def open(
        self, request: p.OpenRequest, check: Callable[[str, Distribution], None]
    ) -> dict[str, p.DistributionReply]:
        """Open a session on every expert; one that is full is asked again (after the time
        its ``busy`` reply asked for, else backing off) until the open timeout, then
        dropped; ``check`` raises Moe2Error for a distribution that does not fit the
        expert."""
        until = time.monotonic() + self.config.open_timeout_s
        if self.deadline is not None:
            until = min(until, self.deadline)
        opened: dict[str, p.DistributionReply] = {}
        todo = list(self.weights)
        pause = _BUSY_RETRY_S[0]

        def fits(name: str, tag: int, reply: p.DistributionReply) -> None:
            self.sessions[name] = reply.session  # closed by close(), even if dropped next
            check(name, reply.dist)

        def unwanted(name: str, reply: p.DistributionReply) -> None:
            self.send(name, p.CloseRequest(session=reply.session), None)

        while todo:
            busy: dict[str, float] = {}
            limit = until - time.monotonic()
            futures = {(n, 0): self.send(n, request, limit) for n in todo}
            got = self.gather(futures, 0, limit, check=fits, busy=busy, late=unwanted)
            for (name, _), reply in got.items():
                opened[name] = reply
                self.prompt_tokens[name] = reply.n_tokens
            todo = sorted(busy)
            if not todo:
                break
            pause = max(pause, *busy.values())
            if time.monotonic() + pause >= until:
                for name in todo:
                    self.drop(name, Busy("every session of the expert stayed in use"), 0)
                break
            self._sleep(pause)
            pause = min(pause * 2, _BUSY_RETRY_S[1])
        return opened

    def _sleep(self, seconds: float) -> None:
        """Wait ``seconds``, but not past the gateway abandoning the prompt."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.abandoned():
                raise Cancelled("the gateway is stopping and abandoned this prompt")
            time.sleep(min(left, _ALIVE_CHECK_S))

    def drop(self, name: str, error: Moe2Error, at: int) -> None:
        """Leave ``name`` out from now on (its session closed); raises when none is left."""
        if name in self.weights:
            log.warning(
                "dropping expert %s at token %d: %s: %s", name, at, error.code, error.message
            )
            del self.weights[name]
            self.weights = renormalise(self.weights)
            self.dropped.append(
                p.DroppedExpert(id=name, code=error.code, reason=error.message, at_token=at)
            )
            sid = self.sessions.pop(name, None)
            if sid is not None:  # best effort: it may be dead
                self.send(name, p.CloseRequest(session=sid), None)
        if not self.weights:
            reasons = "; ".join(f"{d.id}: {d.code}: {d.reason}" for d in self.dropped)
            codes = {d.code for d in self.dropped}
            if codes == {ContextOverflow.code}:
                raise ContextOverflow(
                    f"the prompt is longer than every expert's context: {reasons}"
                )
            if codes == {Busy.code}:
                raise Busy(f"every expert chosen for this prompt is full: {reasons}")
            raise NoExperts(f"every expert chosen for this prompt failed: {reasons}")

    def close(self) -> None:
        """Close every session still open (best effort, not waited for)."""
        for name, sid in self.sessions.items():
            self.send(name, p.CloseRequest(session=sid), None)
        self.sessions.clear()
