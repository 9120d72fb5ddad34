"""``moe2ctl``: the control-plane CLI.

Every command that reports something takes ``--json``. Errors from the moe2 error tree become
a one-line message on stderr and a non-zero exit status here, and nowhere else.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from moe2.shared.errors import Moe2Error

F = TypeVar("F", bound=Callable[..., Any])

# Exit statuses: 0 ok, 1 the operation failed (moe2 error), 2 usage error (click's),
# 3 the problem has no feasible answer (optimize).
EXIT_FAILED = 1
EXIT_INFEASIBLE = 3


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(fn)


def emit(obj: Any, as_json: bool, human: Callable[[Any], str] | None = None) -> None:
    if as_json or human is None:
        click.echo(json.dumps(obj, indent=None if as_json else 2, default=str))
    else:
        click.echo(human(obj))


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
