"""MoE² against its baselines on the real packaged models, the full grid, every answer through
the gateway, beside the paper's Tables II-IV (issue 16).

    .venv/bin/python bench/bench_eval.py                          # 3 models, 200 + 150 questions
    .venv/bin/python bench/bench_eval.py --train 120 --test 60    # a quicker look
    .venv/bin/python bench/bench_eval.py \\
        --expert smol-c0=SmolLM2.gguf+c0.gguf --expert smol-c1=SmolLM2.gguf+c1.gguf ...

One run: a loopback broker; one agent per expert (SmolLM2-135M, Gemma-3-270m and
Qwen2.5-Coder-0.5B from their PyPI wheels by default, or ``--expert ID=GGUF[+LORA]``, e.g. the
LoRA domain experts of ``moe2ctl experts finetune``), each declaring a device class (delay
measured on this machine, energy modelled from the class's power figures); scores collected
over MQTT on a train pool and on held-out questions (MMLU, ARC-Easy, ARC-Challenge, SciQ,
drawn once and split, so no question is in both); a gate trained on the pool, exported and
pushed; then ``moe2ctl eval`` twice on the held-out questions over the same grid: from the
stored scores, and through the gateway (each route pushed as an application, each question a
multiple-choice prompt, each answer's delay and energy measured).

The grid comes from the experts' own costs (the paper's seconds and joules belong to 7B and
3B models on RTX 4090s and Orins): delay limits that leave out the slowest expert(s), energy
limits that admit the cheapest one, two, ... Timings taken while other work runs on the
machine are inflated; the accuracies are not.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from moe2.controller import datasets as ds
from moe2.controller.collect import collect
from moe2.controller.evaluate.answerer import Question, Route, ScoreAnswerer
from moe2.controller.evaluate.cli import (
    RouteBars,
    eval_gate_delay,
    fleet_figures,
    held_out_sets,
    make_answerer,
    measured_links,
)
from moe2.controller.evaluate.report import markdown
from moe2.controller.evaluate.run import EvalSettings, Evaluation, Grid, evaluate
from moe2.controller.experts.packaged import fetch
from moe2.controller.gate.cli import export_gate, train_gate
from moe2.controller.gate.config import TrainConfig
from moe2.controller.localfleet import LocalFleet
from moe2.controller.optimize.fromregistry import GateDelay
from moe2.controller.registry import Registry
from moe2.controller.registry.sync import online_experts, sync_once
from moe2.shared.broker import start_broker
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import BrokerConfig, RpcClient

APP = "qa"
PACKAGED = {
    "smollm2": ("smollm2-135m", "orin-agx-64gb"),
    "gemma3": ("gemma3-270m", "orin-agx-64gb"),
    "qwen-coder": ("qwen2.5-coder-0.5b", "rtx4090"),
}
MIX = (("mmlu", 0.5), ("arc-easy", 0.15), ("arc-challenge", 0.15), ("sciq", 0.2))
PROFILE = (
    "--profile-points", "3", "--profile-repeats", "3", "--profile-max-prompt-fraction", "0.15",
    "--profile-decode-tokens", "4", "--profile-idle-seconds", "0",
)  # fmt: skip

# The paper's Tables II-IV (8 fine-tuned Qwen2.5-7B/3B experts on RTX 4090s and Orins):
# accuracy (%) per delay limit (s), over E_max = 5, 10, 15, 20, 25, 35, 50 J.
PAPER = {
    1: {
        "MoE²": (58.3, 59.3, 59.3, 59.3, 59.3, 59.9, 59.9),
        "SMO M. V.": (58.3, 59.1, 59.1, 59.1, 59.1, 59.4, 59.4),
        "Rand. M. V.": (57.5, 58.9, 56.8, 56.1, 57.0, 59.0, 57.5),
    },
    2: {
        "MoE²": (58.3, 59.4, 59.4, 66.1, 71.6, 71.7, 71.8),
        "SMO M. V.": (58.3, 59.0, 59.2, 64.7, 71.6, 69.5, 69.5),
        "Rand. M. V.": (58.0, 58.4, 58.6, 58.4, 60.4, 61.2, 63.3),
    },
    3: {
        "MoE²": (58.3, 66.2, 66.2, 66.2, 71.6, 71.7, 71.8),
        "SMO M. V.": (58.3, 66.2, 66.2, 66.2, 71.6, 69.5, 69.5),
        "Rand. M. V.": (58.0, 61.5, 61.0, 60.2, 60.7, 62.6, 62.9),
    },
}
PAPER_ENERGIES = (5, 10, 15, 20, 25, 35, 50)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def experts(args: argparse.Namespace) -> list[tuple[str, Path, list[str], str]]:
    """(agent id, model, extra agent flags, device class) of every expert."""
    if not args.expert:
        return [(a, fetch(m), [], dev) for a, (m, dev) in PACKAGED.items()]
    classes = ("orin-agx-64gb", "rtx4090")
    out = []
    for i, spec in enumerate(args.expert):
        agent_id, _, rest = spec.partition("=")
        model, _, lora = rest.partition("+")
        flags = ["--lora", lora] if lora else []
        out.append((agent_id, Path(model).expanduser(), flags, classes[i % 2]))
    return out


def questions(n_train: int, n_test: int) -> tuple[list[ds.Sample], list[ds.Sample]]:
    """A train pool and held-out questions of the same mix, disjoint."""
    train, test = [], []
    for name, share in MIX:
        a, b = round(n_train * share), round(n_test * share)
        drawn = ds.from_benchmark(name, a + b, seed=16)
        relabel = [ds.Sample(APP, s.prompt, s.targets, s.answer) for s in drawn]
        train += relabel[:a]
        test += relabel[a : a + b]
    seen = {s.prompt for s in train}
    return train, [s for s in test if s.prompt not in seen]


def wait_for(broker: BrokerConfig, kind: str, ids: list[str], timeout: float) -> None:
    """Until every agent of ``ids`` has published its retained ``kind`` (profile, links)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = FleetView.snapshot(broker, (kind,), 2.0)
        have = state.best_links() if kind == "links" else getattr(state, kind)
        if all(i in have for i in ids):
            return
        time.sleep(1.0)
    raise SystemExit(f"no {kind} from all of {ids} within {timeout:.0f} s")


def grid_from_costs(costs: Any, gate_delay: float) -> Grid:
    """Delay limits that leave out the slowest expert, then all but the fastest; energy limits
    that admit the cheapest expert, the two cheapest, ... (per step, as eval states them)."""
    t = costs.steps.astype(float)
    per_expert = (costs.prompt_delay + (t[:, None] - 1) * costs.decode_delay) / t[:, None]
    # (the gate's delay: the gateway's measured figure; 0 before it has run the gate)
    delay = np.sort(per_expert.mean(axis=0)) + gate_delay  # each expert alone, + the gate
    delays: list[float | None] = [None]
    if len(delay) > 1:
        delays += [round(float(delay[-2]) * 1.05, 4)]
    if len(delay) > 2:
        delays += [round(float(delay[0]) * 1.05, 4)]
    energy = np.sort(costs.energy.mean(axis=0))
    energies = [round(float(energy[: n + 1].sum()) * 1.05, 4) for n in range(len(energy) - 1)]
    return Grid(tuple(delays), (*energies, None))


def one_eval(
    reg: Registry,
    broker: BrokerConfig,
    gate: str,
    dataset: str,
    answerer_name: str,
    grid: Grid | None,
    k: int,
    seeds: int,
) -> tuple[Evaluation, Grid, float]:
    state = fleet_figures(broker, required=True)
    assert state is not None
    selection, test, note, sel_note = held_out_sets(reg, gate, dataset, None, state.best_links())
    delay = eval_gate_delay(state, gate, None, broker, live=answerer_name == "gateway")
    grid = grid or grid_from_costs(
        selection.costs,
        float(selection.gate_seconds(delay).mean()) if isinstance(delay, GateDelay) else 0.0,
    )
    bars = RouteBars()
    answerer = make_answerer(answerer_name, test, reg, broker, progress=bars, timeout_s=600)
    t0 = time.monotonic()
    try:
        result = evaluate(
            selection,
            test,
            answerer,
            grid,
            EvalSettings(k=k, seeds=seeds, gate=delay),
            test_note=note,
            selection_note=sel_note,
        )
    finally:
        bars.close()
        answerer.close()
    return result, grid, time.monotonic() - t0


def paper_tables() -> str:
    lines = ["## The paper's Tables II-IV (8 fine-tuned Qwen2.5 experts, RTX 4090s and Orins)", ""]
    for delay, rows in PAPER.items():
        lines += [
            f"τ_max = {delay} s | " + " | ".join(f"{e} J" for e in PAPER_ENERGIES),
            "|---|" + "---|" * len(PAPER_ENERGIES),
        ]
        lines += [
            f"| {m} | " + " | ".join(f"{v:.1f}" for v in vals) + " |" for m, vals in rows.items()
        ]
        lines.append("")
    return "\n".join(lines)


def side_by_side(scores: Evaluation, gateway: Evaluation) -> str:
    """Accuracy from stored scores vs through the gateway, and measured vs promised costs."""
    s, g = scores.to_json(), gateway.to_json()
    lines = [
        "## Stored scores vs the gateway (same questions, gate, subsets)",
        "",
        "| method | cell (τ, E) | acc scores | acc gateway | measured delay s/step | promised | "
        "measured energy J/step | promised | within |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(label: str, where: str, a: dict[str, Any], b: dict[str, Any]) -> str:
        c, pr = b["costs"] or {}, b.get("promised") or {}
        fmt = lambda x: "" if x is None else f"{x:.3g}"  # noqa: E731
        return (
            f"| {label} | {where} | {100 * a['accuracy']:.1f} | {100 * b['accuracy']:.1f} | "
            f"{fmt(c.get('delay'))} | {fmt(pr.get('delay'))} | {fmt(c.get('energy'))} | "
            f"{fmt(pr.get('energy'))} | {b['within_limits']} |"
        )

    for key, m in g["baselines"].items():
        if m["costs"] is not None:
            lines.append(row(m["label"], "-", s["baselines"][key], m))
    for cs, cg in zip(s["cells"], g["cells"], strict=True):
        if cg["feasible"]:
            where = f"{cg['delay_limit']}, {cg['energy_limit']}"
            for key in ("moe2", "smo_mv", "smo_plurality"):
                lines.append(
                    row(cg["methods"][key]["label"], where, cs["methods"][key], cg["methods"][key])
                )
    return "\n".join(lines) + "\n"


def oracle(reg: Registry, broker: BrokerConfig, gate: str, dataset: str) -> float:
    """Share of held-out questions some single expert gets right (a perfect router's ceiling
    over these experts, from the stored scores)."""
    links = measured_links(broker, required=False)
    _sel, test, _n, _s = held_out_sets(reg, gate, dataset, None, links)
    m = test.mixed
    qs = [
        Question(i, m.prompts[i], m.choices[i], int(m.answer[i]), m.apps[i])
        for i in range(m.n_samples)
    ]
    answerer = ScoreAnswerer(test)
    right = np.zeros(m.n_samples, dtype=bool)
    for e in test.experts:
        picks = [a.choice for a in answerer.answer(qs, Route((e,), 1))]
        right |= np.array([p == int(g) for p, g in zip(picks, m.answer, strict=True)])
    return float(right.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=200, help="questions to train the gate on")
    ap.add_argument("--test", type=int, default=150, help="held-out questions to evaluate on")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--expert", action="append", default=[], help="ID=GGUF[+LORA] (repeatable)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write both evaluations here")
    args = ap.parse_args()
    t_start = time.monotonic()
    phases: dict[str, float] = {}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-eval-"))
    workdir.mkdir(parents=True, exist_ok=True)
    fleet_spec = experts(args)
    ids = [a for a, *_ in fleet_spec]
    with start_broker("auto") as broker:
        cfg = BrokerConfig(host=broker.host, port=broker.port)
        with LocalFleet(cfg, workdir / "agents") as fleet:
            t0 = time.monotonic()
            for i, (agent_id, model, flags, device) in enumerate(fleet_spec):
                role = (
                    ["--serve-app", f"warm={','.join(ids)}:1", "--gateway-link-probe-first-s", "1"]
                    if i == 0
                    else []
                )
                fleet.start(
                    agent_id, model, "--n-threads", "1", "--device-class", device,
                    "--n-gpu-layers", "0", *PROFILE, *flags, *role,
                )  # fmt: skip
                # One at a time: agents profiling together on one machine slow each other down
                # and their profiles would promise too much delay.
                fleet.wait_online([agent_id], 600)
                wait_for(cfg, "profile", [agent_id], 1200)
            wait_for(cfg, "links", ids, 120)
            phases["fleet up and profiled"] = time.monotonic() - t0
            log(f"fleet: {', '.join(f'{a} ({d})' for a, _m, _f, d in fleet_spec)}")

            reg = Registry.open(f"sqlite:///{workdir / 'registry.db'}")
            train_set, test_set = questions(args.train, args.test)
            reg.add_dataset("bench-train", ds.CHOICE, "benchmarks", train_set)
            reg.add_dataset("bench-test", ds.CHOICE, "benchmarks", test_set)
            sync_once(reg, cfg)
            online = {a: i for a, i in online_experts(reg).items() if a in ids}
            t0 = time.monotonic()
            with RpcClient(cfg, timeout=600) as rpc:
                for name in ("bench-train", "bench-test"):
                    last = [0.0]

                    def progress(
                        done: int, total: int, name: str = name, last: list[float] = last
                    ) -> None:
                        if time.monotonic() - last[0] > 30 or done == total:
                            last[0] = time.monotonic()
                            log(f"collect {name}: {done}/{total}")

                    rep = collect(
                        reg, rpc, name, online, stop=threading.Event(), on_progress=progress
                    )
                    if not rep.complete:
                        raise SystemExit(f"collect {name} failed: {rep.as_dict()}")
            phases["collect scores"] = time.monotonic() - t0

            t0 = time.monotonic()
            row, trained = train_gate(
                reg, "bench-train", None, TrainConfig(), gates_dir=workdir / "gates"
            )
            export_gate(
                reg, row.version, [s.prompt for s in test_set][:16], gates_dir=workdir / "gates"
            )
            phases["train + export gate"] = time.monotonic() - t0
            m = trained.metrics()

            t0 = time.monotonic()
            scores, grid, _ = one_eval(
                reg, cfg, row.version, "bench-test", "scores", None, args.k, args.seeds
            )
            phases["eval from scores"] = time.monotonic() - t0
            t0 = time.monotonic()
            live, _, answer_s = one_eval(
                reg, cfg, row.version, "bench-test", "gateway", grid, args.k, args.seeds
            )
            phases["eval through the gateway"] = time.monotonic() - t0
            ceiling = oracle(reg, cfg, row.version, "bench-test")
            reg.close()

    # ------------------------------------------------------------------ the printout
    print(f"# bench_eval: {', '.join(ids)} on {len(test_set)} held-out questions\n")
    print(
        f"gate {row.version}: trained on {m['split']['train']} of {len(train_set)} pool questions "
        f"({m['epochs']} epochs, {m['seconds']:.0f} s); on its own test split: gate "
        f"{m['test']['gate']['accuracy']:.3f}, uniform {m['test']['uniform']['accuracy']:.3f}, "
        f"best expert {m['test']['best_expert']} "
        f"{m['test']['experts'][m['test']['best_expert']]['accuracy']:.3f}\n"
    )
    print("# From the stored scores\n")
    print(markdown(scores))
    print("# Through the gateway\n")
    print(markdown(live))
    print(side_by_side(scores, live))
    s = scores.to_json()
    singles = {k.split(":", 1)[1]: v for k, v in s["baselines"].items() if k.startswith("alone:")}
    print("## Reading aids\n")
    print(
        "best single expert: "
        + max(((v["accuracy"], k) for k, v in singles.items()), key=lambda x: x[0])[1]
        + "; "
        + ", ".join(f"{k} {100 * v['accuracy']:.1f}%" for k, v in singles.items())
    )
    print(f"some single expert right (a perfect router's ceiling): {100 * ceiling:.1f}%")
    routes = live.answerer_info.get("routes", [])
    answered = sum(r["questions"] for r in routes)
    print(
        f"answers through the gateway: {answered} in {answer_s:.0f} s "
        f"({answer_s / max(answered, 1):.2f} s each, one at a time, {len(routes)} routes); "
        f"errors: {sum(sum(r['errors'].values()) for r in routes)}; "
        f"partial: {sum(r['partial'] for r in routes)}"
    )
    print(
        "phases: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
        + f"; total {time.monotonic() - t_start:.0f} s "
        "(other work on this machine inflates times)\n"
    )
    print(paper_tables())
    if args.json:
        args.json.write_text(json.dumps({"scores": s, "gateway": live.to_json()}, default=str))


if __name__ == "__main__":
    main()
