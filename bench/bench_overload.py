"""Overload benchmark (issue 23): no collapse under overload.

1. Collection of the packaged fleet's scores (SmolLM2-135M, Gemma-3-270m, Qwen2.5-Coder-0.5B,
   one llama.cpp thread each, as the demo runs them) on MMLU/ARC/SciQ questions, with
   ``moe2ctl collect``'s default settings, on a quiet machine and then with 2× and 4× CPU
   contention: ``c×`` adds ``c - 1`` busy-loop processes per core (each bounded in time and
   stopped with the run), so the fleet gets about 1/c of the CPU it had. Per run: whether the
   collection completed, scores/s and its ratio to the quiet run, and from the agents'
   metrics their model time, the share of it spent on requests nobody got the answer of
   (stopped at their deadline, or finished after it), the share spent in ticks begun after a
   request's deadline (target 0: an agent stops a request at the first tick after its
   deadline), and the requests dropped by reason.
2. A burst of prompts (2,000) published at once against one gateway (k = 2 of the same
   fleet): answered + busy (+ other errors), none lost (each prompt gets exactly one terminal
   message), p50/p99 latency of the answered.

    python bench/bench_overload.py                              # the issue's figures
    python bench/bench_overload.py --fleet tiny --questions 20 --contention 1,2 --burst 100
                                                                # a smoke run, ~2 minutes

Expected wall time on two cores with the defaults: about 30-40 minutes (most of it the 4×
collection). The machine must otherwise be quiet: the contention is the benchmark's own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from moe2.controller import datasets as ds
from moe2.controller.collect import collect
from moe2.controller.localfleet import LocalFleet
from moe2.controller.registry import Registry
from moe2.controller.registry.sync import online_experts, sync_once
from moe2.shared import protocol as p
from moe2.shared.broker import free_port, start_broker
from moe2.shared.children import child_options
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import BrokerConfig, Connection, RpcClient

PACKAGED = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")
TINY = ("animals", "cooking", "code")
# The demo's short self-profile of the packaged models.
PROFILE = (
    "--profile-points", "3", "--profile-max-prompt-fraction", "0.15", "--profile-repeats", "3",
    "--profile-decode-tokens", "4", "--profile-idle-seconds", "0",
)  # fmt: skip
APP = "burst"
BUSY_LOOP = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end:\n    pass\n"


def experts(kind: str) -> dict[str, Path]:
    if kind == "tiny":
        from moe2.controller.experts.packaged import models_dir
        from moe2.controller.experts.tiny import build_experts

        paths = build_experts(models_dir() / "tiny", list(TINY))
        return {f"tiny-{d}": paths[d] for d in TINY}
    from moe2.controller.experts.packaged import fetch

    return {m.replace(".", "-"): fetch(m) for m in PACKAGED}


def questions(kind: str, n: int) -> list[ds.Sample]:
    if kind == "tiny":
        return ds.tiny_domains(TINY, max(1, n // len(TINY)), seed=1, choices=4)
    parts = [("mmlu", n // 2), ("arc-easy", n // 4), ("sciq", n - n // 2 - n // 4)]
    return [s for name, m in parts for s in ds.from_benchmark(name, m, seed=0)]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def agent_figures(ports: dict[str, int]) -> dict[str, Any]:
    """Every agent's model time, wasted and late model time, and drops by reason."""
    out: dict[str, Any] = {"compute_s": 0.0, "wasted_s": 0.0, "late_s": 0.0, "dropped": Counter()}
    for port in ports.values():
        samples = scrape(port)
        for (name, labels), value in samples.items():
            if name == "moe2_agent_compute_seconds_total":
                out["compute_s"] += value
            elif name == "moe2_agent_wasted_compute_seconds_total":
                out["wasted_s"] += value
            elif name == "moe2_agent_late_compute_seconds_total":
                out["late_s"] += value
            elif name == "moe2_agent_dropped_requests_total":
                out["dropped"][dict(labels)["reason"]] += value
    return out


def contention(factor: int, seconds: float) -> list[subprocess.Popen[bytes]]:
    """``factor - 1`` busy loops per core, each ending by itself after ``seconds``."""
    n = (factor - 1) * (os.cpu_count() or 1)
    code = BUSY_LOOP.format(s=seconds)
    return [subprocess.Popen([sys.executable, "-c", code], **child_options()) for _ in range(n)]


def collection_run(
    cfg: BrokerConfig,
    workdir: Path,
    samples: list[ds.Sample],
    names: list[str],
    ports: dict[str, int],
    factor: int,
    limit_s: float,
) -> dict[str, Any]:
    reg = Registry.open(f"sqlite:///{workdir / f'registry-{factor}x.db'}")
    reg.add_dataset("bench", ds.CHOICE, "bench", samples)
    sync_once(reg, cfg)
    online = {n: i for n, i in online_experts(reg).items() if n in names}
    before = agent_figures(ports)
    loops = contention(factor, limit_s) if factor > 1 else []
    stop = threading.Event()
    timer = threading.Timer(limit_s, stop.set)
    timer.start()
    try:
        with RpcClient(cfg) as rpc:
            report = collect(reg, rpc, "bench", online, stop=stop)
    finally:
        timer.cancel()
        for proc in loops:
            proc.kill()
            proc.wait()
    time.sleep(2.0)  # the agents' last ticks in the metrics
    after = agent_figures(ports)
    reg.close()
    compute = after["compute_s"] - before["compute_s"]
    wasted = after["wasted_s"] - before["wasted_s"]
    late = after["late_s"] - before["late_s"]
    out = report.as_dict()
    return {
        "contention": f"{factor}x",
        "complete": report.complete and not report.failed,
        "scores": report.stored,
        "seconds": round(report.seconds, 1),
        "scores_per_s": out["scores_per_s"],
        "missing": out["missing_by_expert"],
        "failed": out["failed"],
        "agent_compute_s": round(compute, 1),
        "wasted_share": round(wasted / compute, 4) if compute else None,
        "late_share": round(late / compute, 6) if compute else None,
        "dropped": {k: int(v - before["dropped"][k]) for k, v in after["dropped"].items()},
        "pace": out["pace"],
    }


def burst(cfg: BrokerConfig, n: int, max_tokens: int, timeout_s: float) -> dict[str, Any]:
    """Publish ``n`` prompts at once; count terminal messages per prompt until each has one
    (or ``timeout_s``)."""
    cid = f"burst-{uuid.uuid4().hex[:6]}"
    inbox = p.topics.client_answers(cfg.owner(cid), cid)
    got: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    sent_at: dict[str, float] = {}
    cond = threading.Condition()

    def on(msg: Any) -> None:
        obj = json.loads(msg.payload)
        if "text" in obj or "error" in obj:
            with cond:
                got.setdefault(str(obj["id"]), []).append((time.monotonic(), obj))
                cond.notify_all()

    conn = Connection(cfg, cid)
    conn.subscribe(inbox, on)
    with conn:
        for i in range(n):
            pid = f"{cid}-{i}"
            body = {"id": pid, "prompt": "The capital of France is", "reply_to": inbox}
            sent_at[pid] = time.monotonic()
            conn.publish(p.topics.prompts(APP), json.dumps(body | {"max_tokens": max_tokens}))
        with cond:
            cond.wait_for(lambda: len(got) >= n, timeout_s)
        time.sleep(2.0)  # a second terminal message, if any, shows
    codes: Counter[str] = Counter()
    latencies = []
    for pid, t0 in sent_at.items():
        first = got.get(pid)
        if not first:
            continue
        at, msg = first[0]
        if "error" in msg:
            codes[msg["error"]["code"]] += 1
        else:
            latencies.append(at - t0)
    latencies.sort()

    def pct(q: float) -> float | None:
        return (
            round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2)
            if latencies
            else None
        )

    return {
        "prompts": n,
        "answered": len(latencies),
        "busy": codes.pop("busy", 0),
        "other_errors": dict(codes),
        "lost": n - len(got),
        "duplicated": sum(1 for v in got.values() if len(v) > 1),
        "p50_s": pct(0.5),
        "p99_s": pct(0.99),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fleet", choices=["packaged", "tiny"], default="packaged")
    ap.add_argument("--questions", type=int, default=60, help="4 options each, 3 experts")
    ap.add_argument("--contention", default="1,2,4", help="factors, comma-separated")
    ap.add_argument("--burst", type=int, default=2000, help="prompts of the burst (0: none)")
    ap.add_argument("--burst-tokens", type=int, default=8, help="max_tokens of each prompt")
    ap.add_argument("--limit-s", type=float, default=1800, help="longest one collection runs")
    ap.add_argument("--keep", type=Path, default=None, help="keep logs and registries here")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    factors = [int(x) for x in args.contention.split(",")]
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="bench-overload-"))
    workdir.mkdir(parents=True, exist_ok=True)
    models = experts(args.fleet)
    names = list(models)
    samples = [
        ds.Sample("bench", s.prompt, s.targets, s.answer)
        for s in questions(args.fleet, args.questions)
    ]
    results: dict[str, Any] = {
        "fleet": args.fleet,
        "questions": len(samples),
        "cpus": os.cpu_count(),
    }
    with start_broker("mosquitto") as broker:
        cfg = BrokerConfig(host=broker.host, port=broker.port)
        ports = {n: free_port() for n in names}
        with LocalFleet(cfg, workdir / "agents") as fleet:
            t0 = time.monotonic()
            for i, name in enumerate(names):
                role = ["--serve-app", f"{APP}={','.join(names)}:2"] if i == 0 else []
                flags = PROFILE if args.fleet == "packaged" else ("--profile-idle-seconds", "0")
                fleet.start(name, models[name], "--n-threads", "1", "--n-gpu-layers", "0",
                            "--metrics-port", str(ports[name]), *flags, *role)  # fmt: skip
                fleet.wait_online([name], 300)
                end = time.monotonic() + 600  # one at a time: profiles measured alone
                while name not in FleetView.snapshot(cfg, ("profile",)).profile:
                    if time.monotonic() > end:
                        raise SystemExit(f"{name} did not profile itself: {fleet.log_tail(name)}")
                    time.sleep(1.0)
            print(
                f"fleet of {len(names)} up and profiled in {time.monotonic() - t0:.0f} s",
                flush=True,
            )
            runs = []
            for factor in factors:
                run = collection_run(cfg, workdir, samples, names, ports, factor, args.limit_s)
                runs.append(run)
                print(json.dumps({k: v for k, v in run.items() if k != "pace"}), flush=True)
            quiet = next((r for r in runs if r["contention"] == "1x"), None)
            for r in runs:
                if quiet and quiet["scores_per_s"] and r["scores_per_s"]:
                    r["vs_quiet"] = round(r["scores_per_s"] / quiet["scores_per_s"], 3)
            results["collection"] = runs
            if args.burst:
                results["burst"] = burst(cfg, args.burst, args.burst_tokens, timeout_s=900)
                print(json.dumps(results["burst"]), flush=True)
    print("\ncollection (default settings)")
    print("contention  complete  scores  seconds  scores/s  vs quiet  wasted  late   dropped")
    for r in results["collection"]:
        print(
            f"{r['contention']:<11} {r['complete']!s:<9} {r['scores']:<7} {r['seconds']:<8} "
            f"{r['scores_per_s']!s:<9} {r.get('vs_quiet', '-')!s:<9} {r['wasted_share']!s:<7} "
            f"{r['late_share']!s:<6} {r['dropped']}"
        )
    if "burst" in results:
        b = results["burst"]
        print(
            f"\nburst of {b['prompts']}: {b['answered']} answered, {b['busy']} busy, other "
            f"errors {b['other_errors']}, lost {b['lost']}, duplicated {b['duplicated']}; "
            f"answered p50 {b['p50_s']} s, p99 {b['p99_s']} s"
        )
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
