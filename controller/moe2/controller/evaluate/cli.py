"""``moe2ctl eval``: MoE² against its baselines on held-out questions, one setting or a grid.

    moe2ctl eval                                    # newest gate, its test split, no limits
    moe2ctl eval --delay 0.02,0.05 --energy 1,2,3,5 --plot eval.png
    moe2ctl eval --jsonl mine.jsonl --json          # your own questions, scored if needed
    moe2ctl eval tiny-mc --gate uniform             # no gate: experts weighed equally
    moe2ctl eval --answerer gateway --energy 1,2,none   # asked through a live gateway, measured
    moe2ctl eval --energy 5,10 --energy-per prompt  # E_max in joules per prompt (Tables II-IV)
    moe2ctl eval --base smol-base                   # S. A.: the base model the adapters share

Held out: evaluating the gate's own dataset uses its test split (which training and early
stopping never saw); another dataset or a JSONL file is used whole, minus any prompt the gate
trained on. SMO chooses subsets on the gate's dataset without its test split. The gate's
delay is what the gateways measured running it (``--gate-delay`` overrides). When the experts
are adapters of one base model, S. A. is that base alone: an online agent serving the base
(found by the model's sha256, or named with ``--base``) scores the questions too. Exit status
0, 1 on an error (the message says what was expected), 2 on bad flags.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from moe2.controller import datasets as ds
from moe2.controller.collect import CollectSettings, collect_options, collect_settings
from moe2.controller.evaluate.answerer import ANSWERERS, Answerer, ScoreAnswerer
from moe2.controller.evaluate.gateway import GateArtefact, GatewayAnswerer, Progress, RouteRun
from moe2.controller.evaluate.report import markdown, plot
from moe2.controller.evaluate.run import (
    EvalSettings,
    Grid,
    LazyGateDelay,
    SingleAgent,
    evaluate,
    work_units,
)
from moe2.controller.gate.weights import UNIFORM
from moe2.controller.optimize.costs import load_profiles
from moe2.controller.optimize.fromregistry import GateDelay, ScoredSet, gate_delay_of, scored_set
from moe2.controller.optimize.solvers import SOLVERS
from moe2.controller.options import (
    broker_from_flags,
    broker_options,
    db_option,
    emit,
    json_option,
    open_registry,
)
from moe2.controller.registry import Registry
from moe2.controller.splits import split
from moe2.shared import protocol as p
from moe2.shared.errors import BrokerError, ConfigError, Moe2Error, NoExperts
from moe2.shared.fleet import FleetState, FleetView
from moe2.shared.mqtt import BrokerConfig

# Without a gate there is no recorded split: hold out this share of the dataset, seeded.
UNIFORM_TEST_FRACTION = 0.2


def parse_limits(text: str, flag: str, unit: str) -> tuple[float | None, ...]:
    """'1,2,3' -> (1.0, 2.0, 3.0); 'none' (alone or in the list) is no limit."""
    out: list[float | None] = []
    for part in text.split(","):
        part = part.strip()
        if part.lower() in ("none", "inf", ""):
            out.append(None)
            continue
        try:
            value = float(part)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise click.BadParameter(
                f"{part!r}: expected {unit} > 0 or 'none', comma-separated (e.g. 1,2,3)",
                param_hint=flag,
            )
        out.append(value)
    return tuple(dict.fromkeys(out))


def import_jsonl(reg: Registry, path: Path, prompt_format: str, option_format: str) -> str:
    """Store the file's questions as a dataset named after its content and formats (so a
    rerun reuses the stored dataset and scores) and return the name."""
    samples = ds.from_jsonl(path, prompt_format=prompt_format, option_format=option_format)
    if ds.kind_of(samples) != ds.CHOICE:
        raise ConfigError(
            f"{path}: evaluation needs multiple-choice questions (two or more 'choices' and "
            "an 'answer' index on every line)"
        )
    digest = hashlib.sha256(path.read_bytes() + f"\0{prompt_format}\0{option_format}".encode())
    name = f"jsonl-{path.stem}-{digest.hexdigest()[:8]}"
    reg.add_dataset(name, ds.CHOICE, f"jsonl:{path}", samples, description="moe2ctl eval")
    return name


def online_experts_now(reg: Registry, broker: BrokerConfig) -> set[str]:
    """The experts online now (none when the broker cannot be reached)."""
    from moe2.controller.registry.sync import online_experts, sync_once

    try:
        sync_once(reg, broker)
    except BrokerError:
        return set()
    return set(online_experts(reg))


def ensure_scores(
    reg: Registry,
    dataset: str,
    experts: list[str],
    broker: BrokerConfig,
    settings: CollectSettings | None = None,
) -> None:
    """Collect the scores ``experts`` lack on ``dataset`` from the fleet (they must be online),
    as ``moe2ctl collect`` would with ``settings``."""
    needed = sum(len(s.targets) for s in reg.samples(dataset))
    missing = [e for e in experts if len(reg.scored(dataset, e)) < needed]
    if not missing:
        return
    from moe2.controller.collect import collect
    from moe2.controller.registry.sync import online_experts, sync_once
    from moe2.shared.mqtt import RpcClient

    sync_once(reg, broker)
    online = online_experts(reg)
    offline = [e for e in missing if e not in online]
    if offline:
        raise NoExperts(
            f"the scores of {', '.join(offline)} on {dataset} are missing and they are not "
            f"online to score it (online: {', '.join(sorted(online)) or 'none'})"
        )
    click.echo(f"scoring {dataset} with {', '.join(missing)}", err=True)
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.monotonic() - last[0] > 2.0 or done == total:
            last[0] = time.monotonic()
            click.echo(f"scoring {dataset}: {done}/{total} ({100 * done / total:.0f}%)", err=True)

    with RpcClient(broker) as rpc:
        report = collect(
            reg,
            rpc,
            dataset,
            {e: online[e] for e in missing},
            settings,
            stop=threading.Event(),
            on_progress=progress,
        )
    if report.interrupted:
        raise KeyboardInterrupt
    if report.failed or not report.complete:
        raise NoExperts(f"scoring {dataset} did not complete:\n{report.what_is_missing()}")


def held_out_sets(
    reg: Registry,
    gate_version: str | None,
    dataset: str | None,
    experts: list[str] | None,
    links: Mapping[str, p.LinkFigures] | None = None,
) -> tuple[ScoredSet, ScoredSet, str, str]:
    """(selection, test, test note, selection note) for the gate and the dataset asked for;
    ``links``: the gateways' measured links, added to every step's delay as ``optimize``
    does."""
    if gate_version == UNIFORM:
        if dataset is None:
            raise ConfigError("with --gate uniform, name the dataset to evaluate on")
        whole = scored_set(
            reg, dataset, gate_version=UNIFORM, online_only=False, experts=experts, links=links
        )
        parts = split(whole.mixed.sample_idx, 0.0, UNIFORM_TEST_FRACTION, seed=0)
        if parts.test.size == 0:
            raise ConfigError(f"{dataset!r} has too few scored samples to hold any out")
        note = f"a seeded {UNIFORM_TEST_FRACTION:.0%} of {dataset}: no gate, no recorded split"
        return whole.select(parts.train), whole.select(parts.test), note, "the rest"
    row = reg.gate_version(gate_version)  # the newest when None; an error if none trained
    trained_on = json.loads(row.datasets_json)[0]
    gate_experts = experts or json.loads(row.experts_json)
    whole = scored_set(
        reg,
        trained_on,
        gate_version=row.version,
        online_only=False,
        experts=gate_experts,
        links=links,
    )
    held = whole.gate.held_out
    selection = whole.select(whole.positions(held, inside=False))
    sel_note = f"the gate's train and val splits of {trained_on}"
    if dataset is None or dataset == trained_on:
        if not held:
            raise ConfigError(
                f"gate {row.version} recorded no test split (trained with test fraction 0 or "
                "before splits were recorded): retrain it, or evaluate on another dataset"
            )
        test = whole.select(whole.positions(held, inside=True))
        return selection, test, f"gate {row.version}'s test split of {trained_on}", sel_note
    other = scored_set(
        reg, dataset, gate_version=row.version, online_only=False, experts=gate_experts, links=links
    )
    seen = set(selection.mixed.prompts)
    keep = [i for i, text in enumerate(other.mixed.prompts) if text not in seen]
    if not keep:
        raise ConfigError(f"every prompt of {dataset!r} is in the gate's training data")
    dropped = other.mixed.n_samples - len(keep)
    note = f"all of {dataset}" + (
        f", minus {dropped} prompt(s) the gate trained on" if dropped else ""
    )
    return selection, other.select(keep), note, sel_note


def fleet_figures(broker: BrokerConfig, *, required: bool) -> FleetState | None:
    """What the gateways measured and announced: their links to the experts (answers cross
    them: the costs include them, as optimize's do) and their gates' latency; None when the
    broker cannot be reached and they are optional."""
    try:
        return FleetView.snapshot(broker, ("links", "gateway", "gate_ack"), 2.0)
    except BrokerError as exc:
        if required:
            raise
        click.echo(f"no measured links ({exc.message}): costs without transmission", err=True)
        return None


def eval_gate_delay(
    state: FleetState | None,
    version: str,
    given: float | None,
    broker: BrokerConfig,
    *,
    live: bool,
) -> GateDelay | LazyGateDelay:
    """τ_gate for an evaluation's promise: what the gateways announced for the gate; when
    none did yet and the answers go through a gateway, what they announce once the evaluation
    has pushed it (with its first gated route); from stored scores alone, 0, said so."""
    gate = gate_delay_of(state, version, given, required=False)
    if not live or gate.curve is not None or given is not None or version == UNIFORM:
        return gate

    def once_pushed(*, required: bool = True) -> GateDelay:
        state = FleetView.snapshot(broker, ("gateway", "gate_ack"), 2.0)
        return gate_delay_of(state, version, required=required)

    return once_pushed


def measured_links(broker: BrokerConfig, *, required: bool) -> dict[str, p.LinkFigures]:
    state = fleet_figures(broker, required=required)
    return {} if state is None else state.best_links()


def base_model(reg: Registry, experts: list[str], named: str | None) -> tuple[str | None, str]:
    """(the expert serving the base model the experts are adapters of, or None; why none)."""
    agents = {a.id: a for a in reg.agents()}
    infos = {e: p.AgentInfo.model_validate_json(agents[e].info_json or "{}") for e in experts}
    if named is not None:
        if named not in agents:
            raise ConfigError(f"--base {named}: no such agent in the registry (`moe2ctl sync`)")
        return named, ""
    models = {(i.model_sha256 or i.model_file) for i in infos.values()}
    if len(models) != 1:
        return None, "the experts are adapters of different models"
    (model,) = models
    for a in agents.values():
        if a.id in experts or not a.info_json:
            continue
        info = p.AgentInfo.model_validate_json(a.info_json)
        if info.adapter is None and (info.model_sha256 or info.model_file) == model:
            return a.id, ""
    return None, (
        f"no agent serves the base model {next(iter(infos.values())).model_file} alone: start "
        "one without --lora, or name it with --base"
    )


def base_scores(
    reg: Registry,
    broker: BrokerConfig,
    test: ScoredSet,
    base: str,
    links: Mapping[str, p.LinkFigures],
    settings: CollectSettings | None = None,
) -> ScoredSet:
    """The base model's scores on the test questions, in their order (scored now if missing
    and the base is online, as ``moe2ctl collect`` would with ``settings``)."""
    if base in online_experts_now(reg, broker):
        ensure_scores(reg, test.dataset, [base], broker, settings)
    whole = scored_set(
        reg, test.dataset, gate_version=UNIFORM, online_only=False, experts=[base], links=links
    )
    order = {int(i): n for n, i in enumerate(whole.mixed.sample_idx)}
    missing = [int(i) for i in test.mixed.sample_idx if int(i) not in order]
    if missing:
        raise NoExperts(f"it has not scored {len(missing)} of the test questions")
    return whole.select([order[int(i)] for i in test.mixed.sample_idx])


def are_adapters(reg: Registry, experts: list[str]) -> bool:
    agents = {a.id: a for a in reg.agents()}
    return all(
        e in agents
        and agents[e].info_json
        and p.AgentInfo.model_validate_json(agents[e].info_json or "{}").adapter is not None
        for e in experts
    )


def make_answerer(
    name: str,
    test: ScoredSet,
    reg: Registry,
    broker: BrokerConfig | None = None,
    *,
    gateways: tuple[str, ...] = (),
    timeout_s: float = 120.0,
    progress: Progress | None = None,
    also: tuple[str, ...] = (),
) -> Answerer:
    """The answerer called ``name``, for the questions of ``test`` (scored by its experts,
    weighted by its gate; ``also``: other experts it may be asked to answer alone)."""
    if name == ScoreAnswerer.name:
        return ScoreAnswerer(test)
    if name == GatewayAnswerer.name:
        if broker is None:
            raise ConfigError("the gateway answerer needs a broker")
        gate = None
        if test.gate.version != UNIFORM:
            row = reg.gate_version(test.gate.version)
            gate = GateArtefact.load(Path(row.artefact_dir), row.version)
        return GatewayAnswerer(
            broker,
            load_profiles(reg, [*test.experts, *also]),
            gate=gate,
            gateways=gateways or None,
            timeout_s=timeout_s,
            progress=progress,
        )
    raise ConfigError(f"answerer {name!r} cannot be built here; expected one of {list(ANSWERERS)}")


class RouteBars:
    """A progress bar per route the gateway answerer asks (stderr)."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._app: str | None = None

    def __call__(self, run: RouteRun, done: int, total: int) -> None:
        if run.app != self._app:
            self.close()
            label = f"{'+'.join(run.experts)} top-{run.k} ({run.weights})"
            self._bar = click.progressbar(length=total, label=label[:60], file=sys.stderr)
            self._bar.__enter__()
            self._app = run.app
        self._bar.update(1)
        if done == total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
        self._bar, self._app = None, None


@click.command("eval")
@click.argument("dataset", required=False)
@click.option(
    "--jsonl",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help='Evaluate on these questions, one a line: {"question", "choices": [...], "answer": '
    'index, "subject"?} (or datasets add\'s {"prompt", "choices", "answer", "app"?}); '
    "stored as a dataset and scored by the online experts if their scores are missing.",
)
@click.option(
    "--prompt-format",
    default=ds.PROMPT_FORMAT,
    show_default=True,
    help="With --jsonl: how a question becomes the prompt the experts score ({question}).",
)
@click.option(
    "--option-format",
    default=ds.OPTION_FORMAT,
    show_default=True,
    help="With --jsonl: how a choice becomes the option text scored after it ({choice}).",
)
@click.option(
    "--gate",
    "gate_version",
    default=None,
    help="Gate version [default: the newest; an error if none was trained]; 'uniform' "
    "weighs every expert equally.",
)
@click.option("--experts", default=None, help="Comma-separated [default: the gate's experts].")
@click.option(
    "--delay",
    "delays",
    default="none",
    show_default=True,
    help="Delay limits τ_max, seconds per step (mean over an answer's steps of the slowest "
    "expert, plus the gate), for every app; comma-separated for a grid; 'none' = no limit.",
)
@click.option(
    "--energy",
    "energies",
    default="none",
    show_default=True,
    help="Energy limits E_max, joules per step (the experts' energy, mean over an answer's "
    "steps and the questions); comma-separated for a grid; 'none' = no limit.",
)
@click.option(
    "--energy-per",
    type=click.Choice(["step", "prompt"]),
    default="step",
    show_default=True,
    help="The unit of --energy: joules per step (eq. 11) or per prompt (the whole answer, as "
    "the paper's Tables II-IV state E_max).",
)
@click.option(
    "--base",
    "base_expert",
    default=None,
    help="The agent serving the base model the experts are adapters of, evaluated alone as "
    "S. A. [default: an online agent with the experts' model and no adapter, when there is "
    "one].",
)
@click.option(
    "--k",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Experts fused per question: the top-k of the subset by gate weight.",
)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Random subsets per cell for Rand. M. V. (mean ± standard deviation).",
)
@click.option(
    "--gate-delay",
    type=click.FloatRange(min=0.0),
    default=None,
    help="Seconds the gate adds per prompt (eq. 8) [default: what the gateways measured "
    "running it and announced; 0 with --gate uniform].",
)
@click.option(
    "--solver",
    type=click.Choice(list(SOLVERS)),
    default="smo",
    show_default=True,
    help="How MoE² and SMO M. V. choose their subset.",
)
@click.option(
    "--answerer",
    type=click.Choice(list(ANSWERERS)),
    default=ScoreAnswerer.name,
    show_default=True,
    help="Where answers come from: 'scores' picks the option of highest fused teacher-forced "
    "log-likelihood from the registry's scores; 'gateway' asks the live fleet through a "
    "gateway (each route pushed as an application eval-<hash> with its subset and gate, every "
    "question a multiple-choice prompt) and measures each answer's delay and energy.",
)
@click.option(
    "--gateway",
    "gateways",
    multiple=True,
    help="With --answerer gateway: the gateway(s) that serve the evaluation's routes "
    "(repeatable) [default: every online gateway].",
)
@click.option(
    "--answer-timeout",
    type=click.FloatRange(min=1.0),
    default=120.0,
    show_default=True,
    help="With --answerer gateway: seconds to wait for one answer.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="PNG of accuracy against E_max [default: eval-<dataset>.png].",
)
@click.option("--no-plot", is_flag=True, help="Write no PNG.")
@click.option(
    "--markdown",
    "md_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write the markdown report to this file.",
)
@collect_options
@db_option
@broker_options
@json_option
def eval_cmd(
    dataset: str | None,
    jsonl: Path | None,
    prompt_format: str,
    option_format: str,
    gate_version: str | None,
    experts: str | None,
    delays: str,
    energies: str,
    energy_per: str,
    base_expert: str | None,
    k: int,
    seeds: int,
    gate_delay: float | None,
    solver: str,
    answerer: str,
    gateways: tuple[str, ...],
    answer_timeout: float,
    plot_path: Path | None,
    no_plot: bool,
    md_path: Path | None,
    db_url: str | None,
    as_json: bool,
    **kw: Any,
) -> None:
    """Accuracy of MoE² and its baselines on held-out questions (paper Fig. 3, Tables II-IV).

    Methods: each expert alone, the original model (S. A.: the experts themselves, or the base
    model they are adapters of), their average (A. E. A.), all experts fused with equal weights
    (M. V.), their plurality vote and MoE² over all of them; and per cell of the --delay ×
    --energy grid, MoE² (SMO subset, gate, top-k fusion), SMO M. V. (the same subset, equal
    weights), Rand. M. V. (random feasible subsets, equal weights) and the SMO subset's
    plurality vote. Every baseline's difference from MoE² comes with a paired bootstrap 95%
    interval. Next to every accuracy: the answers' delay and energy against the cell's
    limits, promised by the one cost function from the experts' profiles, or with --answerer
    gateway measured on the answers beside the promise (the report says which figures are
    measured and which modelled)."""
    if jsonl is not None and dataset is not None:
        raise click.UsageError("give DATASET or --jsonl FILE, not both")
    grid = Grid(
        parse_limits(delays, "--delay", "seconds"),
        parse_limits(energies, "--energy", "joules"),
        "prompt" if energy_per == "prompt" else "step",
    )
    scoring = collect_settings(kw)
    chosen = experts.split(",") if experts else None
    broker = broker_from_flags(kw)
    reg = open_registry(db_url)
    try:
        if jsonl is not None:
            ds.check_formats(prompt_format, option_format)
            dataset = import_jsonl(reg, jsonl, prompt_format, option_format)
            wanted = chosen
            if wanted is None and gate_version != UNIFORM:
                wanted = json.loads(reg.gate_version(gate_version).experts_json)
            if wanted is None:
                raise ConfigError("with --gate uniform and --jsonl, name the --experts")
            ensure_scores(reg, dataset, wanted, broker, scoring)
        live = answerer == GatewayAnswerer.name
        state = fleet_figures(broker, required=live)
        links = {} if state is None else state.best_links()
        selection, test, test_note, sel_note = held_out_sets(
            reg, gate_version, dataset, chosen, links
        )
        gate = eval_gate_delay(state, selection.gate.version, gate_delay, broker, live=live)
        settings = EvalSettings(k=k, seeds=seeds, gate=gate, solver=solver)
        adapters = are_adapters(reg, test.experts)
        base_name, base_note = (
            base_model(reg, test.experts, base_expert) if adapters or base_expert else (None, "")
        )
        base_set = None
        if base_name is not None:
            try:
                base_set = base_scores(reg, broker, test, base_name, links, scoring)
            except Moe2Error as exc:
                base_name, base_note = None, f"{base_name}: {exc.message}"
        bars = RouteBars()
        answers = make_answerer(
            answerer,
            test,
            reg,
            broker,
            gateways=gateways,
            timeout_s=answer_timeout,
            progress=bars,
            also=(base_name,) if base_name else (),
        )
        base = None
        if base_name is not None and base_set is not None:
            base_answers = answers if live else ScoreAnswerer(base_set)
            base = SingleAgent(base_name, base_set, base_answers)
        try:
            with click.progressbar(
                length=work_units(grid, settings),
                label="evaluating",
                file=sys.stderr,
                # the gateway answerer shows a bar per route instead
                hidden=live,
            ) as bar:
                result = evaluate(
                    selection,
                    test,
                    answers,
                    grid,
                    settings,
                    base=base,
                    adapters=adapters,
                    progress=bar.update,
                    test_note=test_note,
                    selection_note=sel_note,
                    base_note=base_note,
                )
        finally:
            bars.close()
            answers.close()
    finally:
        reg.close()
    report = markdown(result)
    out = result.to_json()
    if not no_plot and plot_path is None and importlib.util.find_spec("matplotlib") is None:
        # The default plot needs the eval extra; asked for by --plot, its absence is an error.
        click.echo(
            "no plot: matplotlib is missing (pip install 'moe2-edge-controller[eval]')", err=True
        )
    elif not no_plot:
        path = plot_path or Path(f"eval-{result.dataset}.png")
        out["plot"] = str(plot(result, path))
        click.echo(f"plot written to {path}", err=True)
    if md_path is not None:
        md_path.write_text(report, encoding="utf-8")
        out["markdown"] = str(md_path)
    emit(out, as_json, lambda _: report)
