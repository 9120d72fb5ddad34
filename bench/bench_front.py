"""The HTTP front under load: requests/s and latency (p50, p99) at 1, 16 and 64 concurrent
clients through moe2-http (the official openai client) and through the MQTT prompt API
directly (PromptClient), in one run, against the same fleet: a gateway fusing two tiny
experts (k=2) on a loopback mosquitto, both able to hold every client's prompt at once.

Each client sends its requests back to back (not streamed, the same short prompt); a level's
requests/s is all its answers over its wall time, its percentiles are over every request of
the level. Errors (429, busy...) are counted, never retried. On one machine the clients, the
front, the gateway and the experts share its cores: the figures compare the two paths under
the same load, they are not a capacity plan for a fleet.

  python bench/bench_front.py [--clients 1,16,64] [--requests 20] [--tokens 8]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moe2.controller.experts.tiny import build_experts
from moe2.controller.localfleet import LocalFleet
from moe2.shared.broker import free_port, start_broker, wait_for_port
from moe2.shared.client import PromptClient
from moe2.shared.mqtt import BrokerConfig
from moe2.shared.protocol import ChatMessage

PROMPT = "the fox eats"
APP = "bench"


@dataclass
class Level:
    path: str
    clients: int
    latencies_ms: list[float]  # answered requests
    errors: int
    wall_s: float

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.wall_s if self.wall_s > 0 else float("nan")

    def pct(self, q: float) -> float:
        """Nearest-rank percentile of the latencies (ms)."""
        xs = sorted(self.latencies_ms)
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def load(path: str, clients: int, requests: int, one: Callable[[], None]) -> Level:
    """``clients`` threads, each running ``one`` ``requests`` times back to back."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client() -> None:
        nonlocal errors
        start.wait()
        for _ in range(requests):
            t = time.perf_counter()
            try:
                one()
            except Exception:
                with lock:
                    errors += 1
                continue
            with lock:
                latencies.append((time.perf_counter() - t) * 1e3)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    return Level(path, clients, latencies, errors, time.perf_counter() - t0)


def run(levels: list[int], requests: int, tokens: int) -> list[Level]:
    import openai

    out: list[Level] = []
    top = max(levels)
    with start_broker("mosquitto") as b, tempfile.TemporaryDirectory() as tmp:
        models = build_experts(Path(tmp) / "tiny", ["animals", "code"])
        cfg = BrokerConfig(host=b.host, port=b.port)
        with LocalFleet(cfg, Path(tmp) / "fleet") as fleet:
            # Every client's prompt fits at once: sessions on each expert, slots at the gateway.
            room = ("--max-sessions", str(top + 8), "--n-ctx", "512", "--n-threads", "1")
            fleet.start("a", models["animals"], *room, "--no-profile-on-start")
            fleet.start(
                "b",
                models["code"],
                *room,
                "--no-profile-on-start",
                "--serve-app",
                f"{APP}=a,b:2",
                "--gateway-max-concurrent",
                str(top),
            )
            fleet.wait_online(["a", "b"], 120)
            port = free_port()
            front = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from moe2.controller.openai.cli import main; main()",
                    "--port",
                    str(port),
                    "--no-auth",
                    "--no-access-log",
                    "--broker-port",
                    str(b.port),
                    "--log-level",
                    "warning",
                ]
            )
            try:
                wait_for_port("127.0.0.1", port, 30)
                http = openai.OpenAI(
                    base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120
                )
                messages = [{"role": "user", "content": PROMPT}]
                conv = [ChatMessage(role="user", content=PROMPT)]
                with PromptClient(cfg) as mqtt:

                    def via_mqtt() -> None:
                        mqtt.ask(APP, conv, max_tokens=tokens, timeout=120)

                    def via_http() -> None:
                        http.chat.completions.create(
                            model=APP,
                            messages=messages,  # type: ignore[arg-type]
                            max_tokens=tokens,
                        )

                    # warm-up: the vocabularies, the front's view of the fleet, connections
                    deadline = time.monotonic() + 60
                    while True:
                        try:
                            via_http()
                            break
                        except openai.APIStatusError:
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(0.5)
                    via_mqtt()
                    for clients in levels:
                        for path, one in (
                            ("MQTT (PromptClient)", via_mqtt),
                            ("moe2-http", via_http),
                        ):
                            level = load(path, clients, requests, one)
                            out.append(level)
                            print(
                                f"  {path:<20} {clients:>3} clients: {level.rps:7.1f} req/s, "
                                f"p50 {level.pct(50):7.1f} ms, p99 {level.pct(99):7.1f} ms, "
                                f"{level.errors} errors",
                                file=sys.stderr,
                            )
                http.close()
            finally:
                front.terminate()
                front.wait(15)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,16,64", help="concurrency levels, comma-separated")
    ap.add_argument("--requests", type=int, default=20, help="requests per client per level")
    ap.add_argument("--tokens", type=int, default=8, help="max_tokens of each answer")
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    t0 = time.monotonic()
    results = run(levels, args.requests, args.tokens)
    print(
        f"\n{args.requests} requests per client, max_tokens {args.tokens}, two tiny experts fused "
        f"k=2 behind one gateway, loopback mosquitto ({time.monotonic() - t0:.0f} s)\n"
    )
    print("| clients | path | req/s | p50 ms | p99 ms | errors | HTTP / MQTT req/s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    by = {(r.path, r.clients): r for r in results}
    for clients in levels:
        mqtt = by[("MQTT (PromptClient)", clients)]
        for r in (mqtt, by[("moe2-http", clients)]):
            ratio = f"{r.rps / mqtt.rps:.2f}" if r.path == "moe2-http" and mqtt.rps > 0 else ""
            print(
                f"| {clients} | {r.path} | {r.rps:.1f} | {r.pct(50):.1f} | {r.pct(99):.1f} | "
                f"{r.errors} | {ratio} |"
            )


if __name__ == "__main__":
    main()
