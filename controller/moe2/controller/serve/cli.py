"""``moe2ctl serve``: keep the fleet's assignments right as the fleet changes.

moe2ctl serve --dataset qa --app qa=0.05 --energy 2 --k 2
moe2ctl serve --policy /etc/moe2/serve.toml --dry-run     # print what it would push
moe2ctl serve --policy serve.toml --log-format json --metrics-port 9465

``--metrics-port`` serves Prometheus metrics: ``moe2_serve_decisions_total{action}``,
``moe2_serve_last_decision_timestamp_seconds{action}`` and the process's own.
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
from moe2.shared.logs import LOG_FORMATS, setup_logging
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
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    help="json: one JSON object per log line (for journald and log collectors).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics on this port (decisions by action, the process).",
)
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address of /metrics.")
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
    log_format: str,
    metrics_port: int | None,
    metrics_host: str,
    db_url: str | None,
    as_json: bool,
    **kw: Any,
) -> None:
    """Watch the fleet; re-optimise and push when something that matters changes (an
    assigned expert offline or back, an agent joining, a profile or link moving, a measured
    delay above a limit). One serve acts at a time (a lease in the registry); every
    decision is recorded there. Stops on SIGTERM or Ctrl-C."""
    from moe2.controller.serve.reconcile import Reconciler

    root = logging.getLogger()
    setup_logging(logging.getLevelName(root.level).lower(), log_format)
    decisions = _DecisionMetrics(metrics_host, metrics_port) if metrics_port is not None else None
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
        if decisions is not None:
            decisions.seen(str(decision["action"]))
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
    try:
        reconciler.run(stop)
    finally:
        if decisions is not None:
            decisions.close()


class _DecisionMetrics:
    """``/metrics`` of ``moe2ctl serve``: its decisions by action, and the process."""

    def __init__(self, host: str, port: int) -> None:
        from prometheus_client import (
            PLATFORM_COLLECTOR,
            PROCESS_COLLECTOR,
            CollectorRegistry,
            Counter,
            Gauge,
            start_http_server,
        )

        registry = CollectorRegistry()
        registry.register(PROCESS_COLLECTOR)
        registry.register(PLATFORM_COLLECTOR)
        self.decisions = Counter(
            "moe2_serve_decisions",
            "decisions of moe2ctl serve, by action (pushed, unchanged, infeasible, failed...)",
            ["action"],
            registry=registry,
        )
        self.last = Gauge(
            "moe2_serve_last_decision_timestamp_seconds",
            "unix time of the last decision of each action",
            ["action"],
            registry=registry,
        )
        try:
            self.server, _thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from None
        log.info("metrics on http://%s:%d/metrics", host, self.server.server_address[1])

    def seen(self, action: str) -> None:
        self.decisions.labels(action).inc()
        self.last.labels(action).set_to_current_time()

    def close(self) -> None:
        self.server.shutdown()
