"""A gate trained on collected scores is pushed over MQTT; the gateway verifies it, loads it
with ONNX Runtime, acknowledges it and routes with it; a mismatched gate is never used."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from moe2.agent.gateway.gate import PROBE_TEXTS
from moe2.agent.gateway.onnxgate import OnnxGate
from moe2.controller import datasets as ds
from moe2.controller.cli import main as moe2ctl
from moe2.controller.collect import collect
from moe2.controller.gate.cli import export_gate, train_gate
from moe2.controller.gate.config import TrainConfig
from moe2.controller.gate.export import gate_files
from moe2.controller.localfleet import LocalFleet
from moe2.controller.push import report
from moe2.controller.registry import Registry
from moe2.controller.registry.sync import online_experts, sync_once
from moe2.shared import protocol as p
from moe2.shared.client import PromptClient
from moe2.shared.desired import DesiredState
from moe2.shared.errors import ConfigError, NotAcknowledged
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import BrokerConfig, Connection, RpcClient

FAST = TrainConfig(
    batch_size=16, accumulation=1, eval_every=10, plateau_patience=5, early_stop=15, max_epochs=40
)


def weights(client: PromptClient, app: str, prompt: str) -> dict[str, float]:
    answer = client.ask(app, prompt, max_tokens=3)
    return {e.id: e.weight for e in answer.experts}


def wait_ack(broker: BrokerConfig, gateway: str, version: str, timeout: float) -> p.GateAck:
    got: list[p.GateAck] = []
    ev = threading.Event()

    def on(msg: Any) -> None:
        if msg.payload:
            got.append(p.decode_message(p.GateAck, msg.payload))
            ev.set()

    conn = Connection(broker, f"ackwatch-{uuid.uuid4().hex[:6]}")
    conn.subscribe(p.topics.gate_ack(gateway, version), on)
    with conn:
        assert ev.wait(timeout), f"no gate ack from {gateway} for {version}"
    return got[-1]


def test_gateway_receives_verifies_and_uses_a_pushed_gate(
    broker_config: BrokerConfig, tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("MOE2_DATA_DIR", str(tmp_path / "data"))  # for the moe2ctl calls
    gates_dir = tmp_path / "data" / "gates"
    tag = uuid.uuid4().hex[:6]
    a, c, gw = f"ani-{tag}", f"coo-{tag}", f"gw-{tag}"
    app, other = f"zoo-{tag}", f"zoo2-{tag}"
    with LocalFleet(broker_config, tmp_path / "fleet") as fleet:
        flags = ("--n-threads", "1", "--broker-keepalive", "2")
        fleet.start(a, tiny_models["animals"], *flags)
        fleet.start(c, tiny_models["cooking"], *flags)
        fleet.start(
            gw,
            tiny_models["code"],
            *flags,
            "--serve-app",
            f"{app}={a},{c}:2",
            "--serve-app",
            f"{other}={a},{c}:2",
            "--gateway-stats-interval-s",
            "0.5",
        )
        fleet.wait_online([a, c, gw], 60)

        # Collect over MQTT, train, export.
        reg = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
        reg.add_dataset("t", "free-answer", "tiny", ds.tiny_domains(["animals", "cooking"], 40, 1))
        sync_once(reg, broker_config)
        online = {k: v for k, v in online_experts(reg).items() if k in (a, c)}
        with RpcClient(broker_config, timeout=30) as rpc:
            assert collect(reg, rpc, "t", online).complete
        row, _ = train_gate(reg, "t", [a, c], FAST, version=f"g-{tag}", gates_dir=gates_dir)
        prompts = [s.prompt for s in reg.samples("t")][:4]
        manifest, diff = export_gate(reg, row.version, prompts, gates_dir=gates_dir)
        assert diff <= 1e-5
        files = gate_files(Path(row.artefact_dir))
        blobs = {k: f.read_bytes() for k, f in files.items()}
        ref = p.GateRef(version=manifest.version, sha256=p.gate_digest(manifest))

        cooking, animals = "bake the cake for", "the young fox eats"
        with PromptClient(broker_config) as client:
            before = weights(client, app, cooking)
            assert before == pytest.approx({a: 0.5, c: 0.5})  # uniform until a gate arrives

            with DesiredState(broker_config) as desired:
                (result,) = desired.push_gate(manifest, blobs, [(app, [a, c], 2)], wait_s=60)
            assert result.accepted == [gw] and not result.missing
            acks = result.gate_acks
            assert acks[gw].state == "loaded" and acks[gw].sha256 == ref.sha256
            assert app in acks[gw].apps and "CPUExecutionProvider" in acks[gw].providers
            local = OnnxGate(manifest, blobs)
            for prompt, home in ((cooking, c), (animals, a)):
                g = local.values(prompt, [a, c])
                want = {a: g[0] / g.sum(), c: g[1] / g.sum()}
                got = weights(client, app, prompt)
                assert got == pytest.approx(want, abs=1e-6)  # the pushed gate's values
                assert got[home] > 0.6  # routed to the expert of the prompt's domain

            # What the gate takes here: timed at load, then on the prompts it gates (re-
            # announced), the figure the controller promises as τ_gate.
            latency = acks[gw].latency
            assert latency is not None and latency.unit == "s" and acks[gw].latency_prompts == 0
            assert latency.n_points >= len(PROBE_TEXTS) and latency.at(16) > 0
            answer = client.ask(app, cooking, max_tokens=2)
            assert answer.gate_ms is not None and 0 < answer.gate_ms < answer.latency_ms
            deadline = time.monotonic() + 20
            while True:
                state = FleetView.snapshot(broker_config, ("gateway", "gate_ack"), 2.0)
                found = state.gate_latency(row.version)
                if found is not None and found[1] > 0:
                    break
                assert time.monotonic() < deadline, found
                time.sleep(0.3)
            assert found[0].n_points >= len(PROBE_TEXTS) + found[1]

            # A reference that does not match the manifest: rejected, never used.
            bad = p.GateManifest(**(manifest.model_dump() | {"version": f"bad-{tag}"}))
            with DesiredState(broker_config) as desired:
                desired.publish_gate(bad, blobs)
                wrong = p.GateRef(version=bad.version, sha256="0" * 64)
                desired.push_assignment(other, [a, c], 2, gate=wrong, wait_s=0)
            ack = wait_ack(broker_config, gw, bad.version, 30)
            assert ack.state == "rejected" and "does not match" in (ack.reason or "")
            # Accepted, but the only gateway rejected its gate (files that are no gate): the
            # push is not a success (push-gate exits 4).
            from moe2.shared.protocol.gates import blob_ref

            junk = {role: f"not a gate file: {role} {tag}".encode() for role in blobs}
            broken = p.GateManifest(
                **(
                    manifest.model_dump()
                    | {
                        "version": f"junk-{tag}",
                        "files": [blob_ref(r, d).model_dump() for r, d in junk.items()],
                    }
                )
            )
            with DesiredState(broker_config) as desired:
                (again,) = desired.push_gate(broken, junk, [(other, [a, c], 2)], wait_s=30)
            assert again.accepted == [gw] and again.gate_acks[gw].state == "rejected"
            with pytest.raises(NotAcknowledged, match="loaded gate"):
                report([again], as_json=True)
            assert weights(client, other, cooking) == pytest.approx({a: 0.5, c: 0.5})
            # An expert the gate was not trained on is refused before anything is published.
            with DesiredState(broker_config) as desired, pytest.raises(ConfigError, match=gw):
                desired.push_gate(manifest, blobs, [(other, [a, gw], 2)], wait_s=1)
            assert weights(client, other, cooking) == pytest.approx({a: 0.5, c: 0.5})
            assert weights(client, app, cooking)[c] > 0.6  # the good gate still serves

            # push, push-gate, push from the command line: each takes effect and is acked,
            # whatever numbered the version before (one source: what the fleet shows).
            db = f"sqlite:///{tmp_path / 'registry.db'}"
            cli = ["--broker-port", str(broker_config.port), "--db", db, "--json"]
            versions = []
            for args, experts in (
                (["push", "--app", app, "--subset", a, "--k", "1"], {a}),
                (["push-gate", "--app", app, "--version", row.version, "--k", "2"], {a, c}),
                (["push", "--app", app, "--subset", c, "--k", "1"], {c}),
            ):
                run = CliRunner().invoke(moe2ctl, [*args, *cli])
                assert run.exit_code == 0, run.output
                (pushed,) = json.loads(run.output)["pushed"]
                assert pushed["accepted"] == [gw] and not pushed["rejected"], pushed
                versions.append(pushed["version"])
                assert set(weights(client, app, cooking)) == experts
            assert versions == sorted(versions) and len(set(versions)) == 3
            assert [x.version for x in reg.assignments(app)][-3:] == versions
        reg.close()


def test_a_gateway_with_a_fleet_key_loads_only_signed_gate_manifests(
    broker_config: BrokerConfig, tmp_path: Path
) -> None:
    """Defect 6 (gates): with trusted fleet keys, a gate manifest must carry the key's
    signature: an unsigned one is rejected with the reason and never loaded, a signed one
    is loaded. (The assignment names the manifest by digest, and the manifest its blobs by
    hash, so a signed manifest pins every byte of the gate.)"""
    from moe2.agent.gateway.gate import UniformGate
    from moe2.agent.gateway.gatestore import GateStore
    from moe2.shared.protocol.gates import blob_ref
    from moe2.shared.signing import Signer, Verifier

    key = Signer.generate()
    verifier = Verifier.load([key.save(tmp_path / "fleet.pem")])
    gw = f"gs-{uuid.uuid4().hex[:6]}"
    loaded: list[str] = []

    def loader(manifest: p.GateManifest, files: dict[str, bytes]) -> Any:
        loaded.append(manifest.version)
        return UniformGate()

    conn = Connection(broker_config, f"store-{uuid.uuid4().hex[:6]}")
    store = GateStore(conn, gw, lambda app, gate: None, loader=loader, verifier=verifier)
    files = {"embedding": b"e" * 100, "head": b"h" * 50, "tokenizer": b"t" * 20}
    with conn:
        for signed in (False, True):
            version = f"g-{uuid.uuid4().hex[:6]}"
            manifest = p.GateManifest(
                version=version,
                experts=["a", "b"],
                files=[blob_ref(role, data) for role, data in files.items()],
                embedding_model="test",
                created_at=0.0,
            )
            with DesiredState(broker_config, signer=key if signed else None) as desired:
                desired.publish_gate(manifest, files)
            store.want("qa", p.GateRef(version=version, sha256=p.gate_digest(manifest)))
            ack = wait_ack(broker_config, gw, version, 20)
            if signed:
                assert ack.state == "loaded" and loaded == [version], ack
            else:
                assert ack.state == "rejected" and "bad signature" in (ack.reason or ""), ack
                assert loaded == []
    store.close()
