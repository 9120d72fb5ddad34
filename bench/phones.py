"""Phones for the scale benchmarks: many MQTT clients (``lightmqtt.py``), each its own
connection, each asking one prompt at a time with a think time between an answer and the next
question, answers to each phone's own inbox; run in a process of its own.

    report = run_phones(BrokerConfig(port=1883), 1000, ["qa"], 60.0, think_s=5, max_tokens=4)
    python bench/phones.py --port 1883 --clients 1000 --apps qa --seconds 60
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

from lightmqtt import LightClient, LightPool

from moe2.shared import protocol as p
from moe2.shared.mqtt import BrokerConfig


@dataclass
class LoadReport:
    clients: int
    seconds: float
    sent: int
    answered: int
    errors: dict[str, int]
    unanswered: int  # sent, and neither an answer nor an error by the end
    latencies_s: list[float]
    gateways: dict[str, int] = field(default_factory=dict)  # answers per gateway
    experts: dict[str, int] = field(default_factory=dict)  # answers per expert that answered

    @property
    def per_s(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        xs = sorted(self.latencies_s)
        return xs[min(len(xs) - 1, int(q * (len(xs) - 1)))] if xs else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "sent": self.sent,
            "answered": self.answered,
            "answered_per_s": round(self.per_s, 2),
            "errors": self.errors,
            "unanswered": self.unanswered,
            "p50_s": round(statistics.median(self.latencies_s), 3) if self.latencies_s else None,
            "p99_s": round(self.percentile(0.99), 3) if self.latencies_s else None,
            "by_gateway": dict(sorted(self.gateways.items())),
            "by_expert": dict(sorted(self.experts.items())),
        }


class PromptLoad:
    """``clients`` phones, each its own MQTT connection, each asking one prompt at a time
    with a think time (exponential, mean ``think_s``) between an answer and the next
    question; answers come to each phone's own inbox."""

    def __init__(self, broker: BrokerConfig, clients: int, *, prefix: str = "phone") -> None:
        self.pool = LightPool(broker, keepalive=60)
        self.n = clients
        self.prefix = prefix
        self._lock = threading.Lock()
        self._sent_at: dict[str, tuple[str, float]] = {}  # prompt id -> (phone, perf_counter)
        self._answered: list[float] = []
        self._errors: dict[str, int] = {}
        self._gateways: dict[str, int] = {}
        self._experts: dict[str, int] = {}
        self._due: dict[str, float] = {}  # idle phone -> when it asks next (perf_counter)
        self._sent = 0
        self._think_s = 5.0
        self._rng = random.Random(0)

    def __enter__(self) -> PromptLoad:
        self.pool.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.close()

    def connect(self, timeout: float = 120.0) -> int:
        phones = []
        for i in range(self.n):
            cid = f"{self.prefix}-{i:05d}"
            phones.append(
                self.pool.open(
                    cid,
                    subscriptions=[p.topics.client_answers(cid, cid)],
                    on_message=self._on_reply,
                )
            )
        return self.pool.wait_connected(phones, timeout)

    def _on_reply(self, client: LightClient, msg: mqtt.MQTTMessage) -> None:
        data = json.loads(msg.payload)
        if "index" in data:  # a stream chunk
            return
        with self._lock:
            entry = self._sent_at.pop(str(data.get("id")), None)
            if entry is None:
                return
            phone, sent = entry
            now = time.perf_counter()
            if "error" in data:
                code = str(data["error"].get("code", "?"))
                self._errors[code] = self._errors.get(code, 0) + 1
            else:
                self._answered.append(now - sent)
                gw = str(data.get("gateway"))
                self._gateways[gw] = self._gateways.get(gw, 0) + 1
                for e in data.get("experts", []):
                    self._experts[e["id"]] = self._experts.get(e["id"], 0) + 1
            self._due[phone] = now + self._rng.expovariate(1.0 / self._think_s)

    def run(
        self,
        apps: Sequence[str],
        seconds: float,
        *,
        think_s: float = 5.0,
        max_tokens: int = 4,
        drain_s: float = 60.0,
        seed: int = 0,
    ) -> LoadReport:
        """Ask ``apps`` for ``seconds`` (the first question of each phone at a random time
        within ``think_s``); then wait up to ``drain_s`` for the last answers."""
        self._think_s = think_s
        self._rng = random.Random(seed)
        start = time.perf_counter()
        with self._lock:
            for ph in sorted(self.pool.clients):
                self._due[ph] = start + self._rng.uniform(0, think_s)
        end = start + seconds
        while (now := time.perf_counter()) < end:
            with self._lock:
                ready = [ph for ph, t in self._due.items() if t <= now]
                for ph in ready:
                    del self._due[ph]
            if ready:
                self.pool.call(lambda ready=ready: self._ask(ready, apps, max_tokens))
            time.sleep(0.01)
        elapsed = time.perf_counter() - start
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._sent_at:
                    break
            time.sleep(0.1)
        with self._lock:
            return LoadReport(
                clients=len(self.pool.clients),
                seconds=elapsed,
                sent=self._sent,
                answered=len(self._answered),
                errors=dict(self._errors),
                unanswered=len(self._sent_at),
                latencies_s=list(self._answered),
                gateways=dict(self._gateways),
                experts=dict(self._experts),
            )

    def _ask(self, phones: list[str], apps: Sequence[str], max_tokens: int) -> None:
        """Publish one prompt from each of ``phones`` (on the pool's thread): phone i asks
        application i mod len(apps)."""
        for ph in phones:
            app = apps[int(ph.rsplit("-", 1)[1]) % len(apps)]
            pid = uuid.uuid4().hex[:12]
            req = p.PromptRequest(
                id=pid,
                prompt="the fox eats",
                reply_to=p.topics.client_answers(ph, ph),
                max_tokens=max_tokens,
            )
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = 120
            with self._lock:
                self._sent_at[pid] = (ph, time.perf_counter())
                self._sent += 1
            self.pool.clients[ph].mqtt.publish(
                p.topics.prompts(app), p.encode(req), qos=1, properties=props
            )


def run_phones(
    broker: BrokerConfig,
    clients: int,
    apps: Sequence[str],
    seconds: float,
    *,
    think_s: float,
    max_tokens: int,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """``PromptLoad`` in a child process; its report as a dict."""
    args = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--port",
        str(broker.port),
        "--clients",
        str(clients),
        "--apps",
        ",".join(apps),
        "--seconds",
        str(seconds),
        "--think-s",
        str(think_s),
        "--max-tokens",
        str(max_tokens),
    ]
    run = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"phones failed ({run.returncode}): {run.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="phones asking prompts, as a child process")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--apps", required=True, help="comma-separated applications")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--think-s", type=float, default=5.0)
    ap.add_argument("--max-tokens", type=int, default=4)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with PromptLoad(BrokerConfig(port=args.port), args.clients) as load:
        connected = load.connect()
        apps = args.apps.split(",")
        report = load.run(apps, args.seconds, think_s=args.think_s, max_tokens=args.max_tokens)
    print(json.dumps(report.as_dict() | {"connected": connected}), flush=True)


if __name__ == "__main__":
    main()
