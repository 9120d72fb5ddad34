"""``moe2ctl ask``: send a prompt as a mobile client would and stream the answer.

    moe2ctl ask --app qa "the fox eats"
    moe2ctl ask --app qa --chat --system "Answer briefly." "Name a prime."   # chat template
"""

from __future__ import annotations

import sys
from typing import Any

import click

from moe2.controller.options import broker_from_flags, broker_options, emit, json_option
from moe2.shared.client import PromptClient
from moe2.shared.protocol import NAME_PATTERN, ChatMessage


@click.command()
@click.argument("prompt")
@click.option("--app", required=True, help=f"Application name ({NAME_PATTERN}).")
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Longest answer in tokens [default: the gateway's].",
)
@click.option(
    "--temperature",
    type=click.FloatRange(0.0, 10.0),
    default=0.0,
    show_default=True,
    help="0 is greedy.",
)
@click.option(
    "--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True
)
@click.option("--seed", type=int, default=None, help="Sampling seed.")
@click.option(
    "--chat",
    is_flag=True,
    help="Send PROMPT as a user message of a conversation: each expert renders it with its "
    "model's chat template.",
)
@click.option("--system", default=None, help="With --chat: a system message first.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=120.0,
    show_default=True,
    help="Seconds to wait for the final answer.",
)
@json_option
@broker_options
def ask(
    prompt: str,
    app: str,
    max_tokens: int | None,
    temperature: float,
    top_p: float,
    seed: int | None,
    chat: bool,
    system: str | None,
    timeout: float,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Ask the fleet: publish PROMPT for APP, stream the answer, print who answered."""
    broker = broker_from_flags(kwargs)
    if system is not None and not chat:
        raise click.UsageError("--system needs --chat")
    question: str | list[ChatMessage] = prompt
    if chat:
        question = [ChatMessage(role="user", content=prompt)]
        if system is not None:
            question.insert(0, ChatMessage(role="system", content=system))

    def on_delta(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    with PromptClient(broker) as client:
        answer = client.ask(
            app,
            question,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            timeout=timeout,
            on_delta=None if as_json else on_delta,
        )
    if as_json:
        emit(answer.model_dump(), True)
        return
    experts = ", ".join(f"{e.id} ({e.weight:.2f})" for e in answer.experts)
    dropped = "; dropped " + ", ".join(d.id for d in answer.dropped) if answer.dropped else ""
    click.echo(
        f"\n[{answer.finish_reason}; {answer.tokens} tokens in {answer.latency_ms:.0f} ms; "
        f"{answer.fusion} fusion of {experts}{dropped}]",
        err=True,
    )
