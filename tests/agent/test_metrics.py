"""The Prometheus endpoint of an agent acting as a gateway: parsed with prometheus_client's
own parser, its counters move with traffic; and ``--log-format json`` writes JSON lines."""

from __future__ import annotations

import json
import logging
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moe2.shared.broker import free_port
from moe2.shared.client import PromptClient
from moe2.shared.errors import BadMessage
from moe2.shared.logs import JsonFormatter
from moe2.shared.mqtt import BrokerConfig


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def test_metrics_move_with_traffic(
    tiny_models: dict[str, Path], start_agent: Any, broker_config: BrokerConfig
) -> None:
    a, b = f"m-a-{uuid.uuid4().hex[:6]}", f"m-b-{uuid.uuid4().hex[:6]}"
    app = f"metrics-{uuid.uuid4().hex[:6]}"
    port = free_port()
    # No start-up profiles: an open waiting behind a measurement under load would drop an
    # expert from an answer, and the counts below would be one short.
    start_agent(tiny_models["animals"], a, "--no-profile-on-start")
    agent = start_agent(
        tiny_models["code"],
        b,
        "--no-profile-on-start",
        "--serve-app",
        f"{app}={a},{b}:2",
        "--metrics-port",
        str(port),
        "--log-format",
        "json",
    )
    before = scrape(port)
    assert total(before, "moe2_gateway_prompts_total", app=app) == 0
    assert total(before, "moe2_agent_offload_info", backend="CPU") == 1
    assert total(before, "moe2_agent_gpu_layers") == 0
    with PromptClient(broker_config) as client:
        answers = [client.ask(app, "the fox eats", max_tokens=5) for _ in range(2)]
        with pytest.raises(BadMessage):
            client.ask(app, "the fox eats", max_tokens=100_000)
    after = scrape(port)
    tokens = sum(x.tokens for x in answers)
    assert total(after, "moe2_gateway_prompts_total", app=app) == 2
    assert total(after, "moe2_gateway_prompt_errors_total", app=app, code="bad_request") == 1
    assert total(after, "moe2_gateway_tokens_total", app=app) == tokens
    # one fused step per generated token, plus the step that picked the end (if any)
    steps = total(after, "moe2_gateway_step_seconds_count", app=app)
    assert tokens <= steps <= tokens + 2
    assert total(after, "moe2_gateway_tokens_per_second_count", app=app) == 2
    assert total(after, "moe2_gateway_prompts_in_flight") == 0
    # The gateway's agent is one of the experts: its model thread served open and step, for
    # every answer it took part in (under load an expert may be dropped from one: it says so)
    served = sum(b in {e.id for e in x.experts} for x in answers)
    assert served >= 1, [x.dropped for x in answers]
    assert total(after, "moe2_agent_requests_total", op="open") >= served
    # Tokens after the first come from steps (per-token decoding) or from verifications and
    # drafts (speculative, the default): at least one such request per answer.
    decode = sum(
        total(after, "moe2_agent_requests_total", op=op) for op in ("step", "verify", "draft")
    )
    assert decode >= served
    assert total(after, "moe2_agent_tokens_evaluated_total") > total(
        before, "moe2_agent_tokens_evaluated_total"
    )
    assert total(after, "moe2_agent_request_seconds_count", op="open") >= served
    assert total(after, "moe2_agent_sessions") == 0  # every session closed again
    # --log-format json: every line of the agent's log is one JSON object
    lines = [ln for ln in agent.log().splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]
    assert any("serving" in r["message"] for r in records)
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)


def test_json_formatter_carries_exceptions_and_extras() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("a",), None)
        import sys

        record.exc_info = sys.exc_info()
    record.moe2 = {"app": "qa"}
    out = json.loads(JsonFormatter().format(record))
    assert out["message"] == "failed a" and out["level"] == "ERROR"
    assert "ValueError: boom" in out["exc"] and out["moe2"] == {"app": "qa"}
