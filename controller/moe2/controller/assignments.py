"""Pushing desired state to the gateways: which experts (and how many per prompt) serve an
application. Assignments are retained and versioned, so a gateway that (re)connects gets
the latest one; each gateway acknowledges the version it now serves.

    assignment, acks = push_assignment(broker, "qa", ["orin-1", "rtx-1"], k=1)
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import click

from moe2.controller.fleet import read_retained
from moe2.controller.options import broker_from_flags, broker_options, emit, json_option
from moe2.shared import protocol as p
from moe2.shared.errors import ConfigError, Moe2Error
from moe2.shared.mqtt import BrokerConfig, Connection


def current_assignment(
    broker: BrokerConfig, app: str, wait_s: float = 2.0
) -> p.AppAssignment | None:
    retained = read_retained(broker, [p.topics.desired_app(app)], wait_s)
    payload = retained.get(p.topics.desired_app(app))
    if not payload:
        return None
    try:
        return p.decode_message(p.AppAssignment, payload)
    except Moe2Error:
        return None  # a malformed retained message is replaced by the next push


def push_assignment(
    broker: BrokerConfig,
    app: str,
    subset: list[str],
    k: int,
    *,
    gate: p.GateRef | None = None,
    wait_s: float = 5.0,
    expect_gateways: int | None = None,
) -> tuple[p.AppAssignment, dict[str, p.AssignmentAck]]:
    """Publish the next version of ``app``'s assignment; returns it and the acks received
    within ``wait_s`` (stops early once ``expect_gateways`` have acknowledged)."""
    if k > len(subset):
        raise ConfigError(f"k={k} exceeds the subset of {len(subset)} experts")
    previous = current_assignment(broker, app)
    assignment = p.AppAssignment(
        app=app, version=(previous.version + 1) if previous else 1, subset=subset, k=k, gate=gate
    )
    acks: dict[str, p.AssignmentAck] = {}
    cond = threading.Condition()

    def on_ack(msg: Any) -> None:
        try:
            ack = p.decode_message(p.AssignmentAck, msg.payload)
        except Moe2Error:
            return
        if ack.app == app and ack.version == assignment.version:
            with cond:
                acks[ack.gateway] = ack
                cond.notify_all()

    with Connection(broker, f"moe2ctl-push-{uuid.uuid4().hex[:8]}") as conn:
        conn.subscribe(p.topics.ALL_ASSIGNMENT_ACKS, on_ack)
        info = conn.publish(p.topics.desired_app(app), p.encode(assignment), retain=True)
        info.wait_for_publish(timeout=10)
        deadline = time.monotonic() + wait_s
        with cond:
            while time.monotonic() < deadline:
                if expect_gateways is not None and len(acks) >= expect_gateways:
                    break
                cond.wait(max(0.0, deadline - time.monotonic()))
    return assignment, acks


@click.command()
@click.option("--app", required=True, help="Application to assign.")
@click.option("--subset", required=True, help="Comma-separated expert (agent) ids.")
@click.option(
    "--k",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Experts fused per prompt (top-k of the subset by gate value).",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds to collect gateway acknowledgements.",
)
@click.option(
    "--gateways",
    type=click.IntRange(min=1),
    default=None,
    help="Stop waiting once this many gateways have acknowledged.",
)
@json_option
@broker_options
def push(
    app: str, subset: str, k: int, wait_s: float, gateways: int | None, as_json: bool, **kwargs: Any
) -> None:
    """Publish which experts serve APP (retained, versioned) and collect acknowledgements."""
    p.check_name("application", app)
    members = [p.check_name("expert id", m.strip()) for m in subset.split(",") if m.strip()]
    if not members:
        raise click.BadParameter("name at least one expert", param_hint="--subset")
    assignment, acks = push_assignment(
        broker_from_flags(kwargs), app, members, k, wait_s=wait_s, expect_gateways=gateways
    )
    result = {"assignment": assignment.model_dump(), "acks": sorted(acks)}
    emit(
        result,
        as_json,
        lambda r: (
            f"app {app}: version {assignment.version}, subset {', '.join(members)}, k={k}\n"
            f"acknowledged by {len(acks)} gateway(s): {', '.join(sorted(acks)) or 'none yet'}"
        ),
    )
