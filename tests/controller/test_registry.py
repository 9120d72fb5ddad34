"""The registry on SQLite and on PostgreSQL: datasets, scores, migrations, gates, acks, and
syncing agents from retained messages."""

from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa

from moe2.controller import datasets as ds
from moe2.controller.registry import Registry, migrations
from moe2.controller.registry.schema import GateVersion
from moe2.controller.registry.sync import RegistryWriter, online_experts, sync_once
from moe2.shared import protocol as p
from moe2.shared.errors import ConfigError
from moe2.shared.fleet import FleetState
from moe2.shared.mqtt import BrokerConfig, Connection


def test_dataset_is_stored_once_with_its_samples(registry: Registry) -> None:
    samples = ds.tiny_domains(["animals", "code"], 3, choices=2)
    row = registry.add_dataset("t", ds.kind_of(samples), "tiny", samples)
    again = registry.add_dataset("t", ds.kind_of(samples), "tiny", samples)
    assert row.id == again.id and row.kind == "multiple-choice"
    stored = registry.samples("t")
    assert [(s.app, s.prompt, tuple(s.targets), s.answer) for s in stored] == [
        (s.app, s.prompt, s.targets, s.answer) for s in samples
    ]
    with pytest.raises(ConfigError, match="already exists"):
        registry.add_dataset("t", "free-answer", "tiny", samples[:2])


def test_scores_are_unique_and_come_back_as_arrays(registry: Registry) -> None:
    samples = ds.tiny_domains(["animals"], 2)
    registry.add_dataset("s", "free-answer", "tiny", samples)
    rows = registry.samples("s")
    for e, lp in (("a", -1.0), ("b", -7.0)):
        registry.add_scores(
            {
                "sample_id": r.id,
                "expert": e,
                "option": 0,
                "tokenizer_hash": "h",
                "tokens": [5, 6],
                "logprobs": [lp, lp / 2],
            }
            for r in rows
        )
    with pytest.raises(sa.exc.IntegrityError):
        registry.add_scores(
            [
                {
                    "sample_id": rows[0].id,
                    "expert": "a",
                    "option": 0,
                    "tokenizer_hash": "h",
                    "tokens": [1],
                    "logprobs": [0.0],
                }
            ]
        )
    assert registry.scored("s", "a") == {(r.id, 0) for r in rows}
    table = registry.score_table("s")
    assert table.experts == ["a", "b"] and len(table.samples) == 2
    assert table.logp[0][0].tolist() == [[-1.0, -0.5], [-7.0, -3.5]]


def test_upgrade_from_schema_1_keeps_data(db_url: str) -> None:
    reg = Registry.open(db_url)
    reg.add_dataset("old", "free-answer", "tiny", ds.tiny_domains(["code"], 2))
    with reg.engine.begin() as conn:  # what a version-1 registry looked like
        conn.execute(sa.text("DROP TABLE embedding_cache"))
        conn.execute(sa.text("ALTER TABLE datasets DROP COLUMN description"))
        conn.execute(sa.text("UPDATE schema_version SET version = 1"))
    reg.close()
    old = Registry.open(db_url, upgrade=False)
    assert migrations.current_version(old.engine) == 1
    old.close()
    reg = Registry.open(db_url)
    assert migrations.current_version(reg.engine) == migrations.LATEST
    assert len(reg.samples("old")) == 2
    reg.cache_embeddings("m", {"k": __import__("numpy").ones(3)})
    assert reg.cached_embeddings("m", ["k"])["k"].tolist() == [1.0, 1.0, 1.0]
    reg.close()


def test_gate_versions_assignments_and_acks(registry: Registry) -> None:
    registry.add_gate_version(
        GateVersion(
            version="g1",
            experts_json='["a"]',
            datasets_json='["d"]',
            config_json="{}",
            metrics_json="{}",
            artefact_dir="/tmp/g1",
        )
    )
    registry.update_gate("g1", sha256="f" * 64)
    assert registry.gate_version().sha256 == "f" * 64
    a = p.AppAssignment(
        app="zoo",
        version=1,
        subset=["a"],
        k=1,
        gate=p.GateRef(version="g1", sha256="f" * 64),
    )
    registry.add_assignment(a)
    registry.add_assignment(a.model_copy(update={"subset": ["a", "b"]}))  # the same version again
    (row,) = registry.assignments("zoo")
    assert row.version == 1 and json.loads(row.subset_json) == ["a", "b"]
    registry.record_assignment_ack(
        p.AssignmentAck(gateway="gw", app="zoo", version=1, accepted=True)
    )
    registry.record_gate_ack(p.GateAck(gateway="gw", version="g1", sha256="f" * 64, state="loaded"))
    registry.record_gate_ack(
        p.GateAck(gateway="gw", version="g1", sha256="f" * 64, state="rejected")
    )
    assert [r.state for r in registry.gate_acks("g1")] == ["rejected"]
    assert registry.assignment_acks("zoo")[0].accepted
    assert registry.add_optimisation_run({"subset": ["a"]}, "g1", None) >= 1


def test_sync_stores_agents_from_retained_messages(
    registry: Registry, broker_config: BrokerConfig
) -> None:
    agent_id = f"fake-{time.time_ns() % 10**9}"
    info = p.AgentInfo(
        agent_id=agent_id,
        model="m",
        model_file="m.gguf",
        architecture="llama",
        quantization="F32",
        n_ctx=128,
        n_vocab=10,
        tokenizer_hash="h",
        eos_ids=[2],
        add_bos=True,
        device_class="cpu",
        software_version="0",
        max_sessions=1,
        started_at=time.time(),
    )
    conn = Connection(broker_config, f"pub-{agent_id}")
    with conn:
        conn.publish(p.topics.agent_info(agent_id), p.encode(info), retain=True).wait_for_publish(5)
        st = p.AgentStatus(agent_id=agent_id, state="online", since=time.time())
        conn.publish(p.topics.agent_status(agent_id), p.encode(st), retain=True).wait_for_publish(5)
        try:
            counts = sync_once(registry, broker_config)
            assert counts["info"] >= 1 and counts["status"] >= 1
            assert online_experts(registry)[agent_id].tokenizer_hash == "h"
        finally:
            for t in (p.topics.agent_info(agent_id), p.topics.agent_status(agent_id)):
                conn.publish(t, b"", retain=True).wait_for_publish(5)


def test_packaged_benchmarks_load_with_their_labels(registry: Registry) -> None:
    mmlu = ds.from_benchmark("mmlu")
    assert len(mmlu) == 14042 and len({s.app for s in mmlu}) == 57
    for name in ("arc-easy", "arc-challenge", "sciq"):
        samples = ds.from_benchmark(name, limit=20, seed=3)
        assert len(samples) == 20
        assert all(len(s.targets) >= 2 and 0 <= s.answer < len(s.targets) for s in samples)
    sub = ds.from_benchmark("mmlu", limit=30, seed=1)
    row = registry.add_dataset("mmlu30", ds.kind_of(sub), "benchmark:mmlu", sub)
    assert row.n_samples == 30 and row.kind == "multiple-choice"


def _info(agent_id: str, model: str = "m") -> p.AgentInfo:
    return p.AgentInfo(
        agent_id=agent_id,
        model=model,
        model_file="m.gguf",
        architecture="llama",
        quantization="F32",
        n_ctx=128,
        n_vocab=10,
        tokenizer_hash="h",
        eos_ids=[2],
        add_bos=True,
        device_class="cpu-generic",
        software_version="0",
        max_sessions=1,
        started_at=0.0,
    )


def test_agents_are_written_in_bulk_and_only_when_they_changed(registry: Registry) -> None:
    infos = [_info(f"a{i}") for i in range(3)]
    assert registry.store_agents(infos, {"a0": "online", "a1": "online"}) == 3
    assert registry.store_agents(infos, {"a0": "online"}) == 0  # nothing new
    assert registry.store_agents([_info("a2", model="m2")], {"a1": "offline"}) == 2
    rows = {a.id: a for a in registry.agents()}
    assert [rows[a].state for a in ("a0", "a1", "a2")] == ["online", "offline", "unknown"]
    assert rows["a2"].model == "m2" and rows["a0"].info_json == infos[0].model_dump_json()
    assert [a.id for a in registry.agents(["a2", "a0", "zz"])] == ["a0", "a2"]
    ack = p.AssignmentAck(gateway="gw", app="qa", version=3, accepted=True)
    assert registry.record_acks([ack]) == 1 and registry.record_acks([ack]) == 0


def test_a_writer_stores_only_what_changed_since_its_last_store(registry: Registry) -> None:
    state = FleetState()
    for i in range(50):
        a = f"w{i}"
        state.info[a] = _info(a)
        state.status[a] = p.AgentStatus(agent_id=a, state="online")
    writer = RegistryWriter(registry)
    assert writer.store(state) == {"info": 50, "status": 50}
    assert writer.rows_written == 50
    state.status["w7"] = p.AgentStatus(agent_id="w7", state="offline")
    writer.store(state)
    assert writer.rows_written == 51  # the one agent that changed, not the fifty
    assert {a.id: a.state for a in registry.agents(["w7", "w8"])} == {
        "w7": "offline",
        "w8": "online",
    }


def test_scores_keep_the_prompts_length_and_migration_5_adds_it(db_url: str) -> None:
    reg = Registry.open(db_url)
    reg.add_dataset("len", "free-answer", "tiny", ds.tiny_domains(["code"], 2))
    rows = reg.samples("len")
    reg.add_scores(
        {"sample_id": r.id, "expert": "a", "option": 0, "tokenizer_hash": "h", "tokens": [5],
         "logprobs": [-1.0], "prompt_tokens": 7 if r.idx == 0 else None}
        for r in rows
    )  # fmt: skip
    assert [t.tolist() for t in reg.score_table("len").prompt_tokens] == [[7], [-1]]
    assert reg.without_prompt_tokens("len", "a") == {rows[1].id}
    reg.set_prompt_tokens("a", {rows[1].id: 9})
    assert [t.tolist() for t in reg.score_table("len").prompt_tokens] == [[7], [9]]
    with reg.engine.begin() as conn:  # a version-4 registry: no prompt_tokens yet
        conn.execute(sa.text("ALTER TABLE scores DROP COLUMN prompt_tokens"))
        conn.execute(sa.text("UPDATE schema_version SET version = 4"))
    reg.close()
    reg = Registry.open(db_url)
    assert migrations.current_version(reg.engine) == migrations.LATEST
    assert [t.tolist() for t in reg.score_table("len").prompt_tokens] == [[-1], [-1]]
    reg.close()
