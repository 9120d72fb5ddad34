"""``moe2-agent``: run one edge agent.

moe2-agent --model models/tiny-code.gguf --id code-1 --broker-port 1883
moe2-agent --config /etc/moe2/agent.toml
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import click

from moe2.agent.backend import BACKENDS, open_backend
from moe2.agent.config import AgentConfig, ProfileConfig
from moe2.agent.gateway.config import GatewayConfig
from moe2.shared.errors import ConfigError, Moe2Error
from moe2.shared.logs import LOG_FORMATS, setup_logging
from moe2.shared.mqtt import BrokerConfig
from moe2.shared.settings import collect_overrides, load_settings, settings_options


@click.command(context_settings={"show_default": False, "max_content_width": 100})
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML configuration file (flags and MOE2_AGENT_* variables override it).",
)
@click.option(
    "--backend",
    type=click.Choice(sorted(BACKENDS)),
    default="llama.cpp",
    show_default=True,
    help="Inference engine.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    help="text for people, json for log collectors (one object per line).",
)
@settings_options(AgentConfig)
@settings_options(BrokerConfig, section="broker")
@settings_options(ProfileConfig, section="profile")
@settings_options(GatewayConfig, section="gateway")
@click.option(
    "--serve-app",
    "serve_apps",
    multiple=True,
    metavar="APP=ID,ID[:K]",
    help="Gateway: serve APP with these experts (top-K, default 2) until the "
    "controller pushes an assignment; repeatable. Implies --gateway-enabled.",
)
@click.version_option(package_name="moe2-edge-agent")
def main(
    config_file: Path | None,
    backend: str,
    log_level: str,
    log_format: str,
    serve_apps: tuple[str, ...],
    **flags: Any,
) -> None:
    """Serve a GGUF model's next-token distributions over MQTT."""
    setup_logging(log_level, log_format)
    overrides = collect_overrides(flags)
    if serve_apps:
        gw = overrides.setdefault("gateway", {})
        gw["apps"] = _parse_apps(serve_apps)
        gw.setdefault("enabled", True)
    try:
        config = load_settings(
            AgentConfig, file=config_file, env_prefix="MOE2_AGENT_", overrides=overrides
        )
    except ConfigError as exc:
        raise click.UsageError(exc.message) from None

    from moe2.agent.daemon import Agent

    try:
        agent = Agent(config, open_backend(backend, config))
    except Moe2Error as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)

    def _stop(signum: int, frame: Any) -> None:
        agent.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        agent.start()
    except Moe2Error as exc:
        click.echo(f"error: {exc.message}", err=True)
        agent.stop()
        sys.exit(1)
    agent.wait()


def _parse_apps(specs: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    apps: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        members, _, k = rest.partition(":")
        subset = [m for m in members.split(",") if m]
        if not sep or not name or not subset or (k and not k.isdigit()):
            raise click.BadParameter(
                f"{spec!r}: expected APP=ID,ID[:K], e.g. qa=tiny-code,tiny-animals:2",
                param_hint="--serve-app",
            )
        apps[name] = {"subset": subset, "k": int(k) if k else 2}
    return apps
