"""Batched decoding on the model thread: the scheduler against real llama.cpp (tiny experts).

Several sessions' requests evaluated in one llama_decode must give each session exactly what
it would get alone; drafts, verifications and multi-sample scoring are checked against direct
evaluation of the same histories."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moe2.agent.backend import DecodePart
from moe2.agent.batching import Scheduler
from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend
from moe2.agent.meters import thread_cpu_seconds
from moe2.agent.service import AgentService
from moe2.agent.tasks import ScoreMany
from moe2.shared import protocol as p

PROMPTS = ["the fox eats", "a young owl sleeps near the", "the cat", "the bird sings in the"]


@dataclass
class Job:
    request: Any
    replies: list[p.Message] = field(default_factory=list)

    def done(self, reply: p.Message) -> None:
        self.replies.append(reply)


@pytest.fixture
def service(tiny_models: dict[str, Path]) -> Iterator[AgentService]:
    backend = LlamaCppBackend(AgentConfig(model=tiny_models["animals"], n_threads=1, n_ctx=256))
    svc = AgentService("t", backend, max_sessions=8)
    yield svc
    svc.close()


def run_together(svc: AgentService, jobs: list[Job]) -> Scheduler:
    sched = Scheduler(svc.backend, svc.start, lambda job, reply: job.done(reply))
    for job in jobs:
        sched.submit(job)
    while not sched.idle:
        sched.tick()
    return sched


def full(reply: p.Message) -> np.ndarray:
    assert isinstance(reply, p.DistributionReply), reply
    assert isinstance(reply.dist, p.FullDist)
    return reply.dist.logprobs()


def test_concurrent_sessions_share_ticks_and_get_what_they_would_alone(
    service: AgentService, animals_backend: LlamaCppBackend
) -> None:
    opens = [Job(p.OpenRequest(prompt=x, full=True)) for x in PROMPTS]
    sched = run_together(service, opens)
    assert sched.ticks == 1  # four prompts, one decode
    sessions = [j.replies[0].session for j in opens]  # type: ignore[attr-defined]
    steps = [
        Job(p.StepRequest(session=s, tokens=[300 + i], full=True)) for i, s in enumerate(sessions)
    ]
    sched = run_together(service, steps)
    assert sched.ticks == 1 and sched.decoded_tokens == 4
    for i, (x, job) in enumerate(zip(PROMPTS, steps)):
        seq = animals_backend.new_sequence()
        seq.extend(animals_backend.tokenize(x, add_bos=True))
        want = seq.extend([300 + i])
        seq.close()
        np.testing.assert_allclose(full(job.replies[0]), want, atol=1e-5)


def test_requests_of_one_session_run_in_order_and_a_failure_stays_its_own(
    service: AgentService,
) -> None:
    first = Job(p.OpenRequest(prompt="the fox", full=True))
    run_together(service, [first])
    sid = first.replies[0].session  # type: ignore[attr-defined]
    n_vocab = service.backend.info.n_vocab
    jobs = [
        Job(p.StepRequest(session=sid, tokens=[300], full=True)),
        Job(p.StepRequest(session=sid, tokens=[301], full=True)),
        Job(p.StepRequest(session=sid, tokens=[n_vocab + 5])),  # invalid: its own error
        Job(p.CloseRequest(session=sid)),
        Job(p.StepRequest(session=sid, tokens=[302])),  # after the close: unknown
        Job(p.OpenRequest(prompt="the cat", full=True)),
    ]
    run_together(service, jobs)
    assert [type(j.replies[0]).__name__ for j in jobs] == [
        "DistributionReply",
        "DistributionReply",
        "ErrorReply",
        "CloseReply",
        "ErrorReply",
        "DistributionReply",
    ]
    assert jobs[1].replies[0].n_tokens == jobs[0].replies[0].n_tokens + 1  # type: ignore[attr-defined]
    assert jobs[2].replies[0].error.code == "invalid_token"  # type: ignore[attr-defined]
    assert jobs[4].replies[0].error.code == "unknown_session"  # type: ignore[attr-defined]


def test_a_draft_is_the_models_own_greedy_continuation_with_its_distributions(
    service: AgentService, animals_backend: LlamaCppBackend
) -> None:
    ids = animals_backend.tokenize("the fox eats", add_bos=True)
    opened = service.handle(p.OpenRequest(tokens=ids[:-1], full=True))
    assert isinstance(opened, p.DistributionReply)
    draft = service.handle(
        p.DraftRequest(session=opened.session, feed=[ids[-1]], gamma=5, full=True)
    )
    assert isinstance(draft, p.DistributionsReply)
    seq = animals_backend.new_sequence()
    lp = seq.extend(ids)
    want_tokens = []
    for i, dist in enumerate(draft.dists):
        assert isinstance(dist, p.FullDist)
        np.testing.assert_allclose(dist.logprobs(), lp, atol=1e-5)
        t = int(np.argmax(lp))
        want_tokens.append(t)
        assert draft.lengths[i] == len(ids) + i
        if t in animals_backend.info.eos_ids:
            break
        lp = seq.extend([t])
    seq.close()
    assert draft.drafted == want_tokens
    # The last drafted token is not in the history: the next request feeds it or rewinds.
    assert draft.n_tokens == draft.lengths[-1]


def test_verify_after_rewind_equals_stepping_the_same_tokens_one_by_one(
    service: AgentService, animals_backend: LlamaCppBackend
) -> None:
    ids = animals_backend.tokenize("a young owl sleeps near the", add_bos=True)
    opened = service.handle(p.OpenRequest(tokens=ids[:3], full=True))
    assert isinstance(opened, p.DistributionReply)
    # Something to throw away first: the verify rewinds past it.
    service.handle(p.StepRequest(session=opened.session, tokens=[310, 311], full=True))
    fed = ids[3:]
    reply = service.handle(
        p.VerifyRequest(session=opened.session, rewind_to=3, feed=fed, full=True)
    )
    assert isinstance(reply, p.DistributionsReply)
    assert reply.lengths == list(range(4, 4 + len(fed))) and reply.n_tokens == len(ids)
    seq = animals_backend.new_sequence()
    seq.extend(ids[:3])
    for t, dist in zip(fed, reply.dists):
        assert isinstance(dist, p.FullDist)
        np.testing.assert_allclose(dist.logprobs(), seq.extend([t]), atol=1e-5)
    seq.close()
    # bytes pieces are tokenized by the agent, one distribution per piece
    text = service.handle(
        p.VerifyRequest(
            session=opened.session,
            rewind_to=3,
            feed=p.VerifyRequest.encode_pieces([b" young owl", ids[3]]),
            top_k=5,
        )
    )
    assert isinstance(text, p.DistributionsReply)
    assert len(text.dists) == 2 and text.lengths[1] == text.lengths[0] + 1


def test_score_many_equals_scoring_each_sample_alone_and_keeps_errors_per_sample(
    service: AgentService, animals_backend: LlamaCppBackend
) -> None:
    samples = [
        p.ScoreSample(prompt="the fox", target=" eats fish"),
        p.ScoreSample(prompt="the cat", target=" sleeps in the forest ."),
        p.ScoreSample(prompt_tokens=[1, 5], target_tokens=[10**6]),  # outside the vocabulary
        p.ScoreSample(prompt="the owl", target=" hunts"),
        p.ScoreSample(prompt="a bird", target=" sings"),
        p.ScoreSample(prompt="the dog", target=" eats the fish"),
    ]
    reply = service.handle(p.ScoreManyRequest(samples=samples))
    assert isinstance(reply, p.ScoreManyReply) and len(reply.results) == len(samples)
    assert reply.results[2].error is not None and reply.results[2].error.code == "invalid_token"
    for s, r in zip(samples, reply.results):
        if s.prompt is None:
            continue
        one = service.handle(p.ScoreRequest(prompt=s.prompt, target=s.target))
        assert isinstance(one, p.ScoreReply)
        assert r.target_tokens == one.target_tokens
        np.testing.assert_allclose(r.logprobs, one.logprobs, atol=1e-5)
        direct = animals_backend.score(
            animals_backend.tokenize(s.prompt, add_bos=True), r.target_tokens
        )
        np.testing.assert_allclose(r.logprobs, direct, atol=1e-5)


QUESTION = "a young owl sleeps near the"
OPTIONS = [" old mill", " river", " cat eats the fish", " sea"]


def test_a_four_option_question_evaluates_its_prompt_once(
    service: AgentService, animals_backend: LlamaCppBackend
) -> None:
    job = Job(p.ScoreChoicesRequest(prompt=QUESTION, targets=OPTIONS))
    sched = run_together(service, [job])
    (reply,) = job.replies
    assert isinstance(reply, p.ScoreChoicesReply), reply
    prompt = animals_backend.tokenize(QUESTION, add_bos=True)
    targets = [animals_backend.tokenize(o, add_bos=False) for o in OPTIONS]
    assert reply.prompt_tokens == len(prompt) and reply.targets_tokens == targets
    # the prompt once, then each option's tokens but its last (read from the row before it)
    assert sched.decoded_tokens == len(prompt) + sum(len(t) - 1 for t in targets)
    assert sched.ticks == 2  # the prompt, then every option side by side
    for got, target in zip(reply.logprobs, targets, strict=True):
        np.testing.assert_allclose(got, animals_backend.score(prompt, target), atol=1e-5)


def test_score_many_shares_each_prompt_among_its_samples(
    service: AgentService, animals_backend: LlamaCppBackend
) -> None:
    other = "the cat"
    samples = [
        *(p.ScoreSample(prompt=QUESTION, target=o) for o in OPTIONS),
        p.ScoreSample(prompt=other, target=" sleeps in the forest ."),
        p.ScoreSample(prompt=QUESTION, target=" owl"),  # the same prompt, further down
        p.ScoreSample(prompt=other, target=" hunts"),
    ]
    job = Job(p.ScoreManyRequest(samples=samples))
    sched = run_together(service, [job])
    (reply,) = job.replies
    assert isinstance(reply, p.ScoreManyReply), reply
    prompts = {text: animals_backend.tokenize(text, add_bos=True) for text in (QUESTION, other)}
    evaluated = sum(len(x) for x in prompts.values())
    for s, r in zip(samples, reply.results, strict=True):
        assert r.error is None and r.target_tokens is not None
        assert s.prompt is not None
        evaluated += len(r.target_tokens) - 1
        want = animals_backend.score(prompts[s.prompt], r.target_tokens)
        np.testing.assert_allclose(r.logprobs, want, atol=1e-5)
    assert sched.decoded_tokens == evaluated


def test_without_sharing_every_sample_evaluates_its_prompt(
    service: AgentService, animals_backend: LlamaCppBackend
) -> None:
    # what collection cost before prompts were shared (bench/bench_promise.py compares)
    prompt = animals_backend.tokenize(QUESTION, add_bos=True)
    targets = [animals_backend.tokenize(o, add_bos=False) for o in OPTIONS]

    def reply(results: list[p.ScoreResult]) -> p.ScoreManyReply:
        return p.ScoreManyReply(results=results, compute_ms=0.0)

    task = ScoreMany(animals_backend, [(prompt, t) for t in targets], reply, share=False)
    job = Job(p.PingRequest())  # (any request: the task is given)
    sched = Scheduler(animals_backend, lambda _req, _requester: task, lambda j, r: j.done(r))
    sched.run(job)
    assert sched.decoded_tokens == sum(len(prompt) + len(t) - 1 for t in targets)
    (done,) = job.replies
    assert isinstance(done, p.ScoreManyReply)
    for r, t in zip(done.results, targets, strict=True):
        np.testing.assert_allclose(r.logprobs, animals_backend.score(prompt, t), atol=1e-5)


def test_without_a_shared_cache_the_options_still_score_right(tiny_models: dict[str, Path]) -> None:
    # batching off: a context (a KV cache) per sequence, so nothing can be shared between
    # them: each option evaluates the prompt again, with the same result
    backend = LlamaCppBackend(
        AgentConfig(model=tiny_models["animals"], n_threads=1, n_ctx=128, batching=False)
    )
    svc = AgentService("t", backend, max_sessions=2)
    try:
        job = Job(p.ScoreChoicesRequest(prompt=QUESTION, targets=OPTIONS))
        sched = run_together(svc, [job])
        (reply,) = job.replies
        assert isinstance(reply, p.ScoreChoicesReply), reply
        prompt = backend.tokenize(QUESTION, add_bos=True)
        targets = [backend.tokenize(o, add_bos=False) for o in OPTIONS]
        again = sum(len(prompt) for t in targets[:-1] if len(t) > 1)
        assert sched.decoded_tokens == len(prompt) + again + sum(len(t) - 1 for t in targets)
        for got, target in zip(reply.logprobs, targets, strict=True):
            np.testing.assert_allclose(got, backend.score(prompt, target), atol=1e-5)
    finally:
        svc.close()


def test_a_batch_over_the_kv_cache_fails_only_its_parts(tiny_models: dict[str, Path]) -> None:
    backend = LlamaCppBackend(
        AgentConfig(model=tiny_models["animals"], n_threads=1, n_ctx=64, max_sessions=1)
    )
    try:
        # KV cells for (1 session + 1) x 64 tokens, shared by every sequence of the context
        a, b, c = backend.new_sequence(), backend.new_sequence(), backend.new_sequence()
        a.extend([1] + [300] * 62)
        b.extend([1] + [300] * 62)
        out = backend.decode_batch([DecodePart(c, [1] + [301] * 9, [9]), DecodePart(a, [302], [0])])
        assert isinstance(out[0], Exception) and out[0].code == "busy"  # type: ignore[attr-defined]
        assert isinstance(out[1], list) and len(out[1]) == 1
        assert len(c) == 0 and len(a) == 64
    finally:
        backend.close()


class _Stalled:
    """A backend whose every decode also waits ``stall_s`` off the CPU (as a model thread
    does when other experts hold the cores)."""

    def __init__(self, backend: LlamaCppBackend, stall_s: float) -> None:
        self._b, self.stall_s = backend, stall_s
        self.info = backend.info

    def decode_batch(self, parts: list[DecodePart]) -> list[list[np.ndarray] | Exception]:
        time.sleep(self.stall_s)
        return self._b.decode_batch(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._b, name)


def test_model_time_is_read_from_the_schedulers_clock_and_wall_time_kept_apart(
    service: AgentService,
) -> None:
    """compute_ms (what a request's energy is of) comes from the scheduler's clock: the model
    thread's CPU time where energy is modelled on a CPU; the wall time of the same ticks is
    handed to ``on_model_time`` (the agent's own handling is the rest of a request's time)."""
    stalled = _Stalled(service.backend, 0.05)  # type: ignore[arg-type]
    walls: list[float] = []
    sched = Scheduler(
        stalled,  # type: ignore[arg-type]
        service.start,
        lambda job, reply: job.done(reply),
        clock=thread_cpu_seconds,
        on_model_time=lambda job, wall: walls.append(wall),
    )
    job = Job(p.OpenRequest(prompt="the fox eats", full=True))
    sched.run(job)
    (reply,) = job.replies
    assert isinstance(reply, p.DistributionReply)
    # the stall is wall time, not CPU time: charged it would double a tiny model's energy
    assert walls and walls[0] >= 0.05
    assert 0 < reply.compute_ms < 1e3 * walls[0] - 40
    service.start(p.CloseRequest(session=reply.session))
