"""Clustering prompts with the gate's encoder: real MiniLM embeddings of real MMLU questions,
scikit-learn K-means, the registry on SQLite and PostgreSQL, and the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from moe2.controller import datasets as ds
from moe2.controller.cli import main
from moe2.controller.experts.cluster import (
    agreement,
    assign,
    choose_k,
    composition,
    kmeans,
    plot_composition,
    purity,
)
from moe2.controller.registry import Registry, migrations
from moe2.shared.errors import ConfigError

SUBJECTS = ("high_school_us_history", "college_mathematics", "anatomy", "computer_security")


@pytest.fixture(scope="module")
def encoder() -> object:
    from moe2.controller.gate.embedding import Encoder

    return Encoder.load()


@pytest.mark.slow  # the sentence encoder on 120 real questions: ~10 s on 2 cores
def test_same_subject_questions_cluster_together_far_better_than_chance(encoder) -> None:
    questions = [s for s in ds.from_benchmark("mmlu", split="heldout") if s.app in SUBJECTS]
    sample = random.Random(0).sample(questions, 120)
    labels = [s.app for s in sample]
    emb = encoder.embed([s.prompt for s in sample])  # type: ignore[attr-defined]
    clusters = kmeans(emb, k=4, seed=0)
    got = agreement(clusters.labels, labels, seed=0)
    # Measured: purity 0.85 vs 0.42 shuffled, adjusted Rand 0.74 vs 0.00.
    assert got["purity"] > got["purity_shuffled"] + 0.25
    assert got["adjusted_rand"] > 0.4 > 0.05 > abs(got["adjusted_rand_shuffled"])
    # Nearest-centroid assignment (how a new prompt joins a cluster) agrees with K-means.
    assert (assign(emb, clusters.centroids) == clusters.labels).all()
    comp = composition(clusters.labels, labels, 4)
    tops = {c["top"][0]["label"] for c in comp.summary()}
    assert len(tops) >= 3 and tops <= set(SUBJECTS)


def test_k_chosen_by_the_data_is_the_number_of_separate_groups() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:5]  # five directions far apart
    emb = np.concatenate([c + 0.05 * rng.standard_normal((30, 8)) for c in centres])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    choice = choose_k(emb, range(2, 10), seed=0)
    assert choice.k == 5 and choice.clusters.k == 5
    assert choice.silhouettes[5] == max(choice.silhouettes.values()) > 0.8
    assert sorted(choice.silhouettes) == list(range(2, 10))
    with pytest.raises(ConfigError, match="no K to try"):
        choose_k(emb[:3], [5, 6])


@pytest.mark.slow  # the sentence encoder on 12 prompts of each of the 19 families: ~20 s
def test_clustering_the_mixture_recovers_the_families_far_better_than_chance(
    tmp_path: Path,
) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    args = ["experts", "cluster", "--benchmark", "all", "--per-benchmark", "12", "-k", "8"]
    res = CliRunner().invoke(
        main, [*args, "--db", db, "--json"], env={"MOE2_DATA_DIR": str(tmp_path / "data")}
    )
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["name"] == "all-train-k8" and info["prompts"] == 12 * len(ds.BENCHMARKS)
    fam = info["metrics"]["families"]
    assert fam["nmi"] > fam["nmi_shuffled"] + 0.3
    assert fam["purity"] > fam["purity_shuffled"] + 0.2
    rows = {f["family"]: f for f in info["families"]}
    assert set(rows) == set(ds.BENCHMARKS)
    assert all(sum(f["per_cluster"]) == f["prompts"] == 12 for f in rows.values())
    # Families with a format of their own land in one cluster.
    for name in ("sst2", "mrpc", "arithmetic"):
        assert max(rows[name]["per_cluster"]) >= 10, rows[name]
    shown = CliRunner().invoke(main, ["experts", "clusters", "all-train-k8", "--db", db])
    assert "against the task families" in shown.output
    assert any(line.startswith("sst2 ") for line in shown.output.splitlines())


def test_metrics_and_validation_on_known_assignments(tmp_path: Path) -> None:
    labels = ["a", "a", "b", "b", "c", "c"]
    assert purity(np.array([0, 0, 1, 1, 2, 2]), labels) == 1.0
    assert purity(np.array([0, 1, 0, 1, 0, 1]), labels) == pytest.approx(1 / 3)
    comp = composition(np.array([0, 0, 1, 1, 1, 1]), labels, 2)
    assert comp.counts.sum() == 6 and comp.summary()[1]["size"] == 4
    png = plot_composition(comp, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="K must be between 2"):
        kmeans(np.eye(3, dtype=np.float32), k=4)
    with pytest.raises(ConfigError, match="do not match"):
        assign(np.ones((2, 5)), np.ones((3, 4)))


def test_splits_keep_fine_tuning_and_evaluation_questions_apart() -> None:
    for name in ds.BENCHMARKS:
        train = {s.prompt for s in ds.from_benchmark(name, split="train")}
        heldout = {s.prompt for s in ds.from_benchmark(name, split="heldout")}
        test = {s.prompt for s in ds.from_benchmark(name, split="test")}
        assert train and heldout and not train & heldout
        assert heldout <= test
    assert len({s.app for s in ds.from_benchmark("mmlu", split="train")}) == 57
    with pytest.raises(ConfigError, match="unknown split"):
        ds.from_benchmark("mmlu", split="validation")


def test_clusterings_are_stored_and_read_back(registry: Registry) -> None:
    samples = ds.tiny_domains(["code", "cooking"], 3)
    registry.add_dataset("corpus", ds.kind_of(samples), "tiny", samples)
    rows = registry.samples("corpus")
    cents = np.arange(8, dtype=np.float32).reshape(2, 4)
    members = {r.id: i % 2 for i, r in enumerate(rows)}
    rec = registry.add_clustering("c2", "corpus", "enc", 7, cents, members, {"purity": 1.0})
    assert rec.k == 2 and rec.dataset == "corpus"
    again = registry.clustering()  # the latest
    assert again.name == "c2" and again.seed == 7 and again.metrics == {"purity": 1.0}
    np.testing.assert_array_equal(again.centroids, cents)
    assert registry.cluster_members("c2") == members
    with pytest.raises(ConfigError, match="already exists"):
        registry.add_clustering("c2", "corpus", "enc", 7, cents, members, {})
    with pytest.raises(ConfigError, match="no clustering 'nope'"):
        registry.clustering("nope")


def test_upgrade_from_schema_3_adds_the_expert_tables(db_url: str) -> None:
    reg = Registry.open(db_url)
    with reg.engine.begin() as conn:  # what a version-3 registry (serve's tables) looked like
        for table in ("expert_adapters", "cluster_members", "clusterings"):
            conn.execute(sa.text(f"DROP TABLE {table}"))
        conn.execute(sa.text("UPDATE schema_version SET version = 3"))
    reg.close()
    reg = Registry.open(db_url)
    # every later migration too (5: the scores' prompt lengths)
    assert migrations.current_version(reg.engine) == migrations.LATEST >= 4
    assert reg.clusterings() == [] and reg.experts() == []
    tables = set(sa.inspect(reg.engine).get_table_names())
    assert {"decisions", "leases", "clusterings", "expert_adapters"} <= tables
    reg.close()


def test_cluster_command_stores_shows_and_plots(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w") as f:
        for s in ds.tiny_domains(["weather", "code", "music"], 20, seed=0):
            f.write(json.dumps({"prompt": s.prompt, "target": s.targets[0], "app": s.app}) + "\n")
    db = f"sqlite:///{tmp_path / 'r.db'}"
    env = {"MOE2_DATA_DIR": str(tmp_path / "data")}
    runner = CliRunner()
    res = runner.invoke(
        main,
        ["experts", "cluster", "--jsonl", str(corpus), "-k", "3", "--db", db, "--json"],
        env=env,
    )
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["name"] == "corpus-jsonl-k3" and info["prompts"] == 60
    assert info["metrics"]["purity"] > 0.9 > 0.6 > info["metrics"]["purity_shuffled"]
    assert sorted(c["size"] for c in info["clusters"]) == [20, 20, 20]
    assert Path(info["plot"]).is_file()
    shown = runner.invoke(main, ["experts", "clusters", "corpus-jsonl-k3", "--db", db], env=env)
    assert shown.exit_code == 0 and "weather 20 (100%)" in shown.output
    again = runner.invoke(
        main, ["experts", "cluster", "--jsonl", str(corpus), "-k", "3", "--db", db]
    )
    assert again.exit_code == 1 and "already exists" in again.output
    bad = runner.invoke(main, ["experts", "cluster", "--dataset", "nope", "--db", db])
    assert bad.exit_code == 1 and "no dataset 'nope'" in bad.output


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (["experts", "cluster", "--jsonl", "FILE"], "sklearn"),
        (["experts", "finetune", "--base", "FILE"], "peft"),
    ],
)
def test_a_missing_extra_is_named(
    argv: list[str], missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a)
    )
    (tmp_path / "file").write_text("")  # never read: the check comes first
    argv = [str(tmp_path / "file") if a == "FILE" else a for a in argv]
    db = f"sqlite:///{tmp_path / 'r.db'}"
    res = CliRunner().invoke(main, [*argv, "--db", db], env={"MOE2_DATA_DIR": str(tmp_path)})
    assert res.exit_code == 1, res.output
    assert f"needs {missing}" in res.stderr
    assert "pip install 'moe2-edge-controller[experts]'" in res.stderr
