"""The controller's registry (sqlmodel; SQLite by default, PostgreSQL by URL)."""

from moe2.controller.registry.db import (
    ClusteringRecord,
    Registry,
    SampleRow,
    ScoreTable,
    engine_for,
)

__all__ = ["ClusteringRecord", "Registry", "SampleRow", "ScoreTable", "engine_for"]
