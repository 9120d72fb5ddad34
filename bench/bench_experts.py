"""Domain experts benchmark (issue 11): K LoRA experts of SmolLM2-135M, on the CPU.

1. ``moe2ctl experts cluster``: MMLU's dev+validation questions (the "train" split), embedded
   with the gate's encoder, K-means into K clusters; what each cluster holds.
2. ``moe2ctl experts finetune``: one LoRA adapter per cluster on the packaged SmolLM2-135M GGUF
   (bounded steps), written as llama.cpp adapter GGUFs; the wall time.
3. Held-out MMLU test questions (split "heldout": no question text shared with the training
   split), joined to the clusters by nearest centroid, scored teacher-forced through
   llama.cpp on base + adapter exactly as agents serve them: each expert's loss (mean NLL per
   token of the correct answer) and accuracy (answer log-likelihood picks the option) on every
   cluster, next to the base's.
4. From the same scores: base, best single expert, majority vote, uniform mixture, routing by
   nearest centroid, and the MoE² gate (trained with moe2's gate trainer on the scores,
   5-fold cross-validated), on the same held-out questions.

Everything is kept under --out (default <data dir>/experts/bench-smollm2-k<K>): the registry,
the adapters (serve one with ``moe2-agent --model BASE --lora ADAPTER``), results.json. A rerun
resumes fine-tuning from its checkpoints and reuses cached embeddings.

  python bench/bench_experts.py [--k 4] [--steps 60] [--per-cluster 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend
from moe2.controller import datasets as ds
from moe2.controller.experts import packaged
from moe2.controller.experts.cluster import assign
from moe2.controller.gate.cli import embeddings
from moe2.controller.gate.config import TrainConfig
from moe2.controller.gate.embedding import Encoder
from moe2.controller.gate.train import TrainData, evaluate_weights, gate_values, train
from moe2.controller.registry import Registry, SampleRow, ScoreTable
from moe2.controller.settings import ControllerSettings
from moe2.shared.files import sha256_file


def moe2ctl(*args: str) -> Any:
    """Run a moe2ctl command as a user would; its progress goes to our stderr."""
    cmd = [str(Path(sys.executable).parent / "moe2ctl"), *args, "--json"]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with status {out.returncode}")
    return json.loads(out.stdout)


# --------------------------------------------------------------------------- scoring


def scores_for(
    base: Path, adapter: Path | None, samples: list[SampleRow], threads: int
) -> list[list[np.ndarray]]:
    """Per question, per option, the log-probabilities of its tokens after the prompt (natural
    log): the agent's ``score_choices`` (prompt with BOS as the model wants, evaluated once;
    each option tokenized on its own), on base + adapter as an agent serves them."""
    b = LlamaCppBackend(AgentConfig(model=base, n_threads=threads, n_ctx=1024, lora=adapter))
    try:
        return [
            b.score_choices(
                b.tokenize(s.prompt, add_bos=b.info.add_bos),
                [b.tokenize(t, add_bos=False) for t in s.targets],
            )
            for s in samples
        ]
    finally:
        b.close()


# --------------------------------------------------------------------------- metrics


def loss_acc(logp: list[list[np.ndarray]], samples: list[SampleRow], idx: list[int]) -> tuple:
    """(mean NLL per token of the correct answer, accuracy) over ``idx``."""
    nll = sum(-logp[i][samples[i].answer].sum() for i in idx)
    tokens = sum(len(logp[i][samples[i].answer]) for i in idx)
    acc = np.mean([int(np.argmax([o.sum() for o in logp[i]])) == samples[i].answer for i in idx])
    return nll / max(tokens, 1), float(acc)


def majority_vote(per_expert: list[list[list[np.ndarray]]], i: int) -> int:
    """Each expert votes for its most likely option; ties go to the option with the highest
    log-likelihood summed over the experts."""
    opts = len(per_expert[0][i])
    votes = np.zeros(opts)
    total = np.zeros(opts)
    for lp in per_expert:
        sums = np.array([o.sum() for o in lp[i]])
        votes[int(np.argmax(sums))] += 1
        total += sums
    best = np.flatnonzero(votes == votes.max())
    return int(best[np.argmax(total[best])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per expert")
    ap.add_argument("--max-seconds", type=float, default=330, help="per expert")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--cutoff", type=int, default=192, help="tokens per training sequence")
    ap.add_argument("--per-cluster", type=int, default=50, help="held-out questions per cluster")
    ap.add_argument("--candidates", type=int, default=2500, help="held-out questions embedded")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    out = args.out or ControllerSettings.load().experts_dir / f"bench-smollm2-k{args.k}"
    out.mkdir(parents=True, exist_ok=True)
    db = f"sqlite:///{out / 'registry.db'}"
    os.environ["MOE2_DATA_DIR"] = str(out / "data")
    times: dict[str, float] = {}
    t_all = time.monotonic()

    base = packaged.fetch("smollm2-135m")
    name = f"mmlu-train-k{args.k}"

    # 1. clusters ------------------------------------------------------------------------
    t0 = time.monotonic()
    reg = Registry.open(db)
    known = {c.name for c in reg.clusterings()}
    reg.close()
    if name in known:
        info = moe2ctl("experts", "clusters", name, "--db", db, "--top", "6")
    else:
        info = moe2ctl(
            "experts", "cluster", "--benchmark", "mmlu", "--split", "train", "-k", str(args.k),
            "--name", name, "--db", db, "--top", "6", "--plot", str(out / "clusters.png"),
        )  # fmt: skip
    times["cluster"] = time.monotonic() - t0
    m = info["metrics"]
    print(f"\n== 1. clusters: {info['prompts']} MMLU dev+validation prompts, K={args.k}")
    print(
        f"   vs the 57 subjects: purity {m['purity']:.3f} (shuffled {m['purity_shuffled']:.3f}), "
        f"adjusted Rand {m['adjusted_rand']:.3f} ({m['adjusted_rand_shuffled']:.3f}), "
        f"NMI {m['nmi']:.3f} ({m['nmi_shuffled']:.3f})"
    )
    for c in info["clusters"]:
        tops = ", ".join(f"{t['label']} {t['count']}" for t in c["top"])
        print(f"   cluster {c['cluster']} ({c['size']:4d}): {tops}")
    print(f"   plot: {out / 'clusters.png'}")

    # 2. fine-tuning ---------------------------------------------------------------------
    t0 = time.monotonic()
    experts = moe2ctl(
        "experts", "finetune", "--base", str(base), "--clustering", name, "--db", db,
        "--out", str(out / "adapters"), "--prefix", "smollm2", "--rank", str(args.rank),
        "--alpha", str(2 * args.rank), "--lr", str(args.lr), "--batch-size", "8",
        "--accumulation", "1", "--max-steps", str(args.steps), "--cutoff-len", str(args.cutoff),
        "--max-seconds", str(args.max_seconds), "--threads", str(args.threads),
        "--val-samples", "16",
    )  # fmt: skip
    times["finetune"] = time.monotonic() - t0
    print(f"\n== 2. fine-tuning ({times['finetune']:.0f} s wall)")
    print(
        "   expert      steps  train s  val loss base -> expert (16 kept-back train-split prompts)"
    )
    for e in experts:
        print(
            f"   {e['name']:10s} {e['steps']:>3d}/{e['planned_steps']:<3d} "
            f"{e['seconds']:>7.0f}  "
            f"{e['val_loss_base']:.3f} -> {e['val_loss']:.3f}"
        )

    # 3. held-out evaluation ---------------------------------------------------------------
    t0 = time.monotonic()
    reg = Registry.open(db)
    rec = reg.clustering(name)
    heldout = ds.from_benchmark("mmlu", args.candidates, seed=11, split="heldout")
    eval_name = f"mmlu-heldout-{args.candidates}"
    reg.add_dataset(eval_name, ds.kind_of(heldout), "benchmark:mmlu:split=heldout", heldout)
    rows = reg.samples(eval_name)
    emb = embeddings(reg, Encoder.load(), [r.prompt for r in rows])
    reg.close()
    cluster_of = assign(emb, rec.centroids)
    chosen: list[int] = []
    for c in range(rec.k):
        chosen += [i for i in range(len(rows)) if cluster_of[i] == c][: args.per_cluster]
    samples = [rows[i] for i in chosen]
    clusters = np.array([cluster_of[i] for i in chosen])
    e_emb = emb[chosen]
    names = ["base"] + [e["name"] for e in experts]
    adapters: list[Path | None] = [None] + [Path(e["adapter"]) for e in experts]
    logp: dict[str, list[list[np.ndarray]]] = {}
    # Scores are kept per (model, adapter bytes, questions, scorer): a rerun scores only what
    # changed ("choices": the agent's score_choices).
    key = hashlib.sha256(json.dumps([[s.prompt, s.targets] for s in samples]).encode())
    for n, a in zip(names, adapters):
        digest = sha256_file(a)[:12] if a is not None else "base"
        cache = out / "scores" / f"{n}-{digest}-{key.hexdigest()[:12]}-choices.pkl"
        if cache.exists():
            logp[n] = pickle.loads(cache.read_bytes())
            continue
        t1 = time.monotonic()
        logp[n] = scores_for(base, a, samples, args.threads)
        cache.parent.mkdir(exist_ok=True)
        cache.write_bytes(pickle.dumps(logp[n]))
        print(
            f"   scored {n}: {len(samples)} questions in {time.monotonic() - t1:.0f} s",
            file=sys.stderr,
        )
    times["evaluate"] = time.monotonic() - t0
    # score_choices (prompt once, options behind it) against score (each option on its own
    # from an empty cache), on one question's options: llama.cpp is not batch-invariant.
    check = LlamaCppBackend(AgentConfig(model=base, n_threads=args.threads, lora=adapters[1]))
    tokenizer_hash = check.info.tokenizer_hash
    s0 = samples[0]
    p0 = check.tokenize(s0.prompt, add_bos=check.info.add_bos)
    direct = [check.score(p0, check.tokenize(t, add_bos=False)) for t in s0.targets]
    check.close()
    scorer_diff = max(float(np.abs(d - c).max()) for d, c in zip(direct, logp[names[1]][0]))

    sizes = [int((clusters == c).sum()) for c in range(rec.k)]
    print(
        f"\n== 3. held-out MMLU test questions (split 'heldout'), by nearest centroid: "
        f"{sizes} per cluster"
    )
    print("   loss = mean NLL per token of the correct answer (nats); acc = accuracy")
    header = "   model        " + "".join(f"  cluster {c} loss/acc" for c in range(rec.k))
    print(header + "        all loss/acc")
    table: dict[str, dict[str, Any]] = {}
    for n in names:
        cells = []
        table[n] = {}
        for c in range(rec.k):
            idx = [i for i in range(len(samples)) if clusters[i] == c]
            lo, acc = loss_acc(logp[n], samples, idx)
            table[n][str(c)] = {"loss": lo, "acc": acc}
            cells.append(f"{lo:13.3f}/{acc:.2f}")
        lo, acc = loss_acc(logp[n], samples, list(range(len(samples))))
        table[n]["all"] = {"loss": lo, "acc": acc}
        print(f"   {n:12s}" + "".join(f" {x:>20s}" for x in cells) + f" {lo:12.3f}/{acc:.2f}")
    own_best = []
    for c in range(rec.k):
        col = {n: table[n][str(c)]["loss"] for n in names}
        own_best.append(min(col, key=col.get) == names[c + 1])
    print(f"   own expert has the lowest loss on its cluster: {own_best}")

    # 4. the mixture comparison -------------------------------------------------------------
    ex_names = names[1:]
    table_scores = ScoreTable(
        experts=ex_names,
        samples=samples,
        logp=[
            [np.stack([logp[n][i][o] for n in ex_names]) for o in range(len(samples[i].targets))]
            for i in range(len(samples))
        ],
        tokenizers=[[frozenset({tokenizer_hash})] * len(ex_names) for _ in samples],
    )
    data = TrainData.build(table_scores, e_emb)
    n, e = len(samples), len(ex_names)
    methods: dict[str, Any] = {}
    methods["base"] = table["base"]["all"]
    singles = {x: table[x]["all"] for x in ex_names}
    best = max(singles, key=lambda x: (singles[x]["acc"], -singles[x]["loss"]))
    methods[f"best single expert ({best})"] = singles[best]
    mv = np.array([majority_vote([logp[x] for x in ex_names], i) for i in range(n)])
    methods["majority vote (all experts)"] = {
        "loss": None,
        "acc": float((mv == data.answer).mean()),
    }
    uni = evaluate_weights(data, np.full((n, e), -math.log(e)))
    methods["uniform mixture"] = {"loss": uni.nll_per_token, "acc": uni.accuracy}
    route = np.full((n, e), -np.inf)
    route[np.arange(n), clusters] = 0.0
    r = evaluate_weights(data, route)
    methods["nearest-centroid routing (top-1)"] = {"loss": r.nll_per_token, "acc": r.accuracy}
    # MoE² gate: moe2's trainer on the scores, 5-fold cross-validated (each question scored
    # by a gate that did not see it).
    folds = np.random.default_rng(0).permutation(n) % 5
    g_all = np.zeros((n, e))
    for f in range(5):
        tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
        res = train(data.subset(tr), TrainConfig(seed=f))
        g_all[te] = gate_values(res.head, data.emb[te])
    g = evaluate_weights(data, np.log(np.clip(g_all, 1e-30, None)))
    methods["MoE² gate (all experts, weights)"] = {"loss": g.nll_per_token, "acc": g.accuracy}
    for k in (1, 2):
        top = np.argsort(-g_all, 1)[:, :k]
        w = np.full((n, e), -np.inf)
        sel = np.take_along_axis(g_all, top, 1)
        np.put_along_axis(w, top, np.log(sel / sel.sum(1, keepdims=True)), 1)
        gk = evaluate_weights(data, w)
        methods[f"MoE² gate top-{k}"] = {"loss": gk.nll_per_token, "acc": gk.accuracy}
    right = np.array(
        [[int(np.argmax([o.sum() for o in logp[x][i]])) == samples[i].answer for x in ex_names]
         for i in range(n)]
    )  # fmt: skip
    methods["oracle (any expert right)"] = {"loss": None, "acc": float(right.any(1).mean())}
    print(f"\n== 4. on the same {n} held-out questions (gate: 5-fold cross-validation)")
    print("   method                                   acc     loss/token")
    for k_, v in methods.items():
        lo = "-" if v["loss"] is None else f"{v['loss']:.3f}"
        print(f"   {k_:40s} {v['acc']:.3f}   {lo}")

    times["total"] = time.monotonic() - t_all
    print(
        f"\nwall time: clustering {times['cluster']:.0f} s, fine-tuning {times['finetune']:.0f} s, "
        f"evaluation {times['evaluate']:.0f} s, total {times['total']:.0f} s "
        f"({args.threads} threads)"
    )
    print(f"score_choices vs score, one question's options: max |diff| {scorer_diff:.2e} nats")
    print(f"adapters: {out / 'adapters'}  (moe2ctl experts list --db {db})")
    print(f"serve one: moe2-agent {' '.join(experts[0]['agent_flags'])} --id {experts[0]['name']}")
    results = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "clusters": info,
        "experts": experts,
        "eval_per_cluster": sizes,
        "table": table,
        "methods": methods,
        "times": times,
        "scorer_diff": scorer_diff,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
