"""Multiple-choice prompts: answered by scoring, not by generating.

A prompt that carries ``choices`` is routed like any other (the application's subset, the
gate's top-k of its online members), then every chosen expert scores every choice as the text
that follows the prompt, teacher forced, in one ``score_choices`` request (the prompt is
evaluated once per expert; an agent without that operation gets one ``score`` request per
choice). The experts' log-probabilities are fused with the one mixing rule
(``moe2.shared.mixing``: per token when the chosen experts share a tokenizer hash, per whole
option otherwise), exactly as the controller fuses stored scores, and the answer is the option
of highest fused log-likelihood::

    scorer = ChoiceScorer("gw-1", rpc, fleet, router, gates, config, stats)
    answer = scorer.answer("qa", request, received=time.monotonic())
    answer.choice, answer.logprobs, answer.mixing

Experts that fail or stay silent are dropped and the others' weights renormalised, as in
generation; when every one fails the prompt gets one error. Each answer is counted in the
application's figures (``stats.py``) with the chosen option's steps: eq. 8's delay measured
(the gate's part once), the experts' energy by the one cost model on the tokens each really
evaluated (its prompt once, the options branched from its cache); and the gateway's own time
(the latency less the gate and the wait for the experts' scores) in ``own``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future

import numpy as np

from moe2.agent.gateway.config import GatewayConfig
from moe2.agent.gateway.gate import renormalise
from moe2.agent.gateway.stats import AppStatsWindow, OwnTime, answer_energy
from moe2.shared import mixing
from moe2.shared import protocol as p
from moe2.shared.answercost import SCORED, Work
from moe2.shared.errors import (
    BadMessage,
    ContextOverflow,
    DeadlineExceeded,
    InternalError,
    Moe2Error,
    NoExperts,
    RequestTimeout,
    UnknownOperation,
)
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import RpcClient

log = logging.getLogger(__name__)

# (application, prompt) -> the online experts of its subset, the gate's top-k of them with
# their weights (the gateway's own choice, as for a generated answer), the gate's seconds.
Choose = Callable[[str, str], tuple[dict[str, p.AgentInfo], dict[str, float], float]]


class ChoiceScorer:
    def __init__(
        self,
        gateway_id: str,
        rpc: RpcClient,
        fleet: FleetView,
        choose: Choose,  # (app, prompt) -> online experts, the gate's top-k with weights
        config: GatewayConfig,
        stats: AppStatsWindow | None = None,
        own: OwnTime | None = None,
    ) -> None:
        self.id = gateway_id
        self.rpc = rpc
        self.fleet = fleet
        self.choose = choose
        self.config = config
        self.stats = stats
        self.own = own

    def answer(self, app: str, req: p.PromptRequest, received: float) -> p.ChoiceAnswer:
        choices = list(req.choices or [])
        if len(choices) < 2:
            raise BadMessage("a multiple-choice prompt needs two or more choices")
        if req.prompt is None:
            raise BadMessage("'choices' go with a text 'prompt', not with 'messages'")
        prompt = req.prompt
        infos, chosen, gate_s = self.choose(app, prompt)
        deadline = received + self.config.deadline_s
        until = min(deadline, time.monotonic() + self.config.open_timeout_s)
        sent = time.monotonic()
        futures = {
            n: self.rpc.call_async(
                n, p.ScoreChoicesRequest(prompt=prompt, targets=choices), deadline=until
            )
            for n in chosen
        }
        replies, dropped = self._gather(futures, prompt, choices, deadline)
        waited_s = time.monotonic() - sent
        weights = renormalise({n: chosen[n] for n in chosen if n in replies})
        names = list(weights)
        level = mixing.level_of([frozenset({infos[n].tokenizer_hash}) for n in names])
        if level == mixing.TOKEN:
            _check_same_tokens(replies, names)
        log_w = np.log(np.array([weights[n] for n in names]))[:, None]  # (experts, 1)
        fused: list[float] = []
        steps: list[int] = []
        for o in range(len(choices)):
            logp = mixing.padded([replies[n].logprobs[o] for n in names])  # (experts, tokens)
            u = mixing.units(logp, level, f"prompt {req.id} choice {o}")
            fused.append(float(mixing.mixture_loglik(log_w, u)))
            steps.append(mixing.steps(logp))
        choice = int(np.argmax(fused))
        latency_s = time.monotonic() - received
        if self.own is not None:
            self.own.add(SCORED, steps=steps[choice], seconds=latency_s - gate_s - waited_s)
        if self.stats is not None:
            works = {
                n: Work(replies[n].prompt_tokens, tuple(len(t) for t in replies[n].targets_tokens))
                for n in names
                if replies[n].prompt_tokens > 0  # 0: an agent that predates score_choices
            }
            energy = answer_energy(self.fleet.copy().profile, works, steps[choice], SCORED)
            self.stats.answered(
                app, latency_s=latency_s, gate_s=gate_s, steps=steps[choice], energy=energy
            )
        return p.ChoiceAnswer(
            id=req.id,
            choice=choice,
            logprobs=fused,
            experts=[p.ExpertWeight(id=n, weight=w) for n, w in weights.items()],
            mixing=level,
            steps=steps,
            latency_ms=latency_s * 1e3,
            compute_ms={n: replies[n].compute_ms for n in names},
            app=app,
            dropped=dropped,
            gateway=self.id,
            gate_ms=gate_s * 1e3,
            prompt_tokens={n: replies[n].prompt_tokens for n in names},
        )

    def _gather(
        self,
        futures: dict[str, Future[p.ScoreChoicesReply]],
        prompt: str,
        choices: list[str],
        deadline: float,
    ) -> tuple[dict[str, p.ScoreChoicesReply], list[p.DroppedExpert]]:
        """Every expert's reply that fits the question; the others dropped, with why."""
        end = min(deadline, time.monotonic() + self.config.open_timeout_s)
        replies: dict[str, p.ScoreChoicesReply] = {}
        dropped: list[p.DroppedExpert] = []
        for name, fut in futures.items():
            try:
                try:
                    reply = self.rpc.wait(fut, max(0.0, end - time.monotonic()))
                except UnknownOperation:  # an agent older than score_choices
                    reply = self._one_by_one(name, prompt, choices, end)
                _check_reply(reply, len(choices))
                replies[name] = reply
            except RequestTimeout:
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded("the prompt's deadline passed while scoring") from None
                late = RequestTimeout(f"no reply within {self.config.open_timeout_s:g} s")
                dropped.append(_dropped(name, late))
            except Moe2Error as exc:
                dropped.append(_dropped(name, exc))
        for d in dropped:
            log.warning(
                "expert %s left out of a multiple-choice answer: %s: %s", d.id, d.code, d.reason
            )
        if not replies:
            reasons = "; ".join(f"{d.id}: {d.code}: {d.reason}" for d in dropped)
            if all(d.code == ContextOverflow.code for d in dropped):
                raise ContextOverflow(f"the prompt and its choices exceed every context: {reasons}")
            raise NoExperts(f"every expert chosen for this prompt failed: {reasons}")
        return replies, dropped

    def _one_by_one(
        self, name: str, prompt: str, choices: list[str], end: float
    ) -> p.ScoreChoicesReply:
        futures = [
            self.rpc.call_async(name, p.ScoreRequest(prompt=prompt, target=c), deadline=end)
            for c in choices
        ]
        got = [self.rpc.wait(f, max(0.0, end - time.monotonic())) for f in futures]
        return p.ScoreChoicesReply(
            targets_tokens=[g.target_tokens for g in got],
            prompt_tokens=0,  # a score reply does not say (only the stats use it)
            logprobs=[g.logprobs for g in got],
            compute_ms=sum(g.compute_ms for g in got),
        )


def _dropped(name: str, error: Moe2Error) -> p.DroppedExpert:
    return p.DroppedExpert(id=name, code=error.code, reason=error.message, at_token=0)


def _check_reply(reply: p.ScoreChoicesReply, n_choices: int) -> None:
    """BadMessage unless the reply holds one finite log-probability per scored token."""
    if len(reply.logprobs) != n_choices or len(reply.targets_tokens) != n_choices:
        raise BadMessage(f"scores of {len(reply.logprobs)} choices, expected {n_choices}")
    for lp, toks in zip(reply.logprobs, reply.targets_tokens):
        if not lp or len(lp) != len(toks):
            raise BadMessage("a choice's scores do not match its tokens")
        if not all(np.isfinite(x) and x <= 1e-6 for x in lp):
            raise BadMessage("scores must be finite natural-log probabilities (<= 0)")


def _check_same_tokens(replies: Mapping[str, p.ScoreChoicesReply], names: Sequence[str]) -> None:
    """Experts of one vocabulary must have scored the same ids, or per-token mixing is wrong."""
    first = replies[names[0]].targets_tokens
    for n in names[1:]:
        if replies[n].targets_tokens != first:
            raise InternalError(
                f"experts {names[0]} and {n} share a tokenizer hash but tokenized the choices "
                "differently"
            )
