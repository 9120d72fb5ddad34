"""Score collection: every online expert's teacher-forced target log-probabilities over a
dataset, stored in the registry (docs/method.md: collect p once, train the gate offline).

Every vocabulary (``tokenizer_hash``) tokenizes the dataset once, by one of its experts, and
its experts score those ids: experts of one vocabulary score the same ids, so their per-token
probabilities line up for token-level fusion, and each score is stored with the prompt's real
length in its expert's tokens, which the cost model needs. Scores stored before prompt
lengths were get them filled in by the next run. Samples go to an expert
``batch`` (sample, option) pairs per ``score_many`` request, which the agent evaluates
together in one batch (one ``score`` request each to an agent without that operation).
Scores are committed in small batches: an interrupted run loses at most one uncommitted
batch, and a new run skips every (sample, option, expert)
already stored, so nothing is redone or stored twice.

    report = collect(registry, rpc, "tiny", experts={"a": info_a, "b": info_b})
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from moe2.controller.registry import Registry, SampleRow
from moe2.shared import protocol as p
from moe2.shared.errors import Moe2Error, UnknownOperation
from moe2.shared.mqtt import RpcClient

log = logging.getLogger(__name__)


@dataclass
class CollectReport:
    dataset: str
    total: int  # (sample, option, expert) triples the dataset needs
    already: int  # stored before this run
    stored: int  # stored by this run
    failed: dict[str, str] = field(default_factory=dict)  # expert -> reason
    interrupted: bool = False
    seconds: float = 0.0

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
            "failed": self.failed,
            "interrupted": self.interrupted,
            "seconds": round(self.seconds, 3),
            "scores_per_s": round(self.stored / self.seconds, 2) if self.seconds else None,
        }


@dataclass(frozen=True)
class _Job:
    sample: SampleRow
    option: int


@dataclass
class CollectSettings:
    window: int = 4  # score requests in flight per expert (hides MQTT round trips)
    batch: int = 32  # samples per score_many request (one round trip per batch)
    commit_every: int = 64  # rows per registry transaction
    timeout_s: float = 60.0  # per request
    max_failures: int = 3  # consecutive errors before an expert is given up


def _tokenize_all(
    rpc: RpcClient,
    agent: p.AgentInfo,
    jobs: Sequence[_Job],
    timeout: float,
    window: int = 64,
) -> dict[tuple[int, int], tuple[list[int], list[int]]]:
    """(sample id, option) -> (prompt ids, target ids), tokenized by ``agent``, ``window``
    requests in flight (an agent refuses work beyond its queue: ``busy``)."""
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
    flying: deque[tuple[str, Any, Future[Any]]] = deque()
    todo = deque(wanted)
    while todo or flying:
        while todo and len(flying) < window:
            kind, key, req = todo.popleft()
            flying.append((kind, key, rpc.call_async(agent.agent_id, req)))
        kind, key, fut = flying.popleft()
        got[(kind, key)] = rpc.wait(fut, timeout).tokens
    return {
        (j.sample.id, j.option): (
            got[("prompt", j.sample.id)],
            got[("target", (j.sample.id, j.option))],
        )
        for j in jobs
    }


class _Worker(threading.Thread):
    """Sends one expert's samples, ``batch`` per ``score_many`` request and ``window``
    requests at a time, and puts their scores into the results queue."""

    def __init__(
        self,
        rpc: RpcClient,
        info: p.AgentInfo,
        jobs: list[_Job],
        tokens: dict[tuple[int, int], tuple[list[int], list[int]]] | None,
        results: queue.Queue[Any],
        settings: CollectSettings,
        stop: threading.Event,
    ) -> None:
        super().__init__(name=f"collect-{info.agent_id}", daemon=True)
        self.rpc, self.info, self.jobs, self.tokens = rpc, info, jobs, tokens
        self.results, self.settings, self.stop = results, settings, stop
        self.failure: str | None = None
        self.batch = max(1, settings.batch)
        rpc.use_codec(info)

    def _sample(self, job: _Job) -> p.ScoreSample:
        if self.tokens is not None:
            prompt, target = self.tokens[(job.sample.id, job.option)]
            return p.ScoreSample(prompt_tokens=prompt, target_tokens=target)
        return p.ScoreSample(prompt=job.sample.prompt, target=job.sample.targets[job.option])

    def _request(self, jobs: list[_Job]) -> Future[Any]:
        agent = self.info.agent_id
        if self.batch > 1:
            return self.rpc.call_async(
                agent, p.ScoreManyRequest(samples=[self._sample(j) for j in jobs])
            )
        s = self._sample(jobs[0])
        return self.rpc.call_async(agent, p.ScoreRequest(**s.model_dump(exclude_none=True)))

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
        todo = deque(self.jobs)
        flying: deque[tuple[list[_Job], Future[Any]]] = deque()
        failures = 0
        while (todo or flying) and not self.stop.is_set():
            while todo and len(flying) < self.settings.window:
                jobs = [todo.popleft() for _ in range(min(self.batch, len(todo)))]
                flying.append((jobs, self._request(jobs)))
            jobs, fut = flying.popleft()
            try:
                reply = self.rpc.wait(fut, self.settings.timeout_s)
            except UnknownOperation:
                if self.batch == 1:
                    self.failure = "the agent scores nothing (no score operation)"
                    break
                log.info("%s predates score_many: one sample per request", self.info.agent_id)
                self.batch = 1  # an older agent: one request per sample
                todo.extendleft(reversed(jobs))
                continue
            except Moe2Error as exc:
                failures += 1
                log.warning(
                    "expert %s failed on %d samples: %s", self.info.agent_id, len(jobs), exc
                )
                if failures >= self.settings.max_failures:
                    self.failure = f"{exc.code}: {exc.message}"
                    break
                todo.extend(jobs)  # retry later
                continue
            failures = 0
            if isinstance(reply, p.ScoreReply):
                self._store(jobs[0], reply.target_tokens, reply.logprobs, reply.compute_ms)
                continue
            per = reply.compute_ms / max(1, len(jobs))
            for job, res in zip(jobs, reply.results):
                if res.error is None:
                    self._store(job, res.target_tokens, res.logprobs, per)
                    continue
                # a sample the expert cannot score (too long for its context, say) will not
                # score on a retry either: the expert fails the collection with its reason
                log.warning("expert %s cannot score %s: %s", self.info.agent_id, job, res.error)
                self.failure = f"{res.error.code}: {res.error.message}"
            if self.failure is not None:
                break
        self.results.put(None)  # this worker is done


def collect(
    registry: Registry,
    rpc: RpcClient,
    dataset: str,
    experts: dict[str, p.AgentInfo],
    settings: CollectSettings | None = None,
    *,
    stop: threading.Event | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> CollectReport:
    """Score ``dataset`` with every expert in ``experts`` (agent id -> its info)."""
    settings = settings or CollectSettings()
    stop = stop or threading.Event()
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
                    tokens = _tokenize_all(
                        rpc, experts[m], list(pending.values()), settings.timeout_s
                    )
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
                workers.append(_Worker(rpc, experts[m], todo[m], tokens, results, settings, stop))
    for w in workers:
        w.start()
    live, batch, last = len(workers), [], time.monotonic()
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
            stored = {e: registry.scored(dataset, e) for e in {r["expert"] for r in batch}}
            rest = [r for r in batch if (r["sample_id"], r["option"]) not in stored[r["expert"]]]
            report.stored += len(batch) - len(rest) + registry.add_scores(rest)
    for w in workers:
        w.join(timeout=settings.timeout_s)
        if w.failure:
            report.failed[w.info.agent_id] = w.failure
    report.interrupted = report.interrupted or stop.is_set()
    report.seconds = time.monotonic() - t0
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
    @click.option("--window", type=int, default=4, show_default=True, help="requests in flight")
    @click.option("--batch", type=int, default=32, show_default=True, help="samples per request")
    @click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True)
    @db_option
    @broker_options
    @json_option
    def collect_cmd(
        dataset: str,
        experts: str | None,
        window: int,
        batch: int,
        timeout_s: float,
        db_url: str | None,
        as_json: bool,
        **kw: Any,
    ) -> None:
        """Ask every online expert for the dataset's target log-probabilities; resumable."""
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

        settings = CollectSettings(window=window, batch=batch, timeout_s=timeout_s)
        with RpcClient(broker, timeout=timeout_s) as rpc:
            report = collect(reg, rpc, dataset, online, settings, stop=stop, on_progress=progress)
        reg.close()
        out = report.as_dict() | {"experts": sorted(online)}
        emit(out, as_json, lambda o: "\n".join(f"{k}: {v}" for k, v in o.items()))
        if report.failed or not report.complete:
            raise SystemExit(1)

    return collect_cmd


collect_cmd = _cli()
