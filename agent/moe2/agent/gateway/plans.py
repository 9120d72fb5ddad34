"""Which plan a round of fused decoding takes, from what was measured for the set of experts:
a per-token step, one drafter, or every chosen expert drafting (a tree), and the draft
length γ.

Per set of experts (``CostModel``, kept across prompts by ``DecoderMemory``): the
acceptance rates, the round trip and the drafting cost set each round's γ; the plans are
compared by the tokens per second they delivered (wall clock), and the fastest is taken,
speculation only when it beats steps by 10%. A plan that loses is probed again after 8,
16, 32... tokens and given up for good past 512; while speculating, a step every 32 tokens
keeps the step's cost measured.

    model = memory.get(["a", "b"], config)
    plan, gamma = model.plan(["step", "linear", "tree"], limit=32)
    model.round_done(plan, (1, 1), (3, 4), gamma, tokens=5, wall_ms=40.0, draft_ms=8.0)
    memory.remember(["a", "b"], model)
"""

from __future__ import annotations

import copy
import logging
import statistics
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from moe2.agent.gateway.config import GatewayConfig

log = logging.getLogger(__name__)

Plan = Literal["step", "linear", "tree"]

# A plan that loses to per-token steps is probed again after this many tokens, doubling
# each time; past GIVE_UP_TOKENS it is not tried again for that set of experts.
FIRST_PROBE_TOKENS = 8
GIVE_UP_TOKENS = 512
# A speculative plan is taken over per-token steps only when it delivered this much more
# (measured rates are noisy; per-token decoding is the safe side).
MARGIN = 1.1
# While speculating, a per-token step every this many tokens keeps the step's cost measured
# (a stale figure from a moment of load would keep speculation chosen).
STEP_PROBE_TOKENS = 32
# Steps and rounds whose wall times the comparison uses (the last ones: a moment of load
# weighs little).
WINDOW = 8


@dataclass
class _Rate:
    """An exponentially decayed success rate, with a prior of ``prior`` over two trials."""

    prior: float = 0.8
    hits: float = 1.6
    trials: float = 2.0

    def add(self, hits: int, trials: int, decay: float) -> None:
        self.hits = decay * self.hits + hits
        self.trials = decay * self.trials + trials

    @property
    def value(self) -> float:
        return min(self.hits / self.trials, 0.9999) if self.trials > 0 else self.prior


@dataclass
class _Round:
    tokens: int  # emitted
    wall_ms: float  # draft sent to the last verification in
    gamma: int
    draft_ms: float  # the slowest drafter's model time, per drafted token


@dataclass
class _Mode:
    """What was measured of one speculative plan."""

    first: _Rate = field(default_factory=_Rate)  # the round's first position accepted
    later: _Rate = field(default_factory=_Rate)  # each later position, given the one before
    rounds: deque[_Round] = field(default_factory=lambda: deque(maxlen=WINDOW))
    gap: int = FIRST_PROBE_TOKENS  # tokens of steps before it is probed again
    since: int = 0  # tokens since it was last tried
    given_up: bool = False

    @property
    def rate(self) -> float | None:
        """Tokens per ms its last rounds delivered, wall clock (None: never measured)."""
        if not self.rounds:
            return None
        return sum(r.tokens for r in self.rounds) / max(1e-3, sum(r.wall_ms for r in self.rounds))

    def costs(self) -> tuple[float, float]:
        """(fixed ms, ms per drafted token) of a round, T(γ) = fixed + γ·per-token, fitted to
        the last rounds' wall times (least squares when their γ differ; the agents' own
        model time per drafted token at least: it leaves their per-token overheads out)."""
        rs = list(self.rounds)
        floor = max(r.draft_ms for r in rs)
        gs = [float(r.gamma) for r in rs]
        ws = [r.wall_ms for r in rs]
        g_mean, w_mean = statistics.fmean(gs), statistics.fmean(ws)
        var = sum((g - g_mean) ** 2 for g in gs)
        per = floor
        if var > 0:
            cov = sum((g - g_mean) * (w - w_mean) for g, w in zip(gs, ws))
            per = max(floor, cov / var)
        return max(0.0, w_mean - per * g_mean), per

    def expected_tokens(self, gamma: int) -> float:
        """Tokens a round of γ emits on average: the first position, then the run of later
        acceptances (the correction at the first rejection included)."""
        b, a = self.first.value, self.later.value
        if gamma <= 1:
            return 1.0
        return 1.0 + b * (1 - a ** (gamma - 1)) / (1 - a)

    def gamma(self, max_gamma: int) -> int:
        """The draft length that maximises expected tokens per ms by the measured costs."""
        if not self.rounds:
            return min(4, max_gamma)
        fixed, per = self.costs()
        best, rate = 1, 0.0
        for g in range(1, max_gamma + 1):
            r = self.expected_tokens(g) / (fixed + g * per + 1e-6)
            if r > rate:
                best, rate = g, r
        return best


class CostModel:
    """Per set of experts: the measured cost of a per-token step and of each speculative
    plan, and which plan to take next (see the module docstring). Plans are compared by the
    tokens per second they delivered (wall clock, so every overhead counts); the draft
    length of a round comes from its measured acceptance and costs."""

    def __init__(self, start_gamma: int, max_gamma: int, *, decay: float = 0.8) -> None:
        self.start_gamma = start_gamma
        self.max_gamma = max_gamma
        self.decay = decay
        self.steps: deque[float] = deque(maxlen=WINDOW)  # wall ms of the last steps
        self.step_since = 0  # tokens since the last per-token step
        self.modes: dict[Plan, _Mode] = {"linear": _Mode(), "tree": _Mode()}

    @property
    def step_ms(self) -> float | None:
        """The median wall time of the last per-token steps (None: none measured)."""
        return statistics.median(self.steps) if self.steps else None

    def step_done(self, wall_ms: float) -> None:
        self.steps.append(wall_ms)
        self.step_since = 0
        for mode in self.modes.values():
            mode.since += 1

    def round_done(
        self,
        plan: Plan,
        first: tuple[int, int],  # (accepted, tested) at the first position
        later: tuple[int, int],  # ... at the later ones
        gamma: int,
        tokens: int,  # emitted
        wall_ms: float | None,  # None: the draft was made ahead, its time is not known
        draft_ms: float = 0.0,  # the slowest drafter's compute
    ) -> None:
        mode = self.modes[plan]
        mode.first.add(*first, self.decay)
        mode.later.add(*later, self.decay)
        if wall_ms is not None:
            mode.rounds.append(_Round(tokens, wall_ms, gamma, draft_ms / max(1, gamma)))
        mode.since = 0
        self.step_since += tokens
        for other in self.modes.values():
            if other is not mode:
                other.since += tokens

    def plan(self, allowed: Sequence[Plan], limit: int) -> tuple[Plan, int]:
        """The next plan and its γ (at most ``limit``) among ``allowed``."""
        spec = [m for m in allowed if m != "step"]
        if limit < 2 or not spec:
            return "step", 1
        gamma = {m: max(2, min(self.modes[m].gamma(self.max_gamma), limit)) for m in spec}
        if "step" in allowed and self.step_ms is None:
            return "step", 1  # measure a step first: nothing is lost
        for name in spec:  # each plan once, to measure it
            if self.modes[name].rate is None and not self.modes[name].given_up:
                return name, min(self.start_gamma, limit)
        open_ = [m for m in spec if not self.modes[m].given_up or "step" not in allowed]
        best: Plan = max(open_, key=lambda m: self.modes[m].rate or 0.0) if open_ else "step"
        best_rate = (self.modes[best].rate or 0.0) if best != "step" else 0.0
        step_rate = 1.0 / (self.step_ms or 1e9)
        if best == "step" or ("step" in allowed and step_rate * MARGIN >= best_rate):
            # Steps win. A plan not given up is probed now and then; one that lost for long
            # enough is given up for good.
            for name in spec:
                mode = self.modes[name]
                if mode.given_up or mode.since < mode.gap:
                    continue
                mode.gap *= 2
                if mode.gap > GIVE_UP_TOKENS:
                    mode.given_up = True
                    log.info("speculative plan %s given up for this set of experts", name)
                    continue
                return name, gamma[name]
            return "step", 1
        self.modes[best].gap = FIRST_PROBE_TOKENS
        if "step" in allowed and self.step_since >= STEP_PROBE_TOKENS:
            return "step", 1
        return best, gamma[best]


class DecoderMemory:
    """What a gateway has learned per set of experts, across prompts (thread-safe: prompts
    are generated concurrently; a model is copied out and stored back)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[tuple[str, ...], CostModel] = {}

    def get(self, experts: Iterable[str], config: GatewayConfig) -> CostModel:
        key = tuple(sorted(experts))
        with self._lock:
            known = self._known.get(key)
            if known is not None:
                return copy.deepcopy(known)
        return CostModel(config.speculative_gamma, config.speculative_max_gamma)

    def remember(self, experts: Iterable[str], model: CostModel) -> None:
        with self._lock:
            self._known[tuple(sorted(experts))] = copy.deepcopy(model)
