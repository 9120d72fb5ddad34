"""An evaluation as the paper lays it out: markdown tables (Fig. 3 without limits, then one
table per delay limit with a column per energy limit, as Tables II–IV), and a PNG of accuracy
against the energy budget, one line per method and delay limit (matplotlib, Agg backend).

    print(markdown(result))
    plot(result, Path("eval.png"))

A cell reads ``95.8 ± 2.9 (≈0.021 s, ≈1.52 J)``: accuracy in percent ± its spread (1σ: the
binomial standard error on the held-out questions, with the standard deviation over seeds for
random subsets), then what the answers cost per step (worst app's delay, energy; ≈ where the
figures are modelled, ~ where partly modelled, nothing where measured), marked ``over`` where
that breaks the cell's limit. When the answers were measured (``--answerer gateway``), a row
"MoE² promised" under each table gives what the profiles said the same answers would cost:
the figures the optimiser held to the limits.
"""

from __future__ import annotations

from pathlib import Path

from moe2.controller.evaluate.metrics import AnswerCosts
from moe2.controller.evaluate.run import (
    AVERAGE,
    LABELS,
    MOE2,
    MOE2_ALL,
    RANDOM_MV,
    SINGLE,
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


def cost_text(c: AnswerCosts) -> str:
    d, e = marks(c)
    return f"{d}{c.worst_delay:.3g} s, {e}{c.energy:.3g} J"


def _costs(m: MethodResult) -> str:
    if m.costs is None:
        return ""
    mark = ", over" if m.within_limits is False else ""
    return f" ({cost_text(m.costs)}{mark})"


def cell_text(m: MethodResult) -> str:
    spread = f" ± {percent(m.spread)}" if m.spread is not None else ""
    return f"{percent(m.accuracy)}{spread}{_costs(m)}"


def markdown(result: Evaluation) -> str:
    j = result.to_json()
    prov = j["provenance"]
    gate = prov["gate"]
    lines = [
        f"## MoE² evaluation on {result.dataset}",
        "",
        f"- questions: {result.test['questions']} held out ({result.test['held_out']})",
        f"- subsets chosen on: {result.selection['samples']} samples of "
        f"{result.selection['dataset']} ({result.selection['note']})",
        f"- answers: {result.answerer}; MoE² fuses the top-{result.settings.k} of S; "
        f"Rand. M. V.: mean over {result.settings.seeds} random feasible subsets; "
        "± is 1σ (binomial standard error, and the spread over seeds for random subsets)",
        f"- gate: {gate['version']}"
        + (
            f" (trained on {', '.join(gate['datasets'])}; weights via {gate['source']})"
            if gate["datasets"]
            else ""
        ),
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
        "| Method | Accuracy (%) | ± | Delay (s/step) | Energy (J/step) |",
        "|---|---|---|---|---|",
    ]
    order = [k for k in result.baselines if k.startswith(f"{SINGLE}:")]
    order += [AVERAGE, VOTE_ALL, MOE2_ALL]
    for key in order:
        m = result.baselines[key]
        d, e = ("", "") if m.costs is None else marks(m.costs)
        delay = "" if m.costs is None else f"{d}{m.costs.worst_delay:.3g}"
        energy = "" if m.costs is None else f"{e}{m.costs.energy:.3g}"
        spread = "" if m.spread is None else percent(m.spread)
        lines.append(f"| {m.label} | {percent(m.accuracy)} | {spread} | {delay} | {energy} |")
    for delay_limit in result.grid.delays:
        cells = [c for c in result.cells if c.delay_limit == delay_limit]
        lines += [
            "",
            f"### Accuracy (%) for τ_max = {_limit(delay_limit, 's')} per step",
            "",
            "| E_max (J) | " + " | ".join(_limit(c.energy_limit, "J") for c in cells) + " |",
            "|---|" + "---|" * len(cells),
        ]
        for key in (MOE2, SMO_MV, RANDOM_MV):
            row = [cell_text(c.methods[key]) if c.feasible else "infeasible" for c in cells]
            lines.append(f"| {LABELS[key]} | " + " | ".join(row) + " |")
        if any(c.feasible and c.methods[MOE2].promised is not None for c in cells):
            row = [
                f"({cost_text(pr)})"
                if c.feasible and (pr := c.methods[MOE2].promised) is not None
                else ""
                for c in cells
            ]
            lines.append(f"| {PROMISED} | " + " | ".join(row) + " |")
        subsets = [
            f"{_limit(c.energy_limit, 'J')}: {{{', '.join(c.methods[MOE2].subsets[0])}}}"
            for c in cells
            if c.feasible
        ]
        if subsets:
            lines += ["", "SMO subsets: " + "; ".join(subsets)]
        for c in cells:
            if not c.feasible:
                lines.append(f"- infeasible at {_limit(c.energy_limit, 'J')}: {c.reason}")
    return "\n".join(lines) + "\n"


PROMISED = "MoE² promised"


def _costs_line(result: Evaluation) -> str:
    prov = result.provenance
    if result.answerer_measures:
        return (
            "- costs per step: measured on the answers (delay: the gateway's latency / T, T = "
            "the correct option's tokens; energy: the answering experts' power from their "
            f"profiles ({prov['cost_basis']}) × their measured model time); "
            "'over' = above the cell's limit by more than the profiles' stated spread; "
            "≈ modelled, ~ partly modelled, no mark measured"
        )
    return (
        f"- costs per step, from profiles: {prov['cost_basis']} "
        "(delay = worst app's mean, energy = mean; ≈ modelled, ~ partly modelled, no mark "
        "measured; 'over' = above the cell's limit)"
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
    styles = {MOE2: "-", SMO_MV: "--", RANDOM_MV: ":"}
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
    singles = [m for k, m in result.baselines.items() if k.startswith(f"{SINGLE}:")]
    best = max(singles, key=lambda m: m.accuracy)
    ax.axhline(100 * best.accuracy, color="grey", linewidth=1, label=f"best single: {best.label}")
    vote = result.baselines[VOTE_ALL]
    ax.axhline(
        100 * vote.accuracy,
        color="black",
        linewidth=1,
        linestyle="-.",
        label="M. V. of all experts",
    )
    ax.set_xlabel("energy limit E_max (J per step)" + ("; rightmost: none" if None in x_of else ""))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"MoE² on {result.dataset}: {result.test['questions']} held-out questions")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
