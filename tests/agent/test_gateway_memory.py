"""A gateway's memory is bounded: what it keeps per prompt answered is capped (the last
10,000 prompt ids, to spot a second copy; a few thousand PUBACK results per connection;
each application's figures over its stats window), so after the first 10,000 prompts its
RSS stays within a few MB however many follow."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from prompting import PromptInbox

from moe2.shared.mqtt import BrokerConfig

WAVE = 64  # prompts in flight at once (the gateway runs 16 and queues the rest)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_gateway_rss_after_50000_prompts_is_within_a_few_mb_of_after_10000(
    start_agent: Any, tiny_models: dict[str, Path], broker_config: BrokerConfig
) -> None:
    a = start_agent(tiny_models["animals"], f"a-{uuid.uuid4().hex[:6]}", "--no-profile-on-start")
    b = start_agent(tiny_models["cooking"], f"b-{uuid.uuid4().hex[:6]}", "--no-profile-on-start")
    app = f"mem-{uuid.uuid4().hex[:6]}"
    gateway = start_agent(
        tiny_models["code"],
        f"gw-{uuid.uuid4().hex[:6]}",
        "--no-profile-on-start",
        "--serve-app",
        f"{app}={a.agent_id},{b.agent_id}:2",
    )
    rss: dict[int, float] = {}
    sent = errors = 0
    with PromptInbox(broker_config) as inbox:
        while sent < 50_000:
            ids = inbox.send(app, WAVE, max_tokens=2)
            assert inbox.wait_all(ids, 120), inbox.summary(ids)
            summary = inbox.summary(ids)
            assert not summary["lost"] and not summary["duplicated"], summary
            errors += sum(summary["errors"].values())
            inbox.by_id.clear()  # the test's own memory stays flat too
            sent += WAVE
            if sent % 10_000 < WAVE:
                rss[sent] = rss_mb(gateway.proc.pid)
    assert errors == 0
    first, last = rss[min(rss)], rss[max(rss)]
    assert last - first < 5.0, rss
