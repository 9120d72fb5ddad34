"""The secured fleet, tried as a hostile network would: the broker the ``moe2_broker`` role
renders (passwords, per-role ACL, TLS from the fleet CA it generates, message size limit),
real agents and gateways logged in as their own users, and clients as phones use it.

Each test names the defect of issue 12 it keeps fixed; each failed on the code before."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.client import PromptClient
from moe2.shared.desired import DesiredState
from moe2.shared.errors import BrokerError
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import Connection, response_properties
from moe2.shared.signing import Signer

pytestmark = [pytest.mark.timeout(600)]


def start(fleet: LocalFleet, sb: Any, name: str, model: Path, *flags: str) -> str:
    fleet.start(
        name,
        model,
        "--n-threads",
        "1",
        "--no-profile-on-start",
        "--broker-keepalive",
        "2",
        *flags,
        broker=sb.config(name),
    )
    fleet.wait_online([name], 60)
    return name


@pytest.fixture
def fleet(secured_broker: Any, tmp_path: Path) -> Any:
    ctl = secured_broker.take("controller")
    with LocalFleet(secured_broker.config(ctl), tmp_path / "fleet") as f:
        f.controller = ctl  # type: ignore[attr-defined]
        yield f


class Inbox:
    """Messages on a topic filter, as the given login sees them."""

    def __init__(self, cfg: Any, topic_filter: str) -> None:
        self.got: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.conn = Connection(cfg, f"inbox-{uuid.uuid4().hex[:6]}")
        self.conn.subscribe(topic_filter, self._on)

    def _on(self, msg: Any) -> None:
        with self.cond:
            self.got.append(json.loads(msg.payload) if msg.payload else {})
            self.cond.notify_all()

    def wait(self, n: int, timeout: float) -> list[dict[str, Any]]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.got) >= n, timeout)
            return list(self.got)


def test_only_tls_and_known_logins_get_in(secured_broker: Any) -> None:
    """TLS on the secured broker (issue 12, Build): plain TCP, anonymous users and wrong
    passwords are refused; a known user over TLS gets in."""
    sb = secured_broker
    user = sb.take("client")
    with socket.create_connection((sb.host, sb.port), timeout=5) as raw:  # plain MQTT CONNECT
        raw.sendall(bytes.fromhex("101000044d5154540502003c000003616263"))
        raw.settimeout(5)
        try:
            answer = raw.recv(16)
        except (ConnectionResetError, TimeoutError):
            answer = b""
        assert not answer.startswith(b"\x20"), "a plain-TCP client got a CONNACK"
    plain = sb.config(user).model_copy(update={"tls_ca": None})
    for refused in (sb.config(None), sb.config(user, password="wrong"), plain):
        with pytest.raises(BrokerError):
            Connection(refused, f"x-{uuid.uuid4().hex[:6]}").start()
    with Connection(sb.config(user), f"ok-{uuid.uuid4().hex[:6]}") as conn:
        assert conn.connected
    # The generated CA and certificate are made once: a second apply changes nothing.
    recap = [ln for ln in sb.apply().splitlines() if ln.startswith("localhost")]
    assert recap and "changed=0" in recap[-1] and "failed=0" in recap[-1], recap


def test_the_broker_refuses_an_oversized_prompt_before_anyone_parses_it(
    secured_broker: Any,
) -> None:
    """Defect 8: the role sets ``message_size_limit`` (16 MiB), so a 20 MB prompt is refused
    by the broker and never reaches a gateway. Before, the limit was 0 (256 MB)."""
    sb = secured_broker
    client, gw = sb.take("client"), sb.take("gateway")
    got: list[int] = []
    with Connection(sb.config(gw), f"gw-{uuid.uuid4().hex[:6]}") as gconn:
        gconn.subscribe("moe2/v1/prompts/#", lambda m: got.append(len(m.payload)))
        time.sleep(0.3)
        # keepalive 60: sending 20 MB over TLS on a busy machine outlasts the default 2 s.
        # QoS 0: at QoS 1 mosquitto answers with reason 0x95, which paho takes for a
        # malformed PUBACK and reconnects to send the message again, forever (the hostile
        # client only hurts itself; the gateway never sees the message either way).
        slow = sb.config(client).model_copy(update={"keepalive": 60})
        with Connection(slow, f"c-{uuid.uuid4().hex[:6]}") as conn:
            mine = p.topics.prompts("qa", client)
            conn.publish(mine, b"x" * 20_000_000, qos=0).wait_for_publish(60)
            assert conn.publish_acked(mine, b"{}")  # small ones pass
        time.sleep(0.5)
    assert got == [2]  # the small prompt only
    assert got == [2]


def test_the_acl_binds_every_role_to_what_it_may_write(secured_broker: Any) -> None:
    """Defects 3 and 6 of issue 12, and issue 20: an agent user writes only its own info,
    status and profile and its own RPC replies (it cannot mark another agent offline, answer
    for another, write desired state, acknowledge an assignment or announce itself a
    gateway); a gateway user cannot write desired state or gates; a client asks and cancels
    only under its own name (prompts/<app>/<user>, cancel/<app>/<user>) and reads only its
    own replies; moe2-http's login (role http) as a client, plus its fleet view's marker,
    and nothing of the fleet's. Each write rule of
    ``moe2_broker_acl_roles`` is used here as allowed, and its neighbours as refused (the
    read rules are what the agents, gateways and clients of the other tests live on)."""
    sb = secured_broker
    agent, other, gw, client, stranger, front = (
        sb.take("agent"),
        sb.take("agent"),
        sb.take("gateway"),
        sb.take("client"),
        sb.take("client"),
        sb.take("http"),
    )
    denied = {
        agent: [
            p.topics.agent_status(other),
            p.topics.agent_info(other),
            p.topics.rpc_reply(gw, other),
            p.topics.desired_app("qa"),
            p.topics.prompts("qa"),
            p.topics.prompts("qa", agent),
            p.topics.gateway_status(agent),
            p.topics.assignment_ack(agent, "qa"),
            p.topics.gate_ack(agent, "g1"),
            p.topics.gateway_links(agent),
            p.topics.gateway_stats(agent),
            p.topics.agent_rpc(other),
        ],
        gw: [
            p.topics.desired_app("qa"),
            p.topics.gate_manifest("g1"),
            p.topics.blob_chunk("a" * 64, 0),
            p.topics.agent_info(other),
            p.topics.gateway_status(other),
            "phone/7/answers",
        ],
        client: [
            p.topics.agent_rpc(other),
            p.topics.replies(stranger) + "/answers",
            p.topics.prompts("qa"),  # the publisher's name is not in the topic
            p.topics.prompts("qa", stranger),  # another's
            p.topics.prompts("qa", client) + "/x",
            p.topics.cancel("qa"),
            p.topics.cancel("qa", stranger),
        ],
        front: [
            p.topics.prompts("qa"),
            p.topics.prompts("qa", client),
            p.topics.cancel("qa"),
            p.topics.cancel("qa", client),
            p.topics.replies(client) + "/answers",
            p.topics.replies(front) + "/answers",  # only its marker in its own replies
            p.topics.desired_app("qa"),
            p.topics.gateway_status(gw),
            p.topics.agent_status(other),
            p.topics.agent_rpc(other),
        ],
    }
    allowed = {
        agent: [
            p.topics.agent_status(agent),
            p.topics.agent_info(agent),
            p.topics.agent_profile(agent),
            p.topics.rpc_reply(gw, agent),
        ],
        gw: [
            p.topics.agent_rpc(other),
            p.topics.replies(client) + "/answers",
            # a gateway publishes again the prompts a crashed one left behind (adopt.py)
            p.topics.prompts("qa"),
            p.topics.prompts("qa", client),
            p.topics.gateway_status(gw),
            p.topics.assignment_ack(gw, "qa"),
        ],
        client: [p.topics.prompts("qa", client), p.topics.cancel("qa", client)],
        front: [
            p.topics.prompts("qa", front),
            p.topics.cancel("qa", front),
            p.topics.sync_marker(front, "moe2-http-x"),
        ],
    }
    for user, topics in denied.items():
        with Connection(sb.config(user), f"t-{uuid.uuid4().hex[:6]}") as conn:
            for topic in topics:
                with pytest.raises(BrokerError, match="Not authorized"):
                    conn.publish_acked(topic, b"{}", retain=False)
            for topic in allowed[user]:
                conn.publish_acked(topic, b"{}")  # no subscriber is fine; no refusal
    # moe2-http's fleet view gets in sync (its marker comes back) and reads what admission
    # needs: the gateways' status and announced capacity.
    status = p.GatewayStatus(gateway=gw, state="online", apps={"qa": 0}, max_concurrent=2)
    with Connection(sb.config(gw), f"g-{uuid.uuid4().hex[:6]}") as gconn:
        gconn.publish_acked(p.topics.gateway_status(gw), p.encode(status), retain=True)
        try:
            hconn = Connection(sb.config(front), f"h-{uuid.uuid4().hex[:6]}")
            view = FleetView(hconn, ("info", "status", "gateway", "desired_app"))
            with hconn:
                assert view.synced.wait(30), "moe2-http's fleet view never got its marker"
                assert view.copy().gateway[gw].capacity == 2
        finally:
            gconn.publish_acked(p.topics.gateway_status(gw), b"", retain=True)
    # A client subscribing to another's replies gets nothing of them.
    seen: list[str] = []
    with Connection(sb.config(stranger), f"s-{uuid.uuid4().hex[:6]}") as spy:
        spy.subscribe("moe2/v1/replies/#", lambda m: seen.append(m.topic))
        time.sleep(0.3)
        with Connection(sb.config(gw), f"g-{uuid.uuid4().hex[:6]}") as gconn:
            gconn.publish_acked(p.topics.replies(client) + "/answers", b"{}")
            gconn.publish_acked(p.topics.replies(stranger) + "/answers", b"{}")
        time.sleep(0.5)
    assert seen == [p.topics.replies(stranger) + "/answers"]


def test_an_agent_lying_about_its_own_vocabulary_is_left_out(
    secured_broker: Any, fleet: LocalFleet, tiny_models: dict[str, Path]
) -> None:
    """Defect 3: an agent user may only speak about itself (the ACL binds it to its topics),
    but what it says is checked too: an info claiming n_vocab=7 for the shared tokenizer is
    left out by the gateway, whose answers keep coming from the honest expert and name the
    liar among the dropped experts. Before, the fused vocabulary was taken from the forger's
    claim and prompts failed (``internal`` in the issue's report; ``no_experts`` after the
    fleet-state issue)."""
    sb = secured_broker
    honest, liar, gw, client = sb.take("agent"), sb.take("agent"), sb.take("gateway"), None
    start(fleet, sb, honest, tiny_models["animals"])
    real = fleet.info[honest]
    forged = real.model_copy(update={"agent_id": liar, "n_vocab": 7, "eos_ids": [2]})
    with Connection(sb.config(liar), f"liar-{uuid.uuid4().hex[:6]}") as conn:
        conn.publish_acked(p.topics.agent_info(liar), p.encode(forged), retain=True)
        online = p.AgentStatus(agent_id=liar, state="online", since=time.time())
        conn.publish_acked(p.topics.agent_status(liar), p.encode(online), retain=True)
        # The liar first in the subset: uniform gate ties keep the subset's order.
        start(
            fleet,
            sb,
            gw,
            tiny_models["code"],
            "--serve-app",
            f"zoo={liar},{honest}:2",
            "--gateway-open-timeout-s",
            "3",
        )
        client = sb.take("client")
        with PromptClient(sb.config(client)) as pc:
            for prompt in ("the fox eats", "a young owl"):
                answer = pc.ask("zoo", prompt, max_tokens=6, timeout=60)
                assert [e.id for e in answer.experts] == [honest], answer
                # chosen by the gate but unusable: the answer says who and why
                assert [(d.id, d.at_token) for d in answer.dropped] == [(liar, 0)], answer
                assert answer.text
        for topic in (p.topics.agent_info(liar), p.topics.agent_status(liar)):
            conn.publish_acked(topic, b"", retain=True)


def test_phones_get_answers_on_the_secured_broker(
    secured_broker: Any, fleet: LocalFleet, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Defect 4: the documented phone flows work as a client user: mosquitto_pub/_sub with
    reply_to in moe2/v1/replies/<user>/, ``moe2ctl ask`` and PromptClient; a reply_to the
    broker would not let a gateway publish to is answered ``bad_request`` on the prompt's
    MQTT 5 ResponseTopic instead of silence. Before: the PromptClient inbox was unreadable
    for a client user (ask timed out) and phone/7/answers got nothing, silently."""
    sb = secured_broker
    expert, gw, phone = sb.take("agent"), sb.take("gateway"), sb.take("client")
    start(fleet, sb, expert, tiny_models["animals"])
    start(fleet, sb, gw, tiny_models["code"], "--serve-app", f"zoo={expert}:1")
    # mosquitto_pub / mosquitto_sub, as the README shows
    reply_to = f"moe2/v1/replies/{phone}/answers"
    # line-buffered (-oL), with debug lines (-d) to see the SUBACK
    topic = f"moe2/v1/replies/{phone}/#"
    cmd = ["stdbuf", "-oL", "mosquitto_sub", *sb.cli_args(phone), "-d", "-t", topic, "-W", "90"]
    sub = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    subscribed = threading.Event()

    def read() -> None:
        assert sub.stdout is not None
        for line in sub.stdout:
            lines.append(line)
            if "SUBACK" in line:
                subscribed.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert subscribed.wait(30), lines
    body = {"id": "p1", "prompt": "the fox eats", "reply_to": reply_to, "max_tokens": 8}
    asked = f"moe2/v1/prompts/zoo/{phone}"  # on a fleet's broker a phone asks under its name
    subprocess.run(
        ["mosquitto_pub", *sb.cli_args(phone), "-t", asked, "-m", json.dumps(body)],
        check=True,
        timeout=30,
    )
    # moe2ctl ask as the same client user, through its settings from the environment
    env = dict(
        os.environ,
        MOE2_DATA_DIR=str(tmp_path / "ctl"),
        MOE2_BROKER__HOST=sb.host,
        MOE2_BROKER__PORT=str(sb.port),
        MOE2_BROKER__USERNAME=phone,
        MOE2_BROKER__PASSWORD=sb.users[phone][1],
        MOE2_BROKER__TLS_CA=str(sb.ca),
    )
    asked = subprocess.run(
        [
            str(Path(sys.executable).parent / "moe2ctl"),
            "ask",
            "--app",
            "zoo",
            "--max-tokens",
            "6",
            "--json",
            "a young owl",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["experts"][0]["id"] == expert
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any('"id":"p1"' in ln for ln in lines):
        time.sleep(0.1)
    time.sleep(0.5)  # nothing more may come
    sub.terminate()
    sub.wait(10)
    reader.join(10)
    assert sub.stdout is not None
    sub.stdout.close()
    finals = [json.loads(ln) for ln in lines if ln.startswith("{") and '"id":"p1"' in ln]
    assert len(finals) == 1 and finals[0]["text"] and "error" not in finals[0], lines
    # reply_to outside moe2/: the gateway may not publish there; say so on the ResponseTopic
    inbox = Inbox(sb.config(phone), f"moe2/v1/replies/{phone}/#")
    with inbox.conn as conn:
        time.sleep(0.3)
        bad = {"id": "p2", "prompt": "the fox", "reply_to": "phone/7/answers"}
        conn.publish_acked(
            p.topics.prompts("zoo", phone),
            json.dumps(bad).encode(),
            properties=response_properties(f"moe2/v1/replies/{phone}/r", b"c2"),
        )
        got = inbox.wait(1, 20)
        time.sleep(0.5)
    assert len(inbox.got) == 1, inbox.got
    assert got[0]["id"] == "p2" and got[0]["error"]["code"] == "bad_request", got
    assert "moe2/v1/replies/" in got[0]["error"]["message"]


def test_gateways_apply_only_desired_state_the_fleet_key_signed(
    secured_broker: Any, fleet: LocalFleet, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Defect 6: with the fleet's public key, a gateway applies only assignments the
    controller signed: an unsigned or tampered one (written with the controller's own login,
    as a leaked password would) is rejected with the reason, a cleared retained message
    changes nothing, and a signed revert returns the app to the local configuration.
    Before, any retained assignment was applied at once."""
    sb = secured_broker
    a, b, gw = sb.take("agent"), sb.take("agent"), sb.take("gateway")
    key = Signer.generate()
    public = key.save(tmp_path / "fleet-signing.pem")
    conf = tmp_path / "gw.toml"
    conf.write_text(f'[gateway]\ntrusted_keys = ["{public}"]\n')
    start(fleet, sb, a, tiny_models["animals"])
    start(fleet, sb, b, tiny_models["cooking"])
    start(fleet, sb, gw, tiny_models["code"], "--config", str(conf), "--serve-app", f"zoo={a}:1")
    ctl = sb.config(fleet.controller)  # type: ignore[attr-defined]
    client = sb.take("client")
    with PromptClient(sb.config(client)) as pc:
        assert [e.id for e in pc.ask("zoo", "the fox", max_tokens=2).experts] == [a]
        with DesiredState(ctl, signer=key) as desired:
            moved = desired.push_assignment("zoo", [b], 1)
        assert moved.accepted == [gw] and moved.assignment.sig
        assert [e.id for e in pc.ask("zoo", "the fox", max_tokens=2).experts] == [b]
        with DesiredState(ctl) as unsigned:
            refused = unsigned.push_assignment("zoo", [a], 1)
        assert refused.rejected == {gw: refused.rejected[gw]}
        assert "bad signature" in refused.rejected[gw]
        # A signed assignment altered after signing (its subset swapped)
        with DesiredState(ctl, signer=key) as desired:
            version = desired.next_version("zoo")
        good = key.sign(p.AppAssignment(app="zoo", version=version, subset=[b], k=1))
        tampered = good.model_copy(update={"subset": [a]})
        view_conn = Connection(ctl, f"v-{uuid.uuid4().hex[:6]}")
        view = FleetView(view_conn, ("assignment_ack",))
        with view_conn:
            view_conn.publish_acked(p.topics.desired_app("zoo"), p.encode(tampered), retain=True)
            assert view.wait(
                lambda s: (
                    (ack := s.assignment_ack.get((gw, "zoo"))) is not None
                    and ack.version == version
                ),
                10,
            )
            ack = view.copy().assignment_ack[(gw, "zoo")]
            assert not ack.accepted and "signature" in (ack.reason or "")
            # clearing the retained message: unsigned, so nothing changes
            view_conn.publish_acked(p.topics.desired_app("zoo"), b"", retain=True)
            time.sleep(1.0)
        assert [e.id for e in pc.ask("zoo", "the fox", max_tokens=2).experts] == [b]
        with DesiredState(ctl, signer=key) as desired:
            back = desired.revert("zoo")
        assert back.accepted == [gw] and back.acks[gw].serving
        assert [e.id for e in pc.ask("zoo", "the fox", max_tokens=2).experts] == [a]
    # The gateway's own login may not write desired state at all.
    with (
        Connection(sb.config(gw), f"g-{uuid.uuid4().hex[:6]}") as conn,
        pytest.raises(BrokerError, match="Not authorized"),
    ):
        conn.publish_acked(p.topics.desired_app("zoo"), p.encode(good), retain=True)
