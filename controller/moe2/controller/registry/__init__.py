"""The controller's registry (sqlmodel; SQLite by default, PostgreSQL by URL)."""

from moe2.controller.registry.db import DB_ENV, Registry, SampleRow, ScoreTable, default_url

__all__ = ["DB_ENV", "Registry", "SampleRow", "ScoreTable", "default_url"]
