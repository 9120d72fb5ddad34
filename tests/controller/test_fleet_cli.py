"""``moe2ctl agents`` and ``moe2ctl profile`` read the retained messages of a real broker."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from moe2.controller.cli import main
from moe2.shared.broker import Broker, MosquittoBroker, start_broker
from moe2.shared.costmodel import CostCurve, CostCurves
from moe2.shared.mqtt import BrokerConfig, Connection
from moe2.shared.protocol import (
    AgentInfo,
    AgentProfile,
    AgentStatus,
    AssignmentAck,
    ComputeBackend,
    ComputeDevice,
    GatewayStatus,
    encode,
    topics,
)
from moe2.shared.protocol.profiles import MeterSource, ProfilePoint

pytestmark = pytest.mark.skipif(not MosquittoBroker.available(), reason="needs mosquitto")


def _line(a: float, b: float, unit: str) -> CostCurve:
    return CostCurve(
        unit=unit,
        coef=[a, b],
        residual_std=0.001,
        rel_residual_std=0.02,
        n_points=12,
        min_tokens=16,
        max_tokens=1843,
    )


CURVES = CostCurves(
    prompt_seconds=_line(0.05, 0.002, "s"),
    token_seconds=_line(0.0095, 2e-6, "s"),
    prompt_joules=_line(1.0, 0.04, "J"),
    token_joules=_line(0.2, 4e-5, "J"),
)


def _info(agent: str, device: str) -> AgentInfo:
    gpu = device != "cpu-generic"
    backend = ComputeBackend(
        name="CUDA" if gpu else "CPU",
        gpu_layers=31 if gpu else 0,
        n_layers=31,
        requested_layers=31 if gpu else 0,
        vram_bytes=(92 << 20) if gpu else 0,
        supports_gpu_offload=gpu,
        devices=[ComputeDevice(name="CUDA0", description="Orin", kind="gpu")] if gpu else [],
    )
    return AgentInfo(
        agent_id=agent,
        model="SmolLM2-135M-Instruct",
        model_file="smollm2.gguf",
        architecture="llama",
        quantization="Q4_1",
        n_ctx=2048,
        n_vocab=49152,
        tokenizer_hash="ab" * 32,
        eos_ids=[2],
        add_bos=False,
        device_class=device,
        software_version="0.1.0",
        max_sessions=4,
        started_at=1.7e9,
        backend=backend,
    )


def _profile(agent: str, source: MeterSource) -> AgentProfile:
    point = ProfilePoint(
        prompt_tokens=16,
        decode_tokens=16,
        prompt_seconds=[0.08, 0.09],
        token_seconds=[0.01, 0.01],
        prompt_joules=[1.6, 1.7],
        token_joules=[0.2, 0.21],
    )
    return AgentProfile(
        agent_id=agent,
        model="SmolLM2-135M-Instruct",
        device_class="cpu-generic",
        power_mode="default",
        meter_source=source,
        energy_measured=source != "modelled",
        delay_measured=True,
        energy_scope="cpu-package" if source == "rapl" else "device-figures",
        idle_watts=12.5 if source == "rapl" else None,
        n_ctx=2048,
        points=[point],
        curves=CURVES,
        profiled_at=1.7e9,
        duration_s=42.0,
    )


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    # A broker of its own: the retained fleet below must not leak into other tests.
    b = start_broker("mosquitto")
    try:
        cfg = BrokerConfig(port=b.port)
        with Connection(cfg, "fleet-test-publisher") as conn:
            retained = [
                (topics.agent_info("cpu-1"), encode(_info("cpu-1", "cpu-generic"))),
                (
                    topics.agent_status("cpu-1"),
                    encode(AgentStatus(agent_id="cpu-1", state="online", since=1.7e9)),
                ),
                (topics.agent_profile("cpu-1"), encode(_profile("cpu-1", "rapl"))),
                (topics.agent_info("orin-1"), encode(_info("orin-1", "orin-agx-64gb"))),
                (
                    topics.agent_status("orin-1"),
                    encode(AgentStatus(agent_id="orin-1", state="offline")),
                ),
                (topics.agent_profile("orin-1"), encode(_profile("orin-1", "modelled"))),
                (topics.agent_info("broken-1"), b'{"v": 1, "agent_id": "broken-1"}'),
                # cpu-1 is a gateway: it announced qa at v1 and zoo from its local
                # configuration, then accepted qa v3 (no new announcement: same subscriptions)
                (
                    topics.gateway_status("cpu-1"),
                    encode(
                        GatewayStatus(gateway="cpu-1", state="online", apps={"qa": 1, "zoo": 0})
                    ),
                ),
                (
                    topics.assignment_ack("cpu-1", "qa"),
                    encode(AssignmentAck(gateway="cpu-1", app="qa", version=3, accepted=True)),
                ),
                (
                    topics.assignment_ack("cpu-1", "zoo"),
                    encode(
                        AssignmentAck(
                            gateway="cpu-1", app="zoo", version=2, accepted=False, reason="x"
                        )
                    ),
                ),
            ]
            for topic, payload in retained:
                conn.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
        yield b
    finally:
        b.close()


def _run(broker: Broker, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [*args, "--broker-port", str(broker.port)])
    return result.exit_code, result.stdout, result.stderr


def test_agents_json_lists_state_model_device_and_meter(broker: Broker) -> None:
    code, out, err = _run(broker, "agents", "--json")
    assert code == 0, err
    rows = {r["agent_id"]: r for r in json.loads(out)}
    assert set(rows) == {"cpu-1", "orin-1"}  # broken-1's info is invalid and skipped
    assert rows["cpu-1"]["state"] == "online"
    assert rows["orin-1"]["state"] == "offline"
    assert rows["orin-1"]["device_class"] == "orin-agx-64gb"
    assert rows["cpu-1"]["model"] == "SmolLM2-135M-Instruct"
    assert rows["cpu-1"]["tokenizer_hash"] == "ab" * 32
    assert (rows["cpu-1"]["meter_source"], rows["cpu-1"]["energy_measured"]) == ("rapl", True)
    assert (rows["orin-1"]["meter_source"], rows["orin-1"]["energy_measured"]) == (
        "modelled",
        False,
    )
    assert "broken-1" in err  # the bad retained message is reported, not hidden
    assert rows["orin-1"]["backend"]["name"] == "CUDA"
    assert rows["orin-1"]["backend"]["gpu_layers"] == 31


def test_agents_table(broker: Broker) -> None:
    code, out, _ = _run(broker, "agents")
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split() == [
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
    ]
    assert any(line.split()[:2] == ["orin-1", "offline"] for line in lines)
    # where each model runs: layers on the GPU of all, GiB of weights there
    orin = next(line for line in lines if line.startswith("orin-1"))
    cpu = next(line for line in lines if line.startswith("cpu-1"))
    assert "CUDA 31/31 0.1G" in orin and " CPU " in cpu
    # SERVES: the version each gateway acknowledged (qa v3), not the one it last announced;
    # a rejected version changes nothing (zoo stays on the local configuration, v0)
    assert cpu.split()[-1] == "qa@v3,zoo@v0"


def test_profile_json_evaluates_the_curves(broker: Broker) -> None:
    code, out, err = _run(broker, "profile", "cpu-1", "--at", "100", "--json")
    assert code == 0, err
    (summary,) = json.loads(out)
    assert summary["profile"]["meter_source"] == "rapl"
    assert summary["profile"]["energy_measured"] is True
    (at,) = summary["at"]
    assert at["prompt_tokens"] == 100
    assert at["prompt_seconds"] == pytest.approx(0.05 + 0.002 * 100)
    assert at["token_joules"] == pytest.approx(0.2 + 4e-5 * 100)


def test_profile_text_says_when_figures_are_modelled(broker: Broker) -> None:
    code, out, _ = _run(broker, "profile")
    assert code == 0
    assert "cpu-1" in out and "orin-1" in out
    orin = out[out.index("orin-1:") :]
    assert "modelled (MODELLED, not measured" in orin
    cpu = out[out.index("cpu-1:") : out.index("orin-1:")]
    assert "rapl (measured, scope cpu-package, idle 12.5 W)" in cpu
    assert "2048" in cpu  # default lengths stop at n_ctx


def test_profile_of_an_unknown_agent_fails(broker: Broker) -> None:
    code, _, err = _run(broker, "profile", "nobody")
    assert code == 1
    assert "no retained profile for nobody" in err
    assert "cpu-1, orin-1" in err


def test_no_broker_is_a_clear_error() -> None:
    from moe2.shared.broker import free_port

    result = CliRunner().invoke(
        main, ["agents", "--broker-port", str(free_port()), "--broker-connect-timeout", "1"]
    )
    assert result.exit_code == 1
    assert "MQTT broker at 127.0.0.1" in result.stderr
