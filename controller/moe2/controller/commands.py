"""The list of ``moe2ctl`` sub-commands, each defined next to the concept it drives."""

from __future__ import annotations

import click

from moe2.controller.experts.cli import models
from moe2.controller.fleet import agents_cmd, profile_cmd

COMMANDS: list[click.Command] = [models, agents_cmd, profile_cmd]
