"""Desired state: what the controller asks the gateways to serve, and what they say back.

    moe2/v1/desired/apps/<app>            retained  AppAssignment   subset, k, gate of an app
    moe2/v1/agents/<gw>/acks/<app>        retained  AssignmentAck   accepted / rejected (why)
    moe2/v1/agents/<gw>/gateway           retained  GatewayStatus   the apps a gateway serves

Versions are per application and only grow: a gateway applies a version above the one it
serves, acknowledges the same version again (a retained copy after a reconnect), and rejects
an older one with a reason. The controller takes the next version from what the fleet shows
(the retained assignment and every gateway's acknowledgement: ``moe2.shared.desired``).

Only the controller writes desired state (the broker's ACL), and it signs it
(``moe2.shared.signing``): a gateway that trusts a fleet key rejects what the key did not
sign. An application goes back to the gateways' local configuration with a signed, versioned
``revert`` assignment; clearing the retained message (an empty payload, which nobody can
sign) leaves such a gateway as it is.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moe2.shared.protocol.base import NAME_PATTERN, Message

Name = Annotated[str, Field(pattern=NAME_PATTERN)]

# How a gateway's reason for refusing an old version starts (the publisher retries above it).
STALE_VERSION = "stale version"

# Versions stay exact in every JSON implementation (2^53) and cannot be pinned out of reach.
MAX_VERSION = (1 << 53) - 1


class GateRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Name
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class AppAssignment(Message):
    """Retained on ``moe2/v1/desired/apps/<app>``: which experts serve an application."""

    app: Name
    version: int = Field(ge=1, le=MAX_VERSION)  # increases with every push
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


class AssignmentAck(Message):
    """Retained on ``moe2/v1/agents/<gateway>/acks/<app>``: what a gateway made of the
    assignment version it last received for the app."""

    gateway: Name
    app: Name
    version: int = Field(ge=1, le=MAX_VERSION)
    accepted: bool
    serving: bool = True  # False: accepted, but the assignment leaves this gateway out
    reason: str | None = Field(default=None, max_length=1000)  # why it was rejected
    current: int | None = Field(default=None, ge=0, le=MAX_VERSION)  # the version it serves


class GatewayStatus(Message):
    """Retained on ``moe2/v1/agents/<gateway>/gateway`` (LWT: offline): the applications a
    gateway answers prompts for, so controllers know whose acknowledgement to expect and
    clients can tell an application that nobody serves."""

    gateway: Name
    state: Literal["online", "offline"]
    group: Name | None = None  # shared-subscription group
    apps: dict[Name, int] = Field(default_factory=dict)  # app -> assignment version (0: local)
    since: float | None = None  # unix seconds
    # Set in the last will only: the broker published this, the gateway vanished without
    # draining (its kept MQTT session may hold prompts: see agent/gateway/adopt.py).
    lost: bool = False
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
    errors: int = Field(ge=0)  # error replies in the window
    steps: int = Field(ge=0)  # generation steps (tokens) of those answers
    delay_s_per_step: float | None = Field(default=None, ge=0)  # mean of latency / steps
    delay_s_per_step_p95: float | None = Field(default=None, ge=0)
    # Joules per step of the experts that answered, from their profiles' curves scaled by
    # the answer's measured steps; measured only where every profile's meter measured.
    energy_j_per_step: float | None = Field(default=None, ge=0)
    energy_measured: bool = False


class AppStats(Message):
    """Retained on ``moe2/v1/agents/<gateway>/stats``: per application, the measured delay
    and energy of the answers this gateway gave over the last ``window_s`` seconds."""

    gateway: Name
    window_s: float = Field(gt=0)
    apps: dict[Name, AppFigures] = Field(default_factory=dict)
    at: float  # unix seconds
