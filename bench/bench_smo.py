"""SMO (exact branch and bound) against brute force, greedy removal and random, side by side.

Instances are realistic random problems (moe2.controller.optimize.synthetic): 300 prompts over
three apps (qa: 1 target token, code: 3-8, chat: 2-6), experts specialised per domain on four
device classes, a gate that knows the experts only roughly and overrates a few (J is not
monotone), an energy budget of 30% of all experts together and per-app delay limits at the
70th percentile of the experts' delays.

    .venv/bin/python bench/bench_smo.py                        # N = 8 ... 64, about 5 minutes
    .venv/bin/python bench/bench_smo.py --sizes 8 12 16 --instances 10

Brute force runs up to --brute-max experts; beyond, its time is extrapolated from its measured
cost per subset (marked ~). Greedy's gap is J(greedy) − J(optimum) in nats per sample (when SMO
stops at the time limit, measured against SMO's lower bound, marked ≤).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

from moe2.controller.optimize import Solution, solve
from moe2.controller.optimize.synthetic import synthetic_problem

TARGETS = {8: 0.010, 32: 2.0}  # N -> median seconds for an exact answer


@dataclass
class Run:
    smo_s: float
    nodes: int
    evaluated: int
    exact: bool
    gap: float
    size: int
    greedy_gap: float
    random_gap: float
    brute_s: float | None


def _run(n: int, seed: int, samples: int, time_limit: float, brute_max: int) -> Run | None:
    problem = synthetic_problem(n, n_samples=samples, seed=seed)
    start = time.perf_counter()
    exact = solve(problem, time_limit=time_limit)
    smo_s = time.perf_counter() - start
    if not isinstance(exact, Solution):
        return None
    lower = exact.stats["lower_bound"]
    greedy = solve(problem, "greedy")
    rand = solve(problem, "random", seed=seed)
    assert isinstance(greedy, Solution) and isinstance(rand, Solution)
    reference = exact.objective if exact.optimal else lower
    brute_s = None
    if n <= brute_max:
        start = time.perf_counter()
        brute = solve(problem, "brute")
        brute_s = time.perf_counter() - start
        assert isinstance(brute, Solution)
        if abs(brute.objective - exact.objective) > 1e-9 * max(1.0, abs(brute.objective)):
            raise AssertionError(f"N={n} seed={seed}: SMO {exact.objective} != brute {brute}")
    return Run(
        smo_s=smo_s,
        nodes=exact.stats["nodes"],
        evaluated=exact.stats["evaluated"],
        exact=exact.optimal,
        gap=exact.stats["gap"],
        size=len(exact.subset),
        greedy_gap=greedy.objective - reference,
        random_gap=rand.objective - reference,
        brute_s=brute_s,
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}" if seconds < 10 else f"{seconds * 1000:.0f}"


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            value = seconds / size
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.1e} {unit}"
    return f"{seconds:.3g} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 12, 16, 24, 32, 48, 64])
    parser.add_argument("--instances", type=int, default=5, help="instances per size (< 48)")
    parser.add_argument("--big-instances", type=int, default=3, help="instances per size ≥ 48")
    parser.add_argument("--samples", type=int, default=300, help="prompts per instance")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per SMO run")
    parser.add_argument("--brute-max", type=int, default=16, help="largest N run by brute force")
    args = parser.parse_args()

    header = (
        f"{'N':>3} {'2^N':>9} {'brute':>14} {'SMO ms med':>10} {'max':>8} {'nodes':>7} "
        f"{'evaluated':>9} {'|S|':>4} {'exact':>6} {'ε-gap max':>9} "
        f"{'greedy gap med':>14} {'max':>7} {'opt':>5} {'random gap':>10}"
    )
    print(header)
    print("-" * len(header))
    per_subset: float | None = None  # brute force seconds per subset, for extrapolation
    medians: dict[int, tuple[float, bool]] = {}
    for n in args.sizes:
        count = args.instances if n < 48 else args.big_instances
        runs = [
            r
            for s in range(count)
            if (r := _run(n, 1000 * n + s, args.samples, args.time_limit, args.brute_max))
        ]
        if not runs:
            print(f"{n:>3} every instance infeasible")
            continue
        brute_times = [r.brute_s for r in runs if r.brute_s is not None]
        if brute_times:
            brute_med = statistics.median(brute_times)
            per_subset = brute_med / (2**n - 1)
            brute = f"{_ms(brute_med)} ms"
        elif per_subset is not None:
            brute = "~" + _duration(per_subset * (2**n - 1))
        else:
            brute = "-"
        times = [r.smo_s for r in runs]
        exact = sum(r.exact for r in runs)
        unproven = "≤" if exact < len(runs) else ""
        g_gaps = [r.greedy_gap for r in runs]
        medians[n] = (statistics.median(times), exact == len(runs))
        print(
            f"{n:>3} {2**n:>9.3g} {brute:>14} {_ms(statistics.median(times)):>10} "
            f"{_ms(max(times)):>8} {statistics.median(r.nodes for r in runs):>7.0f} "
            f"{statistics.median(r.evaluated for r in runs):>9.0f} "
            f"{statistics.median(r.size for r in runs):>4.0f} {exact:>3}/{len(runs):<2} "
            f"{max(r.gap for r in runs):>9.4f} "
            f"{unproven + f'{statistics.median(g_gaps):.4f}':>14} "
            f"{unproven + f'{max(g_gaps):.4f}':>7} "
            f"{sum(g <= 1e-9 for g in g_gaps):>2}/{len(runs):<2} "
            f"{unproven + f'{statistics.median(r.random_gap for r in runs):.4f}':>10}"
        )
    print()
    for n, target in TARGETS.items():
        if n in medians:
            med, all_exact = medians[n]
            ok = med <= target and all_exact
            print(
                f"target N={n}: exact in ≤ {_ms(target)} ms median: {_ms(med)} ms, "
                f"{'all exact' if all_exact else 'not all exact'} -> {'met' if ok else 'MISSED'}"
            )
    if 64 in medians:
        med, all_exact = medians[64]
        print(
            f"target N=64: solved or an ε-gap within {args.time_limit:g} s: median {med:.1f} s, "
            f"{'all exact' if all_exact else 'gaps reported above'}"
        )


if __name__ == "__main__":
    main()
