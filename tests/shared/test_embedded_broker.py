"""The embedded broker (iotcore's rumqttd, run as ``python -m iotcore --config FILE``) with
mosquitto out of the way: the prompt API for MQTT 5 and MQTT 3.1.1 clients, the fleet's own
MQTT 5 features (shared subscriptions, subscription identifiers, last wills), and the demo."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from moe2.controller.localfleet import LocalFleet
from moe2.shared import broker as broker_mod
from moe2.shared.broker import IotcoreBroker, start_broker
from moe2.shared.client import PromptClient
from moe2.shared.errors import UnknownApp
from moe2.shared.mqtt import BrokerConfig, Connection, reply_qos, response_properties

pytest.importorskip("iotcore", reason="pip install 'moe2-edge-shared[embedded-broker]'")


@pytest.fixture(scope="module")
def embedded() -> Iterator[IotcoreBroker]:
    with pytest.MonkeyPatch.context() as mp:  # as on a box without mosquitto
        mp.setattr(broker_mod, "_mosquitto_path", lambda: None)
        assert not broker_mod.MosquittoBroker.available()
        b = start_broker("auto")
    assert isinstance(b, IotcoreBroker)
    yield b
    b.close()


@pytest.fixture(scope="module")
def served(
    embedded: IotcoreBroker, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[BrokerConfig, str]]:
    cfg = BrokerConfig(host=embedded.host, port=embedded.port, keepalive=2)
    app = f"emb-{uuid.uuid4().hex[:6]}"
    with LocalFleet(cfg, tmp_path_factory.mktemp("embedded")) as fleet:
        # no start-up profile: a prompt must not wait behind its measurements
        flags = ("--n-threads", "1", "--broker-keepalive", "2", "--no-profile-on-start")
        fleet.start("emb-animals", tiny_models["animals"], *flags)
        fleet.start(
            "emb-code",
            tiny_models["code"],
            *flags,
            "--serve-app",
            f"{app}=emb-animals,emb-code:2",
            *embedded.gateway_flags,
        )
        fleet.wait_online(["emb-animals", "emb-code"], 60)
        yield cfg, app


def test_two_listeners_on_known_ports(embedded: IotcoreBroker) -> None:
    assert embedded.listeners == {"5": embedded.port, "3.1.1": embedded.port_v311}
    conf = (Path(embedded._dir.name) / "rumqttd.toml").read_text()
    assert f'listen = "127.0.0.1:{embedded.port}"' in conf
    assert f'listen = "127.0.0.1:{embedded.port_v311}"' in conf
    assert "max_payload_size = 67108864" in conf
    pinned = IotcoreBroker(port=broker_mod.free_port(), port_v311=broker_mod.free_port())
    with pinned:
        assert pinned.listeners["3.1.1"] == pinned.port_v311


def test_prompt_api_over_mqtt5(served: tuple[BrokerConfig, str]) -> None:
    cfg, app = served
    deltas: list[str] = []
    with PromptClient(cfg) as client:
        # warm up: right after start a gateway may not have its experts' vocabularies yet
        # and leaves such an expert out of a first answer (listing it as dropped)
        client.ask(app, "warm up", max_tokens=2, timeout=60)
        answer = client.ask(app, "the fox eats", max_tokens=6, on_delta=deltas.append)
        assert answer.text and "".join(deltas) == answer.text
        assert {e.id for e in answer.experts} == {"emb-animals", "emb-code"}, answer.dropped
        # rumqttd acknowledges a publish nobody subscribed to as a success (mosquitto says
        # "no matching subscribers"): the gateway's catch-all answers instead.
        with pytest.raises(UnknownApp, match="no online gateway serves"):
            client.ask("nobody-serves-this", "x", timeout=30)


def _client(protocol: int, port: int) -> tuple[mqtt.Client, queue.Queue[dict]]:
    inbox: queue.Queue[dict] = queue.Queue()
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"phone-{uuid.uuid4().hex[:6]}", protocol=protocol
    )
    c.on_message = lambda _c, _u, m: inbox.put(json.loads(m.payload))
    return c, inbox


def test_prompt_api_for_an_mqtt311_client(
    served: tuple[BrokerConfig, str], embedded: IotcoreBroker
) -> None:
    """What mosquitto_pub/_sub (3.1.1 by default) or a phone library does: plain JSON, a
    reply_to topic, no MQTT 5 properties, on the 3.1.1 listener."""
    _cfg, app = served
    c, inbox = _client(mqtt.MQTTv311, embedded.port_v311)
    subscribed = threading.Event()
    c.on_subscribe = lambda *_a: subscribed.set()
    reply_to = f"phone/{uuid.uuid4().hex[:6]}/answers"
    c.connect(embedded.host, embedded.port_v311)
    c.loop_start()
    try:
        c.subscribe(reply_to, qos=1)
        assert subscribed.wait(10)
        prompt = {
            "id": "p1",
            "prompt": "the fox eats",
            "reply_to": reply_to,
            "max_tokens": 6,
            "stream": True,
        }
        c.publish(f"moe2/v1/prompts/{app}", json.dumps(prompt), qos=1)
        got = []
        while True:
            msg = inbox.get(timeout=30)
            got.append(msg)
            if "text" in msg or "error" in msg:
                break
        final = got[-1]
        assert final["id"] == "p1" and "error" not in final, final
        assert "".join(m["delta"] for m in got[:-1]) == final["text"]
    finally:
        c.loop_stop()
        c.disconnect()


def test_a_311_client_on_the_mqtt5_port_is_refused(embedded: IotcoreBroker) -> None:
    """Why there are two ports: rumqttd's v5 listener does not accept a 3.1.1 CONNECT."""
    c, _ = _client(mqtt.MQTTv311, embedded.port)
    accepted = threading.Event()
    c.on_connect = lambda *a: accepted.set() if a[3] == 0 else None
    c.connect(embedded.host, embedded.port)
    c.loop_start()
    try:
        assert not accepted.wait(2)
    finally:
        c.loop_stop()
        c.disconnect()


@pytest.mark.slow
def test_demo_runs_on_the_embedded_broker(tmp_path: Path) -> None:
    """``moe2ctl demo`` end to end with iotcore, no mosquitto on the PATH."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin", MOE2_MODELS_DIR=str(tmp_path))
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from moe2.controller.cli import main; main()",
            "demo",
            "--broker",
            "iotcore",
            "--domain",
            "animals",
            "--domain",
            "code",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "iotcore on 127.0.0.1" in out and "(MQTT 3.1.1)" in out
    prompts = out.split("[7/8] prompts", 1)[1].split("[8/8]", 1)[0]
    assert prompts.count(" -> ") == 4 and "multiple choice" in prompts
    assert "answers from the stored scores" in out  # see the demo: rumqttd and the gateway
    assert "every process the demo started has been stopped" in out


def test_reply_qos_travels_with_the_request(embedded: IotcoreBroker) -> None:
    """rumqttd delivers a QoS 0 publish at the subscription's QoS 1 (MQTT says the lower of
    the two) and forwards QoS 1 messages ~44 ms late: an agent must answer a gateway's QoS 0
    step at the QoS the gateway asked for, which travels as a user property."""
    cfg = BrokerConfig(host=embedded.host, port=embedded.port)
    got: queue.Queue = queue.Queue()
    sub = Connection(cfg, f"sub-{uuid.uuid4().hex[:6]}")
    sub.subscribe("rq/test", got.put, qos=1)
    pub = Connection(cfg, f"pub-{uuid.uuid4().hex[:6]}")
    with sub, pub:
        pub.publish("rq/test", b"x", qos=0, properties=response_properties("r/x", b"c", 0))
        pub.publish("rq/test", b"y", qos=0)
        asked, plain = got.get(timeout=5), got.get(timeout=5)
    assert asked.qos == 1  # upgraded by the broker
    assert reply_qos(asked) == 0
    assert reply_qos(plain) == 1  # no wish: the delivered QoS
