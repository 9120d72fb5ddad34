"""The list of ``moe2ctl`` sub-commands, each defined next to the concept it drives."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
