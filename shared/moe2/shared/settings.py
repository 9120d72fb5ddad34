"""Typed configuration loading: one pydantic model per process, filled from (lowest first)
defaults, a TOML file, ``MOE2_*`` environment variables and command-line flags, validated
once at the entry point and passed down.

The CLI flags come from the model itself (``settings_options``), so a field's bounds and help
text are written once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import click
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from moe2.shared.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Jetson images ship Python 3.10
    import tomli as tomllib

M = TypeVar("M", bound=BaseModel)
F = TypeVar("F", bound=Callable[..., Any])


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
            return data
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None


def _env_values(model: type[BaseModel], prefix: str) -> dict[str, Any]:
    """``PREFIX_FIELD`` variables for flat fields, ``PREFIX_SECTION__FIELD`` for nested ones."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            nested = _env_values(ann, f"{prefix}{name.upper()}__")
            if nested:
                out[name] = nested
            continue
        key = f"{prefix}{name.upper()}"
        if key in os.environ:
            out[name] = os.environ[key]
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_settings(
    model: type[M],
    *,
    file: Path | None = None,
    env_prefix: str = "",
    overrides: dict[str, Any] | None = None,
) -> M:
    """Build and validate the settings model; a ConfigError names each bad field."""
    data: dict[str, Any] = {}
    if file is not None:
        data = _merge(data, read_toml(file))
    if env_prefix:
        data = _merge(data, _env_values(model, env_prefix))
    if overrides:
        data = _merge(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        where = f" (from {file})" if file else ""
        raise ConfigError(f"invalid configuration{where}: {problems}") from None


def _click_type(annotation: Any) -> Any:
    origin = get_origin(annotation)
    if origin is not None:  # Optional[X], Literal[...], X | None
        args = [a for a in get_args(annotation) if a is not type(None)]
        if all(isinstance(a, str) for a in args):
            return click.Choice(args)
        if len(args) == 1:
            return _click_type(args[0])
        return str
    if annotation in (int, float, str, bool):
        return annotation
    if annotation is Path:
        return click.Path(path_type=Path)
    return str


def settings_options(model: type[BaseModel], section: str | None = None) -> Callable[[F], F]:
    """Click options for the model's scalar fields: ``--n-ctx`` for ``n_ctx`` (or
    ``--broker-port`` for ``broker.port`` when ``section`` is given). Unset flags are None,
    so they do not override the file or environment."""

    def decorate(fn: F) -> F:
        for name, field in reversed(list(model.model_fields.items())):
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                continue  # a section of its own
            if get_origin(ann) in (dict, list):
                continue  # structured: configuration file only
            flag = f"--{(section + '-') if section else ''}{name.replace('_', '-')}"
            dest = f"{section}__{name}" if section else name
            ctype = _click_type(ann)
            default_txt = (
                ""
                if field.default is None or field.default is PydanticUndefined
                else f" [default: {field.default}]"
            )
            help_txt = (field.description or "") + default_txt
            if ctype is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", dest, default=None, help=help_txt)(fn)
            else:
                fn = click.option(flag, dest, type=ctype, default=None, help=help_txt)(fn)
        return fn

    return decorate


def collect_overrides(values: dict[str, Any]) -> dict[str, Any]:
    """Nest the flags that were given: ``{"broker__port": 1}`` -> ``{"broker": {"port": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if "__" in key:
            section, name = key.split("__", 1)
            out.setdefault(section, {})[name] = value
        else:
            out[key] = value
    return out
