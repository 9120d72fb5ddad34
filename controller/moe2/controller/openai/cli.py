"""``moe2-http``: serve the OpenAI-compatible API over the fleet's MQTT prompt API.

moe2-http --api-keys-file /etc/moe2/http-keys --broker-host 10.0.0.2
MOE2_HTTP_API_KEYS=sk-1,sk-2 moe2-http --host 0.0.0.0 --port 8000
moe2-http --config /etc/moe2/http.toml
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import click

from moe2.controller.openai.settings import HttpSettings
from moe2.shared.errors import ConfigError, Moe2Error
from moe2.shared.logs import LOG_FORMATS, setup_logging
from moe2.shared.mqtt import BrokerConfig
from moe2.shared.settings import collect_overrides, load_settings, settings_options

log = logging.getLogger(__name__)


@click.command(context_settings={"max_content_width": 100})
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML settings file (MOE2_HTTP_* variables and flags override it).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True)
@settings_options(HttpSettings)
@settings_options(BrokerConfig, section="broker")
@click.version_option(package_name="moe2-edge-controller")
def main(config_file: Path | None, log_level: str, log_format: str, **flags: Any) -> None:
    """Serve /v1/chat/completions, /v1/completions and /v1/models for the moe2 fleet, the
    fleet page (/fleet), /metrics, /health and /ready."""
    setup_logging(log_level, log_format)
    try:
        settings = load_settings(
            HttpSettings,
            file=config_file or _env_file(),
            env_prefix="MOE2_HTTP_",
            overrides=collect_overrides(flags),
        )
    except ConfigError as exc:
        raise click.UsageError(exc.message) from None
    try:
        serve(settings)
    except Moe2Error as exc:
        raise click.ClickException(exc.message) from None


def _env_file() -> Path | None:
    value = os.environ.get("MOE2_HTTP_CONFIG")
    return Path(value) if value else None


def serve(settings: HttpSettings) -> None:
    from moe2.controller.openai.app import FLEET_KINDS, Front, build_app
    from moe2.controller.openai.server import run
    from moe2.shared.client import PromptClient
    from moe2.shared.fleet import FleetView
    from moe2.shared.mqtt import Connection

    fleet_conn = Connection(settings.broker, f"moe2-http-fleet-{os.getpid()}")
    fleet = FleetView(fleet_conn, FLEET_KINDS)
    # On a broker with logins a client reads only moe2/v1/replies/<its user>/#: the answers'
    # inbox is named after the user then (one moe2-http per broker user).
    client_id = settings.broker.username or f"moe2-http-{os.getpid()}"
    with PromptClient(settings.broker, client_id) as client:
        fleet_conn.start()
        try:
            app = build_app(Front(settings, client, fleet))
            log.info(
                "OpenAI-compatible API on http://%s:%d/v1, fleet page /fleet, metrics /metrics "
                "(%s)",
                settings.host,
                settings.port,
                "no API keys" if settings.no_auth else f"{len(settings.accepted_keys())} API keys",
            )
            run(app, settings)
        finally:
            fleet_conn.stop()
