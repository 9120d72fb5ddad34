"""A dead or hung agent shows offline within a few seconds (MQTT last will)."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

# keepalive 2 s in the fixtures: the broker gives up after 1.5 x keepalive = 3 s.
OFFLINE_WITHIN = 8.0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
def test_killed_or_frozen_agent_goes_offline(
    sig: signal.Signals, start_agent: Any, status_watcher: Any, tiny_models: dict[str, Path]
) -> None:
    agent = start_agent(tiny_models["code"], f"live-{uuid.uuid4().hex[:6]}")
    os.kill(agent.proc.pid, sig)
    took = status_watcher.wait_for(agent.agent_id, "offline", OFFLINE_WITHIN)
    assert took < OFFLINE_WITHIN


def test_stopped_agent_says_offline_at_once(
    start_agent: Any, status_watcher: Any, tiny_models: dict[str, Path]
) -> None:
    agent = start_agent(tiny_models["code"], f"stop-{uuid.uuid4().hex[:6]}")
    agent.proc.terminate()
    status_watcher.wait_for(agent.agent_id, "offline", 5)
    assert agent.proc.wait(10) == 0
