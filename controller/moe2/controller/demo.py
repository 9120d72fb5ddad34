"""``moe2ctl demo``: the whole pipeline on this machine, on embedded defaults.

Starts a loopback broker (mosquitto when installed, else the embedded rumqttd), builds the
tiny synthetic-domain experts, starts one real agent process per expert, and shows what
they serve over MQTT: each expert's next-token distribution for a few prompts.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from moe2.controller.experts.domains import DOMAINS
from moe2.controller.experts.packaged import models_dir
from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.broker import BROKERS, start_broker
from moe2.shared.client import PromptClient
from moe2.shared.mqtt import BrokerConfig, RpcClient

DEMO_DOMAINS = ("animals", "code", "cooking", "arithmetic")
PROMPTS = ("the fox eats", "def compute ( x ) :", "bake the cake for", "3 plus 4")


@click.command()
@click.option(
    "--broker",
    "broker_kind",
    type=click.Choice(["auto", *BROKERS]),
    default="auto",
    show_default=True,
    help="Which embedded broker to start.",
)
@click.option(
    "--domain",
    "domains",
    multiple=True,
    type=click.Choice(sorted(DOMAINS)),
    help="Experts to run (repeatable).",
    default=DEMO_DOMAINS,
    show_default=True,
)
@click.option("--top", default=3, show_default=True, help="Tokens to show per distribution.")
@click.option(
    "--k",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Experts fused per prompt (0: all).",
)
def demo(broker_kind: str, domains: tuple[str, ...], top: int, k: int) -> None:
    """Run broker + tiny experts locally and print distributions served over MQTT."""
    from moe2.controller.experts.tiny import build_experts

    t0 = time.monotonic()
    k = k or len(domains)
    with (
        start_broker(broker_kind) as broker,
        tempfile.TemporaryDirectory(prefix="moe2-demo-") as tmp,
    ):
        cfg = BrokerConfig(host=broker.host, port=broker.port)
        ports = ", ".join(f"{port} (MQTT {v})" for v, port in broker.listeners.items())
        if len(set(broker.listeners.values())) == 1:
            ports = f"{broker.port} (MQTT 5 and 3.1.1)"
        click.echo(f"broker: {broker.name} on {broker.host}, port {ports}")
        paths = build_experts(models_dir() / "tiny", list(domains))
        click.echo(f"experts: {', '.join(f'{d} ({paths[d].name})' for d in domains)}")
        with LocalFleet(cfg, Path(tmp)) as fleet, RpcClient(cfg) as rpc:
            ids = [f"tiny-{d}" for d in domains]
            for i, (agent_id, d) in enumerate(zip(ids, domains)):
                # The first agent is also the gateway: it serves the app "demo" with all
                # experts, k of them per prompt (uniform weights until a gate is pushed).
                role = ["--serve-app", f"demo={','.join(ids)}:{k}"] if i == 0 else []
                role += broker.gateway_flags if i == 0 else ()
                fleet.start(agent_id, paths[d], "--n-threads", "1", *role)
            fleet.wait_online(ids, timeout=120)
            click.echo(f"{len(ids)} agents online after {time.monotonic() - t0:.1f} s\n")
            for prompt in PROMPTS:
                click.echo(f"prompt: {prompt!r}")
                for agent_id in ids:
                    reply = rpc.call(
                        agent_id, p.OpenRequest(prompt=prompt, top_k=top, with_pieces=True)
                    )
                    rpc.call(agent_id, p.CloseRequest(session=reply.session))
                    dist = reply.dist
                    assert isinstance(dist, p.TopKDist)  # asked for top-k
                    shown = "  ".join(
                        f"{piece.strip() or repr(piece)}={2.718281828**lp:.2f}"
                        for piece, lp in zip(dist.pieces or [], dist.logprobs)
                    )
                    click.echo(
                        f"  {agent_id:18s} {shown}   (tail {dist.tail:.2f}, "
                        f"{reply.compute_ms:.1f} ms)"
                    )
                click.echo("")
            click.echo(f"answers through the gateway {ids[0]} (app 'demo', k={k}):")
            with PromptClient(cfg) as client:
                for prompt in PROMPTS:
                    answer = client.ask("demo", prompt, max_tokens=16)
                    experts = ", ".join(f"{e.id} {e.weight:.2f}" for e in answer.experts)
                    click.echo(
                        f"  {prompt!r} -> {answer.text.strip()!r}   [{answer.tokens} tokens, "
                        f"{answer.latency_ms:.0f} ms, {answer.fusion} fusion of {experts}]"
                    )
