"""The fleet page (``GET /fleet`` on ``moe2-http``): one read-only HTML page for operators,
rendered on the server from ``FleetSummary`` (no script; it reloads itself every
``REFRESH_S``), behind the front's API keys (a browser gives one as the password of HTTP
Basic authentication; any user name).

Agents with their cost curves as small plots, applications against their limits, and the
last ``moe2ctl serve`` decisions with their reasons. Every value is escaped.
"""

from __future__ import annotations

import html
import time

from moe2.controller.openai.summary import AgentRow, AppRow, Curve, DecisionRow, FleetSummary

REFRESH_S = 10
_PLOT_W, _PLOT_H = 220, 80
# Each kind of curve (CostCurves: prompt_*, token_*, score_*): its colour, label and dashes
# (the scoring pass is dashed: scaled to its own maximum, it can lie on the prompt's line).
_KINDS = {
    "prompt": ("#1f77b4", "prompt", ""),
    "token": ("#d62728", "per token", ""),
    "score": ("#2ca02c", "scoring", "4 3"),
}

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .3em 0; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; } th, td { padding: .3em .6em; text-align: left;
  border-bottom: 1px solid #ddd; vertical-align: top; }
th { background: #f4f4f4; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.online { color: #18794e; font-weight: 600; } .offline { color: #b42318; font-weight: 600; }
.over { color: #b42318; font-weight: 600; } .muted { color: #777; }
.plot text { font-size: 9px; fill: #555; } .status span { margin-right: 1.5em; }
"""


def e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if value == 0:
        return f"0{unit}"
    if abs(value) < 0.01 and unit == " s":
        return f"{value * 1e3:.3g} ms"
    return f"{value:.3g}{unit}"


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def plot(curves: list[Curve], unit: str) -> str:
    """An inline SVG of every curve of one unit (s or J) the profile has against the prompt
    length: the prompt pass, a generated token, and (profiles since the scoring pass is
    measured) a scoring pass, each labelled and scaled to its own maximum (a prompt costs
    hundreds of tokens' steps: on one scale the per-token curve would be a flat line)."""
    mine = [c for c in curves if c.unit == unit and c.points]
    if not mine:
        return '<span class="muted">no profile</span>'
    xs = [x for c in mine for x, _ in c.points]
    x0, x1 = min(xs), max(xs)
    pad = 4

    def sx(x: float) -> float:
        return pad + (x - x0) / max(1, x1 - x0) * (_PLOT_W - 2 * pad)

    below = 14  # the L axis labels
    above = 6 + 10 * len(mine)  # the legend: a line per curve
    parts, legend = [], []
    for i, c in enumerate(mine):
        top = max(y for _, y in c.points) or 1.0
        colour, label, dashes = _KINDS.get(c.name.split("_")[0], ("#555", c.name, ""))
        dashed = f' stroke-dasharray="{dashes}"' if dashes else ""
        pts = " ".join(
            f"{sx(x):.1f},{_PLOT_H - below - y / top * (_PLOT_H - below - above):.1f}"
            for x, y in c.points
        )
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dashed} points="{pts}">'
            f"<title>{e(c.name)}: up to {e(fmt(top, ' ' + unit))}</title></polyline>"
        )
        legend.append(
            f'<text x="{pad}" y="{10 + 10 * i}" style="fill: {colour}">{e(label)} up to '
            f"{e(fmt(top, ' ' + unit))}</text>"
        )
    return (
        f'<svg class="plot" role="img" aria-label="{e(unit)} curves" width="{_PLOT_W}" '
        f'height="{_PLOT_H}" viewBox="0 0 {_PLOT_W} {_PLOT_H}">'
        f'<rect width="{_PLOT_W}" height="{_PLOT_H}" fill="#fafafa" stroke="#ddd"/>'
        + "".join(parts)
        + "".join(legend)
        + f'<text x="{pad}" y="{_PLOT_H - 3}">L={x0}</text>'
        f'<text x="{_PLOT_W - pad}" y="{_PLOT_H - 3}" text-anchor="end">L={x1} tokens</text>'
        "</svg>"
    )


def _agent_row(a: AgentRow) -> str:
    state = "online" if a.online else "offline"
    serves = ", ".join(f"{app}@v{v}" for app, v in sorted((a.serves or {}).items()))
    gateway = "-" if a.serves is None else (serves or "(no app)")
    if a.serves is not None and a.capacity is not None:
        gateway += f' <span class="muted">({a.capacity} at once)</span>'
    meter = a.meter or "-"
    if a.meter not in (None, "modelled") and not a.energy_measured:
        meter += " (modelled)"
    model = e(a.model) + (f" + {e(a.adapter)}" if a.adapter else "")
    return (
        f'<tr data-agent="{e(a.agent)}"><td>{e(a.agent)}</td><td class="{state}">{state}</td>'
        f"<td>{model}</td><td>{e(a.backend)}</td><td>{e(a.device_class)}</td>"
        f"<td>{e(meter)}</td><td class='num'>{e(a.max_sessions)}</td><td>{gateway}</td>"
        f"<td>{plot(a.curves, 's')}</td><td>{plot(a.curves, 'J')}</td></tr>"
    )


def _app_row(a: AppRow) -> str:
    gateways = ", ".join(f"{g}@v{v}" for g, v in sorted(a.gateways.items()))
    delay_cls = ' class="num over"' if a.over_delay else ' class="num"'
    energy_cls = ' class="num over"' if a.over_energy else ' class="num"'
    energy = fmt(a.energy_j_per_step, " J")
    if a.energy_j_per_step is not None and not a.energy_measured:
        energy = f"≈{energy}"
    return (
        f'<tr data-app="{e(a.app)}"><td>{e(a.app)}</td>'
        f"<td>{e(gateways) or '<span class=offline>none online</span>'}</td>"
        f"<td class='num'>{e(a.version if a.version is not None else 'local')}</td>"
        f"<td>{e(', '.join(a.subset) or '-')}</td><td class='num'>{e(a.k or '-')}</td>"
        f"<td>{e(a.gate or 'uniform')}</td>"
        f"<td{delay_cls}>{e(fmt(a.delay_s_per_step, ' s'))}</td>"
        f"<td class='num'>{e(fmt(a.delay_s_per_step_p95, ' s'))}</td>"
        f"<td class='num'>{e(fmt(a.delay_limit, ' s'))}</td>"
        f"<td{energy_cls}>{e(energy)}</td><td class='num'>{e(fmt(a.energy_limit, ' J'))}</td>"
        f"<td class='num'>{a.answers}</td><td class='num'>{a.errors}</td></tr>"
    )


def _decision_row(d: DecisionRow) -> str:
    return (
        f"<tr><td>{e(when(d.at))}</td><td>{e(d.app or 'all')}</td><td>{e(d.action)}</td>"
        f"<td>{e(', '.join(d.subset) if d.subset else '-')}</td>"
        f"<td class='num'>{e(d.version if d.version is not None else '-')}</td>"
        f"<td>{e(d.reason)}</td></tr>"
    )


def _table(headers: list[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{e(empty)}</p>'
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def render(s: FleetSummary) -> str:
    online = sum(a.online for a in s.agents)
    gateways = sum(a.serves is not None for a in s.agents)
    broker = "connected" if s.broker_connected else "DISCONNECTED"
    status = (
        f'<p class="status"><span>broker: <b class="{"online" if s.broker_connected else "offline"}'
        f'">{broker}</b></span><span>agents online: <b>{online}</b> of {len(s.agents)}</span>'
        f"<span>gateways: <b>{gateways}</b></span>"
        f"<span>capacity: <b>{e(s.capacity if s.capacity is not None else 'not announced')}</b>"
        f"</span><span>requests held here: <b>{s.in_flight}</b></span>"
        f'<span class="muted">as of {e(when(s.at))}</span></p>'
    )
    agents = _table(
        [
            "agent",
            "state",
            "model",
            "backend",
            "device class",
            "energy meter",
            "sessions",
            "gateway of",
            "delay curves (s)",
            "energy curves (J)",
        ],
        [_agent_row(a) for a in s.agents],
        "no agent has announced itself on this broker",
    )
    apps = _table(
        [
            "application",
            "served by",
            "version",
            "subset",
            "k",
            "gate",
            "delay/step",
            "p95",
            "limit",
            "energy/step",
            "limit",
            "answers",
            "errors",
        ],
        [_app_row(a) for a in s.apps],
        "no application is assigned or served",
    )
    if s.registry == "not configured":
        decisions = (
            '<p class="muted">no registry configured (moe2-http --db-url ...): serve decisions '
            "and limits are not shown</p>"
        )
    elif s.registry != "ok":
        decisions = f'<p class="offline">registry {e(s.registry)}</p>'
    else:
        decisions = _table(
            ["at", "application", "action", "subset", "version", "reason"],
            [_decision_row(d) for d in s.decisions],
            "no serve decision recorded yet",
        )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="{REFRESH_S}">'
        "<title>moe2 fleet</title>"
        f"<style>{_STYLE}</style></head><body><h1>moe2 fleet</h1>{status}"
        f'<h2 id="agents">Agents</h2>{agents}'
        '<h2 id="apps">Applications</h2><p class="muted">delay and energy per generated step '
        "of real answers over the gateways' recent window; ≈ marks energy modelled from "
        f"device figures; red: over the limit</p>{apps}"
        f'<h2 id="decisions">Last serve decisions</h2>{decisions}</body></html>'
    )
