"""Issue 20: every login bound to what it is. On the broker the ``moe2_broker`` role renders
(mosquitto 2.0.11: passwords, the per-role ACL, the dynamic-security plugin's rules on
shared subscriptions, TLS), each test tries one attack path as a hostile tenant would, with
a real login of the role it attacks from, and shows it fails while the legitimate flow
still works. Before the fix each attack succeeded (the numbers in the docstrings were
measured then)."""

from __future__ import annotations

import json
import os
import signal
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prompting import PromptInbox

from moe2.controller.cli import main
from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.client import PromptClient
from moe2.shared.desired import DesiredState
from moe2.shared.errors import BrokerError, UnknownApp
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import BrokerConfig, Connection, response_properties
from moe2.shared.signing import Signer

pytestmark = [pytest.mark.timeout(600)]

GROUP = "moe2-gateways"  # the gateways' default shared-subscription group


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


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
def fleet(secured_broker: Any, tmp_path: Path) -> Iterator[LocalFleet]:
    ctl = secured_broker.take("controller")
    with LocalFleet(secured_broker.config(ctl), tmp_path / "fleet") as f:
        f.controller = ctl  # type: ignore[attr-defined]
        yield f


class Raw:
    """A bare MQTT 5 client with a login, as an attacker's own tool would be: any client id,
    any session expiry, and the broker's reason codes as they come."""

    def __init__(self, cfg: BrokerConfig, client_id: str, *, session_expiry: int = 0) -> None:
        self.suback: list[str] = []
        self.got: list[tuple[str, bytes]] = []
        self.ev = threading.Event()
        self.c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        self.c.username_pw_set(cfg.username, cfg.password)
        assert cfg.tls_ca is not None
        self.c.tls_set(ca_certs=cfg.tls_ca, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.c.on_connect = lambda *a: self.ev.set()
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, bytes(m.payload)))
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry
        self.c.connect(cfg.host, cfg.port, keepalive=10, clean_start=True, properties=props)
        self.c.loop_start()
        assert self.ev.wait(10), "no CONNACK"

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        self.suback.extend(str(rc) for rc in codes)
        self.ev.set()

    def subscribe(self, topic_filter: str) -> str:
        self.ev.clear()
        self.c.subscribe(topic_filter, qos=1)
        assert self.ev.wait(10), "no SUBACK"
        return self.suback[-1]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Watch:
    """Every message on a topic filter, as one login sees it (retained ones included)."""

    def __init__(self, cfg: BrokerConfig, topic_filter: str) -> None:
        self.got: list[tuple[str, bytes, bool]] = []
        self.cond = threading.Condition()
        self.conn = Connection(cfg, uid("watch"))
        self.conn.subscribe(topic_filter, self._on)

    def _on(self, msg: Any) -> None:
        with self.cond:
            self.got.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.cond.notify_all()

    def json(self) -> list[dict[str, Any]]:
        with self.cond:
            return [json.loads(m) for _, m, _ in self.got if m]

    def wait(self, n: int, timeout: float) -> list[tuple[str, bytes, bool]]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.got) >= n, timeout)
            return list(self.got)


# ---------------------------------------------------------------------------- path 1


def test_no_client_or_expert_can_join_the_gateways_shared_group(
    secured_broker: Any, fleet: LocalFleet, tiny_models: dict[str, Path]
) -> None:
    """Path 1: a client or expert login subscribed to the gateways' shared group
    ($share/moe2-gateways/moe2/v1/prompts/<app>) got its turn of the prompts, which mosquitto
    then dropped for lack of read rights (3 of 10 prompts lost with a client login, 4 of 12
    with an expert's). Now the dynamic-security plugin refuses those subscriptions (SUBACK
    0x87), and every prompt is answered; a gateway may join the prompt groups and no other."""
    sb = secured_broker
    app = uid("zoo")
    expert, gw = sb.take("agent"), sb.take("gateway")
    thief_client, thief_expert, asker = sb.take("client"), sb.take("agent"), sb.take("client")
    start(fleet, sb, expert, tiny_models["animals"])
    start(fleet, sb, gw, tiny_models["code"], "--serve-app", f"{app}={expert}:1")
    thieves = [Raw(sb.config(thief_client), uid("t")), Raw(sb.config(thief_expert), uid("t"))]
    try:
        for thief in thieves:
            for shared in (
                *p.topics.prompts_shared(GROUP, app),
                p.topics.prompts_unrouted(GROUP),
                f"$share/other/{p.topics.prompts(app)}",
            ):
                assert thief.subscribe(shared) == "Not authorized", shared
        with PromptInbox(sb.config(asker)) as inbox:
            ids = inbox.send(app, 10, max_tokens=2)
            assert inbox.wait_all(ids, 120), inbox.summary(ids)
            time.sleep(0.5)
            assert inbox.summary(ids) == {
                "answered": 10,
                "errors": {},
                "lost": [],
                "duplicated": [],
            }
        assert all(not t.got for t in thieves)
    finally:
        for thief in thieves:
            thief.close()
    # A gateway login joins the groups of prompts, and no other shared group.
    other_gw = Raw(sb.config(sb.take("gateway")), uid("g"))
    try:
        assert other_gw.subscribe(p.topics.prompts_shared(GROUP, app)[1]).startswith("Granted")
        assert other_gw.subscribe(f"$share/x/{p.topics.agent_rpc(expert)}") == "Not authorized"
    finally:
        other_gw.close()


# ---------------------------------------------------------------------------- path 2


def test_no_login_takes_over_a_session_and_adoption_after_a_power_cut_still_works(
    secured_broker: Any, fleet: LocalFleet, tiny_models: dict[str, Path]
) -> None:
    """Path 2: client ids were not tied to logins. A client login connecting as
    moe2-gateway-<id> resumed that gateway's kept session and knocked it off; as
    moe2-agent-<id> it published that expert's offline last will; with session expiry 0
    under a frozen gateway's id it ended the gateway's kept session before adoption (2
    prompts lost, no adoption). Now every connection's id carries a tag only its password
    computes: the attacker's connections under those names touch nobody's session. The one
    id shared on purpose, a gateway's kept session, is named in its status, which a client
    cannot read, and a live gateway still adopts it after a power cut (SIGSTOP: no FIN, the
    broker sees it at the keepalive timeout): every prompt answered once, by the live one."""
    sb = secured_broker
    app = uid("zoo")
    expert, g1, g2, attacker = (
        sb.take("agent"),
        sb.take("gateway"),
        sb.take("gateway"),
        sb.take("client"),
    )
    start(fleet, sb, expert, tiny_models["animals"])
    flags = ("--serve-app", f"{app}={expert}:1", "--gateway-adopt-after-s", "1")
    start(fleet, sb, g1, tiny_models["code"], *flags)
    start(fleet, sb, g2, tiny_models["code"], *flags)
    ctl = sb.config(fleet.controller)  # type: ignore[attr-defined]
    statuses = Watch(ctl, p.topics.agent_status(expert))
    gateways = Watch(ctl, "moe2/v1/agents/+/gateway")
    spy = Raw(sb.config(attacker), uid("spy"))
    with statuses.conn, gateways.conn:
        spy.subscribe("moe2/v1/agents/+/gateway")
        view = FleetView.snapshot(ctl, ("gateway",))
        session = view.gateway[g2].session
        assert session is not None and session.startswith(f"moe2-gateway-{g2}.")
        # Connections under every name an attacker can guess: nobody is knocked off.
        for guess in (f"moe2-agent-{expert}", f"moe2-gateway-{g1}", f"gw-{g1}"):
            for _ in range(3):
                Raw(sb.config(attacker), guess).close()
        with PromptInbox(sb.config(sb.take("client"))) as inbox:
            assert inbox.wait_all(inbox.send(app, 2, max_tokens=2), 60)
            os.kill(fleet.procs[expert].pid, signal.SIGSTOP)  # answers wait on the expert
            held = inbox.send(app, 6, max_tokens=2)  # split between g1 and g2
            time.sleep(0.8)
            os.kill(fleet.procs[g2].pid, signal.SIGSTOP)  # the power cut
            # end the frozen gateway's kept session, as the attack did: a session under the
            # guessable name, expiry 0
            Raw(sb.config(attacker), f"moe2-gateway-{g2}", session_expiry=0).close()
            os.kill(fleet.procs[expert].pid, signal.SIGCONT)
            after = inbox.send(app, 6, max_tokens=2)
            assert inbox.wait_all(held + after, 90), inbox.summary(held + after)
            time.sleep(0.5)
            summary = inbox.summary(held + after)
            answered_by = {m.get("gateway") for pid in held + after for m in inbox.terminal(pid)}
        fleet.kill(g2)
        time.sleep(0.3)
    spy.close()
    assert summary == {"answered": 12, "errors": {}, "lost": [], "duplicated": []}
    assert answered_by == {g1}
    assert "publishing them again for live gateways" in fleet.log_tail(g1, 200_000)
    states = [json.loads(m)["state"] for _, m, _ in statuses.got if m]
    assert states and "offline" not in states, states  # the expert's last will never went out
    g1_states = [s["state"] for s in gateways.json() if s["gateway"] == g1]
    assert g1_states and "offline" not in g1_states, g1_states  # never knocked off
    assert spy.got == []  # a client reads no gateway status, so learns no session id


# ---------------------------------------------------------------------------- path 3


def test_no_login_without_the_fleet_key_can_lock_desired_state(
    secured_broker: Any,
    fleet: LocalFleet,
    tiny_models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: Any,
) -> None:
    """Path 3: an expert could write its own retained acks/<app>, and the push's version took
    any agent's ack: a forged ack at 2^53-1 made ``moe2ctl push`` exit 1, one at 2^53-2 made
    the controller sign 2^53-1, and pushing stayed broken after the forgery was cleared. Now
    an expert may not write acknowledgements (nor announce itself a gateway); a gateway
    login's forged acknowledgement (a stolen gateway password) does not count, since the
    controller counts only versions its key signed; and a fleet already at the end of the
    range recovers with ``moe2ctl push --force-version 1``."""
    sb = secured_broker
    app = uid("zoo")
    expert, gw, stolen = sb.take("agent"), sb.take("gateway"), sb.take("gateway")
    key = Signer.generate()
    public = key.save(tmp_path / "data" / "fleet-signing.pem")
    conf = tmp_path / "gw.toml"
    conf.write_text(f'[gateway]\ntrusted_keys = ["{public}"]\n')
    start(fleet, sb, expert, tiny_models["animals"])
    start(fleet, sb, gw, tiny_models["code"], "--config", str(conf), "--serve-app", f"{app}=x:1")
    ctl = sb.config(fleet.controller)  # type: ignore[attr-defined]
    with DesiredState(ctl, signer=key) as desired:
        assert desired.push_assignment(app, [expert], 1).accepted == [gw]
    edge = p.MAX_VERSION
    forged = p.AssignmentAck(gateway=expert, app=app, version=edge, accepted=True, current=edge)
    with Connection(sb.config(expert), uid("x")) as conn:
        for topic, payload in (
            (p.topics.assignment_ack(expert, app), p.encode(forged)),
            (
                p.topics.gateway_status(expert),
                p.encode(p.GatewayStatus(gateway=expert, state="online", apps={app: edge})),
            ),
        ):
            with pytest.raises(BrokerError, match="Not authorized"):
                conn.publish_acked(topic, payload, retain=True)
    # A stolen gateway password: the broker lets it announce and acknowledge, and it shows an
    # old signed assignment as "proof" of a version near the end of the range.
    with DesiredState(ctl, signer=key) as desired:
        old = desired.view.copy().desired_app[app]
    lie = p.AssignmentAck(
        gateway=stolen, app=app, version=edge - 1, accepted=True, current=edge - 1, proof=old
    )
    with Connection(sb.config(stolen), uid("x")) as conn:
        online = p.GatewayStatus(gateway=stolen, state="online", group=GROUP, apps={app: edge})
        conn.publish_acked(p.topics.gateway_status(stolen), p.encode(online), retain=True)
        conn.publish_acked(p.topics.assignment_ack(stolen, app), p.encode(lie), retain=True)
    with DesiredState(ctl, signer=key) as desired:
        second = desired.push_assignment(app, [expert], 1, wait_s=3)
    assert second.assignment.version == 2 and second.accepted == [gw], second.summary()
    # A fleet already at the end of the range (signed by the key, before this fix): the next
    # push says how to get out, and --force-version 1 does.
    with Connection(ctl, uid("x")) as conn:
        at_edge = key.sign(p.AppAssignment(app=app, version=edge, subset=[expert], k=1))
        conn.publish_acked(p.topics.desired_app(app), p.encode(at_edge), retain=True)
    with DesiredState(ctl, signer=key) as desired:
        assert desired.view.wait(
            lambda s: (a := s.assignment_ack.get((gw, app))) is not None and a.version == edge, 10
        )
    for name, value in {
        "MOE2_DATA_DIR": str(tmp_path / "data"),
        "MOE2_BROKER__HOST": ctl.host,
        "MOE2_BROKER__PORT": str(ctl.port),
        "MOE2_BROKER__USERNAME": str(ctl.username),
        "MOE2_BROKER__PASSWORD": str(ctl.password),
        "MOE2_BROKER__TLS_CA": str(ctl.tls_ca),
    }.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    push = ["push", "--app", app, "--subset", expert, "--wait", "5", "--json"]
    stuck = runner.invoke(main, push)
    assert stuck.exit_code == 1 and "--force-version" in stuck.output, stuck.output
    reset = runner.invoke(main, [*push, "--force-version", "1"])
    assert reset.exit_code == 0, reset.output
    out = json.loads(reset.output.splitlines()[0])["pushed"][0]
    assert (out["epoch"], out["version"], out["accepted"]) == (1, 1, [gw]), out
    again = runner.invoke(main, push)
    assert again.exit_code == 0, again.output
    out = json.loads(again.output.splitlines()[0])["pushed"][0]
    assert (out["epoch"], out["version"], out["accepted"]) == (1, 2, [gw]), out
    with PromptClient(sb.config(sb.take("client"))) as pc:
        assert [e.id for e in pc.ask(app, "the fox", max_tokens=2).experts] == [expert]
    with Connection(sb.config(stolen), uid("x")) as conn:
        for topic in (p.topics.gateway_status(stolen), p.topics.assignment_ack(stolen, app)):
            conn.publish_acked(topic, b"", retain=True)


# ---------------------------------------------------------------------------- path 4


def test_no_client_can_write_into_another_users_inbox(
    secured_broker: Any, fleet: LocalFleet, tiny_models: dict[str, Path]
) -> None:
    """Path 4: reply_to could name any user's moe2/v1/replies/<user>/..., and a gateway wrote
    there: one client delivered stream chunks, finals and errors, with ids it chose, into
    another client's inbox, the controller's and a gateway's fleet-sync marker topic. Now a
    client asks on moe2/v1/prompts/<app>/<its user> (the only prompt topic its login may
    write), and a gateway answers such a prompt only inside that user's replies: every
    attempt gets a bad_request in the attacker's own replies, and nothing reaches the
    others. Duplicate keys cannot split routing from error reporting either."""
    sb = secured_broker
    app = uid("zoo")
    expert, gw = sb.take("agent"), sb.take("gateway")
    attacker, victim = sb.take("client"), sb.take("client")
    ctl_user = fleet.controller  # type: ignore[attr-defined]
    start(fleet, sb, expert, tiny_models["animals"])
    start(fleet, sb, gw, tiny_models["code"], "--serve-app", f"{app}={expert}:1")
    ctl = sb.config(ctl_user)
    own = Watch(sb.config(attacker), f"moe2/v1/replies/{attacker}/#")
    mine = f"moe2/v1/replies/{attacker}/answers"
    targets = [
        f"moe2/v1/replies/{victim}/answers",
        f"moe2/v1/replies/{ctl_user}/answers/x",
        f"moe2/v1/replies/{gw}/sync/x",
    ]
    victims = [
        Watch(sb.config(victim), f"moe2/v1/replies/{victim}/#"),  # all of the victim's
        Watch(ctl, targets[1]),
        Watch(ctl, targets[2]),
    ]
    for w in victims:
        w.conn.start()
    with own.conn as conn:
        time.sleep(0.3)
        asked = p.topics.prompts(app, attacker)
        for i, target in enumerate(targets):
            body = {"id": f"x{i}", "prompt": "the fox", "reply_to": target, "stream": True}
            conn.publish_acked(asked, json.dumps(body).encode())
        # its own reply_to, another's ResponseTopic: answered on its own only
        body = {"id": "y", "prompt": "the fox", "reply_to": mine, "max_tokens": 2}
        conn.publish_acked(
            asked,
            json.dumps(body).encode(),
            properties=response_properties(targets[0], b"c"),
        )
        dup = b'{"id": "d", "prompt": "x", "reply_to": "%s", "reply_to": "%s"}' % (
            mine.encode(),
            targets[0].encode(),
        )
        conn.publish_acked(asked, dup)
        for topic in (p.topics.prompts(app), p.topics.prompts(app, victim)):
            with pytest.raises(BrokerError, match="Not authorized"):
                conn.publish_acked(topic, json.dumps(body).encode())
        got = own.wait(5, 60)
        time.sleep(1.0)  # nothing more may come
    for w in victims:
        w.conn.stop()
    errors = {m["id"]: m["error"] for m in own.json() if "error" in m}
    finals = [m for m in own.json() if "text" in m]
    assert set(errors) == {"x0", "x1", "x2", "d"}, got
    for i in range(3):
        assert errors[f"x{i}"]["code"] == "bad_request"
        assert f"answered only in moe2/v1/replies/{attacker}/" in errors[f"x{i}"]["message"]
    # the key given twice: refused, and the refusal follows neither reply_to
    assert errors["d"]["code"] == "bad_request" and "twice" in errors["d"]["message"]
    where = {json.loads(m).get("id"): t for t, m, _ in own.got if m}
    assert where["d"] == where["x0"] == p.topics.prompt_errors(attacker)
    assert [f["id"] for f in finals] == ["y"] and where["y"] == mine
    assert all(w.got == [] for w in victims), [w.got for w in victims]


def test_no_client_can_cancel_another_users_prompt(
    secured_broker: Any, fleet: LocalFleet, tiny_models: dict[str, Path]
) -> None:
    """Cancels (issue 24) on logins bound to what they are: a PromptCancel names a prompt by
    id and reply_to, which another user may well know (ids are often counters, an inbox is
    no secret). The broker lets a login cancel only on cancel/<app>/<itself>, and a gateway
    stops only a prompt published on prompts/<app>/<that same user>: the attacker's cancels
    of the victim's prompts (sent first, so they are waiting when the prompts come) are
    refused by the broker on the victim's and the bare topic and ignored by the gateway on
    the attacker's own, and the victim's own cancel still works. Before, the gateway matched
    id and reply_to only: the attacker's cancel on its own topic answered the victim's
    prompt 'cancelled'."""
    sb = secured_broker
    app = uid("zoo")
    expert, gw = sb.take("agent"), sb.take("gateway")
    attacker, victim = sb.take("client"), sb.take("client")
    start(fleet, sb, expert, tiny_models["animals"])
    start(fleet, sb, gw, tiny_models["code"], "--serve-app", f"{app}={expert}:1")
    inbox = Watch(sb.config(victim), f"moe2/v1/replies/{victim}/#")
    reply_to = f"moe2/v1/replies/{victim}/answers"

    def cancel(pid: str) -> bytes:
        return json.dumps({"id": pid, "reply_to": reply_to}).encode()

    with inbox.conn as mine, Connection(sb.config(attacker), uid("x")) as theirs:
        time.sleep(0.3)
        for pid in ("v1", "v2"):
            for topic in (p.topics.cancel(app), p.topics.cancel(app, victim)):
                with pytest.raises(BrokerError, match="Not authorized"):
                    theirs.publish_acked(topic, cancel(pid))
            theirs.publish_acked(p.topics.cancel(app, attacker), cancel(pid))
        mine.publish_acked(p.topics.cancel(app, victim), cancel("v2"))
        time.sleep(1.0)  # the cancels are at the gateway before the prompts
        for pid in ("v1", "v2"):
            body = {"id": pid, "prompt": "the fox eats", "reply_to": reply_to, "max_tokens": 4}
            mine.publish_acked(p.topics.prompts(app, victim), json.dumps(body).encode())
        inbox.wait(2, 60)
        time.sleep(1.0)  # nothing more may come
    got = {m["id"]: m for m in inbox.json()}
    assert len(inbox.json()) == 2, inbox.json()
    assert "text" in got["v1"], got  # the attacker's cancels: refused, or not the owner's
    assert got["v2"]["error"]["code"] == "cancelled", got  # the victim's own


# ---------------------------------------------------------------------------- the lesser ones


def test_ghost_gateways_invalid_app_names_and_retained_prompts(
    secured_broker: Any, fleet: LocalFleet, tiny_models: dict[str, Path]
) -> None:
    """The lesser ones: an expert announcing itself as a gateway for an app 'ghost' made
    clients wait 15 s for a timeout instead of unknown_app (now the broker refuses the
    announcement, and the client gets unknown_app); a prompt to an invalid application
    name with a valid reply_to got no answer (now bad_request); a client could publish
    retained prompts that the broker kept and handed to every gateway subscribing later
    (now the gateway clears it and answers bad_request, never serving it)."""
    sb = secured_broker
    app = uid("zoo")
    expert, gw, client = sb.take("agent"), sb.take("gateway"), sb.take("client")
    start(fleet, sb, expert, tiny_models["animals"])
    start(fleet, sb, gw, tiny_models["code"], "--serve-app", f"{app}={expert}:1")
    ghost = p.GatewayStatus(gateway=expert, state="online", group=GROUP, apps={"ghost": 0})
    with (
        Connection(sb.config(expert), uid("x")) as conn,
        pytest.raises(BrokerError, match="Not authorized"),
    ):
        conn.publish_acked(p.topics.gateway_status(expert), p.encode(ghost), retain=True)
    with PromptClient(sb.config(client)) as pc, pytest.raises(UnknownApp):
        pc.ask("ghost", "the fox", max_tokens=2, timeout=60)
    inbox = Watch(sb.config(client), f"moe2/v1/replies/{client}/#")
    reply_to = f"moe2/v1/replies/{client}/answers"
    with inbox.conn as conn:
        time.sleep(0.3)
        body = {"id": "bad-app", "prompt": "x", "reply_to": reply_to}
        conn.publish_acked(f"moe2/v1/prompts/-bad-/{client}", json.dumps(body).encode())
        body = {"id": "kept", "prompt": "the fox", "reply_to": reply_to, "max_tokens": 2}
        conn.publish_acked(p.topics.prompts(app, client), json.dumps(body).encode(), retain=True)
        inbox.wait(2, 60)
        time.sleep(1.0)  # nothing more may come
    got = {m["id"]: m for m in inbox.json()}
    assert len(inbox.json()) == 2, inbox.json()
    assert got["bad-app"]["error"]["code"] == "bad_request", got
    assert "not a prompt topic" in got["bad-app"]["error"]["message"]
    assert got["kept"]["error"]["code"] == "bad_request", got
    assert "retained" in got["kept"]["error"]["message"]
    # The broker keeps no retained prompt: a gateway subscribing now would get none.
    later = Watch(sb.config(sb.take("gateway")), f"moe2/v1/prompts/{app}/#")
    with later.conn:
        time.sleep(1.0)
    assert later.got == []
