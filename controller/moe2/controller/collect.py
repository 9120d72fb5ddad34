"""Score collection: every online expert's teacher-forced target log-probabilities over a
dataset, stored in the registry (docs/method.md: collect p once, train the gate offline).

Every vocabulary (``tokenizer_hash``) tokenizes the dataset once, by one of its experts, and
its experts score those ids: experts of one vocabulary score the same ids, so their per-token
probabilities line up for token-level fusion, and each score is stored with the prompt's real
length in its expert's tokens, which the cost model needs. Scores stored before prompt
lengths were get them filled in by the next run. Samples go to an expert in ``score_many``
requests, which the agent evaluates together in one batch (one ``score`` request each to an
agent without that operation). Scores are committed in small batches: an interrupted run
loses at most one uncommitted batch, and a new run skips every (sample, option, expert)
already stored, so nothing is redone or stored twice.

Bulk work sized to the expert. Each expert is asked at its own pace (``_Pace``): requests of
about ``request_s`` seconds of its model time, sized from its measured throughput (its
profile to begin with, a quarter of that size at first, then what its replies take), each
with a timeout from the work in flight to it; every request carries that deadline, so the
agent drops one nobody waits for any more and no batch queues behind abandoned work. A batch
that times out is split in two and retried (the throughput it showed slows the pace), down
to single samples; ``busy`` (the agent's backpressure) waits the time the agent asked for.
A collection finishes complete, or says exactly what is missing per expert and why (and
``moe2ctl collect`` exits non-zero). The same settings (``CollectSettings``, flags
``collect_options``) drive ``collect``, ``eval``'s own scoring and ``serve``'s scoring of
new agents.

    report = collect(registry, rpc, "tiny", experts={"a": info_a, "b": info_b})
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moe2.controller.registry import Registry, SampleRow
from moe2.shared import protocol as p
from moe2.shared.errors import Busy, Moe2Error, RequestTimeout, UnknownOperation
from moe2.shared.mqtt import RpcClient
from moe2.shared.settings import collect_overrides, load_settings, settings_options

log = logging.getLogger(__name__)

# Characters per token of a text not tokenized yet (the agent's estimate too).
_CHARS_PER_TOKEN = 4
# A request's timeout: this many times the work in flight at the measured pace, plus a
# round trip, within [_MIN_TIMEOUT_S, _MAX_TIMEOUT_S]; the first request to an expert with
# neither a profile nor a measurement gets _FIRST_TIMEOUT_S.
_SLACK = 3.0
_ROUND_TRIP_S = 1.0
_MIN_TIMEOUT_S = 10.0
_MAX_TIMEOUT_S = 900.0
_FIRST_TIMEOUT_S = 60.0
# Longest a busy expert's hint is honoured at once, seconds (then it is asked again).
_MAX_BUSY_WAIT_S = 30.0


class CollectSettings(BaseModel):
    """How bulk scoring asks each expert (``moe2ctl collect``, ``eval``'s own scoring,
    ``serve``'s scoring of new agents): the same flags everywhere (``collect_options``)."""

    model_config = ConfigDict(extra="forbid")

    batch: int | None = Field(
        default=None,
        ge=1,
        le=p.MAX_SCORE_SAMPLES,
        description="largest number of samples per request (default: sized to each "
        "expert's measured throughput so a request takes about --request-s)",
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=86_400,
        description="seconds one request may take (default: from the expert's measured "
        "throughput and the work in flight to it)",
    )
    request_s: float = Field(
        default=10.0, gt=0, le=3600, description="model time one request should take, seconds"
    )
    window: int = Field(default=2, ge=1, le=64, description="requests in flight per expert")
    max_failures: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="failed requests in a row (errors, or timeouts of single samples) before "
        "an expert is given up",
    )
    stall_s: float = Field(
        default=600.0,
        gt=0,
        description="give an expert up after this many seconds without a score (busy, timeouts)",
    )
    commit_every: int = Field(default=64, ge=1, description="scores per registry transaction")


collect_options = settings_options(CollectSettings)


def collect_settings(
    kwargs: dict[str, Any], base: Mapping[str, Any] | None = None
) -> CollectSettings:
    """Pop the ``collect_options`` flags out of a command's kwargs into settings (over
    ``base``, e.g. a configuration file's section); ConfigError on a bad value."""
    flags = {k: kwargs.pop(k) for k in list(kwargs) if k in CollectSettings.model_fields}
    return load_settings(CollectSettings, overrides={**(base or {}), **collect_overrides(flags)})


@dataclass
class CollectReport:
    dataset: str
    total: int  # (sample, option, expert) triples the dataset needs
    already: int  # stored before this run
    stored: int  # stored by this run
    failed: dict[str, str] = field(default_factory=dict)  # expert -> why it was given up
    interrupted: bool = False
    seconds: float = 0.0
    missing: dict[str, int] = field(default_factory=dict)  # expert -> scores still missing
    # expert -> (sample id, option, why) of samples it cannot score (too long for it, say)
    unscorable: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)
    pace: dict[str, dict[str, Any]] = field(default_factory=dict)  # expert -> how it went

    @property
    def complete(self) -> bool:
        return self.already + self.stored == self.total

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "total": self.total,
            "already": self.already,
            "stored": self.stored,
            "missing": self.total - self.already - self.stored,
            "missing_by_expert": {e: n for e, n in sorted(self.missing.items()) if n},
            "failed": self.failed,
            "unscorable": {
                e: [{"sample_id": s, "option": o, "reason": r} for s, o, r in rows[:20]]
                for e, rows in sorted(self.unscorable.items())
            },
            "interrupted": self.interrupted,
            "seconds": round(self.seconds, 3),
            "scores_per_s": round(self.stored / self.seconds, 2) if self.seconds else None,
            "pace": self.pace,
        }

    def what_is_missing(self) -> str:
        """One line per expert that lacks scores, with why; empty when complete."""
        lines = []
        for expert, n in sorted(self.missing.items()):
            if not n:
                continue
            why = self.failed.get(expert)
            bad = self.unscorable.get(expert, [])
            if why is None and bad:
                why = f"{len(bad)} option(s) it cannot score, e.g. sample {bad[0][0]} option "
                why += f"{bad[0][1]}: {bad[0][2]}"
            if why is None:
                why = "interrupted" if self.interrupted else "not finished"
            lines.append(f"{expert}: {n} scores missing ({why})")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Job:
    sample: SampleRow
    option: int


Tokens = dict[tuple[int, int], tuple[list[int], list[int]]]


def _tokenize_all(
    rpc: RpcClient,
    agent: p.AgentInfo,
    jobs: Sequence[_Job],
    timeout: float,
    window: int = 64,
) -> Tokens:
    """(sample id, option) -> (prompt ids, target ids), tokenized by ``agent``, ``window``
    requests in flight; a ``busy`` agent is asked again after the time it asked for."""
    wanted: list[tuple[str, Any, p.TokenizeRequest]] = []  # (kind, key, request)
    seen: set[int] = set()
    for j in jobs:
        if j.sample.id not in seen:
            seen.add(j.sample.id)
            req = p.TokenizeRequest(text=j.sample.prompt, add_bos=agent.add_bos)
            wanted.append(("prompt", j.sample.id, req))
        req = p.TokenizeRequest(text=j.sample.targets[j.option], add_bos=False)
        wanted.append(("target", (j.sample.id, j.option), req))
    got: dict[tuple[str, Any], list[int]] = {}
    flying: deque[tuple[str, Any, p.TokenizeRequest, Future[Any]]] = deque()
    todo = deque(wanted)
    busy_until = 0.0
    while todo or flying:
        while todo and len(flying) < window and time.monotonic() >= busy_until:
            kind, key, req = todo.popleft()
            fut = rpc.call_async(agent.agent_id, req, timeout=timeout)
            flying.append((kind, key, req, fut))
        if not flying:
            time.sleep(max(0.0, busy_until - time.monotonic()))
            continue
        kind, key, req, fut = flying.popleft()
        try:
            got[(kind, key)] = rpc.wait(fut).tokens
        except Busy as exc:
            todo.appendleft((kind, key, req))
            busy_until = time.monotonic() + min(_MAX_BUSY_WAIT_S, exc.retry_after_s or 1.0)
    return {
        (j.sample.id, j.option): (
            got[("prompt", j.sample.id)],
            got[("target", (j.sample.id, j.option))],
        )
        for j in jobs
    }


class _Pace:
    """How fast one expert scores, as this collection sees it (seconds per token of work
    in flight: its throughput, shared with whatever else it serves), and from that how many
    samples to send per request and how long to wait for each.

    It starts slow: the first requests are a quarter of ``request_s`` by the profile (which
    was measured on a quiet box), and the batch doubles with each reply up to ``request_s``
    at the pace the replies show, so an expert slower than its profile costs a small request
    that times out, not a big one."""

    def __init__(
        self, settings: CollectSettings, seconds_per_token: float | None, tokens_per_sample: float
    ) -> None:
        self.settings = settings
        self.spt = seconds_per_token  # None: not known yet (no profile, no reply)
        self.cap = settings.batch or p.MAX_SCORE_SAMPLES  # halved after a timeout
        if settings.batch is None and self.spt is not None:
            quarter = settings.request_s / 4 / (self.spt * tokens_per_sample)
            self.cap = max(1, min(self.cap, int(quarter)))
        self.timeouts = 0
        self.busy = 0
        self.requests = 0
        self.smallest = self.cap  # the smallest batch a timeout led to

    def batch(self, tokens_per_sample: float) -> int:
        if self.spt is None:
            return 1  # measure first
        want = self.settings.batch or int(self.settings.request_s / (self.spt * tokens_per_sample))
        return max(1, min(want, self.cap, p.MAX_SCORE_SAMPLES))

    def timeout(self, tokens_in_flight: int) -> float:
        if self.settings.timeout_s is not None:
            return self.settings.timeout_s
        if self.spt is None:
            return _FIRST_TIMEOUT_S
        wanted = _SLACK * self.spt * tokens_in_flight + _ROUND_TRIP_S
        return min(_MAX_TIMEOUT_S, max(_MIN_TIMEOUT_S, wanted))

    def answered(self, seconds: float, tokens_in_flight: int) -> None:
        seen = seconds / max(1, tokens_in_flight)
        self.spt = seen if self.spt is None else self.spt + 0.5 * (seen - self.spt)
        self.cap = min(self.cap * 2, self.settings.batch or p.MAX_SCORE_SAMPLES)

    def timed_out(self, waited: float, tokens_in_flight: int, batch: int) -> None:
        """Nothing came within ``waited``: it is slower than we thought."""
        self.timeouts += 1
        at_least = waited / max(1, tokens_in_flight)
        self.spt = max(at_least, 2 * self.spt) if self.spt is not None else at_least
        self.cap = max(1, batch // 2)
        self.smallest = min(self.smallest, self.cap)

    def summary(self, tokens_per_sample: float) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "timeouts": self.timeouts,
            "busy": self.busy,
            "batch_now": self.batch(tokens_per_sample),
            "smallest_batch": self.smallest,
            "seconds_per_token": round(self.spt, 6) if self.spt is not None else None,
        }


def profile_seconds_per_token(profile: p.AgentProfile | None, tokens: float) -> float | None:
    """What scoring ``tokens`` tokens costs per token by ``profile`` (None: no profile)."""
    if profile is None or tokens <= 0:
        return None
    seconds = profile.curves.prompt_seconds.at(tokens)
    return seconds / tokens if seconds > 0 else None


@dataclass
class _Flight:
    jobs: list[_Job]
    future: Future[Any]
    sent: float
    tokens_in_flight: int  # its own tokens and those still in flight before it
    tokens: int


class _Worker(threading.Thread):
    """Scores one expert's samples at its pace (``_Pace``), ``window`` requests at a time,
    and puts their scores into the results queue."""

    def __init__(
        self,
        rpc: RpcClient,
        info: p.AgentInfo,
        jobs: list[_Job],
        tokens: Tokens | None,
        results: queue.Queue[Any],
        settings: CollectSettings,
        stop: threading.Event,
        profile: p.AgentProfile | None = None,
    ) -> None:
        super().__init__(name=f"collect-{info.agent_id}", daemon=True)
        self.rpc, self.info, self.jobs, self.tokens = rpc, info, jobs, tokens
        self.results, self.settings, self.stop = results, settings, stop
        self.failure: str | None = None
        self.unscorable: list[tuple[int, int, str]] = []
        self.one_by_one = False  # an agent without score_many
        self.mean_tokens = sum(self._tokens(j) for j in jobs) / max(1, len(jobs))
        spt = profile_seconds_per_token(profile, self.mean_tokens)
        self.pace = _Pace(settings, spt, self.mean_tokens)
        rpc.use_codec(info)

    def _tokens(self, job: _Job) -> int:
        if self.tokens is not None:
            prompt, target = self.tokens[(job.sample.id, job.option)]
            return len(prompt) + len(target)
        chars = len(job.sample.prompt) + len(job.sample.targets[job.option])
        return max(1, chars // _CHARS_PER_TOKEN)

    def _sample(self, job: _Job) -> p.ScoreSample:
        if self.tokens is not None:
            prompt, target = self.tokens[(job.sample.id, job.option)]
            return p.ScoreSample(prompt_tokens=prompt, target_tokens=target)
        return p.ScoreSample(prompt=job.sample.prompt, target=job.sample.targets[job.option])

    def _request(self, jobs: list[_Job], timeout: float) -> Future[Any]:
        agent = self.info.agent_id
        self.pace.requests += 1
        if not self.one_by_one:
            req = p.ScoreManyRequest(samples=[self._sample(j) for j in jobs])
            return self.rpc.call_async(agent, req, timeout=timeout)
        s = self._sample(jobs[0])
        one = p.ScoreRequest(**s.model_dump(exclude_none=True))
        return self.rpc.call_async(agent, one, timeout=timeout)

    def _store(self, job: _Job, tokens: list[int], logprobs: list[float], ms: float) -> None:
        prompt = self.tokens[(job.sample.id, job.option)][0] if self.tokens is not None else None
        self.results.put(
            {
                "sample_id": job.sample.id,
                "expert": self.info.agent_id,
                "option": job.option,
                "tokenizer_hash": self.info.tokenizer_hash,
                "tokens": tokens,
                "logprobs": logprobs,
                "compute_ms": ms,
                "prompt_tokens": None if prompt is None else len(prompt),
            }
        )

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # a bug must cost this expert, never hang the collection
            log.exception("collecting from %s failed", self.info.agent_id)
            self.failure = f"internal: {type(exc).__name__}: {exc}"
        finally:
            self.results.put(None)  # this worker is done

    def _run(self) -> None:
        todo: deque[_Job] = deque(self.jobs)
        again: deque[list[_Job]] = deque()  # batches to send first (halves of timed-out ones)
        flying: deque[_Flight] = deque()
        failures = 0
        busy_until = 0.0
        progress = time.monotonic()
        while (todo or again or flying) and not self.stop.is_set():
            now = time.monotonic()
            while (todo or again) and len(flying) < self.settings.window and now >= busy_until:
                if again:
                    jobs = again.popleft()
                    if self.one_by_one and len(jobs) > 1:  # one sample per request now
                        again.appendleft(jobs[1:])
                        jobs = jobs[:1]
                else:
                    n = 1 if self.one_by_one else self.pace.batch(self.mean_tokens)
                    jobs = [todo.popleft() for _ in range(min(n, len(todo)))]
                tokens = sum(self._tokens(j) for j in jobs)
                in_flight = tokens + sum(f.tokens for f in flying)
                fut = self._request(jobs, self.pace.timeout(in_flight))
                flying.append(_Flight(jobs, fut, now, in_flight, tokens))
            if now - progress > self.settings.stall_s:
                self.failure = f"no score for {self.settings.stall_s:g} s"
                break
            if not flying:
                time.sleep(min(0.5, max(0.0, busy_until - now)))
                continue
            f = flying.popleft()
            try:
                reply = self.rpc.wait(f.future)
            except UnknownOperation:
                if self.one_by_one:
                    self.failure = "the agent scores nothing (no score operation)"
                    break
                log.info("%s predates score_many: one sample per request", self.info.agent_id)
                self.one_by_one = True
                todo.extendleft(reversed(f.jobs))
                continue
            except Busy as exc:
                # Backpressure: more work queued there than it can finish in time.
                self.pace.busy += 1
                wait = min(_MAX_BUSY_WAIT_S, exc.retry_after_s or 1.0)
                busy_until = max(busy_until, time.monotonic() + wait)
                again.appendleft(f.jobs)
                continue
            except RequestTimeout:
                waited = time.monotonic() - f.sent
                self.pace.timed_out(waited, f.tokens_in_flight, len(f.jobs))
                if len(f.jobs) > 1:  # smaller pieces, first
                    half = len(f.jobs) // 2
                    again.appendleft(f.jobs[half:])
                    again.appendleft(f.jobs[:half])
                    log.info(
                        "expert %s: %d samples timed out after %.1f s; retrying in halves",
                        self.info.agent_id,
                        len(f.jobs),
                        waited,
                    )
                    continue
                failures += 1
                log.warning(
                    "expert %s: one sample timed out after %.3g s (%d in a row)",
                    self.info.agent_id,
                    waited,
                    failures,
                )
                if failures >= self.settings.max_failures:
                    self.failure = (
                        f"timeout: a single sample did not score within {waited:.3g} s, "
                        f"{failures} times in a row"
                    )
                    break
                again.append(f.jobs)
                continue
            except Moe2Error as exc:
                failures += 1
                log.warning(
                    "expert %s failed on %d samples: %s", self.info.agent_id, len(f.jobs), exc
                )
                if failures >= self.settings.max_failures:
                    self.failure = f"{exc.code}: {exc.message}"
                    break
                again.append(f.jobs)  # retry later
                continue
            failures = 0
            progress = time.monotonic()
            self.pace.answered(progress - f.sent, f.tokens_in_flight)
            if isinstance(reply, p.ScoreReply):
                self._store(f.jobs[0], reply.target_tokens, reply.logprobs, reply.compute_ms)
                continue
            per = reply.compute_ms / max(1, len(f.jobs))
            for job, res in zip(f.jobs, reply.results):
                if res.error is None:
                    self._store(job, res.target_tokens, res.logprobs, per)
                    continue
                # A sample the expert cannot score (too long for its context, say) will not
                # score on a retry either: it is reported, the others go on.
                reason = f"{res.error.code}: {res.error.message}"
                log.warning("expert %s cannot score %s: %s", self.info.agent_id, job, reason)
                self.unscorable.append((job.sample.id, job.option, reason))


def _profiles(registry: Registry, names: Sequence[str]) -> dict[str, p.AgentProfile]:
    """The profiles the registry holds of ``names`` (the agents' retained ones, as synced)."""
    out: dict[str, p.AgentProfile] = {}
    for row in registry.agents():
        if row.id in names and row.profile_json:
            try:
                out[row.id] = p.AgentProfile.model_validate_json(row.profile_json)
            except ValidationError:
                log.warning("the stored profile of %s is not valid; ignoring it", row.id)
    return out


def collect(
    registry: Registry,
    rpc: RpcClient,
    dataset: str,
    experts: dict[str, p.AgentInfo],
    settings: CollectSettings | None = None,
    *,
    stop: threading.Event | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    profiles: Mapping[str, p.AgentProfile] | None = None,
) -> CollectReport:
    """Score ``dataset`` with every expert in ``experts`` (agent id -> its info), each at the
    pace its profile (``profiles``, default: the registry's) and its replies show."""
    settings = settings or CollectSettings()
    stop = stop or threading.Event()
    if profiles is None:
        profiles = _profiles(registry, list(experts))
    t0 = time.monotonic()
    samples = registry.samples(dataset)
    all_jobs = [_Job(s, o) for s in samples for o in range(len(s.targets))]
    report = CollectReport(dataset, total=len(all_jobs) * len(experts), already=0, stored=0)
    todo: dict[str, list[_Job]] = {}
    for name in experts:
        done = registry.scored(dataset, name)
        report.already += len(done)
        todo[name] = [j for j in all_jobs if (j.sample.id, j.option) not in done]
    groups: dict[str, list[str]] = {}
    for name, info in experts.items():
        groups.setdefault(info.tokenizer_hash, []).append(name)
    results: queue.Queue[Any] = queue.Queue()
    workers: list[_Worker] = []
    timeout = settings.timeout_s or _FIRST_TIMEOUT_S
    by_id = {s.id: s for s in samples}
    for members in groups.values():
        pending = {(j.sample.id, j.option): j for m in members for j in todo[m]}
        # Stored scores without the prompt's length (collected before it was stored): the
        # vocabulary's tokenization gives it.
        lengthless = {m: registry.without_prompt_tokens(dataset, m) for m in members}
        for sid in set().union(*lengthless.values()):
            pending.setdefault((sid, 0), _Job(by_id[sid], 0))
        tokens = None
        if pending:
            # One tokenization for all experts of this vocabulary; the first that answers.
            for m in members:
                try:
                    tokens = _tokenize_all(rpc, experts[m], list(pending.values()), timeout)
                    break
                except Moe2Error as exc:
                    report.failed.setdefault(m, f"tokenize: {exc.code}: {exc.message}")
            if tokens is None:
                continue
            for m, sids in lengthless.items():
                if sids:
                    registry.set_prompt_tokens(m, {i: len(tokens[(i, 0)][0]) for i in sids})
        for m in members:
            if todo[m] and m not in report.failed:
                workers.append(
                    _Worker(
                        rpc, experts[m], todo[m], tokens, results, settings, stop, profiles.get(m)
                    )
                )
    for w in workers:
        w.start()
    live, batch, last = len(workers), [], time.monotonic()
    stored: dict[str, int] = {}
    try:
        while live:
            try:
                item = results.get(timeout=0.25)
            except queue.Empty:
                item = False
            if item is None:
                live -= 1
            elif item is not False:
                batch.append(item)
            due = time.monotonic() - last > 0.5 or live == 0
            if batch and (len(batch) >= settings.commit_every or due):
                last = time.monotonic()
                report.stored += registry.add_scores(batch)
                batch = []
                if on_progress:
                    on_progress(report.already + report.stored, report.total)
    except KeyboardInterrupt:
        stop.set()
        report.interrupted = True
        if batch:
            # The interrupt may have come inside add_scores, after its commit: store only
            # what is not stored yet.
            done_now = {e: registry.scored(dataset, e) for e in {r["expert"] for r in batch}}
            rest = [r for r in batch if (r["sample_id"], r["option"]) not in done_now[r["expert"]]]
            report.stored += len(batch) - len(rest) + registry.add_scores(rest)
    for w in workers:
        w.join(timeout=5.0)
        if w.failure:
            report.failed[w.info.agent_id] = w.failure
        if w.unscorable:
            report.unscorable[w.info.agent_id] = w.unscorable
        report.pace[w.info.agent_id] = w.pace.summary(w.mean_tokens)
    report.interrupted = report.interrupted or stop.is_set()
    report.seconds = time.monotonic() - t0
    needed = len(all_jobs)
    for name in experts:
        stored[name] = len(registry.scored(dataset, name))
        report.missing[name] = needed - stored[name]
    return report


# --------------------------------------------------------------------------- CLI


def _cli() -> Any:
    import signal

    import click

    from moe2.controller.options import (
        broker_from_flags,
        broker_options,
        db_option,
        emit,
        json_option,
        open_registry,
    )
    from moe2.controller.registry.sync import online_experts, sync_once
    from moe2.shared.errors import NoExperts

    @click.command("collect")
    @click.argument("dataset")
    @click.option("--experts", default=None, help="agent ids, comma-separated [default: online]")
    @collect_options
    @click.option("--timeout", "timeout_alias", type=float, default=None, hidden=True)
    @db_option
    @broker_options
    @json_option
    def collect_cmd(
        dataset: str,
        experts: str | None,
        timeout_alias: float | None,
        db_url: str | None,
        as_json: bool,
        **kw: Any,
    ) -> None:
        """Ask every online expert for the dataset's target log-probabilities; resumable.
        Requests are sized to each expert's measured throughput unless --batch and
        --timeout-s say otherwise; exits 1, naming what is missing, unless complete."""
        if timeout_alias is not None and kw.get("timeout_s") is None:
            kw["timeout_s"] = timeout_alias  # the flag's old name
        settings = collect_settings(kw)
        broker = broker_from_flags(kw)
        reg = open_registry(db_url)
        sync_once(reg, broker)
        online = online_experts(reg)
        if experts:
            wanted = experts.split(",")
            missing = [e for e in wanted if e not in online]
            if missing:
                raise NoExperts(
                    f"expert(s) {', '.join(missing)} not online; online: "
                    f"{', '.join(sorted(online)) or 'none'}"
                )
            online = {e: online[e] for e in wanted}
        if not online:
            raise NoExperts("no expert is online: start agents or check --broker-host")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if time.monotonic() - last[0] > 1.0 or done == total:
                last[0] = time.monotonic()
                click.echo(
                    f"collect {dataset}: {done}/{total} ({100 * done / total:.0f}%)", err=True
                )

        with RpcClient(broker) as rpc:
            report = collect(reg, rpc, dataset, online, settings, stop=stop, on_progress=progress)
        reg.close()
        out = report.as_dict() | {"experts": sorted(online)}
        emit(out, as_json, lambda o: "\n".join(f"{k}: {v}" for k, v in o.items()))
        if report.failed or not report.complete:
            click.echo(f"incomplete:\n{report.what_is_missing()}", err=True)
            raise SystemExit(1)

    return collect_cmd


collect_cmd = _cli()
