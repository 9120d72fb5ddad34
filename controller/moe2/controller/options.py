"""Options and output helpers every ``moe2ctl`` command shares (kept apart from ``cli`` so
that command modules can import them without importing the command group).

The controller's settings (``settings.py``) are loaded once by the ``moe2ctl`` group and
reach each command through the click context; ``--db`` and ``--broker-*`` flags of a command
override them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from moe2.controller.settings import ControllerSettings
from moe2.shared.desired import DesiredState
from moe2.shared.mqtt import BrokerConfig
from moe2.shared.settings import collect_overrides, load_settings, settings_options
from moe2.shared.signing import Signer

if TYPE_CHECKING:
    from moe2.controller.registry.db import Registry

F = TypeVar("F", bound=Callable[..., Any])

# Exit statuses: 0 ok, 1 the operation failed (moe2 error), 2 usage error (click's),
# 3 the problem has no feasible answer (optimize), 4 desired state pushed but no gateway
# acknowledged it (push, push-gate, optimize --push).
EXIT_FAILED = 1
EXIT_INFEASIBLE = 3
EXIT_NOT_ACKED = 4


def settings() -> ControllerSettings:
    """The settings the ``moe2ctl`` group loaded (loaded now when a command runs alone)."""
    ctx = click.get_current_context(silent=True)
    found = ctx.find_object(ControllerSettings) if ctx is not None else None
    if found is None:
        found = ControllerSettings.load()
        if ctx is not None:
            ctx.obj = found
    return found


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(fn)


def db_option(fn: F) -> F:
    return click.option(
        "--db",
        "db_url",
        default=None,
        help="Registry URL (sqlite:///FILE or postgresql://...) [default: $MOE2_DB_URL, the "
        "configuration file's db_url, or SQLite in the data folder]",
    )(fn)


def registry_url(db_url: str | None) -> str:
    return db_url or settings().registry_url


def open_registry(db_url: str | None) -> Registry:
    from moe2.controller.registry.db import Registry

    return Registry.open(registry_url(db_url))


def broker_options(fn: F) -> F:
    """``--broker-host``, ``--broker-port``... over the settings' broker section."""
    return settings_options(BrokerConfig, section="broker")(fn)


def broker_from_flags(kwargs: dict[str, Any]) -> BrokerConfig:
    """Pop the ``broker__*`` flag values out of a command's kwargs into a BrokerConfig."""
    flags = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("broker__")}
    overrides = collect_overrides(flags).get("broker", {})
    base = settings().broker.model_dump(exclude_unset=True)
    return load_settings(BrokerConfig, overrides={**base, **overrides})


def signing_key() -> Signer | None:
    """The fleet key that signs desired state, when the settings name or find one."""
    key = settings().signing_key_path
    return Signer.load(key) if key is not None else None


def desired_state(broker: BrokerConfig) -> DesiredState:
    """The publisher of desired state, signing with the fleet key when there is one."""
    return DesiredState(broker, signer=signing_key())


def emit(obj: Any, as_json: bool, human: Callable[[Any], str] | None = None) -> None:
    if as_json or human is None:
        click.echo(json.dumps(obj, indent=None if as_json else 2, default=str))
    else:
        click.echo(human(obj))
