"""Versioned schema migrations, recorded in ``schema_version``.

A new database gets the current schema at once and is stamped ``LATEST``. An older one runs
every step after its version, in order, in one transaction each. A change to a table is a new
step here written against the schema before it (never an edit of the models alone).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, Engine, inspect, text
from sqlmodel import SQLModel

from moe2.controller.registry import schema
from moe2.shared.errors import ConfigError


def _v2(conn: Connection) -> None:
    """Embedding cache table; datasets.description."""
    schema.EmbeddingCache.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]
    cols = {c["name"] for c in inspect(conn).get_columns("datasets")}
    if "description" not in cols:
        conn.execute(text("ALTER TABLE datasets ADD COLUMN description VARCHAR"))


def _v3(conn: Connection) -> None:
    """moe2ctl serve: decisions and leases."""
    for model in (schema.Decision, schema.Lease):
        SQLModel.metadata.tables[str(model.__tablename__)].create(conn, checkfirst=True)


def _v4(conn: Connection) -> None:
    """Domain experts: clusterings, their members, LoRA expert adapters."""
    for name in ("clusterings", "cluster_members", "expert_adapters"):
        SQLModel.metadata.tables[name].create(conn, checkfirst=True)


def _v5(conn: Connection) -> None:
    """scores.prompt_tokens: each expert's real prompt length, for the cost model."""
    cols = {c["name"] for c in inspect(conn).get_columns("scores")}
    if "prompt_tokens" not in cols:
        conn.execute(text("ALTER TABLE scores ADD COLUMN prompt_tokens INTEGER"))


# version -> step that brings the schema from version-1 to version
STEPS: dict[int, Callable[[Connection], None]] = {2: _v2, 3: _v3, 4: _v4, 5: _v5}
LATEST = max(STEPS)


def current_version(engine: Engine) -> int | None:
    if not inspect(engine).has_table("schema_version"):
        return None
    with engine.connect() as conn:
        row = conn.execute(text("SELECT version FROM schema_version WHERE id = 1")).first()
    return None if row is None else int(row[0])


def _stamp(conn: Connection, version: int) -> None:
    updated = conn.execute(
        text("UPDATE schema_version SET version = :v WHERE id = 1"), {"v": version}
    ).rowcount
    if not updated:
        conn.execute(
            text("INSERT INTO schema_version (id, version) VALUES (1, :v)"), {"v": version}
        )


def migrate(engine: Engine) -> tuple[int | None, int]:
    """Bring the database to ``LATEST``; returns (version before, version after)."""
    before = current_version(engine)
    if before is None:
        if inspect(engine).get_table_names():
            raise ConfigError(
                "the database has tables but no moe2 schema_version: point MOE2_DB_URL at an "
                "empty database or a moe2 registry"
            )
        with engine.begin() as conn:
            SQLModel.metadata.create_all(conn, tables=schema.TABLES)
            _stamp(conn, LATEST)
        return None, LATEST
    if before > LATEST:
        raise ConfigError(
            f"the registry has schema version {before}, newer than this moe2ctl's {LATEST}: "
            "upgrade moe2ctl"
        )
    for version in range(before + 1, LATEST + 1):
        with engine.begin() as conn:
            STEPS[version](conn)
            _stamp(conn, version)
    return before, LATEST
