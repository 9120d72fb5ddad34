"""``moe2ctl serve``: keep the fleet's assignments right as the fleet changes.

moe2ctl serve --dataset qa --app qa=0.05 --energy 2 --k 2
moe2ctl serve --policy /etc/moe2/serve.toml --dry-run     # print what it would push
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import click

from moe2.controller.collect import CollectSettings, collect_options
from moe2.controller.options import (
    broker_from_flags,
    broker_options,
    db_option,
    emit,
    json_option,
    registry_url,
    signing_key,
)
from moe2.controller.serve.policy import ServePolicy
from moe2.shared.errors import ConfigError
from moe2.shared.settings import collect_overrides, load_settings, settings_options

log = logging.getLogger(__name__)


def _apps(specs: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise click.BadParameter(
                f"{spec!r}: expected APP=SECONDS, e.g. qa=0.05", param_hint="--app"
            )
    return out


@click.command("serve")
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TOML file with the serve policy (flags override it).",
)
@click.option(
    "--app",
    "app_limits",
    multiple=True,
    metavar="APP=SECONDS",
    help="An application and its delay limit per answer step; repeatable.",
)
@settings_options(ServePolicy)
@collect_options
@click.option("--dry-run", is_flag=True, help="Decide and record, but push nothing.")
@click.option("--holder", default=None, help="This process's name in the lease [default: random].")
@click.option(
    "--stats-window-s",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="The gateways' figures window (their --gateway-stats-window-s).",
)
@db_option
@broker_options
@json_option
def serve_cmd(
    policy_file: Path | None,
    app_limits: tuple[str, ...],
    dry_run: bool,
    holder: str | None,
    stats_window_s: float,
    db_url: str | None,
    as_json: bool,
    **kw: Any,
) -> None:
    """Watch the fleet; re-optimise and push when something that matters changes (an
    assigned expert offline or back, an agent joining, a profile or link moving, a measured
    delay above a limit). One serve acts at a time (a lease in the registry); every
    decision is recorded there. Stops on SIGTERM or Ctrl-C."""
    from moe2.controller.serve.reconcile import Reconciler

    broker = broker_from_flags(kw)
    scoring = {k: kw.pop(k) for k in list(kw) if k in CollectSettings.model_fields}
    overrides = collect_overrides(kw)
    if any(v is not None for v in scoring.values()):
        overrides["scoring"] = collect_overrides(scoring)
    if app_limits:
        overrides["apps"] = _apps(app_limits)
    try:
        policy = load_settings(ServePolicy, file=policy_file, overrides=overrides)
    except ConfigError as exc:
        raise click.UsageError(exc.message) from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def echo(decision: dict[str, Any]) -> None:
        emit(
            decision,
            as_json,
            lambda d: (
                f"{d['action']:<10} {d['app'] or '-':<12} "
                + (f"v{d['version']} " if d["version"] else "")
                + (f"{','.join(d['subset'])} " if d["subset"] else "")
                + f"({d['reason']})"
            ),
        )

    reconciler = Reconciler(
        broker,
        registry_url(db_url),
        policy,
        holder=holder,
        dry_run=dry_run,
        stats_window_s=stats_window_s,
        echo=echo,
        signer=signing_key(),
    )
    log.info("serve %s: %s", reconciler.holder, policy.model_dump_json())
    reconciler.run(stop)
