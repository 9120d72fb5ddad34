"""The list of ``moe2ctl`` sub-commands, each defined next to the concept it drives."""

from __future__ import annotations

import click

from moe2.controller.agents import agents_cmd, profile_cmd
from moe2.controller.ask import ask
from moe2.controller.demo import demo
from moe2.controller.experts.cli import models
from moe2.controller.optimize.cli import optimize
from moe2.controller.push import push

COMMANDS: list[click.Command] = [ask, push, demo, models, agents_cmd, profile_cmd, optimize]

# Registry, score collection and the gate (issue 5).
from moe2.controller.collect import collect_cmd  # noqa: E402
from moe2.controller.gate.cli import export_cmd, push_gate_cmd, train_cmd  # noqa: E402
from moe2.controller.registry.cli import datasets_cmd, db_cmd, sync_cmd  # noqa: E402

COMMANDS += [db_cmd, sync_cmd, datasets_cmd, collect_cmd, train_cmd, export_cmd, push_gate_cmd]

# Evaluation (issue 16).
from moe2.controller.evaluate.cli import eval_cmd  # noqa: E402

COMMANDS += [eval_cmd]

# The self-healing controller (issue 13).
from moe2.controller.serve.cli import serve_cmd  # noqa: E402

COMMANDS += [serve_cmd]

# Hardening (issue 12): the fleet key that signs desired state.
from moe2.controller.keys import keys_cmd  # noqa: E402

COMMANDS += [keys_cmd]

# Domain experts: clusters, LoRA fine-tuning, adapters (issue 11).
from moe2.controller.experts.experts_cli import experts  # noqa: E402

COMMANDS += [experts]
