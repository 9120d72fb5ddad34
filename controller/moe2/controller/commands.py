"""The list of ``moe2ctl`` sub-commands, each defined next to the concept it drives."""

from __future__ import annotations

import click

from moe2.controller.ask import ask
from moe2.controller.assignments import push
from moe2.controller.demo import demo
from moe2.controller.experts.cli import models
from moe2.controller.fleet import agents_cmd, profile_cmd
from moe2.controller.optimize.cli import optimize

COMMANDS: list[click.Command] = [ask, push, demo, models, agents_cmd, profile_cmd, optimize]
