"""An expert slower than its profile says (a busy box, a long prompt, a bigger model than
its figures): a real tiny agent that profiled itself, whose retained profile is then replaced
by one claiming it ``factor`` times faster; and questions long enough that scoring them takes
seconds of model time."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from moe2.controller import datasets as ds
from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import BrokerConfig, Connection

# A short self-profile (a few seconds), enough for curves to scale.
SHORT_PROFILE = (
    "--profile-points", "2", "--profile-repeats", "1", "--profile-decode-tokens", "4",
    "--profile-max-prompt-fraction", "0.3", "--profile-idle-seconds", "0",
)  # fmt: skip


def start_profiled(fleet: LocalFleet, agent_id: str, model: Path) -> None:
    """Start an agent and wait until its retained profile is in."""
    fleet.start(agent_id, model, "--n-threads", "1", *SHORT_PROFILE)
    fleet.wait_online([agent_id], 60)
    end = time.monotonic() + 120  # it profiles itself once online
    while agent_id not in FleetView.snapshot(fleet.broker, ("profile",)).profile:
        assert time.monotonic() < end, fleet.log_tail(agent_id)
        time.sleep(0.5)


def claim_faster(broker_config: BrokerConfig, agent_id: str, factor: float) -> None:
    """Replace ``agent_id``'s retained profile by one that claims it ``factor`` times faster
    than it measured itself."""
    prof = FleetView.snapshot(broker_config, ("profile",), 3.0).profile[agent_id]
    curves = prof.curves
    faster = {
        name: getattr(curves, name).model_copy(
            update={"coef": [c / factor for c in getattr(curves, name).coef]}
        )
        for name in ("prompt_seconds", "token_seconds", "score_seconds")
        if getattr(curves, name) is not None  # scoring: what collection is paced by
    }
    claimed = prof.model_copy(update={"curves": curves.model_copy(update=faster)})
    with Connection(broker_config, f"claim-{uuid.uuid4().hex[:6]}") as conn:
        conn.publish(p.topics.agent_profile(agent_id), p.encode(claimed), retain=True)
        assert conn.flush(5)


def long_questions(
    n: int, seed: int, domains: tuple[str, ...] = ("animals", "cooking"), chars: int = 2000
) -> list[ds.Sample]:
    """``n`` two-option questions of ~``chars`` / 4 tokens each (a prompt repeated to
    ``chars`` characters): a few hundred of them take seconds of a tiny expert's model time."""
    out = []
    for s in ds.tiny_domains(domains, max(1, n // len(domains)), seed=seed, choices=2):
        text = (s.prompt + " ") * max(1, chars // len(s.prompt))
        out.append(ds.Sample(s.app, text, s.targets, s.answer))
    return out
