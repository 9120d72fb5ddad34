"""An evaluation as the paper lays it out: markdown tables (Fig. 3 without limits, then one
table per delay limit with a column per energy limit, as Tables II–IV), and a PNG of accuracy
against the energy budget, one line per method and delay limit (matplotlib, Agg backend).

    print(markdown(result))
    plot(result, Path("eval.png"))

A cell reads ``95.8 ± 2.9 (≈0.021 s, ≈1.52 J)``: accuracy in percent ± its spread (1σ: the
binomial standard error on the held-out questions, with the standard deviation over seeds for
random subsets), then what the answers cost (worst app's delay per step, energy per step or
per prompt as the grid states it; ≈ where the figures are modelled, ~ where partly modelled,
nothing where measured), marked ``over`` where that breaks the cell's limit. Rows "MoE² −
<method>" give each difference in accuracy points with its paired bootstrap 95% interval over
the same questions. When the answers were measured (``--answerer gateway``), a row "MoE²
promised" under each table gives what the one cost function promised for the same answers:
the figures the optimiser held to the limits.
"""

from __future__ import annotations

import math
from pathlib import Path

from moe2.controller.evaluate.metrics import AnswerCosts, Difference
from moe2.controller.evaluate.run import (
    ALONE,
    AVERAGE,
    BASE,
    CELL_METHODS,
    LABELS,
    MOE2,
    MOE2_ALL,
    PLURALITY_ALL,
    RANDOM_MV,
    SMO_MV,
    VOTE_ALL,
    Evaluation,
    MethodResult,
)
from moe2.controller.extras import require


def percent(share: float) -> str:
    return f"{100 * share:.1f}"


def _limit(value: float | None, unit: str) -> str:
    return "none" if value is None else f"{value:g} {unit}"


def energy_unit(result: Evaluation) -> str:
    return "J/prompt" if result.grid.energy_per == "prompt" else "J"


def source_mark(source: str) -> str:
    """'≈' before figures modelled from device data, '~' where some experts' are measured and
    some modelled, nothing before measured ones."""
    if "modelled" in source:
        return "≈"
    if "mixed" in source:
        return "~"
    return ""


def marks(c: AnswerCosts) -> tuple[str, str]:
    """(delay mark, energy mark)."""
    return source_mark(c.delay_source or c.basis), source_mark(c.energy_source or c.basis)


def cost_text(c: AnswerCosts, per: str = "step") -> str:
    d, e = marks(c)
    unit = "J/prompt" if per == "prompt" else "J"
    energy = c.energy_per_prompt if per == "prompt" else c.energy
    failed = f", {c.failed} failed" if c.failed else ""
    return f"{d}{c.worst_delay:.3g} s, {e}{energy:.3g} {unit}{failed}"


def _costs(m: MethodResult, per: str) -> str:
    if m.costs is None:
        return ""
    mark = ", over" if m.within_limits is False else ""
    return f" ({cost_text(m.costs, per)}{mark})"


def cell_text(m: MethodResult, per: str = "step") -> str:
    spread = f" ± {percent(m.spread)}" if m.spread is not None else ""
    return f"{percent(m.accuracy)}{spread}{_costs(m, per)}"


def difference_text(d: Difference | None) -> str:
    """'+4.2 [+1.0, +7.5]' accuracy points, MoE² minus the method; '*' where the interval
    leaves out 0."""
    if d is None or math.isnan(d.delta):
        return ""
    star = " *" if d.significant else ""
    return f"{100 * d.delta:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]{star}"


def markdown(result: Evaluation) -> str:
    j = result.to_json()
    prov = j["provenance"]
    gate = prov["gate"]
    unit = energy_unit(result)
    per = result.grid.energy_per
    delay = prov.get("gate_delay", {})
    lines = [
        f"## MoE² evaluation on {result.dataset}",
        "",
        f"- questions: {result.test['questions']} held out ({result.test['held_out']})",
        f"- subsets chosen on: {result.selection['samples']} samples of "
        f"{result.selection['dataset']} ({result.selection['note']})",
        f"- answers: {result.answerer}; MoE² fuses the top-{result.settings.k} of S by gate "
        "weight; M. V. fuses all of its subset with equal weights (eq. 3, ω = 1/|S|), through "
        "the same mixing as MoE²; the plurality vote (an extra row) lets each expert answer "
        f"alone and takes the most frequent answer; Rand. M. V.: mean over "
        f"{result.settings.seeds} random feasible subsets; ± is 1σ (binomial standard error, "
        "and the spread over seeds for random subsets); MoE² − X: accuracy points with a "
        "paired bootstrap 95% interval over the same questions (* where it leaves out 0)",
        f"- gate: {gate['version']}"
        + (
            f" (trained on {', '.join(gate['datasets'])}; weights via {gate['source']})"
            if gate["datasets"]
            else ""
        )
        + (
            f"; τ_gate {1e3 * delay['seconds']:.3g} ms per prompt on average ({delay['source']})"
            if delay
            else ""
        ),
        _single_agent_line(result),
        _costs_line(result),
    ]
    for expert, src in prov["costs"].items():
        lines.append(
            f"  - {expert}: delay {src['delay']}, energy {src['energy']} ({src['meter']}), "
            f"{src['device_class'] or 'unknown device'}, link {src['link']}"
        )
    if result.example:
        opts = " | ".join(repr(o) for o in result.example["options"])
        lines.append(f"- scored as: prompt {result.example['prompt']!r}, options {opts}")
    lines += [
        "",
        "### Without limits (Fig. 3)",
        "",
        "| Method | Accuracy (%) | ± | MoE² − method (95% CI) | Delay (s/step) | "
        "Energy (J/step) | Energy (J/prompt) |",
        "|---|---|---|---|---|---|---|",
    ]
    order = [k for k in result.baselines if k.startswith(f"{ALONE}:")]
    order += [
        k for k in (BASE, AVERAGE, VOTE_ALL, PLURALITY_ALL, MOE2_ALL) if k in result.baselines
    ]
    for key in order:
        lines.append(_row(result.baselines[key]))
    every = result.baselines[MOE2_ALL]
    if every.promised is not None:
        lines.append(_row(every, promised=True))
    for delay_limit in result.grid.delays:
        cells = [c for c in result.cells if c.delay_limit == delay_limit]
        lines += [
            "",
            f"### Accuracy (%) for τ_max = {_limit(delay_limit, 's')} per step",
            "",
            f"| E_max ({unit}) | " + " | ".join(_limit(c.energy_limit, unit) for c in cells) + " |",
            "|---|" + "---|" * len(cells),
        ]
        for key in CELL_METHODS:
            row = [cell_text(c.methods[key], per) if c.feasible else "infeasible" for c in cells]
            lines.append(f"| {LABELS[key]} | " + " | ".join(row) + " |")
        if any(c.feasible and c.methods[MOE2].promised is not None for c in cells):
            row = [
                f"({cost_text(pr, per)})"
                if c.feasible and (pr := c.methods[MOE2].promised) is not None
                else ""
                for c in cells
            ]
            lines.append(f"| {PROMISED} | " + " | ".join(row) + " |")
        for key in CELL_METHODS[1:]:
            row = [difference_text(c.methods[key].vs_moe2) if c.feasible else "" for c in cells]
            lines.append(f"| MoE² − {LABELS[key]} | " + " | ".join(row) + " |")
        subsets = [
            f"{_limit(c.energy_limit, unit)}: {{{', '.join(c.methods[MOE2].subsets[0])}}}"
            for c in cells
            if c.feasible
        ]
        if subsets:
            lines += ["", "SMO subsets: " + "; ".join(subsets)]
        for c in cells:
            if not c.feasible:
                lines.append(f"- infeasible at {_limit(c.energy_limit, unit)}: {c.reason}")
    return "\n".join(lines) + "\n"


PROMISED = "MoE² promised"


def _row(m: MethodResult, *, promised: bool = False) -> str:
    c = m.promised if promised else m.costs
    d, e = ("", "") if c is None else marks(c)
    delay = "" if c is None else f"{d}{c.worst_delay:.3g}"
    energy = "" if c is None else f"{e}{c.energy:.3g}"
    prompt = "" if c is None else f"{e}{c.energy_per_prompt:.3g}"
    if promised:
        return f"| {PROMISED} | | | | ({delay}) | ({energy}) | ({prompt}) |"
    spread = "" if m.spread is None else percent(m.spread)
    diff = difference_text(m.vs_moe2)
    failed = f" ({c.failed} failed)" if c is not None and c.failed else ""
    return (
        f"| {m.label} | {percent(m.accuracy)}{failed} | {spread} | {diff} | {delay} | "
        f"{energy} | {prompt} |"
    )


def _single_agent_line(result: Evaluation) -> str:
    sa = result.single_agent
    if sa.get("base"):
        return (
            f"- S. A.: the experts are adapters of one model; S. A. is that base model, "
            f"{sa['base']}, alone; A. E. A. is the mean of the experts alone"
        )
    if sa.get("experts_are") == "adapters":
        return (
            f"- S. A.: not evaluated: {sa.get('missing')}; A. E. A. is the mean of the experts "
            "alone"
        )
    return "- S. A.: the experts are original models, each evaluated alone; A. E. A. is their mean"


def _costs_line(result: Evaluation) -> str:
    prov = result.provenance
    unit = "per prompt" if result.grid.energy_per == "prompt" else "per step"
    if result.answerer_measures:
        return (
            "- costs: measured on the answers (delay per step, eq. 8: the gateway's latency "
            "less the gate's part, over T = the correct option's tokens, plus the gate's part; "
            "energy the answering experts' power from their profiles "
            f"({prov['cost_basis']}) × their measured model time, {unit}); 'over' = above the "
            "cell's limit by more than the profiles' stated spread; answers the fleet failed "
            "to give are counted apart; ≈ modelled, ~ partly modelled, no mark measured"
        )
    return (
        f"- costs {unit}, promised by the one cost function from the profiles: "
        f"{prov['cost_basis']} (delay = worst app's mean, energy = mean; ≈ modelled, ~ partly "
        "modelled, no mark measured; 'over' = above the cell's limit)"
    )


def plot(result: Evaluation, path: Path) -> Path:
    """Accuracy against the energy budget: one line per method and delay limit, with the best
    single expert and the vote of all experts as references."""
    require("matplotlib", "eval", "moe2ctl eval --plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    energies = [e for e in result.grid.energies if e is not None]
    top = max(energies) * 1.25 if energies else 1.0
    x_of = {e: (top if e is None else e) for e in result.grid.energies}
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    styles = {MOE2: "-", SMO_MV: "--", RANDOM_MV: ":"}  # the plurality vote: table only
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, delay_limit in enumerate(result.grid.delays):
        colour = colours[n % len(colours)]
        cells = [c for c in result.cells if c.delay_limit == delay_limit and c.feasible]
        for key, style in styles.items():
            xs = [x_of[c.energy_limit] for c in cells]
            ys = [100 * c.methods[key].accuracy for c in cells]
            label = f"{LABELS[key]}, τ_max {_limit(delay_limit, 's')}"
            if key == RANDOM_MV:
                err = [100 * (c.methods[key].spread or 0.0) for c in cells]
                ax.errorbar(
                    xs,
                    ys,
                    yerr=err,
                    linestyle=style,
                    color=colour,
                    label=label,
                    marker="o",
                    capsize=3,
                )
            else:
                ax.plot(xs, ys, linestyle=style, color=colour, label=label, marker="o")
    singles = [m for k, m in result.baselines.items() if k.startswith(f"{ALONE}:")]
    best = max(singles, key=lambda m: m.accuracy)
    ax.axhline(100 * best.accuracy, color="grey", linewidth=1, label=f"best single: {best.label}")
    vote = result.baselines[VOTE_ALL]
    ax.axhline(
        100 * vote.accuracy,
        color="black",
        linewidth=1,
        linestyle="-.",
        label="M. V. of all experts (equal weights)",
    )
    ax.set_xlabel(
        f"energy limit E_max ({energy_unit(result)})"
        + ("; rightmost: none" if None in x_of else "")
    )
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"MoE² on {result.dataset}: {result.test['questions']} held-out questions")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
