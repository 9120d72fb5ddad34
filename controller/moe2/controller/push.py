"""``moe2ctl push``: which experts serve an application; and the recording and reporting that
every push (``push``, ``push-gate``, ``optimize --push``) shares.

    moe2ctl push --app qa --subset orin-1,rtx-1 --k 1
    moe2ctl push --app qa --subset orin-1 --gateway gw-1 --json
    moe2ctl push --app qa --revert          # back to the gateways' local configuration
    moe2ctl push --app qa --subset orin-1 --force-version 1   # versions start again at 1

With the fleet key (``signing_key``, ``moe2ctl keys generate``) every push is signed.

Publishing goes through ``moe2.shared.desired`` (the one source of versions), which refuses
before publishing anything an expert no agent announced and a k outside 1..|subset| (exit
status 2 here); the registry records each pushed assignment and every answer; the exit status
is 4 when no gateway accepted it, or, for a gate, when no gateway that accepted it loaded it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from moe2.controller.options import (
    broker_from_flags,
    broker_options,
    db_option,
    desired_state,
    emit,
    json_option,
    open_registry,
)
from moe2.controller.registry.db import Registry
from moe2.shared import protocol as p
from moe2.shared.desired import PushResult
from moe2.shared.errors import ConfigError, NotAcknowledged


def record(reg: Registry, results: Sequence[PushResult]) -> None:
    """Store pushed assignments and the gateways' answers."""
    for r in results:
        reg.add_assignment(r.assignment)
        for ack in r.acks.values():
            reg.record_assignment_ack(ack)
        for gack in r.gate_acks.values():
            reg.record_gate_ack(gack)


def describe(r: PushResult) -> str:
    a = r.assignment
    signed = "signed" if a.sig else "unsigned"
    version = p.describe_version(a.key)
    if a.revert:
        lines = [f"app {a.app}: version {version}, back to local configuration ({signed})"]
    else:
        lines = [
            f"app {a.app}: version {version}, subset {', '.join(a.subset)}, k={a.k}"
            + (f", gate {a.gate.version}" if a.gate else ", uniform weights")
            + (f", gateways {', '.join(a.gateways)}" if a.gateways else "")
            + f" ({signed})"
        ]
    lines.append(f"  accepted by: {', '.join(r.accepted) or 'none'}")
    for g, why in r.rejected.items():
        lines.append(f"  rejected by {g}: {why}")
    if r.missing:
        lines.append(f"  no answer from: {', '.join(r.missing)}")
    if not r.expected:
        lines.append("  no gateway is online; the assignment stays retained for those that start")
    if a.gate is not None:
        for g, x in sorted(r.gate_acks.items()):
            lines.append(
                f"  gate {x.state} by {g}"
                + (f" ({x.reason})" if x.reason else "")
                + (f" on {', '.join(x.providers)}" if x.providers else "")
            )
        if r.gate_pending:
            lines.append(f"  gate not loaded yet by: {', '.join(r.gate_pending)}")
    return "\n".join(lines)


def report(
    results: Sequence[PushResult], as_json: bool, extra: dict[str, Any] | None = None
) -> None:
    """Print the outcome; NotAcknowledged (exit 4) when an application has no acceptance, or
    its gate no gateway that accepted the assignment loaded."""
    out = {"pushed": [r.summary() for r in results], **(extra or {})}
    emit(out, as_json, lambda _o: "\n".join(describe(r) for r in results))
    unacked = [r.assignment.app for r in results if not r.accepted]
    if unacked:
        raise NotAcknowledged(
            f"no gateway accepted the assignment of {', '.join(unacked)} (it stays retained; "
            "gateways that start later apply it)"
        )
    unloaded = [
        r.assignment.app
        for r in results
        if r.assignment.gate is not None
        and any(a.serving for a in r.acks.values() if a.accepted)
        and not any(x.state == "loaded" for x in r.gate_acks.values())
    ]
    if unloaded:
        gate = results[0].assignment.gate
        raise NotAcknowledged(
            f"no gateway serving {', '.join(unloaded)} loaded gate "
            f"{gate.version if gate else '?'} within the wait (the reasons are above; it "
            "stays retained)"
        )


@click.command()
@click.option("--app", required=True, help="Application to assign.")
@click.option("--subset", default=None, help="Comma-separated expert (agent) ids.")
@click.option(
    "--revert",
    is_flag=True,
    help="Instead of a subset: the gateways serve APP from their local configuration again "
    "(a signed version of its own).",
)
@click.option(
    "--k",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Experts fused per prompt (top-k of the subset by gate value).",
)
@click.option(
    "--gateway",
    "gateways",
    multiple=True,
    help="Gateway that serves the app (repeatable) [default: every gateway].",
)
@click.option(
    "--force-version",
    type=click.IntRange(min=1, max=p.MAX_VERSION),
    default=None,
    help="Start APP's versions again at this number, in a new epoch that every gateway "
    "accepts whatever version it serves: the way out when APP's version reached the largest "
    "allowed. Signed like any push.",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Longest wait for the online gateways' answers, seconds.",
)
@db_option
@json_option
@broker_options
def push(
    app: str,
    subset: str | None,
    revert: bool,
    k: int,
    gateways: tuple[str, ...],
    force_version: int | None,
    wait_s: float,
    db_url: str | None,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Publish which experts serve APP (retained, versioned), wait for the gateways' answers
    and record them. Exit status 4 when no gateway accepted it."""
    p.check_name("application", app)
    if revert:
        if subset is not None or gateways:
            raise click.UsageError("--revert takes no --subset or --gateway")
        broker = broker_from_flags(kwargs)
        with desired_state(broker) as desired:
            reverted = desired.revert(app, wait_s=wait_s, force_version=force_version)
        _record(db_url, reverted)
        report([reverted], as_json)
        return
    if subset is None:
        raise click.UsageError("give --subset (or --revert)")
    members = [p.check_name("expert id", m.strip()) for m in subset.split(",") if m.strip()]
    if not members:
        raise click.BadParameter("name at least one expert", param_hint="--subset")
    if k > len(members):
        raise click.BadParameter(
            f"k={k} exceeds the {len(members)} experts named", param_hint="--k"
        )
    for g in gateways:
        p.check_name("gateway id", g)
    broker = broker_from_flags(kwargs)
    with desired_state(broker) as desired:
        try:
            desired.check([(app, members, k)], None)
        except ConfigError as exc:  # an assignment no gateway could serve: a bad argument
            raise click.UsageError(exc.message) from None
        result = desired.push_assignment(  # its ConfigError (versions run out): exit 1
            app,
            members,
            k,
            gateways=gateways or None,
            wait_s=wait_s,
            force_version=force_version,
        )
    _record(db_url, result)
    report([result], as_json)


def _record(db_url: str | None, result: PushResult) -> None:
    reg = open_registry(db_url)
    try:
        record(reg, [result])
    finally:
        reg.close()
