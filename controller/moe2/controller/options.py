"""Options and output helpers every ``moe2ctl`` command shares (kept apart from ``cli`` so
that command modules can import them without importing the command group)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click
from pydantic import BaseModel

from moe2.shared.mqtt import BrokerConfig
from moe2.shared.settings import collect_overrides, load_settings, settings_options

F = TypeVar("F", bound=Callable[..., Any])

# Exit statuses: 0 ok, 1 the operation failed (moe2 error), 2 usage error (click's),
# 3 the problem has no feasible answer (optimize).
EXIT_FAILED = 1
EXIT_INFEASIBLE = 3


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(fn)


def broker_options(fn: F) -> F:
    """``--broker-host``, ``--broker-port``... (also ``MOE2_BROKER__HOST``... variables)."""
    return settings_options(BrokerConfig, section="broker")(fn)


def broker_from_flags(kwargs: dict[str, Any]) -> BrokerConfig:
    """Pop the ``broker__*`` flag values out of a command's kwargs into a BrokerConfig."""
    flags = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("broker__")}
    overrides = collect_overrides(flags).get("broker", {})
    env = load_settings(_Env, env_prefix="MOE2_").broker.model_dump(exclude_unset=True)
    return load_settings(BrokerConfig, overrides={**env, **overrides})


class _Env(BaseModel):
    broker: BrokerConfig = BrokerConfig()


def emit(obj: Any, as_json: bool, human: Callable[[Any], str] | None = None) -> None:
    if as_json or human is None:
        click.echo(json.dumps(obj, indent=None if as_json else 2, default=str))
    else:
        click.echo(human(obj))
