"""``moe2ctl``: the control-plane CLI.

Every command that reports something takes ``--json``. Errors from the moe2 error tree become
a one-line message on stderr and a non-zero exit status here, and nowhere else.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from moe2.controller.options import (  # noqa: F401  (re-exported for command modules)
    EXIT_FAILED,
    EXIT_INFEASIBLE,
    broker_from_flags,
    broker_options,
    emit,
    json_option,
)
from moe2.shared.errors import Moe2Error


class Moe2Group(click.Group):
    """Turns moe2 errors into a clear message and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Moe2Error as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(EXIT_FAILED)


@click.group(cls=Moe2Group)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="moe2-edge-controller")
def main(verbose: int) -> None:
    """moe2 control plane: fleet, experts, gate, optimisation, demo."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _register() -> None:
    # Each concept contributes its commands from its own module.
    from moe2.controller import commands

    for cmd in commands.COMMANDS:
        main.add_command(cmd)


_register()
