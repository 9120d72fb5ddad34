"""Registry tables (sqlmodel). One row type per concept the controller remembers.

JSON-valued columns are plain text holding JSON, so the same schema works on SQLite and
PostgreSQL; the ``Registry`` methods encode and decode them.
"""

from __future__ import annotations

import time

from sqlalchemy import Column, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def _now() -> float:
    return time.time()


class SchemaVersion(SQLModel, table=True):
    __tablename__ = "schema_version"

    id: int = Field(default=1, primary_key=True)
    version: int


class Agent(SQLModel, table=True):
    """An agent as its retained info/status/profile messages describe it."""

    __tablename__ = "agents"

    id: str = Field(primary_key=True)
    model: str = ""
    model_sha256: str | None = None
    architecture: str = ""
    tokenizer_hash: str = ""
    n_vocab: int = 0
    device_class: str = ""
    state: str = "unknown"  # online | offline | unknown
    info_json: str | None = Field(default=None, sa_column=Column(Text))
    profile_json: str | None = Field(default=None, sa_column=Column(Text))
    last_seen: float = Field(default_factory=_now)  # unix seconds


class Dataset(SQLModel, table=True):
    __tablename__ = "datasets"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True)
    kind: str  # "multiple-choice" | "free-answer"
    source: str  # where it was loaded from
    n_samples: int = 0
    created_at: float = Field(default_factory=_now)
    description: str | None = None  # added by migration 2


class Sample(SQLModel, table=True):
    """A prompt with its candidate targets; free-answer samples have one target."""

    __tablename__ = "samples"
    __table_args__ = (UniqueConstraint("dataset_id", "idx"),)

    id: int | None = Field(default=None, primary_key=True)
    dataset_id: int = Field(foreign_key="datasets.id", index=True)
    idx: int  # position in the dataset
    app: str = Field(index=True)  # application label
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    targets_json: str = Field(sa_column=Column(Text, nullable=False))  # JSON list[str]
    answer: int = 0  # index of the correct target


class Score(SQLModel, table=True):
    """Teacher-forced log-probabilities of one target of one sample under one expert."""

    __tablename__ = "scores"
    __table_args__ = (UniqueConstraint("sample_id", "expert", "option"),)

    id: int | None = Field(default=None, primary_key=True)
    sample_id: int = Field(foreign_key="samples.id", index=True)
    expert: str = Field(index=True)  # agent id
    option: int = 0  # index into the sample's targets
    tokenizer_hash: str
    tokens_json: str = Field(sa_column=Column(Text, nullable=False))  # JSON list[int]
    logprobs_json: str = Field(sa_column=Column(Text, nullable=False))  # JSON list[float], nats
    compute_ms: float = 0.0
    # The prompt's length in this expert's tokens (BOS included), what scoring and answering
    # it costs; NULL for scores stored before migration 5 (``moe2ctl collect`` fills them in).
    prompt_tokens: int | None = None
    created_at: float = Field(default_factory=_now)


class GateVersion(SQLModel, table=True):
    __tablename__ = "gate_versions"

    version: str = Field(primary_key=True)
    sha256: str | None = None  # gate_digest of its manifest, once exported
    experts_json: str = Field(sa_column=Column(Text, nullable=False))
    datasets_json: str = Field(sa_column=Column(Text, nullable=False))
    config_json: str = Field(sa_column=Column(Text, nullable=False))
    metrics_json: str = Field(sa_column=Column(Text, nullable=False))
    artefact_dir: str  # checkpoint, ONNX files and manifest
    created_at: float = Field(default_factory=_now)
    pushed_at: float | None = None


class OptimisationRun(SQLModel, table=True):
    __tablename__ = "optimisation_runs"

    id: int | None = Field(default=None, primary_key=True)
    gate_version: str | None = None
    problem_path: str | None = None
    result_json: str = Field(sa_column=Column(Text, nullable=False))
    created_at: float = Field(default_factory=_now)


class Assignment(SQLModel, table=True):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("app", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    app: str = Field(index=True)
    version: int
    subset_json: str = Field(sa_column=Column(Text, nullable=False))
    k: int
    gate_version: str | None = None
    gate_sha256: str | None = None
    pushed_at: float = Field(default_factory=_now)


class AssignmentAckRow(SQLModel, table=True):
    __tablename__ = "assignment_acks"

    gateway: str = Field(primary_key=True)
    app: str = Field(primary_key=True)
    version: int = Field(primary_key=True)
    accepted: bool
    reason: str | None = None
    received_at: float = Field(default_factory=_now)


class GateAckRow(SQLModel, table=True):
    __tablename__ = "gate_acks"

    gateway: str = Field(primary_key=True)
    version: str = Field(primary_key=True)
    sha256: str
    state: str  # loaded | rejected
    reason: str | None = None
    received_at: float = Field(default_factory=_now)


class EmbeddingCache(SQLModel, table=True):
    """Sentence embeddings of prompts, so retraining skips the encoder (migration 2)."""

    __tablename__ = "embedding_cache"

    model: str = Field(primary_key=True)
    text_sha256: str = Field(primary_key=True)
    vector: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # (dim,) float32 LE


class Decision(SQLModel, table=True):
    """What ``moe2ctl serve`` decided and why (migration 3)."""

    __tablename__ = "decisions"

    id: int | None = Field(default=None, primary_key=True)
    at: float = Field(default_factory=_now, index=True)  # unix seconds
    controller: str  # the serve process that held the lease
    app: str | None = Field(default=None, index=True)
    action: str  # pushed | unchanged | dry-run | infeasible | failed | scored
    reason: str = Field(sa_column=Column(Text, nullable=False))  # what triggered it
    subset_json: str | None = Field(default=None, sa_column=Column(Text))  # JSON list[str]
    previous_json: str | None = Field(default=None, sa_column=Column(Text))
    version: int | None = None  # the pushed assignment's version
    detail_json: str = Field(default="{}", sa_column=Column(Text, nullable=False))


class Lease(SQLModel, table=True):
    """A named lease: only its holder acts until it expires (migration 3)."""

    __tablename__ = "leases"

    name: str = Field(primary_key=True)
    holder: str
    expires_at: float  # unix seconds


class ClusteringRow(SQLModel, table=True):
    """K-means over the sentence embeddings of a dataset's prompts (migration 4): the
    clusters domain experts are fine-tuned on."""

    __tablename__ = "clusterings"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True)
    dataset_id: int = Field(foreign_key="datasets.id", index=True)
    encoder: str  # embedding model, e.g. all-MiniLM-L6-v2
    k: int
    seed: int
    dim: int
    centroids: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # (k, dim) <f4
    metrics_json: str = Field(sa_column=Column(Text, nullable=False))
    created_at: float = Field(default_factory=_now)


class ClusterMember(SQLModel, table=True):
    """Which cluster each sample of the clustered dataset fell into (migration 4)."""

    __tablename__ = "cluster_members"

    clustering_id: int = Field(foreign_key="clusterings.id", primary_key=True)
    sample_id: int = Field(foreign_key="samples.id", primary_key=True)
    cluster: int = Field(index=True)


class ExpertAdapterRow(SQLModel, table=True):
    """A LoRA expert fine-tuned on one cluster, served as base GGUF + adapter (migration 4)."""

    __tablename__ = "expert_adapters"

    name: str = Field(primary_key=True)
    clustering_id: int | None = Field(default=None, foreign_key="clusterings.id")
    cluster: int | None = None
    base_path: str  # the base model it was trained on (GGUF file or HF folder)
    base_sha256: str | None = None  # of a GGUF base
    architecture: str
    adapter_path: str  # the LoRA GGUF
    adapter_sha256: str
    merged_path: str | None = None  # optional merged (quantised) GGUF
    split: str  # the data it was fine-tuned on, e.g. "benchmark:mmlu:split=train"
    config_json: str = Field(sa_column=Column(Text, nullable=False))
    metrics_json: str = Field(sa_column=Column(Text, nullable=False))
    created_at: float = Field(default_factory=_now)


TABLES = [
    SQLModel.metadata.tables[str(m.__tablename__)]
    for m in (
        SchemaVersion,
        Agent,
        Dataset,
        Sample,
        Score,
        GateVersion,
        OptimisationRun,
        Assignment,
        AssignmentAckRow,
        GateAckRow,
        EmbeddingCache,
        Decision,
        Lease,
        ClusteringRow,
        ClusterMember,
        ExpertAdapterRow,
    )
]
