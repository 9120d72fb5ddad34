"""Gate benchmark, one run, three figures (issue 5):

* gate latency per prompt, ONNX Runtime vs torch eager, side by side (target: ONNX >= 2x);
* gate training time on 10,000 samples x 8 experts with the Table VI defaults (<= 60 s),
  embeddings precomputed (they are cached in the registry; encoding time shown apart);
* score collection throughput over MQTT (collect into a registry) vs direct llama.cpp
  scoring of the same model and token ids (target >= 0.8x).

  python bench/bench_gate.py [--prompts 50] [--samples 10000] [--collect 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moe2.agent.config import AgentConfig
from moe2.agent.gateway.onnxgate import OnnxGate
from moe2.agent.llama import LlamaCppBackend
from moe2.controller import datasets as ds
from moe2.controller.collect import CollectSettings, collect
from moe2.controller.experts.tiny import build_experts
from moe2.controller.gate import export as ex
from moe2.controller.gate.config import TrainConfig
from moe2.controller.gate.embedding import MAX_LENGTH, Encoder, encode_batch, load_tokenizer
from moe2.controller.gate.model import GateHead
from moe2.controller.gate.train import TrainData, train
from moe2.controller.localfleet import LocalFleet
from moe2.controller.mixing import Mixed
from moe2.controller.registry import Registry
from moe2.controller.registry.sync import online_experts, sync_once
from moe2.shared.broker import start_broker
from moe2.shared.mqtt import BrokerConfig, RpcClient

DOMAINS = ("animals", "code", "cooking", "arithmetic")


def bench_latency(tmp: Path, n: int) -> dict[str, float]:
    enc = Encoder.load()
    head = GateHead(enc.dim, 8).eval()
    files = ex.export(enc, head, tmp / "gate", tmp / "enc")
    manifest = ex.write_manifest(tmp / "gate", "bench", [f"e{i}" for i in range(8)], files)
    gate = OnnxGate(manifest, {k: v.read_bytes() for k, v in ex.gate_files(tmp / "gate").items()})
    prompts = [s.prompt + " " + s.targets[0] for s in ds.tiny_domains(DOMAINS, n // 4 + 1, 5)][:n]
    tok = load_tokenizer(enc.tokenizer_json, MAX_LENGTH)

    @torch.no_grad()
    def torch_gate(x: str) -> np.ndarray:
        ids, mask = encode_batch(tok, [x])
        return head(enc(torch.from_numpy(ids), torch.from_numpy(mask)))[0].numpy()

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        for x in prompts[:5]:
            fn(x)  # warm-up
        ts = []
        for x in prompts:
            t0 = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    return {"onnx_ms": timed(gate.probabilities), "torch_ms": timed(torch_gate)}


def bench_training(n: int, experts: int = 8, tokens: int = 8) -> dict[str, float]:
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
    data = TrainData(mixed, emb)
    t0 = time.perf_counter()
    r = train(data, TrainConfig())
    return {
        "train_s": time.perf_counter() - t0,
        "epochs": r.epochs,
        "steps": r.steps,
        "val_gate_nll": r.val.gate.nll_per_token,
        "val_uniform_nll": r.val.uniform.nll_per_token,
    }


def bench_collect(tmp: Path, n: int, model: Path | None = None) -> dict[str, float]:
    models = {"cooking": model} if model else build_experts(tmp / "tiny", ["cooking"])
    broker = start_broker("auto")
    cfg = BrokerConfig(host=broker.host, port=broker.port)
    try:
        with LocalFleet(cfg, tmp / "fleet") as fleet:
            fleet.start(
                "bench-cook", models["cooking"], "--n-threads", "1", "--no-profile-on-start"
            )
            fleet.wait_online(["bench-cook"], 60)
            reg = Registry.open(f"sqlite:///{tmp / 'reg.db'}")
            samples = ds.tiny_domains(["cooking", "animals"], n // 2, seed=7)
            reg.add_dataset("b", "free-answer", "tiny", samples)
            sync_once(reg, cfg)
            online = {k: v for k, v in online_experts(reg).items() if k == "bench-cook"}
            with RpcClient(cfg, timeout=30) as rpc:
                t0 = time.perf_counter()
                rep = collect(reg, rpc, "b", online, CollectSettings())
                mqtt_s = time.perf_counter() - t0
            assert rep.complete, rep.as_dict()
            reg.close()
        direct = LlamaCppBackend(AgentConfig(model=models["cooking"], n_threads=1))
        pairs = [
            (
                direct.tokenize(s.prompt, add_bos=direct.info.add_bos),
                direct.tokenize(s.targets[0], add_bos=False),
            )
            for s in samples
        ]
        t0 = time.perf_counter()
        for prompt, target in pairs:
            direct.score(prompt, target)
        direct_s = time.perf_counter() - t0
        direct.close()
    finally:
        broker.close()
    return {"mqtt_per_s": len(samples) / mqtt_s, "direct_per_s": len(samples) / direct_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--collect", type=int, default=300)
    ap.add_argument("--model", type=Path, default=None, help="also time collection with this GGUF")
    ap.add_argument("--only-collect", action="store_true", help="skip latency and training")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.only_collect:
            co = bench_collect(tmp, args.collect, args.model)
            print(f"collect {args.model}: {co}, ratio {co['mqtt_per_s'] / co['direct_per_s']:.2f}")
            return
        lat = bench_latency(tmp, args.prompts)
        tr = bench_training(args.samples)
        co = bench_collect(tmp, args.collect)
        real = bench_collect(tmp / "real", 100, args.model) if args.model else None
    rows = [
        ("gate latency / prompt, ONNX Runtime (CPU)", f"{lat['onnx_ms']:.2f} ms", ""),
        (
            "gate latency / prompt, torch eager",
            f"{lat['torch_ms']:.2f} ms",
            f"ONNX {lat['torch_ms'] / lat['onnx_ms']:.2f}x faster (target >= 2x)",
        ),
        (
            f"training, {args.samples} samples x 8 experts",
            f"{tr['train_s']:.1f} s",
            f"{tr['epochs']} epochs, {tr['steps']} steps; val NLL/token gate "
            f"{tr['val_gate_nll']:.2f} vs uniform {tr['val_uniform_nll']:.2f} (target <= 60 s)",
        ),
        ("collection over MQTT (+ registry)", f"{co['mqtt_per_s']:.0f} scores/s", ""),
        (
            "direct llama.cpp scoring",
            f"{co['direct_per_s']:.0f} scores/s",
            f"ratio {co['mqtt_per_s'] / co['direct_per_s']:.2f}x (target >= 0.8x)",
        ),
    ]
    if real:
        rows.append(
            (
                f"collection over MQTT, {args.model.name[:20]}",
                f"{real['mqtt_per_s']:.1f} scores/s",
                f"direct {real['direct_per_s']:.1f}/s: ratio "
                f"{real['mqtt_per_s'] / real['direct_per_s']:.2f}x",
            )  # type: ignore[union-attr]
        )
    print(f"| {'measure':<44} | {'value':>14} | note |")
    print(f"|{'-' * 46}|{'-' * 16}|------|")
    for name, value, note in rows:
        print(f"| {name:<44} | {value:>14} | {note} |")


if __name__ == "__main__":
    main()
