"""Score collection from real agents over a real mosquitto: interrupted, resumed, nothing lost
or stored twice; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from slowexpert import claim_faster, long_questions, start_profiled

from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend
from moe2.controller import datasets as ds
from moe2.controller.collect import CollectSettings, collect
from moe2.controller.localfleet import LocalFleet
from moe2.controller.registry import Registry
from moe2.controller.registry.sync import online_experts, sync_once
from moe2.shared import protocol as p
from moe2.shared.mqtt import BrokerConfig, RpcClient

DOMAINS = ("animals", "cooking")


@pytest.fixture(scope="module")
def experts(
    broker_config: BrokerConfig,
    tiny_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, str]]:
    ids = {d: f"{d[:3]}-{uuid.uuid4().hex[:6]}" for d in DOMAINS}
    with LocalFleet(broker_config, tmp_path_factory.mktemp("fleet")) as fleet:
        for d, agent_id in ids.items():
            fleet.start(agent_id, tiny_models[d], "--n-threads", "1", "--broker-keepalive", "2")
        fleet.wait_online(ids.values(), 60)
        yield ids


def test_collect_resumes_after_interruption_without_loss_or_duplicates(
    registry: Registry,
    db_url: str,
    experts: dict[str, str],
    broker_config: BrokerConfig,
    tiny_models: dict[str, Path],
) -> None:
    samples = ds.tiny_domains(DOMAINS, 30, seed=3, choices=2)
    registry.add_dataset("mqtt", "multiple-choice", "tiny", samples)
    sync_once(registry, broker_config)
    online = {k: v for k, v in online_experts(registry).items() if k in experts.values()}
    assert sorted(online) == sorted(experts.values())
    total = len(samples) * 2 * len(online)

    stop = threading.Event()

    def interrupt(done: int, _total: int) -> None:
        if done >= 20:
            stop.set()  # what SIGTERM / Ctrl-C do in `moe2ctl collect`

    settings = CollectSettings(window=2, batch=4, commit_every=8)  # small: interrupted mid-way
    with RpcClient(broker_config, timeout=30) as rpc:
        first = collect(registry, rpc, "mqtt", online, settings, stop=stop, on_progress=interrupt)
    assert first.interrupted and 20 <= first.stored < total and not first.failed

    # Resume with the CLI: it skips what is stored and finishes the rest.
    cmd = [
        sys.executable,
        "-c",
        "from moe2.controller.cli import main; main()",
        "collect",
        "mqtt",
        "--db",
        db_url,
        "--experts",
        ",".join(experts.values()),
        "--json",
        "--broker-host",
        broker_config.host,
        "--broker-port",
        str(broker_config.port),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    second = json.loads(out.stdout)
    assert second["already"] == first.stored and second["stored"] == total - first.stored
    assert second["missing"] == 0 and second["failed"] == {}
    assert "collect mqtt:" in out.stderr  # progress

    with registry.engine.connect() as conn:
        n, distinct = conn.execute(
            sa.text(
                "SELECT COUNT(*), COUNT(DISTINCT sample_id || ':' || expert || ':' || option) "
                "FROM scores"
            )
        ).one()
    assert n == distinct == total

    # What was stored is what the model gives when scored directly.
    table = registry.score_table("mqtt", [experts["animals"], experts["cooking"]])
    assert len(table.samples) == len(samples)
    direct = LlamaCppBackend(AgentConfig(model=tiny_models["cooking"], n_threads=1))
    s = table.samples[5]
    ids = direct.tokenize(s.prompt, add_bos=direct.info.add_bos)
    want = direct.score(ids, direct.tokenize(s.targets[1], add_bos=False))
    # The agent scores samples together in one llama_decode (batched decoding); with the
    # tiny experts' F32 weights llama.cpp's matrix product then sums in another order
    # (measured up to 5e-4 in log-probability; quantized models give identical results).
    np.testing.assert_allclose(table.logp[5][1][1], want, atol=1e-3)
    direct.close()


def test_collect_reports_an_expert_that_is_gone(
    registry: Registry, experts: dict[str, str], broker_config: BrokerConfig
) -> None:
    registry.add_dataset("gone", "free-answer", "tiny", ds.tiny_domains(DOMAINS, 2, seed=4))
    sync_once(registry, broker_config)
    online: dict[str, Any] = dict(online_experts(registry))
    ghost = online[experts["animals"]].model_copy(update={"agent_id": "ghost-1"})
    with RpcClient(broker_config, timeout=2) as rpc:
        report = collect(
            registry,
            rpc,
            "gone",
            {experts["cooking"]: online[experts["cooking"]], "ghost-1": ghost},
            CollectSettings(timeout_s=0.5, max_failures=2),
        )
    assert "ghost-1" in report.failed and "timeout" in report.failed["ghost-1"]
    assert registry.score_count("gone") == {experts["cooking"]: 4}


def test_collect_from_an_expert_ten_times_slower_than_its_profile_completes_in_smaller_batches(
    broker_config: BrokerConfig, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Its profile makes the first requests ten times too big for their timeouts: they time
    out, the expert drops them (nobody waits any more), and they are retried in halves at the
    pace the expert showed, until the collection is complete. Default settings."""
    agent_id = f"slow-{uuid.uuid4().hex[:6]}"
    with LocalFleet(broker_config, tmp_path / "fleet") as fleet:
        start_profiled(fleet, agent_id, tiny_models["animals"])
        claim_faster(broker_config, agent_id, 10.0)
        # ~1,500 tokens each: a full request (256 samples, the prompt scored once for both
        # options) is then well over the 10 s a timeout waits at least
        samples = long_questions(240, seed=5, chars=6000)
        registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
        registry.add_dataset("slow", "multiple-choice", "tiny", samples)
        sync_once(registry, broker_config)
        online = {agent_id: online_experts(registry)[agent_id]}
        with RpcClient(broker_config) as rpc:
            report = collect(registry, rpc, "slow", online)
    assert report.complete and not report.failed, report.as_dict()
    pace = report.pace[agent_id]
    assert pace["timeouts"] >= 1 and pace["smallest_batch"] < p.MAX_SCORE_SAMPLES, pace
    assert registry.score_count("slow") == {agent_id: 2 * len(samples)}
    registry.close()


def test_every_score_is_stored_with_the_prompts_real_length_and_old_ones_get_it(
    registry: Registry,
    experts: dict[str, str],
    broker_config: BrokerConfig,
    tiny_models: dict[str, Path],
) -> None:
    samples = ds.tiny_domains(DOMAINS, 4, seed=6, choices=3)
    registry.add_dataset("lengths", "multiple-choice", "tiny", samples)
    sync_once(registry, broker_config)
    online = {k: v for k, v in online_experts(registry).items() if k in experts.values()}
    with RpcClient(broker_config, timeout=30) as rpc:
        assert not collect(registry, rpc, "lengths", online).failed
    direct = LlamaCppBackend(AgentConfig(model=tiny_models["cooking"], n_threads=1))
    want = [len(direct.tokenize(s.prompt, add_bos=direct.info.add_bos)) for s in samples]
    direct.close()
    table = registry.score_table("lengths", [experts["animals"], experts["cooking"]])
    assert [row.tolist() for row in table.prompt_tokens] == [[n, n] for n in want]
    # scores stored before lengths were (an older moe2ctl): the next collect fills them in
    with registry.engine.begin() as conn:
        conn.execute(sa.text("UPDATE scores SET prompt_tokens = NULL"))
    assert registry.score_table("lengths").prompt_tokens[0].tolist() == [-1, -1]
    with RpcClient(broker_config, timeout=30) as rpc:
        again = collect(registry, rpc, "lengths", online)
    assert again.stored == 0 and not again.failed
    table = registry.score_table("lengths", [experts["animals"], experts["cooking"]])
    assert [row.tolist() for row in table.prompt_tokens] == [[n, n] for n in want]
