"""Shared fixtures: a real mosquitto on loopback, tiny GGUF experts built at test time, and
real ``moe2-agent`` processes that the tests start and stop."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from moe2.shared.broker import Broker, MosquittoBroker, start_broker
from moe2.shared.errors import Moe2Error
from moe2.shared.fleet import FleetState, FleetView
from moe2.shared.mqtt import BrokerConfig, Connection

TINY_DOMAINS = ("animals", "code", "cooking", "arithmetic")


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    kind = os.environ.get("MOE2_TEST_BROKER", "mosquitto")
    if kind == "mosquitto" and not MosquittoBroker.available():
        pytest.fail(
            "mosquitto is not installed: run `make test` (it installs it) or set "
            "MOE2_TEST_BROKER=auto to use the embedded broker"
        )
    b = start_broker(kind)
    yield b
    b.close()


@pytest.fixture(scope="session")
def broker_config(broker: Broker) -> BrokerConfig:
    return BrokerConfig(host=broker.host, port=broker.port, keepalive=2)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from moe2.controller.experts.tiny import build_experts

    return build_experts(tmp_path_factory.mktemp("tiny"), TINY_DOMAINS)


@dataclass(frozen=True)
class TinyAdapters:
    """Domain experts of one tiny base: LoRA adapters fine-tuned on other domains' text."""

    base: Path  # the tiny "animals" expert, the base of every adapter
    adapters: dict[str, Path]  # domain -> adapter GGUF fine-tuned on it


def finetune_tiny(
    base: Path, domain: str, out: Path, steps: int = 30, seed: int = 0
) -> tuple[Path, float, float]:
    """Fine-tune a LoRA adapter of ``base`` on ``domain`` text, through transformers' GGUF
    loading; returns (adapter path, held-out loss before, after) in nats per token."""
    from moe2.controller.experts import base as base_model
    from moe2.controller.experts import finetune as ft
    from moe2.controller.experts.domains import corpus
    from moe2.controller.experts.lora_gguf import AdapterMeta, write_adapter

    def pairs(sentences: list[str]) -> list[tuple[str, str]]:
        out = []
        for s in sentences:
            w = s.split()
            out.append((" ".join(w[:2]), " " + " ".join(w[2:])))
        return out

    ref = base_model.describe(base)
    model, tok = base_model.load(ref)
    cfg = ft.FinetuneConfig(
        rank=8, alpha=16, dropout=0.0, lr=3e-3, batch_size=8, accumulation=1,
        max_steps=steps, loss_on="all", seed=seed, threads=1,
    )  # fmt: skip
    train = ft.tokenize(tok, pairs(corpus(domain, 200, seed=0)), cfg)
    held = ft.tokenize(tok, pairs(corpus(domain, 40, seed=7)), cfg)
    before = ft.mean_loss(model, held)
    result = ft.finetune(model, train, cfg, out / f"work-{domain}")
    after = ft.mean_loss(result.model, held)
    path = write_adapter(
        out / f"lora-{domain}.gguf",
        result.pairs,
        AdapterMeta(ref.architecture, cfg.alpha, name=f"tiny-{domain}", cluster=domain),
        n_head=ref.n_head,
        n_head_kv=ref.n_head_kv,
    )
    return path, before, after


@pytest.fixture(scope="session")
def tiny_finetune() -> object:
    """``finetune_tiny`` for tests that train adapters of their own."""
    return finetune_tiny


@pytest.fixture(scope="session")
def tiny_adapters(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> TinyAdapters:
    out = tmp_path_factory.mktemp("adapters")
    base = tiny_models["animals"]
    adapters = {d: finetune_tiny(base, d, out)[0] for d in ("cooking", "code")}
    return TinyAdapters(base, adapters)


class StatusWatcher:
    """Follows every agent's retained status through a fleet view."""

    def __init__(self, cfg: BrokerConfig) -> None:
        self.conn = Connection(cfg, f"watch-{os.getpid()}-{id(self)}")
        self.view = FleetView(self.conn, ("status",))
        self.conn.start()

    def wait_for(self, agent_id: str, state: str, timeout: float) -> float:
        """Seconds it took to see ``state``; fails the test after ``timeout``."""
        t0 = time.monotonic()

        def seen(s: FleetState) -> bool:
            st = s.status.get(agent_id)
            return st is not None and st.state == state

        if not self.view.wait(seen, timeout):
            now = self.view.copy().status.get(agent_id)
            raise AssertionError(f"agent {agent_id} not {state} within {timeout} s (is {now})")
        return time.monotonic() - t0

    def close(self) -> None:
        self.conn.stop()


@pytest.fixture
def status_watcher(broker_config: BrokerConfig) -> Iterator[StatusWatcher]:
    w = StatusWatcher(broker_config)
    yield w
    w.close()


@dataclass
class AgentProcess:
    agent_id: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_agent(broker_config: BrokerConfig, tmp_path: Path) -> Iterator[object]:
    """``start_agent(model_path, agent_id, *extra_flags)`` -> a running AgentProcess; every
    agent is stopped when the test ends."""
    from moe2.controller.localfleet import LocalFleet

    with LocalFleet(broker_config, tmp_path / "agents") as fleet:

        def _start(model: Path, agent_id: str, *extra: str, timeout: float = 60.0) -> AgentProcess:
            proc = fleet.start(
                agent_id,
                model,
                "--broker-keepalive",
                str(broker_config.keepalive),
                "--n-threads",
                "1",
                *extra,
            )
            try:
                fleet.wait_online([agent_id], timeout)
            except Moe2Error as exc:
                raise AssertionError(
                    f"agent did not come online ({exc.message}); its log:\n"
                    f"{fleet.log_tail(agent_id, 4000)}"
                ) from None
            return AgentProcess(agent_id, proc, fleet.workdir / f"{agent_id}.log")

        yield _start


def dump(obj: object) -> str:
    return json.dumps(obj, indent=1, default=str)


@pytest.fixture(scope="session")
def secured_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The broker the ``moe2_broker`` role installs (passwords, ACL, TLS, size limit), run on
    loopback (``tests/securebroker.py``); skipped where ansible or root is missing."""
    import securebroker

    try:
        with securebroker.running(tmp_path_factory.mktemp("secured")) as sb:
            yield sb
    except securebroker.Unavailable as exc:
        pytest.skip(str(exc))
