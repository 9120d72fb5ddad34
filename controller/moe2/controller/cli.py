"""``moe2ctl``: the control-plane CLI.

Every command that reports something takes ``--json``. Errors from the moe2 error tree become
a one-line message on stderr and a non-zero exit status here, and nowhere else.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from moe2.controller.options import EXIT_FAILED, EXIT_NOT_ACKED
from moe2.controller.settings import ControllerSettings
from moe2.shared.errors import ConfigError, Moe2Error, NotAcknowledged


class Moe2Group(click.Group):
    """Turns moe2 errors into a clear message and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NotAcknowledged as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(EXIT_NOT_ACKED)
        except Moe2Error as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(EXIT_FAILED)


@click.group(cls=Moe2Group)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Controller configuration file (TOML) [default: $MOE2_CONFIG, else "
    "~/.config/moe2/controller.toml when it exists]; MOE2_* variables and flags override it.",
)
@click.version_option(package_name="moe2-edge-controller")
@click.pass_context
def main(ctx: click.Context, verbose: int, config_file: Path | None) -> None:
    """moe2 control plane: fleet, experts, gate, optimisation, demo."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        ctx.obj = ControllerSettings.load(config_file)
    except ConfigError as exc:
        raise click.UsageError(exc.message) from None


def _register() -> None:
    # Each concept contributes its commands from its own module.
    from moe2.controller import commands

    for cmd in commands.COMMANDS:
        main.add_command(cmd)


_register()
