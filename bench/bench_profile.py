"""Profiling benchmark: the measured delay curve of a real packaged model on this machine, and
how stable it is across repeated profiling runs (issue 4).

Profiles the model ``--runs`` times with the real llama.cpp backend and the meter the
cpu-generic class chooses here (RAPL if readable, else modelled), then prints per run the
fitted curves (prompt seconds and joules against prompt length L, seconds and joules per
generated token after a prompt of L) with their values at the measured lengths, and per
curve and length the max/min ratio over the runs (1.00: the runs agree exactly); the last
column is ``profiler.stability``, the worst ratio over the lengths.

    python bench/bench_profile.py [--model smollm2-135m] [--runs 3] [--points 5]
                                  [--repeats 2] [--decode-tokens 16] [--threads 1]
                                  [--save profiles.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from moe2.agent.config import AgentConfig
from moe2.agent.llama import LlamaCppBackend
from moe2.agent.meters import choose_meter
from moe2.agent.profiler import ProfilerSettings, profile_backend, stability
from moe2.controller.experts import packaged
from moe2.shared.costmodel import CostCurves
from moe2.shared.devices import load_device_class
from moe2.shared.protocol import AgentProfile

CURVES = {  # curve -> (label, unit shown, scale from the curve's unit)
    "prompt_seconds": ("prompt s", "ms", 1e3),
    "token_seconds": ("s/token", "ms", 1e3),
    "prompt_joules": ("prompt J", "J", 1.0),
    "token_joules": ("J/token", "J", 1.0),
}


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def run_table(profile: AgentProfile, lengths: list[int]) -> str:
    c = profile.curves
    lines = []
    for name, (label, unit, scale) in CURVES.items():
        curve = getattr(c, name)
        terms = " + ".join(
            f"{k * scale:.4g}" + ("", " L", " L^2", " L^3")[min(i, 3)]
            for i, k in enumerate(curve.coef)
        )
        lines.append(
            f"  {label:<9} = {terms} {unit}"
            f"   (residual ±{curve.rel_residual_std:.1%}, {curve.n_points} measurements)"
        )
    units = [f"{label} {unit}" for label, unit, _ in CURVES.values()]
    lines.append(f"  {'L':>6}" + "".join(f"  {u:>12}" for u in units))
    by_length = {pt.prompt_tokens: pt for pt in profile.points}
    for n in lengths:
        cells = "".join(
            f"  {getattr(c, name).at(n) * scale:12.4g}" for name, (_, _, scale) in CURVES.items()
        )
        pt = by_length[n]
        measured = (
            f"   measured: prompt {min(pt.prompt_seconds) * 1e3:.4g}-"
            f"{max(pt.prompt_seconds) * 1e3:.4g} ms, token {min(pt.token_seconds) * 1e3:.4g}-"
            f"{max(pt.token_seconds) * 1e3:.4g} ms"
        )
        lines.append(f"  {n:>6}{cells}{measured}")
    return "\n".join(lines)


def stability_table(profiles: list[AgentProfile], lengths: list[int]) -> str:
    worst = stability(profiles, lengths)
    lines = [f"  {'curve':<9}" + "".join(f"  {'L=' + str(n):>8}" for n in lengths) + "     worst"]
    for name, (label, _, _) in CURVES.items():
        ratios = []
        for n in lengths:
            values = [getattr(p.curves, name).at(n) for p in profiles]
            ratios.append(max(values) / min(values) if min(values) > 0 else float("inf"))
        lines.append(
            f"  {label:<9}" + "".join(f"  {r:8.2f}" for r in ratios) + f"  {worst[name]:8.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="packaged model name")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--points", type=int, default=5, help="prompt lengths per run")
    ap.add_argument("--repeats", type=int, default=2, help="measurements per prompt length")
    ap.add_argument("--decode-tokens", type=int, default=16)
    # One thread by default: on a 2-core box shared with other work, llama.cpp's spinning
    # thread barrier makes 2-thread delays swing tenfold whenever another process takes a core.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--max-fraction", type=float, default=0.9, help="longest prompt / n_ctx")
    ap.add_argument("--save", type=Path, help="write the profiles here (JSON list)")
    args = ap.parse_args()
    assert set(CURVES) == set(CostCurves.model_fields), "a curve is missing from CURVES"

    path = packaged.fetch(args.model)
    backend = LlamaCppBackend(AgentConfig(model=path, n_ctx=args.n_ctx, n_threads=args.threads))
    device = load_device_class("cpu-generic")
    settings = ProfilerSettings(
        points=args.points,
        repeats=args.repeats,
        decode_tokens=args.decode_tokens,
        max_prompt_fraction=args.max_fraction,
    )
    lengths = settings.lengths_for(backend.info.n_ctx)
    print(
        f"{backend.info.name} ({backend.info.quantization}, {path.name}), n_ctx "
        f"{backend.info.n_ctx}, {args.threads} threads, {os.cpu_count()} cores; {args.runs} runs "
        f"x {len(lengths)} prompt lengths x {args.repeats} repeats, {args.decode_tokens} "
        "decoded tokens each"
    )
    profiles = []
    try:
        for run in range(1, args.runs + 1):
            before = load()
            with choose_meter(device) as meter:
                t0 = time.perf_counter()
                prof = profile_backend(
                    backend,
                    meter,
                    settings,
                    agent_id="bench",
                    device_class=device.device_class,
                    power_mode=device.default_mode,
                )
            profiles.append(prof)
            energy = "measured" if prof.energy_measured else "MODELLED, not measured"
            print(
                f"\nrun {run}: {time.perf_counter() - t0:.1f} s, energy from {prof.meter_source} "
                f"({energy}); {before} -> {load()}"
            )
            print(run_table(prof, lengths))
    finally:
        backend.close()
        if args.save is not None:
            args.save.write_text(json.dumps([p.model_dump(mode="json") for p in profiles]))
    if len(profiles) >= 2:
        print(f"\nstability over {len(profiles)} runs: max/min of each curve at each length")
        print(stability_table(profiles, lengths))


if __name__ == "__main__":
    main()
