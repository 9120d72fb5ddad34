"""Gate learning rate: Table VI's 1e-5 against larger ones, everything else at the defaults.

Two data sets: the tiny fleet (four domain experts built at run time, 4-option questions
scored in-process, the gate's test split held out), and the synthetic 10,000 × 8 of
bench_gate.py. Reports each run's held-out loss and accuracy, steps, LR decays and seconds.

  python bench/bench_gate_lr.py [--lrs 1e-5,1e-4,1e-3] [--per-domain 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend
from moe2.controller import datasets as ds
from moe2.controller.experts.tiny import build_experts
from moe2.controller.gate.cli import embeddings
from moe2.controller.gate.config import TrainConfig
from moe2.controller.gate.embedding import Encoder
from moe2.controller.gate.train import TrainData, train
from moe2.controller.mixing import Mixed
from moe2.controller.registry import Registry

DOMAINS = ("animals", "code", "cooking", "arithmetic")


def tiny_data(tmp: Path, per_domain: int) -> TrainData:
    models = build_experts(tmp / "tiny", DOMAINS)
    reg = Registry.open(f"sqlite:///{tmp / 'reg.db'}")
    reg.add_dataset("lr", "multiple-choice", "tiny", ds.tiny_domains(DOMAINS, per_domain, 3, 4))
    backends = {d: LlamaCppBackend(AgentConfig(model=models[d], n_threads=1)) for d in DOMAINS}
    first = backends[DOMAINS[0]]
    rows = []
    for s in reg.samples("lr"):
        prompt = first.tokenize(s.prompt, add_bos=first.info.add_bos)
        for o, target in enumerate(s.targets):
            ids = first.tokenize(target, add_bos=False)
            for name, b in backends.items():
                rows.append(
                    {
                        "sample_id": s.id,
                        "expert": name,
                        "option": o,
                        "tokenizer_hash": b.info.tokenizer_hash,
                        "tokens": ids,
                        "logprobs": b.score(prompt, ids),
                        "prompt_tokens": len(prompt),
                    }
                )
    reg.add_scores(rows)
    for b in backends.values():
        b.close()
    table = reg.score_table("lr")
    emb = embeddings(reg, Encoder.load(), [s.prompt for s in table.samples])
    reg.close()
    return TrainData.build(table, emb, "lr")


def synthetic_data(n: int, experts: int = 8, tokens: int = 8) -> TrainData:
    rng = np.random.default_rng(0)
    dom = rng.integers(0, experts, n)
    centres = rng.normal(size=(experts, 384))
    emb = (centres[dom] + rng.normal(scale=2.0, size=(n, 384))).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    logp = np.full((n, 1, experts, tokens), -7.0) + rng.normal(
        scale=0.3, size=(n, 1, experts, tokens)
    )
    logp[np.arange(n), 0, dom, :] = -1.0
    mixed = Mixed(
        experts=[f"e{i}" for i in range(experts)],
        sample_idx=np.arange(n),
        prompts=[""] * n,
        choices=[("",)] * n,
        apps=["a"] * n,
        logp=np.minimum(logp, 0),
        mask=np.ones((n, 1, tokens), bool),
        n_options=np.ones(n, np.int64),
        answer=np.zeros(n, np.int64),
        per_token=np.ones(n, bool),
        steps=np.full((n, 1), tokens),
    )
    return TrainData(mixed, emb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lrs", default="1e-5,1e-4,1e-3")
    ap.add_argument("--per-domain", type=int, default=60)
    ap.add_argument("--samples", type=int, default=10_000)
    args = ap.parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]
    with tempfile.TemporaryDirectory() as d:
        sets = {
            f"tiny fleet, {args.per_domain * 4} questions": tiny_data(Path(d), args.per_domain),
            f"synthetic, {args.samples} x 8": synthetic_data(args.samples),
        }
    print(
        "| data | lr | test loss gate | uniform | best expert | test acc gate | steps | "
        "LR decays | stopped | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, data in sets.items():
        for lr in lrs:
            t0 = time.perf_counter()
            r = train(data, TrainConfig(lr=lr))
            m = r.metrics()
            te = m["test"]
            best = te["experts"][te["best_expert"]]
            acc = "-" if te["gate"]["accuracy"] is None else f"{te['gate']['accuracy']:.3f}"
            print(
                f"| {name} | {lr:g} | {te['gate']['loss']:.3f} | {te['uniform']['loss']:.3f} | "
                f"{best['loss']:.3f} | {acc} | {m['steps']} | {m['lr_decays']} | "
                f"{m['stopped']} | {time.perf_counter() - t0:.1f} |"
            )


if __name__ == "__main__":
    main()
