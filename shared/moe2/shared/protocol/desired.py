"""Desired state: what the controller asks the gateways to serve, and what they say back.

    moe2/v1/desired/apps/<app>            retained  AppAssignment   subset, k, gate of an app
    moe2/v1/agents/<gw>/acks/<app>        retained  AssignmentAck   accepted / rejected (why)
    moe2/v1/agents/<gw>/gateway           retained  GatewayStatus   the apps a gateway serves

Versions are per application and only grow: a gateway applies a version above the one it
serves, acknowledges the same version again (a retained copy after a reconnect), and rejects
an older one with a reason. A version is ordered by its epoch first (none: 0), then its
number; a new epoch is an operator's recovery (``moe2ctl push --force-version N``): it starts
the numbers again at N, and every gateway accepts it whatever version it served. The
controller takes the next version from what the fleet shows (the retained assignment and
what each gateway says it serves, with the assignment it serves as proof:
``moe2.shared.desired``), and only from what its own key signed when it signs.

Only the controller writes desired state (the broker's ACL), and it signs it
(``moe2.shared.signing``): a gateway that trusts a fleet key rejects what the key did not
sign. An application goes back to the gateways' local configuration with a signed, versioned
``revert`` assignment; clearing the retained message (an empty payload, which nobody can
sign) leaves such a gateway as it is.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moe2.shared.costmodel import CostCurve
from moe2.shared.protocol.base import NAME_PATTERN, Message

Name = Annotated[str, Field(pattern=NAME_PATTERN)]

# Versions stay exact in every JSON implementation (2^53) and cannot be pinned out of reach.
MAX_VERSION = (1 << 53) - 1


def assignment_digest(a: AppAssignment) -> str:
    """Names one assignment message exactly (its content and signature): which one an
    acknowledgement answers, when a version number was sent twice (a forged or rejected
    message, then the controller's)."""
    return hashlib.sha256(a.model_dump_json(exclude_none=True).encode()).hexdigest()[:32]


def describe_version(key: tuple[int, int]) -> str:
    """An (epoch, version) as people read it: "7", or "7 (epoch 2)"."""
    epoch, version = key
    return f"{version}" if epoch == 0 else f"{version} (epoch {epoch})"


class GateRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Name
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class AppAssignment(Message):
    """Retained on ``moe2/v1/desired/apps/<app>``: which experts serve an application."""

    app: Name
    version: int = Field(ge=1, le=MAX_VERSION)  # increases with every push
    # Starts the version numbers again (an operator's recovery); None: epoch 0. None rather
    # than 0 by default, so the signatures of assignments made before epochs still verify.
    epoch: int | None = Field(default=None, ge=1, le=MAX_VERSION)
    subset: list[Name] = Field(default_factory=list, max_length=1024)
    k: int = Field(default=1, ge=1, le=1024)  # experts per prompt: the top-k of the subset
    gate: GateRef | None = None  # None: uniform weights over the subset
    # Gateways that serve the app; None: every gateway. A gateway left out stops serving it.
    gateways: list[Name] | None = Field(default=None, min_length=1, max_length=1024)
    # True: no assignment; gateways serve the app from their local configuration again.
    revert: bool = False
    sig: str | None = Field(default=None, max_length=200)  # base64 Ed25519 (signing.py)

    @model_validator(mode="after")
    def _subset_unless_revert(self) -> AppAssignment:
        if not self.revert and not self.subset:
            raise ValueError("an assignment names at least one expert (or is a revert)")
        return self

    def serves(self, gateway: str) -> bool:
        return not self.revert and (self.gateways is None or gateway in self.gateways)

    @property
    def key(self) -> tuple[int, int]:
        """(epoch, version): what versions are ordered by."""
        return (self.epoch or 0, self.version)


class AssignmentAck(Message):
    """Retained on ``moe2/v1/agents/<gateway>/acks/<app>``: what a gateway made of the
    assignment version it last received for the app."""

    gateway: Name
    app: Name
    version: int = Field(ge=1, le=MAX_VERSION)
    epoch: int | None = Field(default=None, ge=1, le=MAX_VERSION)  # of ``version``
    answers: str | None = Field(default=None, max_length=64)  # assignment_digest of it
    accepted: bool
    serving: bool = True  # False: accepted, but the assignment leaves this gateway out
    reason: str | None = Field(default=None, max_length=1000)  # why it was rejected
    # The same as an error code of moe2.shared.errors (``stale_version``, ``bad_signature``,
    # ``bad_request``): decide on it, never on the reason's text.
    code: str | None = Field(default=None, max_length=64)
    current: int | None = Field(default=None, ge=0, le=MAX_VERSION)  # the version it serves
    # The assignment it serves (of version ``current``), as it received it (signed): a
    # controller counts a gateway's version only when its own key signed this.
    proof: AppAssignment | None = None


class GatewayOverhead(BaseModel):
    """A gateway's own seconds per answer, beyond the gate and the waits on its experts:
    taking the prompt, routing, fusing, sampling, bookkeeping (the paper's ensemble time). A
    curve in the answer's steps T per kind of answer, fitted on the last answers of that kind
    it gave; what ``moe2.shared.answercost`` adds to an answer once (``gateway_s``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    generated: CostCurve | None = None  # seconds per generated answer of T steps
    scored: CostCurve | None = None  # seconds per multiple-choice answer (T its option's)
    answers: int = Field(default=0, ge=0)  # answers the curves are fitted on

    def seconds(self, kind: str, steps: int) -> float:
        """Seconds for one answer of ``kind`` ("generated" or "scored") of ``steps`` steps
        (0 when no answer of that kind was measured)."""
        curve = self.generated if kind == "generated" else self.scored
        return 0.0 if curve is None else curve.at(float(steps))


class GatewayStatus(Message):
    """Retained on ``moe2/v1/agents/<gateway>/gateway`` (LWT: offline): the applications a
    gateway answers prompts for, so controllers know whose acknowledgement to expect and
    clients can tell an application that nobody serves; and its own time per answer, as
    measured (published again as it moves)."""

    gateway: Name
    state: Literal["online", "offline"]
    group: Name | None = None  # shared-subscription group
    apps: dict[Name, int] = Field(default_factory=dict)  # app -> assignment version (0: local)
    since: float | None = None  # unix seconds
    # Set in the last will only: the broker published this, the gateway vanished without
    # draining (its kept MQTT session may hold prompts: see agent/gateway/adopt.py).
    lost: bool = False
    # The MQTT client id of its kept session, bound to its login (moe2.shared.logins): what
    # a live gateway connects under to adopt that session. Only gateway, controller and
    # http (moe2-http) logins may read this topic.
    session: str | None = Field(default=None, max_length=1024)
    overhead: GatewayOverhead | None = None  # its own time per answer; None: none measured
    # Prompts it generates at once, and more it lets wait before answering 'busy': a
    # front (moe2-http) keeps its requests in flight within their sum. None: not announced.
    # An older peer rejects a status that has them: upgrade gateways and their readers
    # (moe2ctl, moe2-http, the other gateways) together.
    max_concurrent: int | None = Field(default=None, ge=1)
    max_pending: int | None = Field(default=None, ge=0)

    @property
    def capacity(self) -> int | None:
        """Prompts it takes at once (running and waiting), when announced."""
        if self.max_concurrent is None:
            return None
        return self.max_concurrent + (self.max_pending or 0)


class AppFigures(BaseModel):
    """What one application's answers really cost at one gateway, over a recent window."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    answers: int = Field(ge=0)  # final answers in the window
    errors: int = Field(ge=0)  # error replies in the window (in no figure below)
    steps: int = Field(ge=0)  # generation steps (tokens) of those answers
    # Eq. 8 measured: (latency - gate) / steps + gate, mean over the answers (and its p95)
    delay_s_per_step: float | None = Field(default=None, ge=0)
    delay_s_per_step_p95: float | None = Field(default=None, ge=0)
    gate_s: float | None = Field(default=None, ge=0)  # the gate's seconds per prompt, mean
    # Joules of the experts that answered, by the cost model (moe2.shared.answercost) on the
    # tokens each really evaluated: per step (eq. 11) and per prompt, means over the answers;
    # measured only where every profile's meter measured.
    energy_j_per_step: float | None = Field(default=None, ge=0)
    energy_j_per_prompt: float | None = Field(default=None, ge=0)
    energy_measured: bool = False


class AppStats(Message):
    """Retained on ``moe2/v1/agents/<gateway>/stats``: per application, the measured delay
    and energy of the answers this gateway gave over the last ``window_s`` seconds."""

    gateway: Name
    window_s: float = Field(gt=0)
    apps: dict[Name, AppFigures] = Field(default_factory=dict)
    at: float  # unix seconds
