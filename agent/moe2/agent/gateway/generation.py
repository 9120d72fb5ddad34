"""One fused generation (paper Algorithm 3): open a session on each chosen expert, then fill
in the answer with a decoder, token after token fused from every expert's distribution.

The parts: the experts' sessions, weights, RPC waits and dropping (``experts.py``), how
their tokens meet and fuse (``fusion.py``), the frontier, the answer and the per-token
decoder (``decoding.py``), speculative decoders (``speculative.py``). ``decoding`` picks
the decoder (``DECODERS``): ``auto`` (the default) chooses per round between a per-token
step, one drafter and every expert drafting, from what it measured for these experts;
``per-token``, ``speculative`` and ``tree`` force one way. Every decoder chooses the same
tokens (``decoding.py``).

Generation ends on an end-of-generation token, ``max_tokens``, a full context, or the
prompt's deadline (an error). Token texts come from the vocabulary tables the gateway holds
(``vocab.py``), so the loop makes no request besides open, step, draft, verify and close.

    gen = Generation(rpc, infos, vocabs, {"a": 0.7, "b": 0.3}, config, Sampling())
    result = gen.run("the fox eats", max_tokens=16)
    result = gen.run(None, 16, messages=[ChatMessage(role="user", content="Hi")])
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from moe2.agent.gateway.config import GatewayConfig
from moe2.agent.gateway.decoding import (
    Answer,
    Decoder,
    DecodingStats,
    FinishReason,
    Frontier,
    PerTokenDecoder,
    Picker,
    Sampling,
)
from moe2.agent.gateway.experts import ExpertPool, Rpc
from moe2.agent.gateway.fusion import Fused, TokenKey, alignment
from moe2.agent.gateway.plans import CostModel, DecoderMemory
from moe2.agent.gateway.speculative import AdaptiveDecoder, SpeculativeDecoder, TreeDecoder
from moe2.agent.gateway.vocab import Vocab
from moe2.shared import protocol as p
from moe2.shared.errors import ExpertOffline

__all__ = [
    "DECODERS",
    "ExpertOffline",
    "FinishReason",
    "Generation",
    "GenerationResult",
    "Sampling",
]

GREEDY = Sampling()
DecoderFactory = Callable[[CostModel, GatewayConfig], Decoder]
DECODERS: dict[str, DecoderFactory] = {
    "per-token": lambda model, config: PerTokenDecoder(),
    "speculative": SpeculativeDecoder,
    "tree": TreeDecoder,
    "auto": AdaptiveDecoder,
}


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    weights: dict[str, float]  # final weights of the experts still answering
    tokens: int
    fusion: Literal["token-id", "token-text"]
    dropped: list[p.DroppedExpert] = field(default_factory=list)
    picks: list[TokenKey] = field(default_factory=list)  # chosen ids (by id) or bytes (by text)
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # per expert, from its open
    step_seconds: list[float] = field(default_factory=list)  # from the token before, each
    speculation: DecodingStats | None = None  # the decoder's counts
    compute_ms: dict[str, float] = field(default_factory=dict)  # model time each expert reported
    logprobs: list[p.TokenLogprob] | None = None  # when asked for
    # Seconds spent waiting for the experts' replies (ExpertPool.waited_s); the rest of the
    # latency, less the gate, is the gateway's own time.
    waited_s: float | None = None


class Generation:
    def __init__(
        self,
        rpc: Rpc,
        infos: Mapping[str, p.AgentInfo],
        vocabs: Mapping[str, Vocab],  # expert -> its vocabulary table
        weights: Mapping[str, float],
        config: GatewayConfig,
        sampling: Sampling = GREEDY,
        *,
        deadline: float | None = None,  # time.monotonic() value
        on_delta: Callable[[str], None] | None = None,
        on_chunk: Callable[[str, list[p.TokenLogprob]], None] | None = None,  # with logprobs
        on_step: Callable[[int, Fused], None] | None = None,  # for tests and tracing
        alive: Callable[[str], bool] = lambda name: True,  # False: its last will came
        abandoned: Callable[[], bool] = lambda: False,  # True: the gateway gives up (stop)
        memory: DecoderMemory | None = None,  # the gateway's, across prompts
        top_logprobs: int | None = None,  # log-probabilities with this many alternatives
    ) -> None:
        self.config = config
        self.pool = ExpertPool(
            rpc, infos, weights, config, deadline=deadline, alive=alive, abandoned=abandoned
        )
        experts = self.pool.names
        self.align = alignment(infos, vocabs, experts, config)
        self.sampling = sampling
        self.memory = memory
        self.experts = experts
        if on_chunk is None and on_delta is not None:
            delta_only = on_delta

            def on_chunk(delta: str, logprobs: list[p.TokenLogprob]) -> None:
                if delta:
                    delta_only(delta)

        self.answer = Answer(self.align, on_chunk, top_logprobs)
        self.on_step = on_step

    @property
    def fusion(self) -> Literal["token-id", "token-text"]:
        return self.align.kind

    def run(
        self, prompt: str | None, max_tokens: int, messages: list[p.ChatMessage] | None = None
    ) -> GenerationResult:
        """Generate from ``prompt``, or from ``messages``, which each expert renders with its
        own chat template."""
        opts = self.align.options
        model = (
            self.memory.get(self.experts, self.config)
            if self.memory is not None
            else CostModel(self.config.speculative_gamma, self.config.speculative_max_gamma)
        )
        decoder = DECODERS[self.config.decoding](model, self.config)
        frontier = Frontier(
            self.pool,
            self.align,
            Picker(self.sampling, self.align),
            self.answer,
            max_tokens,
            self.on_step,
        )
        started = time.monotonic()
        try:
            opened = self.pool.open(
                p.OpenRequest(prompt=prompt, messages=messages, top_k=opts.top_k, full=opts.full),
                self.align.check,
            )
            finish = frontier.start(opened)
            if finish is None:
                finish = decoder.decode(frontier)
        finally:
            self.pool.close()
            if self.memory is not None:
                self.memory.remember(self.experts, model)
        self.answer.finish()
        stamps = [started, *self.answer.stamps]
        return GenerationResult(
            self.answer.text,
            finish,
            dict(self.pool.weights),
            len(self.answer),
            self.align.kind,
            self.pool.dropped,
            list(self.answer.picks),
            {n: t for n, t in self.pool.prompt_tokens.items() if n in self.pool.weights},
            [b - a for a, b in itertools.pairwise(stamps)],
            decoder.stats,
            dict(self.pool.compute_ms),
            self.answer.logprobs,
            self.pool.waited_s,
        )
