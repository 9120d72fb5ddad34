"""Cancelling a prompt (``PromptCancel`` on ``moe2/v1/cancel/<app>[/<owner>]``), as any MQTT
client would: the gateway stops the generation, closes the experts' sessions and answers the
prompt ``cancelled``, exactly once. Real gateway, real tiny experts, real mosquitto."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prompting import PromptInbox

from moe2.shared import protocol as p
from moe2.shared.broker import free_port
from moe2.shared.mqtt import BrokerConfig


def scrape(port: int) -> dict[str, float]:
    """name -> the sum of its samples (labels summed over)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def eventually(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return check()


def cancel(inbox: PromptInbox, app: str, pid: str, reply_to: str | None = None) -> None:
    body = {"id": pid, "reply_to": reply_to or inbox.topic}
    inbox.conn.publish(p.topics.cancel(app), json.dumps(body).encode(), qos=1)


def test_cancel_stops_the_generation_and_frees_the_sessions(
    tiny_models: dict[str, Path], start_agent: Any, broker_config: BrokerConfig
) -> None:
    a, b = f"c-a-{uuid.uuid4().hex[:6]}", f"c-b-{uuid.uuid4().hex[:6]}"
    app = f"cancel-{uuid.uuid4().hex[:6]}"
    port_a, port_b = free_port(), free_port()
    start_agent(tiny_models["animals"], a, "--metrics-port", str(port_a))
    start_agent(
        tiny_models["code"],
        b,
        "--serve-app",
        f"{app}={a},{b}:2",
        "--metrics-port",
        str(port_b),
        "--gateway-decoding",
        "per-token",  # one round trip per token: the long answer below takes seconds
    )
    with PromptInbox(broker_config) as inbox:
        # Greedy, these experts answer "3 plus 4" with dots up to max_tokens (500 steps).
        [pid] = inbox.send(app, 1, prompt="3 plus 4", max_tokens=500, stream=True)
        with inbox.cond:
            assert inbox.cond.wait_for(lambda: len(inbox.by_id[pid]) >= 2, 30)
        assert "delta" in inbox.by_id[pid][0]  # streaming: the generation is under way
        cancelled_at = time.monotonic()
        cancel(inbox, app, pid)
        assert inbox.wait_all([pid], 30)
        [terminal] = inbox.terminal(pid)
        assert terminal["error"]["code"] == "cancelled", terminal
        assert "cancelled by its client" in terminal["error"]["message"]
        chunks = [m for m in inbox.by_id[pid] if "delta" in m]
        assert len(chunks) < 500  # stopped, not run to max_tokens
        # Both experts' sessions are closed (the gateway closes them as it stops).
        assert eventually(lambda: scrape(port_b)["moe2_agent_sessions"] == 0)
        assert eventually(lambda: scrape(port_a)["moe2_agent_sessions"] == 0)
        print(f"sessions free {time.monotonic() - cancelled_at:.2f} s after the cancel")
        figures = scrape(port_b)
        assert figures["moe2_gateway_prompts_cancelled_total"] == 1
        assert figures["moe2_gateway_prompts_in_flight"] == 0
        time.sleep(0.5)  # nothing more comes for that prompt: exactly one terminal message
        assert len(inbox.terminal(pid)) == 1

        # The gateway goes on serving: the next prompt is answered.
        [nxt] = inbox.send(app, 1, max_tokens=4)
        assert inbox.wait_all([nxt], 30)
        assert "text" in inbox.terminal(nxt)[0]


def test_a_cancel_may_come_first_and_names_one_client(
    tiny_models: dict[str, Path], start_agent: Any, broker_config: BrokerConfig
) -> None:
    gw = f"c-gw-{uuid.uuid4().hex[:6]}"
    app = f"cancel-{uuid.uuid4().hex[:6]}"
    start_agent(tiny_models["animals"], gw, "--serve-app", f"{app}={gw}:1")
    with PromptInbox(broker_config) as inbox:
        # A cancel for a prompt not sent yet is remembered: the prompt is refused at once.
        early = f"{inbox.client_id}-early"
        cancel(inbox, app, early)
        time.sleep(0.3)  # the cancel reaches the gateway first
        body = {"id": early, "prompt": "the fox eats", "reply_to": inbox.topic, "max_tokens": 4}
        inbox.conn.publish(p.topics.prompts(app), json.dumps(body).encode(), qos=1)
        assert inbox.wait_all([early], 20)
        assert inbox.terminal(early)[0]["error"]["code"] == "cancelled"

        # A cancel naming another reply topic is someone else's: the prompt is answered.
        [mine] = inbox.send(app, 1, max_tokens=4)
        cancel(inbox, app, mine, reply_to="moe2/v1/replies/someone-else/answers/x")
        assert inbox.wait_all([mine], 30)
        assert "text" in inbox.terminal(mine)[0]
        # A prompt published under an owner level (prompts/<app>/<owner>, as a client with
        # a login does) is cancelled only on cancel/<app>/<owner>: not on another owner's
        # cancel topic nor the bare one, though they name its id and reply_to.
        owner, reply_to = inbox.client_id, inbox.topic  # the inbox lies in replies/<owner>/
        owned = {"id": f"{owner}-owned", "prompt": "the fox eats", "reply_to": reply_to}
        body = json.dumps({"id": owned["id"], "reply_to": reply_to}).encode()
        for other in (p.topics.cancel(app), p.topics.cancel(app, "someone-else")):
            inbox.conn.publish(other, body, qos=1)
        time.sleep(0.3)  # the cancels reach the gateway first
        prompt = json.dumps({**owned, "max_tokens": 4}).encode()
        inbox.conn.publish(p.topics.prompts(app, owner), prompt, qos=1)
        assert inbox.wait_all([owned["id"]], 30)
        assert "text" in inbox.terminal(owned["id"])[0], inbox.terminal(owned["id"])
        again = {**owned, "id": f"{owner}-owned-2"}
        inbox.conn.publish(
            p.topics.cancel(app, owner),
            json.dumps({"id": again["id"], "reply_to": reply_to}).encode(),
            qos=1,
        )
        time.sleep(0.3)
        inbox.conn.publish(p.topics.prompts(app, owner), json.dumps(again).encode(), qos=1)
        assert inbox.wait_all([again["id"]], 30)
        assert inbox.terminal(again["id"])[0]["error"]["code"] == "cancelled"
        # Malformed cancels are ignored, and the gateway lives on.
        inbox.conn.publish(p.topics.cancel(app), b"{not json", qos=1)
        inbox.conn.publish(p.topics.cancel(app), b'{"id": "x", "reply_to": "a/#"}', qos=1)
        [after] = inbox.send(app, 1, max_tokens=4)
        assert inbox.wait_all([after], 30)
        assert "text" in inbox.terminal(after)[0]
