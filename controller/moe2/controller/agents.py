"""``moe2ctl agents`` and ``moe2ctl profile``: the fleet as its retained messages describe it.

    moe2ctl agents --broker-host 10.0.0.2            # online/offline, model, device class...
    moe2ctl profile orin-1 --at 256 --at 1024 --json
    moe2ctl profile orin-1 --refresh --repeats 3      # profile it now, then show it

Both read the retained ``info``/``status``/``profile`` messages for a bounded time and print
them; nothing is stored (the registry does that).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import click

from moe2.controller.options import broker_from_flags, broker_options, emit, json_option
from moe2.shared.costmodel import CostCurve
from moe2.shared.errors import Moe2Error
from moe2.shared.fleet import FleetState, FleetView
from moe2.shared.mqtt import BrokerConfig, RpcClient
from moe2.shared.protocol import AgentInfo, AgentProfile, AgentStatus, ProfileRequest


def _snapshot(broker: BrokerConfig, wait_s: float) -> FleetState:
    state = FleetView.snapshot(
        broker, ("info", "status", "profile", "gateway", "assignment_ack", "desired_app"), wait_s
    )
    for topic, why in state.refused:  # reported, not hidden
        click.echo(f"warning: ignored {topic}: {why}", err=True)
    return state


def _broker_options(fn: Any) -> Any:
    fn = broker_options(fn)
    return click.option(
        "--wait",
        "wait_s",
        type=click.FloatRange(min=0.1),
        default=3.0,
        show_default=True,
        help="Longest time to wait for the retained messages, seconds.",
    )(fn)


# --------------------------------------------------------------------------- agents


def served_versions(state: FleetState, gateway: str) -> dict[str, int] | None:
    """App -> the assignment version ``gateway`` serves (0: its local configuration); None
    when it is no online gateway. A gateway announces its applications when its
    subscriptions change, not on every new version of an assignment it already serves: the
    version is the latest it acknowledged as accepted and serving, when that is newer."""
    gw = state.gateway.get(gateway)
    if gw is None or gw.state != "online":
        return None
    out = dict(gw.apps)
    for app, announced in gw.apps.items():
        ack = state.assignment_ack.get((gateway, app))
        if ack is None or not (ack.accepted and ack.serving) or ack.version <= announced:
            continue
        desired = state.desired_app.get(app)
        reverted = desired is not None and desired.version == ack.version and desired.revert
        out[app] = 0 if reverted else ack.version
    return out


def agent_rows(state: FleetState) -> list[dict[str, Any]]:
    infos: dict[str, AgentInfo] = state.info
    statuses: dict[str, AgentStatus] = state.status
    profiles: dict[str, AgentProfile] = state.profile
    rows = []
    for agent in sorted(set(infos) | set(statuses) | set(profiles)):
        info, status, prof = infos.get(agent), statuses.get(agent), profiles.get(agent)
        rows.append(
            {
                "agent_id": agent,
                "state": status.state if status else "unknown",
                "since": status.since if status else None,
                "model": info.model if info else None,
                "adapter": info.adapter.model_dump() if info and info.adapter else None,
                "architecture": info.architecture if info else None,
                "quantization": info.quantization if info else None,
                "n_ctx": info.n_ctx if info else None,
                "device_class": info.device_class
                if info
                else (prof.device_class if prof else None),
                "tokenizer_hash": info.tokenizer_hash if info else None,
                "software_version": info.software_version if info else None,
                "started_at": info.started_at if info else None,
                "meter_source": prof.meter_source if prof else None,
                "energy_measured": prof.energy_measured if prof else None,
                "gateway_apps": served_versions(state, agent),
                "backend": info.backend.model_dump() if info and info.backend else None,
            }
        )
    return rows


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def backend_cell(backend: dict[str, Any] | None) -> str:
    """ "CUDA 31/31 1.2G" (layers on the GPU of all, GiB of weights there), "CPU", or "-"."""
    if backend is None:
        return "-"
    if not backend["gpu_layers"]:
        asked = backend["requested_layers"]
        return "CPU" if not asked else f"CPU (asked {asked} on GPU)"
    gib = backend["vram_bytes"] / 2**30
    return f"{backend['name']} {backend['gpu_layers']}/{backend['n_layers']} {gib:.1f}G"


def _agents_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no agents have announced themselves on this broker"

    def cell(v: Any) -> str:
        return "-" if v is None else str(v)

    return _table(
        [
            "AGENT",
            "STATE",
            "MODEL",
            "QUANT",
            "CTX",
            "DEVICE",
            "BACKEND",
            "TOKENIZER",
            "METER",
            "SERVES",
        ],
        [
            [
                r["agent_id"],
                r["state"],
                cell(r["model"]) + (f" + {r['adapter']['name']}" if r.get("adapter") else ""),
                cell(r["quantization"]),
                cell(r["n_ctx"]),
                cell(r["device_class"]),
                backend_cell(r["backend"]),
                cell(r["tokenizer_hash"] and r["tokenizer_hash"][:12]),
                cell(r["meter_source"]),
                cell(
                    r["gateway_apps"]
                    and ",".join(f"{a}@v{v}" for a, v in r["gateway_apps"].items())
                ),
            ]
            for r in rows
        ],
    )


@click.command("agents")
@json_option
@_broker_options
def agents_cmd(as_json: bool, wait_s: float, **kwargs: Any) -> None:
    """List the agents: online/offline, model, device class, tokenizer, energy meter."""
    emit(agent_rows(_snapshot(broker_from_flags(kwargs), wait_s)), as_json, _agents_text)


# --------------------------------------------------------------------------- profile

DEFAULT_LENGTHS = (128, 512, 1024, 2048)


def profile_summary(profile: AgentProfile, lengths: Iterable[int]) -> dict[str, Any]:
    c = profile.curves
    return {
        "profile": profile.model_dump(mode="json"),
        "at": [
            {
                "prompt_tokens": n,
                "prompt_seconds": c.prompt_seconds.at(n),
                "token_seconds": c.token_seconds.at(n),
                "prompt_joules": c.prompt_joules.at(n),
                "token_joules": c.token_joules.at(n),
            }
            for n in lengths
        ],
    }


def _curve_text(name: str, curve: CostCurve) -> str:
    terms = " + ".join(
        f"{c:.4g}" + ("" if i == 0 else " L" if i == 1 else f" L^{i}")
        for i, c in enumerate(curve.coef)
    )
    return (
        f"  {name:<15} = {terms}  {curve.unit}   (residual ±{curve.rel_residual_std:.1%}, "
        f"{curve.n_points} runs, L {curve.min_tokens}-{curve.max_tokens})"
    )


def _profiles_text(summaries: list[dict[str, Any]]) -> str:
    if not summaries:
        return "no agent has published a profile on this broker"
    blocks = []
    for s in summaries:
        p = AgentProfile.model_validate(s["profile"])
        energy = "measured" if p.energy_measured else "MODELLED, not measured"
        delay = "measured" if p.delay_measured else "MODELLED, not measured"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.profiled_at))
        head = [
            f"{p.agent_id}: {p.model} on {p.device_class}/{p.power_mode or '?'}, n_ctx {p.n_ctx}",
            f"  energy: {p.meter_source} ({energy}, scope {p.energy_scope}"
            + (f", idle {p.idle_watts:.1f} W" if p.idle_watts is not None else "")
            + ")",
            f"  delay: {delay}; profiled {when} in {p.duration_s:.1f} s",
        ]
        curves = [
            _curve_text(n, c)
            for n in type(p.curves).model_fields
            if isinstance(c := getattr(p.curves, n), CostCurve)  # not an absent scoring curve
        ]
        table = _table(
            ["  PROMPT", "PROMPT s", "s/TOKEN", "PROMPT J", "J/TOKEN"],
            [
                [
                    f"  {a['prompt_tokens']}",
                    f"{a['prompt_seconds']:.4g}",
                    f"{a['token_seconds']:.4g}",
                    f"{a['prompt_joules']:.4g}",
                    f"{a['token_joules']:.4g}",
                ]
                for a in s["at"]
            ],
        )
        blocks.append("\n".join([*head, *curves, table]))
    return "\n\n".join(blocks)


def refresh_profiles(
    broker: BrokerConfig, agent_ids: Iterable[str], request: ProfileRequest, timeout_s: float
) -> dict[str, AgentProfile]:
    """Profile the agents now, all at once (each on its own box); their new profiles by id."""
    with RpcClient(broker, timeout=timeout_s) as rpc:
        asked = {agent: rpc.call_async(agent, request) for agent in agent_ids}
        return {agent: rpc.wait(fut).profile for agent, fut in asked.items()}


@click.command("profile")
@click.argument("agent_ids", nargs=-1)
@click.option(
    "--at",
    "lengths",
    type=click.IntRange(min=1),
    multiple=True,
    help="Prompt length (tokens) to evaluate the curves at; repeatable. "
    f"[default: {', '.join(map(str, DEFAULT_LENGTHS))} within each n_ctx]",
)
@click.option(
    "--refresh",
    is_flag=True,
    help="Have the named agents profile themselves now (each publishes its new profile; "
    "requests wait meanwhile) and show the new profiles.",
)
@click.option(
    "--points",
    type=click.IntRange(2, 32),
    help="With --refresh: prompt lengths to measure [default: the agent's setting].",
)
@click.option(
    "--repeats",
    type=click.IntRange(1, 20),
    help="With --refresh: measurements per prompt length [default: the agent's setting].",
)
@click.option(
    "--max-prompt-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    help="With --refresh: longest prompt as a fraction of the context [default: the agent's "
    "setting, 0.5].",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=600.0,
    show_default=True,
    help="With --refresh: longest wait for the new profiles, seconds.",
)
@json_option
@_broker_options
def profile_cmd(
    agent_ids: tuple[str, ...],
    lengths: tuple[int, ...],
    refresh: bool,
    points: int | None,
    repeats: int | None,
    max_prompt_fraction: float | None,
    timeout_s: float,
    as_json: bool,
    wait_s: float,
    **kwargs: Any,
) -> None:
    """Show agents' cost curves (delay and energy vs prompt length) and their meter source."""
    broker = broker_from_flags(kwargs)
    if refresh:
        if not agent_ids:
            raise click.UsageError("--refresh needs the ids of the agents to profile")
        request = ProfileRequest(
            points=points, repeats=repeats, max_prompt_fraction=max_prompt_fraction
        )
        profiles = refresh_profiles(broker, agent_ids, request, timeout_s)
    else:
        profiles = _snapshot(broker, wait_s).profile
    wanted = list(agent_ids) or sorted(profiles)
    missing = [a for a in wanted if a not in profiles]
    if missing:
        raise Moe2Error(
            f"no retained profile for {', '.join(missing)}; agents with one: "
            f"{', '.join(sorted(profiles)) or 'none'}"
        )
    summaries = []
    for agent in wanted:
        p = profiles[agent]
        at = lengths or tuple(n for n in DEFAULT_LENGTHS if n <= p.n_ctx) or (p.n_ctx,)
        summaries.append(profile_summary(p, at))
    emit(summaries, as_json, _profiles_text)
