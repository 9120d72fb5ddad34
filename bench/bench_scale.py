"""moe2 past one site, measured by simulation: the control plane at hundreds to thousands of
agents, the optimiser at fleet-sized candidate sets, and prompts from a thousand phones.

1. Control plane. A real mosquitto, N simulated agents (``fleetsim.py``: info, status,
   profile, retained, one connection each, a last will each), 4 simulated gateways that
   acknowledge pushes, one real gateway (a tiny GGUF expert, ``moe2-agent --gateway-enabled``)
   and a registry holding every candidate's scores on ``--apps`` applications (16-256
   candidates each). Timed, each as its own process: ``moe2ctl agents --json``, ``moe2ctl
   sync`` (first, then again with nothing changed), ``moe2ctl serve`` (its first look: every
   application optimised and pushed; then one assigned expert crashes: seconds from the crash
   to the acknowledged push without it, and how many applications were optimised again).
   Memory: peak RSS of each command, RSS of serve, of the real gateway (its fleet view holds
   the whole fleet), of the broker and of the simulator.
2. The optimiser. One application with C candidates (synthetic problems: experts specialised
   per domain on four device classes, a gate that overrates some, an energy budget of 30% of
   all experts together, a delay limit at the 70th percentile): SMO under ``--time-limit``,
   proven optimal or its gap, against greedy removal and random; brute force where C ≤ 16.
   Then ``--decomp-apps`` applications sharing one budget: one subset for every application
   (the paper's form) against a subset per application (``optimize.decompose``).
3. Prompts. ``--clients`` phones (``phones.py``: one MQTT connection each, one prompt at a
   time, a think time between answers) through ``--gateways`` real gateways, one application
   per gateway agent as its one expert; answered prompts per second, errors by code, latency.

    .venv/bin/python bench/bench_scale.py                         # the full run (see below)
    .venv/bin/python bench/bench_scale.py --sizes 100 --apps 10 --candidates 16 32 \\
        --clients 50 --load-seconds 10                            # a smoke run, ~3 minutes

Everything runs on loopback and is stopped at the end; the simulator clears its retained
messages. The full run took 18 minutes on two shared cores (control plane 9, optimiser 5,
phones 3; SMO at 128-256 candidates runs to its 30 s time limit either way).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleetsim import FleetSpec, SimFleetProcess, populate_registry
from lightmqtt import rss_mb as _rss
from phones import run_phones

from moe2.controller.experts.tiny import build_experts
from moe2.controller.localfleet import LocalFleet
from moe2.controller.optimize import Solution, solve
from moe2.controller.optimize.decompose import solve_by_app, split_by_app
from moe2.controller.optimize.synthetic import synthetic_problem
from moe2.controller.registry import Registry
from moe2.shared.broker import MosquittoBroker
from moe2.shared.desired import DesiredState
from moe2.shared.mqtt import BrokerConfig

MOE2CTL = str(Path(sys.executable).parent / "moe2ctl")
DATASET = "fleet"


def rss_mb(pid: int | None) -> float:
    try:
        return _rss(pid) if pid else float("nan")
    except OSError:
        return float("nan")


def timed_rusage(cmd: list[str], timeout: float = 900.0) -> tuple[float, float, str]:
    """(seconds, peak RSS MB, stdout) of a command run to its end (RSS from wait4)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    while True:
        with_data = proc.stdout.read()
        if with_data:
            chunks.append(with_data)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"{cmd[:3]} ran past {timeout} s")
        time.sleep(0.05)
    seconds = time.perf_counter() - t
    rest = proc.stdout.read()
    if rest:
        chunks.append(rest)
    err = proc.stderr.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}): {err[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, b"".join(chunks).decode()


# --------------------------------------------------------------------------- 1. control plane


@dataclass
class Cell:
    n: int
    operation: str
    seconds: float | None
    mb: float | None
    note: str = ""


def _decisions(url: str, since: float) -> list[Any]:
    reg = Registry.open(url, upgrade=False)
    try:
        return list(reg.decisions(since=since))
    finally:
        reg.close()


def _wait_decisions(
    url: str, since: float, done: Any, timeout: float, poll: float = 0.2
) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = _decisions(url, since)
        if done(rows):
            return rows
        time.sleep(poll)
    raise TimeoutError(f"serve did not decide in {timeout:.0f} s: {[d.action for d in rows]}")


def control_plane(n: int, args: argparse.Namespace, tmp: Path, model: Path) -> list[Cell]:
    cells: list[Cell] = []
    lo, hi = args.candidate_range
    spec = FleetSpec(agents=n, apps=args.apps, gateways=4, candidates=(min(lo, n), min(hi, n)))
    url = f"sqlite:///{tmp / f'registry-{n}.db'}"
    t = time.perf_counter()
    candidates = populate_registry(url, spec, args.samples_per_app, DATASET)
    print(f"  N={n}: registry with {sum(map(len, candidates.values()))} memberships in "
          f"{time.perf_counter() - t:.1f} s", flush=True)  # fmt: skip
    broker = MosquittoBroker()
    broker.start()
    cfg = BrokerConfig(port=broker.port)
    flags = ["--broker-port", str(broker.port)]
    try:
        with SimFleetProcess(cfg, spec) as sim, LocalFleet(cfg, tmp / f"fleet-{n}") as real:
            print(f"  N={n}: simulated fleet joined in {sim.ready['join_s']} s", flush=True)
            sec, mb, out = timed_rusage([MOE2CTL, "agents", "--json", "--wait", "10", *flags])
            listed = len(json.loads(out))
            cells.append(Cell(n, "moe2ctl agents", sec, mb, f"{listed} agents listed"))
            fresh = f"sqlite:///{tmp / f'sync-{n}.db'}"
            for label in ("moe2ctl sync (first)", "moe2ctl sync (again)"):
                sec, mb, out = timed_rusage([MOE2CTL, "sync", "--json", "--db", fresh, *flags])
                stored = json.loads(out)["stored"]
                cells.append(Cell(n, label, sec, mb, f"{stored.get('info', 0)} infos"))
            gw = "real-gw"
            real.start(gw, model, "--n-threads", "1", "--no-profile-on-start",
                       "--gateway-enabled", "--gateway-link-probe-interval-s", "0")  # fmt: skip
            real.wait_online([gw], 120)
            cells += _serve(n, args, tmp, url, broker, sim, real, spec)
            cells.append(Cell(n, "gateway (its fleet view)", None, rss_mb(real.procs[gw].pid),
                              "RSS of the real gateway after every push"))  # fmt: skip
            cells.append(Cell(n, "broker", None, rss_mb(broker.pid), "mosquitto RSS"))
            cells.append(Cell(n, "simulator", None, sim.command("stats")["rss_mb"],
                              f"{n} agents + 4 gateways, one connection each"))  # fmt: skip
    finally:
        broker.close()
    return cells


def _serve(
    n: int,
    args: argparse.Namespace,
    tmp: Path,
    url: str,
    broker: MosquittoBroker,
    sim: SimFleetProcess,
    real: LocalFleet,
    spec: FleetSpec,
) -> list[Cell]:
    apps = spec.app_names()
    policy = tmp / f"serve-{n}.toml"
    policy.write_text(
        "\n".join(
            [
                f'dataset = "{DATASET}"',
                'gate = "uniform"',
                "k = 2",
                f"time_limit_s = {args.serve_time_limit}",
                f"max_gap = {args.serve_max_gap}",
                "debounce_s = 0.5",
                "min_interval_s = 0.5",
                "settle_s = 2.0",
                "score_new_agents = false",
                "push_wait_s = 10.0",
                "[apps]",
                *[f'"{a}" = {args.delay_limit}' for a in apps],
            ]
        )
        + "\n"
    )
    cmd = [MOE2CTL, "serve", "--policy", str(policy), "--db", url, "--holder", "bench",
           "--broker-port", str(broker.port), "--json"]  # fmt: skip
    start = time.time()
    log = (tmp / f"serve-{n}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    cells: list[Cell] = []
    try:
        first = _wait_decisions(
            url, start, lambda rows: {d.app for d in rows if d.app} >= set(apps), 1800, 1.0
        )
        t_first = max(d.at for d in first if d.app) - start
        actions: dict[str, int] = {}
        for d in first:
            actions[d.action] = actions.get(d.action, 0) + 1
        cells.append(Cell(n, f"serve: first look ({len(apps)} apps)", t_first, rss_mb(proc.pid),
                          f"{actions}; includes settle_s 2"))  # fmt: skip
        pushed = [d for d in first if d.action == "pushed" and json.loads(d.subset_json or "[]")]
        if not pushed:
            cells.append(Cell(n, "serve: decision after a crash", None, None, "nothing pushed"))
            return cells
        victim = json.loads(pushed[0].subset_json)[0]
        served = {d.app for d in pushed if victim in json.loads(d.subset_json or "[]")}
        time.sleep(1.0)
        crashed = time.time()
        sim.command("crash", victim)

        def done(rows: list[Any]) -> bool:
            mine = [d for d in rows if d.app in served]
            return len({d.app for d in mine}) >= len(served)

        after = _wait_decisions(url, crashed, done, 600)
        acked = [
            d
            for d in after
            if d.action == "pushed" and json.loads(d.detail_json or "{}").get("accepted")
        ]
        ok = all(victim not in json.loads(d.subset_json or "[]") for d in acked)
        seconds = max(d.at for d in after if d.app in served) - crashed
        cells.append(Cell(n, "serve: expert crash -> acked push", seconds, rss_mb(proc.pid),
                          f"{len({d.app for d in after if d.app})} app(s) re-optimised "
                          f"(it served {len(served)}), {len(acked)} pushed+acked, "
                          f"{'without it' if ok else 'STILL WITH IT'}; debounce 0.5"))  # fmt: skip
        if args.churn_s > 0:
            cells.append(_churn(n, args, url, sim, proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
    return cells


def growth(cells: list[Cell]) -> list[str]:
    """How each operation's time and memory grow from the smallest N to the largest."""
    lines = []
    ops: dict[str, dict[int, Cell]] = {}
    for c in cells:
        ops.setdefault(c.operation, {})[c.n] = c
    for op, by_n in ops.items():
        if len(by_n) < 2:
            continue
        lo, hi = by_n[min(by_n)], by_n[max(by_n)]
        factor = hi.n / lo.n
        pairs = [("time", lo.seconds, hi.seconds, "s")]
        if lo.seconds is None:  # a process's memory; a command's is mostly its imports
            pairs = [("memory", lo.mb, hi.mb, "MB")]
        for what, a, b, unit in pairs:
            if a is None or b is None or a <= 0:
                continue
            ratio = b / a
            kind = (
                "sub-linear" if ratio < 0.8 * factor
                else "linear" if ratio <= 1.25 * factor
                else "FASTER THAN LINEAR"
            )  # fmt: skip
            lines.append(
                f"- {op}, {what}: {a:.1f} {unit} at N={lo.n} -> {b:.1f} {unit} at N={hi.n}: "
                f"x{ratio:.1f} for x{factor:.0f} the agents ({kind})"
            )
    return lines


READING = """\
Where the limit is now, and why (the reading of the runs on two shared cores):
- Every `moe2ctl` command pays Python start-up and imports (about 1 CPU-second; several
  seconds of wall time on a loaded machine): that is most of `agents` and `sync` up to
  about a thousand agents.
- Past that, reading the fleet's retained state is the cost every process with a fleet view
  pays on each (re)connection (`moe2ctl agents`/`sync`, `serve`, every gateway): three retained
  messages per agent, each parsed by paho in Python (its MQTT 5 properties) and validated by
  pydantic, a few tenths of a millisecond each: linear in N, ~15,000 messages at 5,000 agents.
  Its memory is the decoded info and profile of every agent (a gateway holds the whole fleet).
- `serve`'s first look builds every application's problem from the registry (scores, each
  candidate's cost curves per sample, in Python) and solves it within its time limit; after
  that a change costs the applications it concerns, one solve each, independent of N.
- The optimiser proves optimality at a few dozen candidates in seconds; at 128-256 it stops at
  its time limit with the gap it proves (never pushed beyond --max-gap)."""


def _churn(n: int, args: argparse.Namespace, url: str, sim: SimFleetProcess, pid: int) -> Cell:
    """Agents crash and come back at random for a while; serve follows. Seconds: from the
    end of the churn to serve's last decision (it settles); the note counts its work."""
    t0 = time.time()
    events = sim.command("churn", str(args.churn_per_s), str(args.churn_s))["events"]
    ended = time.time()
    # Settled: 10 s without a new decision; before the first, up to 120 s (a look that
    # solves several large applications takes that long before it records anything).
    last, quiet_since = 0, time.monotonic()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        count = len(_decisions(url, t0))
        if count != last:
            last, quiet_since = count, time.monotonic()
        if time.monotonic() - quiet_since >= (10 if last else 120):
            break
        time.sleep(0.5)
    rows = _decisions(url, t0)
    actions: dict[str, int] = {}
    for d in rows:
        actions[d.action] = actions.get(d.action, 0) + 1
    settled = max(d.at for d in rows) - ended if rows else None  # None: nothing to do
    return Cell(n, f"serve: churn, {events} crashes/rejoins in {args.churn_s:g} s", settled,
                rss_mb(pid), f"{len(rows)} app decisions {actions}, "
                f"{len({d.app for d in rows if d.app})} apps touched")  # fmt: skip


# --------------------------------------------------------------------------- 2. optimiser


def optimiser(args: argparse.Namespace) -> list[str]:
    lines = [
        f"| candidates | SMO s (median, max) | proven optimal | gap at {args.time_limit:g} s "
        "(max, nats/sample) | greedy − best (median) | random − best (median) | brute force |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in args.candidates:
        times, gaps, g_gaps, r_gaps, exact, brute = [], [], [], [], 0, []
        for seed in range(args.opt_instances):
            pr = synthetic_problem(c, n_samples=args.opt_samples, seed=7000 + 31 * c + seed,
                                   apps=("qa",))  # fmt: skip
            smo = solve(pr, time_limit=args.time_limit)
            if not isinstance(smo, Solution):
                continue
            times.append(smo.stats["time_s"])
            gaps.append(float(smo.stats["gap"]))
            exact += smo.optimal
            best = smo.objective if smo.optimal else smo.stats["lower_bound"]
            greedy = solve(pr, "greedy")
            rand = solve(pr, "random", seed=seed)
            assert isinstance(greedy, Solution) and isinstance(rand, Solution)
            g_gaps.append(greedy.objective - best)
            r_gaps.append(rand.objective - best)
            if c <= 16:
                t = time.perf_counter()
                b = solve(pr, "brute")
                brute.append(time.perf_counter() - t)
                assert isinstance(b, Solution)
                if abs(b.objective - smo.objective) > 1e-9 * max(1.0, abs(b.objective)):
                    raise AssertionError(f"C={c}: SMO {smo.objective} != brute {b.objective}")
        if not times:
            lines.append(f"| {c} | every instance infeasible | | | | | |")
            continue
        lines.append(
            f"| {c} | {statistics.median(times):.2f}, {max(times):.2f} | {exact}/{len(times)} "
            f"| {max(gaps):.4f} | {'≤' if exact < len(times) else ''}"
            f"{statistics.median(g_gaps):.4f} | {statistics.median(r_gaps):.4f} | "
            + (f"{statistics.median(brute):.2f} s, same optimum" if brute else "-")
            + " |"
        )
    lines.append("")
    lines.append(_decomposition(args))
    return lines


def _decomposition(args: argparse.Namespace) -> str:
    """One subset for every application (the paper) against a subset per application."""
    out = [
        f"{args.decomp_apps} applications, {args.decomp_experts} experts, one energy budget "
        f"({args.decomp_energy:.0%} of all experts together); time limit {args.time_limit:g} s:",
        "",
        "| form | J (nats/sample) | energy | proven gap | budget split | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    apps = tuple(f"app{i}" for i in range(args.decomp_apps))
    pr = synthetic_problem(args.decomp_experts, n_samples=40 * len(apps), seed=11, apps=apps,
                           energy_fraction=args.decomp_energy)  # fmt: skip
    one = solve(pr, time_limit=args.time_limit)
    if isinstance(one, Solution):
        out.append(f"| one subset for all (paper) | {one.objective:.4f} | {one.energy:.3g} J | "
                   f"{one.stats['gap']:.4f} | - | {one.stats['time_s']:.1f} |")  # fmt: skip
    else:
        out.append(f"| one subset for all (paper) | infeasible: {one.reason} | | | | |")
    t = time.perf_counter()
    by = solve_by_app(split_by_app(pr), pr.energy_limit, time_limit=args.time_limit)
    gap = "-" if by.gap is None else f"{by.gap:.4f}"
    out.append(f"| a subset per application | {by.objective:.4f} | {by.energy:.3g} J | {gap} | "
               f"{'yes' if by.coupled else 'no'} | {time.perf_counter() - t:.1f} |")  # fmt: skip
    return "\n".join(out)


# --------------------------------------------------------------------------- 3. prompts


def prompts(args: argparse.Namespace, tmp: Path, models: dict[str, Path]) -> dict[str, Any]:
    broker = MosquittoBroker()
    broker.start()
    cfg = BrokerConfig(port=broker.port)
    try:
        with LocalFleet(cfg, tmp / "load") as fleet:
            names = list(models)
            gateways = [f"gw-{i}" for i in range(args.gateways)]
            for i, gw in enumerate(gateways):
                fleet.start(gw, models[names[i % len(names)]], "--n-threads", "1",
                            "--no-profile-on-start", "--gateway-enabled",
                            "--gateway-link-probe-interval-s", "0")  # fmt: skip
            fleet.wait_online(gateways, 180)
            # One application per agent, that agent its one expert (k = 1): the phones' load
            # spreads over every model, and each gateway answers every application.
            apps = {f"load-{i}": [gw] for i, gw in enumerate(gateways)}
            with DesiredState(cfg) as desired:
                for app, subset in apps.items():
                    r = desired.push_assignment(app, subset, 1, wait_s=30)
                    if sorted(r.accepted) != sorted(gateways):
                        raise RuntimeError(f"not every gateway took {app}: {r.summary()}")
            report = run_phones(cfg, args.clients, sorted(apps), args.load_seconds,
                                think_s=args.think_s, max_tokens=4)  # fmt: skip
            report["gateways"] = len(gateways)
            return report
    finally:
        broker.close()


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    ap.add_argument("--apps", type=int, default=50)
    ap.add_argument("--samples-per-app", type=int, default=8)
    ap.add_argument("--candidate-range", type=int, nargs=2, default=[16, 256])
    ap.add_argument("--delay-limit", type=float, default=0.2, help="s per step, every app")
    ap.add_argument("--serve-time-limit", type=float, default=60.0)
    ap.add_argument("--serve-max-gap", type=float, default=0.01)
    ap.add_argument("--churn-per-s", type=float, default=1.0, help="crashes/rejoins a second")
    ap.add_argument("--churn-s", type=float, default=30.0, help="0: no churn")
    ap.add_argument("--candidates", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--opt-instances", type=int, default=3)
    ap.add_argument("--opt-samples", type=int, default=100)
    ap.add_argument("--time-limit", type=float, default=30.0, help="s per SMO run")
    ap.add_argument("--decomp-apps", type=int, default=10)
    ap.add_argument("--decomp-experts", type=int, default=24)
    ap.add_argument("--decomp-energy", type=float, default=0.15)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--gateways", type=int, default=4)
    ap.add_argument("--load-seconds", type=float, default=60.0)
    ap.add_argument(
        "--think-s",
        type=float,
        default=5.0,
        help="mean s between an answer and "
        "the next question of a phone (1,000 phones at 5 s offer ~200/s)",
    )
    ap.add_argument("--skip", nargs="*", default=[], choices=["control", "optimiser", "prompts"])
    args = ap.parse_args()
    started = time.perf_counter()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="moe2-scale-") as tmp_s:
        tmp = Path(tmp_s)
        models = build_experts(tmp / "models", ["animals", "code", "cooking", "arithmetic"])
        if "control" not in args.skip:
            print("## Control plane", flush=True)
            cells = [c for n in args.sizes for c in control_plane(n, args, tmp, models["code"])]
            print()
            print(f"{args.apps} applications, {args.candidate_range[0]}-"
                  f"{args.candidate_range[1]} candidates each, {args.samples_per_app} "
                  "samples per application; seconds are wall time of the whole command "
                  "(Python start-up included), MB its peak or current RSS.")  # fmt: skip
            print()
            print("| N | operation | seconds | MB | note |")
            print("| --- | --- | --- | --- | --- |")
            for c in cells:
                sec = "-" if c.seconds is None else f"{c.seconds:.2f}"
                mb = "-" if c.mb is None else f"{c.mb:.0f}"
                print(f"| {c.n} | {c.operation} | {sec} | {mb} | {c.note} |")
            print()
            print("\n".join(growth(cells)))
            print(flush=True)
        if "optimiser" not in args.skip:
            print("## Optimiser", flush=True)
            print("\n".join(optimiser(args)))
            print(flush=True)
        if "prompts" not in args.skip:
            print("## Prompts", flush=True)
            report = prompts(args, tmp, models)
            print(f"{report['connected']} phones connected through {report['gateways']} "
                  f"gateways ({report['gateways']} applications, one expert each, 4 tokens), "
                  "think time "
                  f"{args.think_s:g} s, {report['seconds']:.0f} s: "
                  f"offered {report['sent'] / report['seconds']:.1f}/s, "
                  f"**{report['answered_per_s']} prompts/s answered**, {report['answered']} "
                  f"answered of {report['sent']} sent, errors {report['errors']}, "
                  f"{report['unanswered']} unanswered, p50 {report['p50_s']} s, "
                  f"p99 {report['p99_s']} s; answers by gateway {report['by_gateway']}, "
                  f"by expert {report['by_expert']}")  # fmt: skip
            print(flush=True)
    print(READING)
    print()
    print(f"(load average {load:.1f} at the start; {time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
