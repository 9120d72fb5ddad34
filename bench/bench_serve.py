"""How fast `moe2ctl serve` heals the fleet: from a fleet change to the acknowledged new
assignment, and what a client sending throughout sees meanwhile.

A broker of its own, three tiny experts and a gateway; serve runs with its default policy
(debounce 2 s, at most one optimisation per 10 s, lease 10 s) and the agents with their
default keepalive (3 s: a killed agent shows offline after ~4.5 s). Each kind of change is
repeated: an assigned expert killed, the same agent started again, its profile made 10000x
slower (it must leave the assignment), the profile restored. A client asks throughout.

    .venv/bin/python bench/bench_serve.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe2.controller import datasets as ds
from moe2.controller.experts.tiny import build_experts
from moe2.controller.localfleet import LocalFleet
from moe2.controller.registry import Registry
from moe2.controller.serve.policy import ServePolicy
from moe2.controller.serve.reconcile import Reconciler
from moe2.shared import protocol as p
from moe2.shared.broker import MosquittoBroker
from moe2.shared.client import PromptClient
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import BrokerConfig, Connection

APP = "animals"
DOMAINS = ("animals", "cooking", "code")


def wait_push(url: str, since: float, test: Callable[[list[str]], bool], timeout: float) -> float:
    """Unix time of the first pushed-and-accepted decision after ``since`` passing ``test``."""
    reg = Registry.open(url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for d in reg.decisions(APP, since=since):
                subset = json.loads(d.subset_json or "[]")
                accepted = json.loads(d.detail_json).get("accepted", [])
                if d.action == "pushed" and accepted and test(subset):
                    return d.at
            time.sleep(0.1)
        seen = [(d.action, d.subset_json, d.reason) for d in reg.decisions(since=since)]
        raise TimeoutError(f"no matching push; decisions since: {seen}")
    finally:
        reg.close()


class Client:
    def __init__(self, cfg: BrokerConfig) -> None:
        self.sent = self.answered = 0
        self.errors: dict[str, int] = {}
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(cfg,), daemon=True)
        self._thread.start()

    def _run(self, cfg: BrokerConfig) -> None:
        with PromptClient(cfg) as client:
            while not self._stop.is_set():
                self.sent += 1
                t = time.perf_counter()
                try:
                    client.ask(APP, "the fox eats", max_tokens=4, timeout=60)
                    self.answered += 1
                    self.latencies.append(time.perf_counter() - t)
                except Exception as exc:
                    code = getattr(exc, "code", type(exc).__name__)
                    self.errors[code] = self.errors.get(code, 0) + 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(90)


def slower(prof: p.AgentProfile, factor: float) -> p.AgentProfile:
    c = prof.curves
    scaled = {
        n: getattr(c, n).model_copy(update={"coef": [x * factor for x in getattr(c, n).coef]})
        for n in ("prompt_seconds", "token_seconds")
    }
    return prof.model_copy(
        update={"curves": c.model_copy(update=scaled), "profiled_at": time.time()}
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        models = build_experts(tmp / "models", list(DOMAINS))
        broker = MosquittoBroker()
        broker.start()
        cfg = BrokerConfig(port=broker.port)
        url = f"sqlite:///{tmp / 'registry.db'}"
        reg = Registry.open(url)
        reg.add_dataset(
            "serve", "multiple-choice", "tiny", ds.tiny_domains(list(DOMAINS), 4, 3, choices=2)
        )
        reg.close()
        times: dict[str, list[float]] = {}
        with LocalFleet(cfg, tmp / "fleet") as fleet:
            ids = {d: f"{d[:3]}-1" for d in DOMAINS}
            for d, a in ids.items():
                fleet.start(a, models[d], "--n-threads", "1")
            fleet.start(
                "gw-1",
                models["code"],
                "--n-threads",
                "1",
                "--no-profile-on-start",
                "--gateway-enabled",
            )
            fleet.wait_online([*ids.values(), "gw-1"], 120)
            policy = ServePolicy(dataset="serve", apps={APP: 0.5}, k=2, gate="uniform")
            stop = threading.Event()
            rec = Reconciler(cfg, url, policy, holder="bench")
            thread = threading.Thread(target=rec.run, args=(stop,), daemon=True)
            thread.start()
            wait_push(url, 0, lambda s: len(s) >= 2, 120)
            client = Client(cfg)
            victim = ids["cooking"]
            for _ in range(args.repeats):
                time.sleep(policy.min_interval_s + 1)
                t = time.time()
                fleet.kill(victim)
                times.setdefault("expert killed -> pushed without it", []).append(
                    wait_push(url, t, lambda s: victim not in s, 120) - t
                )
                time.sleep(policy.min_interval_s + 1)
                t = time.time()
                fleet.start(victim, models["cooking"], "--n-threads", "1")
                times.setdefault("agent restarted -> pushed with it", []).append(
                    wait_push(url, t, lambda s: victim in s, 120) - t
                )
                time.sleep(policy.min_interval_s + 1)
                prof = FleetView.snapshot(cfg, ("profile",)).profile[victim]
                t = time.time()
                with Connection(cfg, "bench-profile") as conn:
                    conn.publish_acked(
                        p.topics.agent_profile(victim), p.encode(slower(prof, 10000)), retain=True
                    )
                    times.setdefault("profile 10000x slower -> pushed without it", []).append(
                        wait_push(url, t, lambda s: victim not in s, 120) - t
                    )
                    time.sleep(policy.min_interval_s + 1)
                    t = time.time()
                    conn.publish_acked(p.topics.agent_profile(victim), p.encode(prof), retain=True)
                    times.setdefault("profile restored -> pushed with it", []).append(
                        wait_push(url, t, lambda s: victim in s, 120) - t
                    )
            time.sleep(2)
            client.stop()
            stop.set()
            thread.join(30)
        broker.close()
    print(f"moe2ctl serve, default policy, {args.repeats} repeats per change")
    print("| change | median s | max s |")
    print("| --- | --- | --- |")
    for name, xs in times.items():
        print(f"| {name} | {statistics.median(xs):.2f} | {max(xs):.2f} |")
    lost = client.sent - client.answered - sum(client.errors.values())
    lat = sorted(client.latencies)
    p50 = statistics.median(lat) if lat else float("nan")
    p99 = lat[int(0.99 * (len(lat) - 1))] if lat else float("nan")
    out: dict[str, Any] = {
        "sent": client.sent,
        "answered": client.answered,
        "errors": client.errors,
        "lost": lost,
        "p50_s": round(p50, 3),
        "p99_s": round(p99, 3),
    }
    print(f"client throughout: {json.dumps(out)}")


if __name__ == "__main__":
    main()
