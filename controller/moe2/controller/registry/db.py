"""The registry: what the controller knows about its fleet, data, scores, gates and pushes.

reg = Registry.open("sqlite:///registry.db")   # or postgresql://...; moe2ctl: settings.py
ds = reg.add_dataset("tiny", "free-answer", "tiny-domains", samples)
reg.add_scores([...]); arrays = reg.score_table("tiny", ["a", "b"])
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import (
    Engine,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from moe2.controller.extras import require
from moe2.controller.registry import migrations
from moe2.controller.registry.schema import (
    Agent,
    Assignment,
    AssignmentAckRow,
    ClusteringRow,
    ClusterMember,
    Dataset,
    Decision,
    EmbeddingCache,
    ExpertAdapterRow,
    GateAckRow,
    GateVersion,
    Lease,
    OptimisationRun,
    Sample,
    Score,
)
from moe2.shared import protocol as p
from moe2.shared.errors import ConfigError


def engine_for(url: str) -> Engine:
    if url.startswith("postgresql"):
        require("psycopg", "postgres", "a PostgreSQL registry")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


# Keys per IN (...) clause: well below SQLite's 32,766 bound parameters and PostgreSQL's 65,535.
_IN_CHUNK = 500


def _chunks(keys: list[str]) -> list[list[str]]:
    return [keys[i : i + _IN_CHUNK] for i in range(0, len(keys), _IN_CHUNK)] or [[]]


@dataclass(frozen=True)
class SampleRow:
    id: int
    idx: int
    app: str
    prompt: str
    targets: list[str]
    answer: int


@dataclass
class ScoreTable:
    """Stored scores of a dataset as arrays, in the experts' order.

    ``logp[i][o]`` is a (experts, tokens) float64 array of target-token log-probabilities of
    option ``o`` of sample ``i`` (token counts are ragged across samples and options; across
    vocabularies each expert has its own count, padded with NaN to the longest).
    ``tokenizers[i]`` holds the tokenizer hashes stored with sample ``i``'s scores, per expert
    (a set: one hash unless the expert changed vocabulary between options); the one mixing
    rule (``moe2.controller.mixing``) decides per token or per sequence from them.
    ``prompt_tokens[i]`` is (experts,) the prompt's length in each expert's tokens, -1 where
    the scores predate it.
    """

    experts: list[str]
    samples: list[SampleRow]
    logp: list[list[np.ndarray]]
    tokenizers: list[list[frozenset[str]]]
    prompt_tokens: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class ClusteringRecord:
    """A stored clustering with its centroids decoded."""

    id: int
    name: str
    dataset: str
    encoder: str
    k: int
    seed: int
    centroids: np.ndarray  # (k, dim) float32
    metrics: dict[str, Any]
    created_at: float


class Registry:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, url: str, *, upgrade: bool = True) -> Registry:
        engine = engine_for(url)
        if upgrade:
            migrations.migrate(engine)
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # ------------------------------------------------------------------ agents

    def upsert_agent_info(self, info: p.AgentInfo) -> None:
        with self.session() as s:
            row = s.get(Agent, info.agent_id) or Agent(id=info.agent_id)
            row.model = info.model
            row.model_sha256 = info.model_sha256
            row.architecture = info.architecture
            row.tokenizer_hash = info.tokenizer_hash
            row.n_vocab = info.n_vocab
            row.device_class = info.device_class
            row.info_json = info.model_dump_json()
            row.last_seen = time.time()
            s.add(row)
            s.commit()

    def set_agent_state(self, agent_id: str, state: str) -> None:
        with self.session() as s:
            row = s.get(Agent, agent_id) or Agent(id=agent_id)
            row.state = state
            row.last_seen = time.time()
            s.add(row)
            s.commit()

    def set_agent_profile(self, profile: p.AgentProfile) -> None:
        with self.session() as s:
            row = s.get(Agent, profile.agent_id) or Agent(id=profile.agent_id)
            row.profile_json = profile.model_dump_json()
            s.add(row)
            s.commit()

    def store_agents(
        self,
        infos: Iterable[p.AgentInfo] = (),
        states: Mapping[str, str] | None = None,
        profiles: Iterable[p.AgentProfile] = (),
    ) -> int:
        """Write many agents' info, state (agent -> "online"/"offline") and profile in one
        transaction; the number of agent rows that changed (a row already holding what is
        given is not written, and keeps its ``last_seen``)."""
        by_id: dict[str, dict[str, Any]] = {}
        for info in infos:
            by_id.setdefault(info.agent_id, {}).update(
                model=info.model,
                model_sha256=info.model_sha256,
                architecture=info.architecture,
                tokenizer_hash=info.tokenizer_hash,
                n_vocab=info.n_vocab,
                device_class=info.device_class,
                info_json=info.model_dump_json(),
            )
        for agent_id, state in (states or {}).items():
            by_id.setdefault(agent_id, {})["state"] = state
        for prof in profiles:
            by_id.setdefault(prof.agent_id, {})["profile_json"] = prof.model_dump_json()
        if not by_id:
            return 0
        # Core statements, not ORM objects: a fleet's first sync writes thousands of rows.
        table = Agent.__table__  # type: ignore[attr-defined]
        columns = [c.name for c in table.columns]
        blank = Agent(id="")  # a new row's defaults, once
        defaults = {c: getattr(blank, c) for c in columns}
        now = time.time()
        ids = sorted(by_id)
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        with self.engine.begin() as conn:
            found: dict[str, dict[str, Any]] = {}
            for part in _chunks(ids):
                q = select(table).where(table.c.id.in_(part))
                found.update((r.id, dict(r._mapping)) for r in conn.execute(q))
            for agent_id in ids:
                fields = by_id[agent_id]
                old = found.get(agent_id)
                if old is None:
                    inserts.append(defaults | fields | {"id": agent_id, "last_seen": now})
                elif any(old[k] != v for k, v in fields.items()):
                    updates.append(
                        {f"new_{k}": v for k, v in (old | fields | {"last_seen": now}).items()}
                    )
            if inserts:
                conn.execute(insert(table), inserts)
            if updates:
                stmt = (
                    update(table)
                    .where(table.c.id == bindparam("new_id"))
                    .values({c: bindparam(f"new_{c}") for c in columns if c != "id"})
                )
                conn.execute(stmt, updates)
        return len(inserts) + len(updates)

    def agents(self, ids: Sequence[str] | None = None) -> list[Agent]:
        """Every agent row, or those of ``ids`` (a fleet's registry holds thousands)."""
        with self.session() as s:
            if ids is None:
                return list(s.execute(select(Agent).order_by(col(Agent.id))).scalars())
            out: list[Agent] = []
            for part in _chunks(sorted(set(ids))):
                q = select(Agent).where(col(Agent.id).in_(part)).order_by(col(Agent.id))
                out += s.execute(q).scalars()
            return sorted(out, key=lambda a: a.id)

    def agent_info(self, agent_id: str) -> p.AgentInfo | None:
        with self.session() as s:
            row = s.get(Agent, agent_id)
        if row is None or row.info_json is None:
            return None
        return p.AgentInfo.model_validate_json(row.info_json)

    # ------------------------------------------------------------------ datasets

    def add_dataset(
        self,
        name: str,
        kind: str,
        source: str,
        samples: Sequence[Any],
        description: str | None = None,
    ) -> Dataset:
        """Store a dataset once; adding the same name again returns the stored one when it
        has the same samples, and refuses when they differ."""
        with self.session() as s:
            old = s.execute(select(Dataset).where(col(Dataset.name) == name)).scalars().first()
            if old is not None:
                if old.n_samples != len(samples) or old.kind != kind:
                    raise ConfigError(
                        f"dataset {name!r} already exists with {old.n_samples} {old.kind} "
                        f"samples; pick another name"
                    )
                return old
            ds = Dataset(
                name=name,
                kind=kind,
                source=source,
                n_samples=len(samples),
                description=description,
            )
            s.add(ds)
            s.flush()
            rows = [
                {
                    "dataset_id": ds.id,
                    "idx": i,
                    "app": smp.app,
                    "prompt": smp.prompt,
                    "targets_json": json.dumps(list(smp.targets)),
                    "answer": smp.answer,
                }
                for i, smp in enumerate(samples)
            ]
            if rows:
                s.execute(insert(Sample.__table__), rows)  # type: ignore[attr-defined]
            s.commit()
            return ds

    def dataset(self, name: str) -> Dataset:
        with self.session() as s:
            ds = s.execute(select(Dataset).where(col(Dataset.name) == name)).scalars().first()
            if ds is None:
                names = [d.name for d in s.execute(select(Dataset)).scalars()]
                raise ConfigError(
                    f"no dataset {name!r} in the registry; known: {', '.join(names) or 'none'}"
                )
            return ds

    def datasets(self) -> list[Dataset]:
        with self.session() as s:
            return list(s.execute(select(Dataset).order_by(col(Dataset.id))).scalars())

    def samples(self, dataset: str) -> list[SampleRow]:
        ds = self.dataset(dataset)
        with self.session() as s:
            rows = s.execute(
                select(Sample).where(col(Sample.dataset_id) == ds.id).order_by(col(Sample.idx))
            ).scalars()
            return [
                SampleRow(int(r.id), r.idx, r.app, r.prompt, json.loads(r.targets_json), r.answer)
                for r in rows
            ]

    # ------------------------------------------------------------------ scores

    def scored(self, dataset: str, expert: str) -> set[tuple[int, int]]:
        """(sample id, option) pairs already scored by ``expert``."""
        ds = self.dataset(dataset)
        with self.session() as s:
            q = (
                select(col(Score.sample_id), col(Score.option))
                .join(Sample, col(Sample.id) == col(Score.sample_id))
                .where(col(Sample.dataset_id) == ds.id, col(Score.expert) == expert)
            )
            return {(int(a), int(b)) for a, b in s.execute(q)}

    def add_scores(self, rows: Iterable[dict[str, Any]]) -> int:
        """Insert score rows (keys as in ``Score``); all-or-nothing per call."""
        batch = [
            {
                "sample_id": r["sample_id"],
                "expert": r["expert"],
                "option": r["option"],
                "tokenizer_hash": r["tokenizer_hash"],
                "tokens_json": json.dumps(list(r["tokens"])),
                "logprobs_json": json.dumps([float(x) for x in r["logprobs"]]),
                "compute_ms": float(r.get("compute_ms", 0.0)),
                "prompt_tokens": r.get("prompt_tokens"),
                "created_at": time.time(),
            }
            for r in rows
        ]
        if not batch:
            return 0
        with self.session() as s:
            s.execute(insert(Score.__table__), batch)  # type: ignore[attr-defined]
            s.commit()
        return len(batch)

    def score_count(self, dataset: str) -> dict[str, int]:
        """Expert -> number of targets of ``dataset`` it scored (counted by the database)."""
        out: dict[str, int] = {}
        for (expert, _app), n in self.score_counts_by_app(dataset).items():
            out[expert] = out.get(expert, 0) + n
        return out

    def score_counts_by_app(
        self, dataset: str, experts: Sequence[str] | None = None
    ) -> dict[tuple[str, str], int]:
        """(expert, application) -> targets of that application's samples the expert scored
        (of ``experts``, default every one); compare with ``targets_by_app``."""
        ds = self.dataset(dataset)
        out: dict[tuple[str, str], int] = {}
        chunks = [None] if experts is None else _chunks(list(experts))
        with self.session() as s:
            for part in chunks:
                q = (
                    select(col(Score.expert), col(Sample.app), func.count())
                    .join(Sample, col(Sample.id) == col(Score.sample_id))
                    .where(col(Sample.dataset_id) == ds.id)
                    .group_by(col(Score.expert), col(Sample.app))
                )
                if part is not None:
                    q = q.where(col(Score.expert).in_(part))
                for expert, app, n in s.execute(q):
                    out[(str(expert), str(app))] = int(n)
        return out

    def targets_by_app(self, dataset: str) -> dict[str, tuple[int, int]]:
        """Application -> (samples, targets) of ``dataset``."""
        out: dict[str, tuple[int, int]] = {}
        for smp in self.samples(dataset):
            n, t = out.get(smp.app, (0, 0))
            out[smp.app] = (n + 1, t + len(smp.targets))
        return out

    def score_table(
        self,
        dataset: str,
        experts: Sequence[str] | None = None,
        apps: Sequence[str] | None = None,
    ) -> ScoreTable:
        """Arrays of the scores of ``experts`` (default: every expert that scored every
        target of the dataset) on the samples of ``apps`` (default: every sample); samples
        missing a score of one of them are left out."""
        samples = self.samples(dataset)
        if apps is not None:
            wanted = set(apps)
            samples = [smp for smp in samples if smp.app in wanted]
        ds = self.dataset(dataset)
        with self.session() as s:
            q = (
                select(
                    col(Score.sample_id),
                    col(Score.expert),
                    col(Score.option),
                    col(Score.logprobs_json),
                    col(Score.tokenizer_hash),
                    col(Score.prompt_tokens),
                )
                .join(Sample, col(Sample.id) == col(Score.sample_id))
                .where(col(Sample.dataset_id) == ds.id)
            )
            if apps is not None:
                q = q.where(col(Sample.app).in_(list(apps)))
            got: dict[tuple[int, str, int], list[float]] = {}
            hashes: dict[tuple[int, str, int], str] = {}
            lengths: dict[tuple[int, str], int] = {}  # (sample id, expert) -> prompt tokens
            # Only the experts asked for: a fleet's registry holds thousands of others.
            parts = [None] if experts is None else _chunks(list(experts))
            for part in parts:
                found = s.execute(q if part is None else q.where(col(Score.expert).in_(part)))
                for sid, e, o, lp, h, n in found:
                    got[(int(sid), e, int(o))] = json.loads(lp)
                    hashes[(int(sid), e, int(o))] = str(h)
                    if n is not None:
                        lengths[(int(sid), e)] = int(n)
        needed = sum(len(smp.targets) for smp in samples)
        if experts is None:
            counts: dict[str, int] = {}
            for _, e, _ in got:
                counts[e] = counts.get(e, 0) + 1
            experts = sorted(e for e, c in counts.items() if c == needed)
        experts = list(experts)
        kept: list[SampleRow] = []
        logp: list[list[np.ndarray]] = []
        tokenizers: list[list[frozenset[str]]] = []
        prompt_tokens: list[np.ndarray] = []
        for smp in samples:
            per_option: list[np.ndarray] = []
            for o in range(len(smp.targets)):
                rows = [got.get((smp.id, e, o)) for e in experts]
                if any(r is None for r in rows):
                    break
                width = max(len(r) for r in rows)  # type: ignore[arg-type]
                arr = np.full((len(experts), width), np.nan)
                for j, r in enumerate(rows):
                    arr[j, : len(r)] = r  # type: ignore[arg-type]
                per_option.append(arr)
            else:
                kept.append(smp)
                logp.append(per_option)
                options = range(len(smp.targets))
                tokenizers.append(
                    [frozenset(hashes[(smp.id, e, o)] for o in options) for e in experts]
                )
                prompt_tokens.append(
                    np.array([lengths.get((smp.id, e), -1) for e in experts], dtype=np.int64)
                )
        return ScoreTable(experts, kept, logp, tokenizers, prompt_tokens)

    def without_prompt_tokens(self, dataset: str, expert: str) -> set[int]:
        """Ids of the samples whose scores by ``expert`` lack the prompt's length."""
        ds = self.dataset(dataset)
        with self.session() as s:
            q = (
                select(col(Score.sample_id))
                .join(Sample, col(Sample.id) == col(Score.sample_id))
                .where(
                    col(Sample.dataset_id) == ds.id,
                    col(Score.expert) == expert,
                    col(Score.prompt_tokens).is_(None),
                )
            )
            return {int(a) for (a,) in s.execute(q)}

    def set_prompt_tokens(self, expert: str, lengths: Mapping[int, int]) -> None:
        """Store the prompt lengths (sample id -> tokens) of ``expert``'s scores."""
        with self.session() as s:
            for sid, n in lengths.items():
                s.execute(
                    update(Score)
                    .where(col(Score.sample_id) == sid, col(Score.expert) == expert)
                    .values(prompt_tokens=int(n))
                )
            s.commit()

    # ------------------------------------------------------------------ embeddings

    def cached_embeddings(self, model: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with self.session() as s:
            for i in range(0, len(keys), 500):
                part = list(keys[i : i + 500])
                q = select(col(EmbeddingCache.text_sha256), col(EmbeddingCache.vector)).where(
                    col(EmbeddingCache.model) == model,
                    col(EmbeddingCache.text_sha256).in_(part),
                )
                for k, v in s.execute(q):
                    out[k] = np.frombuffer(v, dtype="<f4").copy()
        return out

    def cache_embeddings(self, model: str, vectors: dict[str, np.ndarray]) -> None:
        rows = [
            {"model": model, "text_sha256": k, "vector": np.asarray(v, "<f4").tobytes()}
            for k, v in vectors.items()
        ]
        if rows:
            with self.session() as s:
                s.execute(insert(EmbeddingCache.__table__), rows)  # type: ignore[attr-defined]
                s.commit()

    # ------------------------------------------------------------------ gates

    def add_gate_version(self, gate: GateVersion) -> None:
        with self.session() as s:
            s.add(gate)
            s.commit()

    def gate_version(self, version: str | None = None) -> GateVersion:
        with self.session() as s:
            if version is None:
                row = (
                    s.execute(select(GateVersion).order_by(col(GateVersion.created_at).desc()))
                    .scalars()
                    .first()
                )
                if row is None:
                    raise ConfigError(
                        "no gate trained yet: run `moe2ctl train DATASET` first, or pass "
                        "--gate uniform to weigh every expert equally"
                    )
                return row
            row = s.get(GateVersion, version)
            if row is None:
                raise ConfigError(f"no gate version {version!r} in the registry")
            return row

    def update_gate(self, version: str, **fields: Any) -> None:
        with self.session() as s:
            row = s.get(GateVersion, version)
            if row is None:
                raise ConfigError(f"no gate version {version!r} in the registry")
            for k, v in fields.items():
                setattr(row, k, v)
            s.add(row)
            s.commit()

    def record_gate_ack(self, ack: p.GateAck) -> None:
        with self.session() as s:
            row = s.get(GateAckRow, (ack.gateway, ack.version)) or GateAckRow(
                gateway=ack.gateway, version=ack.version, sha256=ack.sha256, state=ack.state
            )
            row.sha256, row.state, row.reason = ack.sha256, ack.state, ack.reason
            row.received_at = time.time()
            s.add(row)
            s.commit()

    def record_acks(
        self, acks: Iterable[p.AssignmentAck] = (), gate_acks: Iterable[p.GateAck] = ()
    ) -> int:
        """Record many gateways' answers in one transaction; the number of rows written (an
        answer already recorded as it is is not written again)."""
        acks, gate_acks = list(acks), list(gate_acks)
        if not acks and not gate_acks:
            return 0
        now = time.time()
        written = 0
        with self.session() as s:
            for ack in acks:
                key = (ack.gateway, ack.app, ack.version)
                row = s.get(AssignmentAckRow, key)
                if row is not None and (row.accepted, row.reason) == (ack.accepted, ack.reason):
                    continue
                row = row or AssignmentAckRow(
                    gateway=ack.gateway, app=ack.app, version=ack.version, accepted=ack.accepted
                )
                row.accepted, row.reason, row.received_at = ack.accepted, ack.reason, now
                s.add(row)
                written += 1
            for gack in gate_acks:
                grow = s.get(GateAckRow, (gack.gateway, gack.version))
                same = (gack.sha256, gack.state, gack.reason)
                if grow is not None and (grow.sha256, grow.state, grow.reason) == same:
                    continue
                grow = grow or GateAckRow(
                    gateway=gack.gateway, version=gack.version, sha256=gack.sha256, state=gack.state
                )
                grow.sha256, grow.state, grow.reason = same
                grow.received_at = now
                s.add(grow)
                written += 1
            s.commit()
        return written

    def gate_acks(self, version: str) -> list[GateAckRow]:
        with self.session() as s:
            q = select(GateAckRow).where(col(GateAckRow.version) == version)
            return list(s.execute(q).scalars())

    # ------------------------------------------------------------------ assignments

    def add_assignment(self, a: p.AppAssignment) -> None:
        """Record a pushed assignment (its version comes from the fleet: ``moe2.shared.
        desired``; a version seen again, after a broker lost its state, replaces the row)."""
        with self.session() as s:
            q = select(Assignment).where(
                col(Assignment.app) == a.app, col(Assignment.version) == a.version
            )
            row = s.execute(q).scalars().first() or Assignment(
                app=a.app, version=a.version, subset_json="[]", k=a.k
            )
            row.subset_json = json.dumps(list(a.subset))
            row.k = a.k
            row.gate_version = a.gate.version if a.gate else None
            row.gate_sha256 = a.gate.sha256 if a.gate else None
            row.pushed_at = time.time()
            s.add(row)
            s.commit()

    def assignments(self, app: str) -> list[Assignment]:
        with self.session() as s:
            q = (
                select(Assignment)
                .where(col(Assignment.app) == app)
                .order_by(col(Assignment.version))
            )
            return list(s.execute(q).scalars())

    def record_assignment_ack(self, ack: p.AssignmentAck) -> None:
        with self.session() as s:
            key = (ack.gateway, ack.app, ack.version)
            row = s.get(AssignmentAckRow, key) or AssignmentAckRow(
                gateway=ack.gateway, app=ack.app, version=ack.version, accepted=ack.accepted
            )
            row.accepted, row.reason, row.received_at = ack.accepted, ack.reason, time.time()
            s.add(row)
            s.commit()

    def assignment_acks(self, app: str) -> list[AssignmentAckRow]:
        with self.session() as s:
            q = select(AssignmentAckRow).where(col(AssignmentAckRow.app) == app)
            return list(s.execute(q).scalars())

    # ------------------------------------------------------------------ serve

    def add_decision(self, row: Decision) -> int:
        with self.session() as s:
            s.add(row)
            s.commit()
            return int(row.id)  # type: ignore[arg-type]

    def decisions(self, app: str | None = None, since: float = 0.0) -> list[Decision]:
        with self.session() as s:
            q = select(Decision).where(col(Decision.at) >= since).order_by(col(Decision.id))
            if app is not None:
                q = q.where(col(Decision.app) == app)
            return list(s.execute(q).scalars())

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease ``name`` for ``ttl_s`` seconds; False while another holder's
        lease runs. Atomic on SQLite and PostgreSQL: one conditional UPDATE, else one INSERT
        that the primary key lets only one process win."""
        now = time.time()
        with self.engine.begin() as conn:
            taken = conn.execute(
                update(Lease)
                .where(
                    col(Lease.name) == name,
                    or_(col(Lease.holder) == holder, col(Lease.expires_at) < now),
                )
                .values(holder=holder, expires_at=now + ttl_s)
            ).rowcount
        if taken:
            return True
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(Lease).values(name=name, holder=holder, expires_at=now + ttl_s))
        except IntegrityError:
            return False  # another holder has it
        return True

    def release_lease(self, name: str, holder: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(Lease).where(col(Lease.name) == name, col(Lease.holder) == holder))

    def lease_holder(self, name: str) -> tuple[str, float] | None:
        with self.session() as s:
            row = s.get(Lease, name)
            return None if row is None else (row.holder, row.expires_at)

    # ------------------------------------------------------------------ optimisation

    def add_optimisation_run(
        self, result: dict[str, Any], gate_version: str | None, problem_path: str | None
    ) -> int:
        with self.session() as s:
            row = OptimisationRun(
                gate_version=gate_version, problem_path=problem_path, result_json=json.dumps(result)
            )
            s.add(row)
            s.commit()
            return int(row.id)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ clusterings, experts

    def add_clustering(
        self,
        name: str,
        dataset: str,
        encoder: str,
        seed: int,
        centroids: np.ndarray,
        members: dict[int, int],
        metrics: dict[str, Any],
    ) -> ClusteringRecord:
        """Store a clustering of ``dataset``: ``centroids`` (k, dim), ``members`` {sample id:
        cluster}. Names are unique: storing one twice is refused."""
        ds = self.dataset(dataset)
        cents = np.ascontiguousarray(centroids, dtype="<f4")
        with self.session() as s:
            q = select(ClusteringRow).where(ClusteringRow.name == name)  # type: ignore[arg-type]
            if s.execute(q).scalars().first() is not None:
                raise ConfigError(f"clustering {name!r} already exists; pick another --name")
            row = ClusteringRow(
                name=name,
                dataset_id=int(ds.id),  # type: ignore[arg-type]
                encoder=encoder,
                k=int(cents.shape[0]),
                seed=seed,
                dim=int(cents.shape[1]),
                centroids=cents.tobytes(),
                metrics_json=json.dumps(metrics),
            )
            s.add(row)
            s.flush()
            rows = [
                {"clustering_id": row.id, "sample_id": sid, "cluster": int(c)}
                for sid, c in members.items()
            ]
            if rows:
                s.execute(insert(ClusterMember.__table__), rows)  # type: ignore[attr-defined]
            s.commit()
            return self._clustering_record(row, ds.name)

    def _clustering_record(self, row: ClusteringRow, dataset: str) -> ClusteringRecord:
        cents = np.frombuffer(row.centroids, dtype="<f4").reshape(row.k, row.dim).copy()
        return ClusteringRecord(
            int(row.id),  # type: ignore[arg-type]
            row.name,
            dataset,
            row.encoder,
            row.k,
            row.seed,
            cents,
            json.loads(row.metrics_json),
            row.created_at,
        )

    def clusterings(self) -> list[ClusteringRecord]:
        with self.session() as s:
            rows = list(s.execute(select(ClusteringRow)).scalars())
            names = {d.id: d.name for d in s.execute(select(Dataset)).scalars()}
        rows.sort(key=lambda r: (r.created_at, r.id or 0))
        return [self._clustering_record(r, names[r.dataset_id]) for r in rows]

    def clustering(self, name: str | None = None) -> ClusteringRecord:
        """The clustering called ``name``, or the latest one."""
        known = self.clusterings()
        if not known:
            raise ConfigError("no clustering in the registry yet: run `moe2ctl experts cluster`")
        if name is None:
            return known[-1]
        for c in known:
            if c.name == name:
                return c
        raise ConfigError(
            f"no clustering {name!r} in the registry; known: {', '.join(c.name for c in known)}"
        )

    def cluster_members(self, clustering: str) -> dict[int, int]:
        """{sample id: cluster} of a stored clustering."""
        cid = self.clustering(clustering).id
        with self.session() as s:
            q = select(ClusterMember).where(ClusterMember.clustering_id == cid)  # type: ignore[arg-type]
            return {m.sample_id: m.cluster for m in s.execute(q).scalars()}

    def add_expert(self, row: ExpertAdapterRow) -> None:
        """Store an expert adapter; one with the same name is replaced (a re-run)."""
        with self.session() as s:
            old = s.get(ExpertAdapterRow, row.name)
            if old is not None:
                s.delete(old)
                s.flush()
            s.add(row)
            s.commit()

    def experts(self) -> list[ExpertAdapterRow]:
        with self.session() as s:
            q = select(ExpertAdapterRow).order_by(ExpertAdapterRow.name)
            return list(s.execute(q).scalars())

    def expert(self, name: str) -> ExpertAdapterRow:
        with self.session() as s:
            row = s.get(ExpertAdapterRow, name)
        if row is None:
            names = [e.name for e in self.experts()]
            raise ConfigError(
                f"no expert {name!r} in the registry; known: {', '.join(names) or 'none'}"
            )
        return row
