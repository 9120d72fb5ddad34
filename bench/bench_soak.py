"""Soak benchmark (issue 12): 20 concurrent clients for several minutes against a loopback
fleet with default settings (4 tiny experts, 2 gateways serving one app with k=2, mosquitto
with persistence as the broker role installs it), through scheduled faults:

    an expert SIGKILLed (restarted 2 s later, as systemd would)
    an expert frozen (SIGSTOP) for 10 s
    a gateway SIGTERMed (drains; restarted 2 s later)
    the other gateway SIGKILLed as by a power cut (back after 30 s: the live gateway adopts
    the prompts its kept MQTT session holds meanwhile)
    the broker restarted (SIGTERM, persistence on)

Each client publishes a prompt at QoS 1 (again while the broker says nobody is subscribed,
for up to 5 s, as ``PromptClient`` does), waits up to 60 s for its answer, and keeps counting
terminal messages per prompt to the end, so duplicates show. Printed: sent, answered, errors
by code, unrouted (the broker said no subscriber: the client knew), lost (accepted while a
gateway was subscribed, no answer or error within the client's deadline), duplicated,
latency p50/p99, and per fault the errors in its window and the recovery time (from the
fault to the first moment after which every prompt sent for 5 s was answered).

    python bench/bench_soak.py [--minutes 4] [--clients 20]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe2.controller.experts.domains import corpus
from moe2.controller.experts.tiny import build_experts
from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.broker import Broker, start_broker
from moe2.shared.errors import BrokerError
from moe2.shared.mqtt import BrokerConfig, Connection, response_properties

DOMAINS = ("animals", "code", "cooking", "arithmetic")
APP = "qa"
EXPERTS = [f"e{i}" for i in range(1, 5)]
GATEWAYS = ["g1", "g2"]
CLIENT_TIMEOUT_S = 60.0
WAIT_FOR_GATEWAY_S = 5.0


@dataclass
class Record:
    pid: str
    sent: float  # time.monotonic()
    routed: bool = False  # the broker had a subscriber for it
    terminal: list[dict[str, Any]] = field(default_factory=list)
    answered_at: float | None = None


class SoakClient(threading.Thread):
    """One closed-loop client with a persistent session, counting every terminal message."""

    def __init__(self, cfg: BrokerConfig, n: int, stop: threading.Event, texts: list[str]):
        super().__init__(name=f"client-{n}", daemon=True)
        self.cid = f"soak-{n}-{uuid.uuid4().hex[:6]}"
        self.inbox = p.topics.client_answers(cfg.owner(self.cid), self.cid)
        self.stop_event = stop
        self.texts = texts
        self.records: dict[str, Record] = {}
        self.cond = threading.Condition()
        self.conn = Connection(cfg, self.cid, session_expiry_s=300)
        self.conn.subscribe(self.inbox, self._on)
        self.n = n

    def _on(self, msg: Any) -> None:
        obj = json.loads(msg.payload)
        if "text" not in obj and "error" not in obj:
            return
        with self.cond:
            rec = self.records.get(str(obj.get("id")))
            if rec is not None:
                rec.terminal.append(obj)
                if rec.answered_at is None:
                    rec.answered_at = time.monotonic()
                self.cond.notify_all()

    def run(self) -> None:
        self.conn.start()
        i = 0
        while not self.stop_event.is_set():
            i += 1
            pid = f"{self.cid}-{i}"
            text = self.texts[(self.n * 7 + i) % len(self.texts)]
            body = {"id": pid, "prompt": text, "reply_to": self.inbox, "max_tokens": 16}
            rec = Record(pid, time.monotonic())
            with self.cond:
                self.records[pid] = rec
            rec.routed = self._publish(json.dumps(body).encode(), pid)
            if not rec.routed:
                continue
            with self.cond:
                self.cond.wait_for(lambda r=rec: bool(r.terminal), CLIENT_TIMEOUT_S)

    def _publish(self, payload: bytes, pid: str) -> bool:
        props = response_properties(self.inbox, pid.encode())
        props.MessageExpiryInterval = math.ceil(CLIENT_TIMEOUT_S)
        give_up = time.monotonic() + WAIT_FOR_GATEWAY_S
        while time.monotonic() < give_up + CLIENT_TIMEOUT_S:
            if not self.conn.wait_connected(CLIENT_TIMEOUT_S):
                return False
            try:
                if self.conn.publish_acked(p.topics.prompts(APP), payload, properties=props):
                    return True
            except BrokerError:
                continue  # the connection dropped under us: publish again once back
            if time.monotonic() >= give_up:
                return False
            time.sleep(0.2)
        return False


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))] if xs else float("nan")


def start_agent(fleet: LocalFleet, name: str, model: Path, gateway: bool) -> None:
    flags = ["--n-threads", "1"]  # 6 agents on a 2-core box; everything else default
    if gateway:
        flags += ["--serve-app", f"{APP}={','.join(EXPERTS)}:2"]
    fleet.start(name, model, *flags)


def run(minutes: float, clients: int, keep: Path | None) -> None:
    duration = minutes * 60
    with tempfile.TemporaryDirectory(prefix="moe2-soak-") as tmp:
        logs = keep or Path(tmp) / "fleet"
        models = build_experts(Path(tmp) / "models", DOMAINS)
        texts = [" ".join(corpus(d, 1, seed=i)[0].split()[:6]) for i in range(10) for d in DOMAINS]
        broker: Broker = start_broker("mosquitto", persistence=True)
        cfg = BrokerConfig(host=broker.host, port=broker.port)
        try:
            with LocalFleet(cfg, logs) as fleet:
                for name, dom in zip(EXPERTS, DOMAINS):
                    start_agent(fleet, name, models[dom], False)
                for name in GATEWAYS:
                    start_agent(fleet, name, models["code"], True)
                fleet.wait_online(EXPERTS + GATEWAYS, 180)
                time.sleep(5)  # start-up profiles, vocabularies
                stop = threading.Event()
                pool = [SoakClient(cfg, n, stop, texts) for n in range(clients)]
                t0 = time.monotonic()
                for c in pool:
                    c.start()
                faults = schedule(fleet, broker, models, duration, t0)
                stop.set()
                for c in pool:
                    c.join(CLIENT_TIMEOUT_S + 10)
                time.sleep(3)  # late duplicates
                report(pool, faults, t0, time.monotonic() - t0, minutes, clients)
                for c in pool:
                    c.conn.stop()
        finally:
            broker.close()


def schedule(
    fleet: LocalFleet, broker: Broker, models: dict[str, Path], duration: float, t0: float
) -> list[tuple[str, float]]:
    def at(frac: float) -> None:
        time.sleep(max(0.0, t0 + frac * duration - time.monotonic()))

    def restart(name: str, model: Path, gateway: bool, after: float = 2.0) -> None:
        time.sleep(after)  # systemd: RestartSec=2s
        start_agent(fleet, name, model, gateway)

    faults: list[tuple[str, float]] = []
    at(0.12)
    faults.append(("expert e1 SIGKILL (restarted after 2 s)", time.monotonic()))
    fleet.procs["e1"].kill()
    fleet.procs["e1"].wait()
    restart("e1", models["animals"], False)
    at(0.27)
    faults.append(("expert e2 SIGSTOP for 10 s", time.monotonic()))
    os.kill(fleet.procs["e2"].pid, signal.SIGSTOP)
    time.sleep(10)
    os.kill(fleet.procs["e2"].pid, signal.SIGCONT)
    at(0.45)
    faults.append(("gateway g1 SIGTERM (restarted after 2 s)", time.monotonic()))
    fleet.procs["g1"].terminate()
    fleet.procs["g1"].wait(120)
    restart("g1", models["code"], True)
    at(0.62)
    faults.append(("gateway g2 SIGKILL (power cut: back after 30 s)", time.monotonic()))
    fleet.procs["g2"].kill()
    fleet.procs["g2"].wait()
    restart("g2", models["code"], True, after=30.0)
    at(0.80)
    faults.append(("broker restart (SIGTERM, persistence on)", time.monotonic()))
    broker.restart()
    at(1.0)
    return faults


def report(
    pool: list[SoakClient],
    faults: list[tuple[str, float]],
    t0: float,
    elapsed: float,
    minutes: float,
    clients: int,
) -> None:
    recs = [r for c in pool for r in c.records.values()]
    answered = [r for r in recs if r.terminal and "text" in r.terminal[0]]
    errors = Counter(
        r.terminal[0]["error"]["code"] for r in recs if r.terminal and "error" in r.terminal[0]
    )
    unrouted = [r for r in recs if not r.routed]
    cutoff = t0 + elapsed - CLIENT_TIMEOUT_S - 5  # later ones may still be in flight at stop
    lost = [r for r in recs if r.routed and not r.terminal and r.sent < cutoff]
    pending = [r for r in recs if r.routed and not r.terminal and r.sent >= cutoff]
    dup = [r for r in recs if len(r.terminal) > 1]
    lat = [1e3 * (r.answered_at - r.sent) for r in answered if r.answered_at is not None]
    print(
        f"soak: {clients} clients, {minutes:g} min ({elapsed:.0f} s), loopback mosquitto "
        "with persistence, 4 tiny experts, 2 gateways, k=2, default settings (1 thread each)"
    )
    print()
    print(
        "| sent | answered | errors by code | unrouted (client told) | lost "
        "| in flight at stop | duplicated | p50 ms | p99 ms |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {len(recs)} | {len(answered)} | {dict(errors) or '-'} | {len(unrouted)} | "
          f"{len(lost)} | {len(pending)} | {len(dup)} | {statistics.median(lat):.0f} | "
          f"{percentile(lat, 0.99):.0f} |")  # fmt: skip
    print()
    print("| fault (at s) | prompts sent in window | errors in window | recovery s |")
    print("|---|---:|---|---:|")
    bounds = [f[1] for f in faults] + [t0 + elapsed]
    by_sent = sorted(recs, key=lambda r: r.sent)
    for (name, when), end in zip(faults, bounds[1:]):
        window = [r for r in by_sent if when <= r.sent < end]
        errs: dict[str, int] = defaultdict(int)
        for r in window:
            if not r.routed:
                errs["unrouted"] += 1
            elif not r.terminal:
                errs["lost"] += 1
            elif "error" in r.terminal[0]:
                errs[r.terminal[0]["error"]["code"]] += 1
        print(f"| {name} ({when - t0:.0f}) | {len(window)} | {dict(errs) or '-'} | "
              f"{recovery(window, when):.1f} |")  # fmt: skip
    if lost:
        print("\nlost (id, sent at s):", [(r.pid, round(r.sent - t0)) for r in lost[:20]])
    if dup:
        print(
            "duplicated (id, copies, sent at s, gateways):",
            [
                (r.pid, len(r.terminal), round(r.sent - t0), [m.get("gateway") for m in r.terminal])
                for r in dup[:20]
            ],
        )


def recovery(window: list[Record], fault: float) -> float:
    """Seconds from the fault to the first send time after which every prompt sent in the
    next 5 s (within the window) was answered."""
    ok = [bool(r.terminal) and "text" in r.terminal[0] for r in window]
    for i, r in enumerate(window):
        following = [ok[j] for j in range(i, len(window)) if window[j].sent < r.sent + 5]
        if following and all(following):
            return r.sent - fault
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--keep", type=Path, default=None, help="keep the agents' logs here")
    args = ap.parse_args()
    run(args.minutes, args.clients, args.keep)


if __name__ == "__main__":
    main()
