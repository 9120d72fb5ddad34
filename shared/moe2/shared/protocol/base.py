"""Schema version, names and the JSON envelope every moe2 message shares."""

from __future__ import annotations

import re
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from moe2.shared.errors import BadMessage, MessageTooLarge, UnsupportedVersion

SCHEMA_VERSION: Final = 1
TOPIC_ROOT = "moe2/v1"

# Agent ids and application names become topic levels: no wildcards, no slashes.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)

# Hard ceilings that hold whatever the configuration says (a peer cannot ask for more).
MAX_TOP_K = 4096
MAX_TOKENS_PER_REQUEST = 131072
MAX_TEXT_CHARS = 1_000_000
MAX_CHOICES = 64  # options of one multiple-choice prompt (and of one score_choices request)


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise BadMessage(
            f"invalid {kind} {value!r}: expected 1-64 characters of letters, digits, '_', '.', "
            "'-', starting with a letter or digit"
        )
    return value


class Message(BaseModel):
    """Base of every payload: strict shape, schema version first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = SCHEMA_VERSION


_json_object: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])


def parse_envelope(payload: bytes | bytearray, max_bytes: int) -> dict[str, Any]:
    """The JSON object of a payload, after the size and schema-version checks."""
    if len(payload) > max_bytes:
        raise MessageTooLarge(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        obj = _json_object.validate_json(payload)
    except ValidationError as exc:
        raise BadMessage(f"payload is not a JSON object: {describe_error(exc)}") from None
    version = obj.get("v")
    if version != SCHEMA_VERSION:
        raise UnsupportedVersion(
            f"schema version {version!r} is not supported; this peer speaks v={SCHEMA_VERSION}"
        )
    return obj


def describe_error(exc: ValidationError) -> str:
    errs = exc.errors(include_url=False)
    if not errs:
        return str(exc)
    e = errs[0]
    where = ".".join(str(p) for p in e.get("loc", ()))
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{where + ': ' if where else ''}{e.get('msg', '')}{more}"


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json(exclude_none=True).encode()


def decode_message(
    model: type[Message], payload: bytes | bytearray, max_bytes: int = 1 << 20
) -> Any:
    """Validate an announcement (AgentInfo, AgentStatus...) from its payload."""
    obj = parse_envelope(payload, max_bytes)
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise BadMessage(f"invalid {model.__name__}: {describe_error(exc)}") from None
