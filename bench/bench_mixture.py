"""Cluster experts over every packaged task family, served by real agents (issue 21).

1. Corpus and clusters (``moe2ctl experts cluster``): the train split of all nineteen families
   (at most ``--per-family`` prompts each), embedded with the gate's encoder, K-means into
   ``--k`` clusters (the paper's 8; ``auto`` picks K by silhouette); what each cluster holds.
2. Fine-tuning (``moe2ctl experts finetune``): one LoRA adapter of the base per cluster,
   ``--steps`` optimizer steps each. Cached: a rerun with the same settings reuses the
   adapters (``<out>/adapters-<recipe>/<expert>.gguf`` and its ``done.json``) and skips
   training; an interrupted run resumes from its checkpoints.
3. The fleet: a loopback broker and one ``moe2-agent`` per expert (base + adapter, as the
   agents serve them), plus one agent serving the base alone (the Single Agent baseline).
4. Scores over MQTT (``collect``): a gate pool from the train split (questions the experts
   were not fine-tuned on, ``--pool-per-family`` of each family) and the held-out questions
   (``--eval-per-family`` of each family, split "heldout": no question text shared with the
   train split). Cached in a registry named after the adapters' hashes.
5. The gate (moe2's trainer, eq. 13) on the pool, over the experts only; exported to ONNX.
6. The tables, from the stored scores: per family, the base, each expert, the equal-weight
   mixture of all experts, MoE² (the gate's weights, all experts and top-k) and a perfect
   router's ceiling; the per-cluster loss table (each expert's loss on the held-out questions
   nearest each cluster); then ``moe2ctl eval`` on the held-out multiple-choice questions.

Accuracy is over the multiple-choice families; TriviaQA and NQ-open are free answers, scored
by the likelihood of their reference (loss per token only).

  python bench/bench_mixture.py                                   # the full run, ~2 h on 2 cores
  python bench/bench_mixture.py --k 2 --steps 2 --per-family 8 --pool-per-family 2 \\
      --eval-per-family 2 --out /tmp/smoke                          # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe2.controller import datasets as ds
from moe2.controller.collect import CollectSettings, collect
from moe2.controller.experts import packaged
from moe2.controller.experts.cluster import assign
from moe2.controller.gate.cli import embeddings, export_gate, train_gate
from moe2.controller.gate.config import TrainConfig
from moe2.controller.gate.embedding import Encoder
from moe2.controller.gate.train import TrainData
from moe2.controller.gate.weights import gate_weights
from moe2.controller.localfleet import LocalFleet
from moe2.controller.registry import Registry
from moe2.controller.registry.sync import online_experts, sync_once
from moe2.controller.settings import ControllerSettings
from moe2.shared.broker import start_broker
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import BrokerConfig, RpcClient

BASE_ID = "base"
EQUAL = "equal weights"
MOE2 = "MoE²"
ORACLE = "oracle (any expert right)"
ALL_MC = "all multiple choice"
# Nine agents share the machine's cores: a request of many samples may wait its turn.
COLLECT = CollectSettings(batch=8, timeout_s=600.0)
PROFILE = (
    "--profile-points", "2", "--profile-repeats", "2", "--profile-max-prompt-fraction", "0.1",
    "--profile-decode-tokens", "4", "--profile-idle-seconds", "0",
)  # fmt: skip


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def moe2ctl(*args: str) -> Any:
    """Run a moe2ctl command as a user would; its progress goes to our stderr."""
    cmd = [str(Path(sys.executable).parent / "moe2ctl"), *args, "--json"]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with status {out.returncode}")
    return json.loads(out.stdout)


# --------------------------------------------------------------------------- 1-2 experts


def clusters(args: argparse.Namespace, db: str, name: str, plot: Path) -> dict[str, Any]:
    reg = Registry.open(db)
    known = {c.name for c in reg.clusterings()}
    reg.close()
    if name in known:
        info: dict[str, Any] = moe2ctl("experts", "clusters", name, "--db", db)
        return info
    info = moe2ctl(
        "experts", "cluster", "--benchmark", "all", "--split", "train",
        "--per-benchmark", str(args.per_family), "-k", str(args.k), "--name", name,
        "--seed", "0", "--db", db, "--plot", str(plot),
    )  # fmt: skip
    return info


def finetune(args: argparse.Namespace, db: str, name: str, base: Path, out: Path) -> list[Any]:
    experts: list[Any] = moe2ctl(
        "experts", "finetune", "--base", str(base), "--clustering", name, "--db", db,
        "--out", str(out), "--prefix", args.prefix, "--rank", str(args.rank),
        "--alpha", str(2 * args.rank), "--lr", str(args.lr), "--batch-size", "8",
        "--accumulation", "1", "--epochs", str(args.epochs), "--max-steps", str(args.steps),
        "--cutoff-len", str(args.cutoff), "--threads", str(args.threads),
        "--val-samples", "16",
    )  # fmt: skip
    return experts


# --------------------------------------------------------------------------- 3-4 scores


def question_sets(
    args: argparse.Namespace, reg: Registry, corpus: str
) -> tuple[list[ds.Sample], list[ds.Sample]]:
    """(gate pool, held-out questions). The pool is drawn from the train split less the
    questions the experts were fine-tuned on (families whose train half they all saw lend
    from those); the held-out questions come from the heldout split."""
    tuned = {s.prompt for s in reg.samples(corpus)}
    pool: list[ds.Sample] = []
    held: list[ds.Sample] = []
    for name in ds.BENCHMARKS:
        train = ds.from_benchmark(name, split="train")
        fresh = [s for s in train if s.prompt not in tuned] or train
        pool += _draw(fresh, args.pool_per_family)
        held += ds.from_benchmark(name, args.eval_per_family, seed=21, split="heldout")
    return pool, held


def _draw(samples: list[ds.Sample], n: int) -> list[ds.Sample]:
    import random

    return samples if n >= len(samples) else random.Random(17).sample(samples, n)


def wait_for_profiles(broker: BrokerConfig, ids: list[str], timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = FleetView.snapshot(broker, ("profile",), 2.0)
        if all(i in state.profile for i in ids):
            return
        time.sleep(1.0)
    raise SystemExit(f"no profile from all of {ids} within {timeout:.0f} s")


def collect_all(reg: Registry, cfg: BrokerConfig, datasets: list[str], ids: list[str]) -> None:
    sync_once(reg, cfg)
    online = {a: i for a, i in online_experts(reg).items() if a in ids}
    missing = [a for a in ids if a not in online]
    if missing:
        raise SystemExit(f"agents {missing} are not online")
    with RpcClient(cfg, timeout=600) as rpc:
        for name in datasets:
            last = [0.0]

            def progress(done: int, total: int, name: str = name, last: list[float] = last) -> None:
                if time.monotonic() - last[0] > 30 or done == total:
                    last[0] = time.monotonic()
                    log(f"collect {name}: {done}/{total}")

            rep = collect(
                reg, rpc, name, online, COLLECT, stop=threading.Event(), on_progress=progress
            )
            if not rep.complete:
                raise SystemExit(f"collect {name} failed: {rep.as_dict()}")


# --------------------------------------------------------------------------- 6 tables


@dataclass
class Methods:
    """Every method's fused option log-likelihoods on the held-out questions."""

    data: TrainData
    loglik: dict[str, np.ndarray]  # method -> (questions, options)
    families: np.ndarray  # (questions,) family of each question
    choice: np.ndarray  # (questions,) bool: multiple choice (accuracy is defined)

    def correct(self, method: str) -> np.ndarray:
        return np.asarray(self.loglik[method].argmax(1) == self.data.mixed.answer)

    def nll(self, method: str, idx: np.ndarray) -> tuple[float, int]:
        """(summed NLL of the correct answers' tokens, their count) over ``idx``."""
        m = self.data.mixed
        right = self.loglik[method][idx, m.answer[idx]]
        return float(-right.sum()), int(m.mask[idx, m.answer[idx]].sum())

    def loss(self, method: str, idx: np.ndarray) -> float:
        """Nats per token of the correct answer over ``idx``."""
        total, tokens = self.nll(method, idx)
        return total / max(tokens, 1)


def methods(reg: Registry, dataset: str, experts: list[str], gate: str, k: int) -> Methods:
    """The base, each expert, equal weights over the experts (the paper's M. V.: ω = 1/|S|,
    fused by eq. 29), MoE² (the gate's weights over all experts, and its top-k), from the
    stored scores."""
    names = [BASE_ID, *experts]
    table = reg.score_table(dataset, names)
    emb = embeddings(reg, Encoder.load(), [s.prompt for s in table.samples])
    data = TrainData.build(table, emb, dataset)
    n, e = len(table.samples), len(names)
    g = gate_weights(reg, experts, [s.prompt for s in table.samples], gate).values  # (n, e-1)

    def only(j: int) -> np.ndarray:
        w = np.full((n, e), -np.inf)
        w[:, j] = 0.0
        return w

    def over_experts(weights: np.ndarray) -> np.ndarray:
        w = np.full((n, e), -np.inf)
        with np.errstate(divide="ignore"):
            w[:, 1:] = np.log(weights)
        return w

    top = np.argsort(-g, axis=1)[:, :k]
    g_top = np.zeros_like(g)
    np.put_along_axis(g_top, top, np.take_along_axis(g, top, 1), 1)
    weights = {BASE_ID: only(0)} | {x: only(j + 1) for j, x in enumerate(experts)}
    weights[EQUAL] = over_experts(np.full((n, e - 1), 1 / (e - 1)))
    weights[MOE2] = over_experts(g)
    weights[f"{MOE2} top-{k}"] = over_experts(g_top / g_top.sum(1, keepdims=True))
    return Methods(
        data,
        {m: data.mixed.option_loglik(w) for m, w in weights.items()},
        np.array([ds.family_of(s.app) or s.app for s in table.samples]),
        np.array([len(s.targets) > 1 for s in table.samples]),
    )


def paired_interval(a: np.ndarray, b: np.ndarray, rounds: int = 2000) -> tuple[float, float]:
    """95% paired bootstrap interval of mean(a) - mean(b), percentage points."""
    rng = np.random.default_rng(0)
    diff = a.astype(float) - b.astype(float)
    means = diff[rng.integers(0, len(diff), (rounds, len(diff)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return 100 * float(lo), 100 * float(hi)


def family_table(parts: list[Methods], experts: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{method: {family | ALL_MC: {"acc", "loss", "n"}}} over the held-out sets (each family
    lies in one of them); a perfect router's ceiling too."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for m in parts:
        groups = {f: np.flatnonzero(m.families == f) for f in ds.BENCHMARKS}
        if m.choice.all():
            groups[ALL_MC] = np.arange(len(m.choice))
        right = {x: m.correct(x) for x in m.loglik}
        right[ORACLE] = np.any([right[x] for x in experts], axis=0)
        for label, hits in right.items():
            for f, idx in groups.items():
                if len(idx) == 0:
                    continue
                mc = bool(m.choice[idx].all())
                out.setdefault(label, {})[f] = {
                    "acc": float(hits[idx].mean()) if mc else None,
                    "loss": m.loss(label, idx) if label in m.loglik else None,
                    "n": len(idx),
                }
    order = [*ds.BENCHMARKS, ALL_MC]
    return {label: {f: row[f] for f in order if f in row} for label, row in out.items()}


def headline(m: Methods, experts: list[str], k: int) -> list[dict[str, Any]]:
    """MoE² against the base, the best single expert and equal weights on every held-out
    multiple-choice question, with paired bootstrap intervals."""
    right = {x: m.correct(x) for x in m.loglik}
    best = max(experts, key=lambda x: right[x].mean())
    rows = []
    for moe in (MOE2, f"{MOE2} top-{k}"):
        for other, label in ((BASE_ID, "base (S. A.)"), (best, f"best expert {best}"),
                             (EQUAL, EQUAL)):  # fmt: skip
            lo, hi = paired_interval(right[moe], right[other])
            rows.append(
                {
                    "moe2": moe,
                    "vs": label,
                    "moe2_acc": float(right[moe].mean()),
                    "other_acc": float(right[other].mean()),
                    "diff_points": 100 * float(right[moe].mean() - right[other].mean()),
                    "interval": (lo, hi),
                    "questions": len(m.choice),
                }
            )
    return rows


def cluster_losses(
    parts: list[Methods], names: list[str], centroids: np.ndarray
) -> tuple[list[int], dict[str, list[float]]]:
    """Held-out questions joined to their nearest centroid; each model's loss (nats per token
    of the correct answer) per cluster."""
    k = len(centroids)
    near = [assign(m.data.emb, centroids) for m in parts]
    sizes = [int(sum((n == c).sum() for n in near)) for c in range(k)]
    out: dict[str, list[float]] = {}
    for name in names:
        row = []
        for c in range(k):
            got = [m.nll(name, np.flatnonzero(n == c)) for m, n in zip(parts, near)]
            total, tokens = sum(g[0] for g in got), sum(g[1] for g in got)
            row.append(total / tokens if tokens else math.nan)
        out[name] = row
    return sizes, out


def print_family_table(t: dict[str, dict[str, dict[str, Any]]]) -> None:
    cols = [c for c in (*ds.BENCHMARKS, ALL_MC) if c in t[next(iter(t))]]
    short = {c: c[:7] for c in cols} | {ALL_MC: "ALL MC"}
    print("accuracy % (free-answer families: loss per token, nats)")
    print(f"{'method':30s}" + "".join(f" {short[c]:>7s}" for c in cols))
    for label, row in t.items():
        cells = []
        for c in cols:
            cell = row.get(c)
            if cell is None:
                cells.append(f" {'':>7s}")
            elif cell["acc"] is not None:
                cells.append(f" {100 * cell['acc']:7.1f}")
            else:
                cells.append(f" {cell['loss']:7.3f}" if cell["loss"] is not None else " " * 8)
        print(f"{label[:30]:30s}" + "".join(cells))
    first = t[next(iter(t))]
    print(f"{'questions':30s}" + "".join(f" {first[c]['n']:>7d}" for c in cols))


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m", choices=sorted(packaged.PACKAGED_MODELS))
    ap.add_argument("--k", default="8", help="clusters (experts), or 'auto'")
    ap.add_argument("--per-family", type=int, default=300, help="fine-tuning prompts per family")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per expert (cap)")
    ap.add_argument("--epochs", type=float, default=2.0, help="passes over a cluster (cap)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--cutoff", type=int, default=256, help="tokens per training sequence")
    ap.add_argument("--threads", type=int, default=2, help="fine-tuning threads")
    ap.add_argument("--pool-per-family", type=int, default=16, help="gate pool questions")
    ap.add_argument("--eval-per-family", type=int, default=60, help="held-out questions")
    ap.add_argument("--top-k", type=int, default=2, help="experts fused per question")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.prefix = args.base.split("-")[0]

    out = args.out or ControllerSettings.load().experts_dir / f"bench-mixture-{args.base}-k{args.k}"
    out.mkdir(parents=True, exist_ok=True)
    os.environ["MOE2_DATA_DIR"] = str(out / "data")
    db = f"sqlite:///{out / 'registry.db'}"
    phases: dict[str, float] = {}
    t_all = time.monotonic()
    base = packaged.fetch(args.base)
    name = f"mix{args.per_family}-k{args.k}"

    t0 = time.monotonic()
    info = clusters(args, db, name, out / "clusters.png")
    phases["cluster"] = time.monotonic() - t0
    t0 = time.monotonic()
    # One folder per training recipe: a rerun with the same one reuses its adapters, another
    # one trains its own (a checkpoint never resumes under other settings).
    recipe = [args.steps, args.epochs, args.rank, args.lr, args.cutoff]
    adapters = out / f"adapters-{hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:8]}"
    experts = finetune(args, db, name, base, adapters)
    phases["fine-tune"] = time.monotonic() - t0
    ids = [e["name"] for e in experts]

    # Scores live in a registry named after what was scored: the adapters and the questions.
    key = hashlib.sha256(
        json.dumps(
            [e["adapter_sha256"] for e in experts]
            + [args.pool_per_family, args.eval_per_family, str(base)]
        ).encode()
    ).hexdigest()[:12]
    reg = Registry.open(db)
    rec = reg.clustering(name)
    pool, held = question_sets(args, reg, rec.dataset)
    reg.close()
    sdb = f"sqlite:///{out / f'scores-{key}.db'}"
    reg = Registry.open(sdb)
    reg.add_dataset("pool", ds.kind_of(pool), "benchmark:all:split=train (not fine-tuned on)", pool)
    for kind, label in ((ds.CHOICE, "mc"), (ds.FREE, "free")):
        part = [s for s in held if s.kind == kind]
        reg.add_dataset(f"heldout-{label}", kind, f"benchmark:all:split=heldout:{kind}", part)

    t0 = time.monotonic()
    with start_broker("auto") as broker:
        cfg = BrokerConfig(host=broker.host, port=broker.port)
        with LocalFleet(cfg, out / "agents") as fleet:
            fleet_ids = [BASE_ID, *ids]
            for e in [None, *experts]:
                agent = BASE_ID if e is None else e["name"]
                lora = [] if e is None else ["--lora", e["adapter"]]
                fleet.start(
                    agent, base, "--n-threads", "1", "--device-class", "cpu-generic",
                    *PROFILE, *lora,
                )  # fmt: skip
            fleet.wait_online(fleet_ids, 600)
            wait_for_profiles(cfg, fleet_ids, 1800)
            phases["fleet up"] = time.monotonic() - t0
            t0 = time.monotonic()
            collect_all(reg, cfg, ["pool"], ids)
            collect_all(reg, cfg, ["heldout-mc", "heldout-free"], fleet_ids)
            phases["collect scores"] = time.monotonic() - t0

            t0 = time.monotonic()
            row, trained = train_gate(reg, "pool", ids, TrainConfig(), gates_dir=out / "gates")
            export_gate(reg, row.version, [s.prompt for s in held][:16], gates_dir=out / "gates")
            phases["gate"] = time.monotonic() - t0

            t0 = time.monotonic()
            found = [
                methods(reg, f"heldout-{x}", ids, row.version, args.top_k) for x in ("mc", "free")
            ]
            fams = family_table(found, ids)
            heads = headline(found[0], ids, args.top_k)
            sizes, losses = cluster_losses(found, fleet_ids, rec.centroids)
            reg.close()
            evaluation = moe2ctl(
                "eval", "heldout-mc", "--gate", row.version, "--db", sdb, "--k",
                str(args.top_k), "--no-plot", "--broker-host", cfg.host,
                "--broker-port", str(cfg.port),
            )  # fmt: skip
            phases["evaluate"] = time.monotonic() - t0

    # ------------------------------------------------------------------ the printout
    m = info["metrics"]
    print(f"# bench_mixture: {len(ids)} LoRA experts of {args.base}, K={info['k']}\n")
    print(
        f"## 1. clusters of {info['prompts']} train-split prompts: purity against the families "
        f"{m['families']['purity']:.3f} (shuffled {m['families']['purity_shuffled']:.3f}), "
        f"NMI {m['families']['nmi']:.3f} ({m['families']['nmi_shuffled']:.3f})"
    )
    print(f"{'family':16s}" + "".join(f" {f'c{c}':>4s}" for c in range(info["k"])))
    for f in info["families"]:
        cells = "".join(
            f" {round(100 * n / f['prompts']):>4d}" if n else "    ." for n in f["per_cluster"]
        )
        print(f"{f['family']:16s}{cells}")
    print("\n## 2. experts (val loss: 16 kept-back prompts of the expert's own cluster)")
    for e in experts:
        print(
            f"{e['name']:28s} steps {e['steps']}/{e['planned_steps']}  "
            f"{e['val_loss_base']:.3f} -> {e['val_loss']:.3f}  {e['adapter']}"
        )
    gm = trained.metrics()
    print(
        f"\n## 3. held-out questions per family (gate {row.version}: trained on "
        f"{gm['split']['train']} of {len(pool)} pool questions, {gm['epochs']} epochs)"
    )
    print_family_table(fams)
    print("\nMoE² against ... on every held-out multiple-choice question (paired bootstrap 95%)")
    for h in heads:
        lo, hi = h["interval"]
        print(
            f"{h['moe2']:10s} {100 * h['moe2_acc']:5.1f} vs {h['vs']:28s} "
            f"{100 * h['other_acc']:5.1f}: {h['diff_points']:+5.1f} points [{lo:+.1f}, {hi:+.1f}]"
        )
    print("\n## 4. loss per token of the correct answer on held-out questions, by nearest cluster")
    print(f"{'model':28s}" + "".join(f" {f'c{c}({n})':>10s}" for c, n in enumerate(sizes)))
    for n_, row_ in losses.items():
        print(f"{n_:28s}" + "".join(f" {v:10.3f}" for v in row_))
    own = [min(ids, key=lambda x: losses[x][c]) == ids[c] for c in range(len(ids)) if sizes[c]]
    print(f"each expert lowest on its own cluster: {sum(own)}/{len(own)}")
    print("\n## 5. moe2ctl eval on the held-out multiple-choice questions")
    for key_, b in evaluation.get("baselines", {}).items():
        print(f"{b.get('label', key_):40s} {100 * b['accuracy']:.1f}")
    for cell in evaluation.get("cells", []):
        for key_, mm in cell.get("methods", {}).items():
            print(f"{mm.get('label', key_):40s} {100 * mm['accuracy']:.1f}")
    phases["total"] = time.monotonic() - t_all
    print("\nphases: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()))
    print(f"adapters: {adapters} (reused by a rerun with the same settings)")
    (out / "results.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "clusters": info,
                "experts": experts,
                "families": fams,
                "headline": heads,
                "cluster_sizes": sizes,
                "cluster_losses": losses,
                "eval": evaluation,
                "phases": phases,
            },
            indent=1,
            default=str,
        )
    )
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
