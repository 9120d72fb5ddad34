"""moe2ctl serve against a real fleet of tiny experts on a broker of its own: it re-optimises
and pushes when experts die, come back or join, when a profile slows down, keeps one
controller acting, and resumes after a broker restart."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from moe2.controller import datasets as ds
from moe2.controller.localfleet import LocalFleet
from moe2.controller.registry import Registry
from moe2.controller.registry.schema import Decision
from moe2.controller.serve.policy import ServePolicy
from moe2.controller.serve.reconcile import Reconciler
from moe2.shared import protocol as p
from moe2.shared.broker import MosquittoBroker
from moe2.shared.client import PromptClient
from moe2.shared.mqtt import BrokerConfig, Connection

APP = "animals"  # the dataset's samples carry their domain as their application


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@dataclass
class Setup:
    broker: MosquittoBroker
    cfg: BrokerConfig
    fleet: LocalFleet
    url: str
    experts: dict[str, str] = field(default_factory=dict)  # domain -> agent id
    gateway: str = ""

    def start_expert(self, domain: str, model: Path, agent_id: str | None = None) -> str:
        agent_id = agent_id or uid(domain[:3])
        self.fleet.start(agent_id, model, "--n-threads", "1", "--broker-keepalive", "1")
        self.experts[domain] = agent_id
        return agent_id


@pytest.fixture
def setup(tiny_models: dict[str, Path], tmp_path: Path) -> Iterator[Setup]:
    broker = MosquittoBroker()
    broker.start()
    cfg = BrokerConfig(host=broker.host, port=broker.port, keepalive=1)
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    reg = Registry.open(url)
    samples = ds.tiny_domains(["animals", "cooking", "code"], 4, seed=3, choices=2)
    reg.add_dataset("serve", "multiple-choice", "tiny", samples)
    reg.close()
    with LocalFleet(cfg, tmp_path / "fleet") as fleet:
        s = Setup(broker, cfg, fleet, url)
        s.gateway = uid("gw")
        fleet.start(
            s.gateway,
            tiny_models["code"],
            "--n-threads",
            "1",
            "--broker-keepalive",
            "1",
            "--no-profile-on-start",
            "--gateway-enabled",
            "--gateway-step-timeout-s",
            "1",
            "--gateway-open-timeout-s",
            "3",
        )
        yield s
    broker.close()


def policy(**over: Any) -> ServePolicy:
    base: dict[str, Any] = dict(
        dataset="serve",
        apps={APP: 0.5},
        k=2,
        gate="uniform",
        gate_delay=0.0,
        tick_s=0.2,
        debounce_s=0.5,
        min_interval_s=0.5,
        lease_ttl_s=2.0,
        settle_s=2.0,
        push_wait_s=5.0,
    )
    return ServePolicy(**(base | over))


class Running:
    """A Reconciler on a thread, as `moe2ctl serve` runs it."""

    def __init__(self, s: Setup, holder: str, **over: Any) -> None:
        self.stop = threading.Event()
        self.rec = Reconciler(s.cfg, s.url, policy(**over), holder=holder)
        self.thread = threading.Thread(target=self.rec.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(20)


def wait_decision(
    url: str, test: Callable[[Decision], bool], timeout: float, since: float = 0.0
) -> Decision:
    reg = Registry.open(url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for d in reg.decisions(since=since):
                if test(d):
                    return d
            time.sleep(0.2)
        raise AssertionError(
            "no such decision; decisions so far:\n"
            + "\n".join(
                f"{d.controller} {d.app} {d.action} {d.subset_json} {d.reason}"
                for d in reg.decisions()
            )
        )
    finally:
        reg.close()


def pushed(app: str, test: Callable[[list[str]], bool]) -> Callable[[Decision], bool]:
    return lambda d: (
        d.app == app and d.action == "pushed" and test(json.loads(d.subset_json or "[]"))
    )


class Asker:
    """A client sending prompts to the app throughout, counting what comes back."""

    def __init__(self, cfg: BrokerConfig) -> None:
        self.sent = self.answered = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(cfg,), daemon=True)
        self._thread.start()

    def _run(self, cfg: BrokerConfig) -> None:
        with PromptClient(cfg) as client:
            while not self._stop.is_set():
                self.sent += 1
                try:
                    client.ask(APP, "the fox eats", max_tokens=3, timeout=30)
                    self.answered += 1
                except Exception as exc:
                    self.errors.append(repr(exc))

    def close(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(60)
        return {"sent": self.sent, "answered": self.answered, "errors": self.errors}


def test_a_dead_expert_is_pushed_out_and_back_in_with_no_prompt_lost(
    setup: Setup, tiny_models: dict[str, Path]
) -> None:
    ids = [setup.start_expert(d, tiny_models[d]) for d in ("animals", "cooking", "code")]
    setup.fleet.wait_online([*ids, setup.gateway], 60)
    serve = Running(setup, "serve-a")
    try:
        first = wait_decision(setup.url, pushed(APP, lambda s: len(s) >= 2), 60)
        subset = json.loads(first.subset_json or "[]")
        asker = Asker(setup.cfg)
        time.sleep(1.0)
        victim = subset[0]
        domain = next(d for d, a in setup.experts.items() if a == victim)
        killed = time.time()
        setup.fleet.kill(victim)
        without = wait_decision(setup.url, pushed(APP, lambda s: victim not in s), 30, since=killed)
        detail = json.loads(without.detail_json)
        assert setup.gateway in detail["accepted"], detail
        assert without.at - killed < 15, without.at - killed  # LWT after 1.5 keepalives
        # It comes back: the same agent id, a new process.
        back = time.time()
        setup.start_expert(domain, tiny_models[domain], victim)
        wait_decision(setup.url, pushed(APP, lambda s: victim in s), 60, since=back)
        time.sleep(1.0)
        outcome = asker.close()
        assert outcome["sent"] > 5 and not outcome["errors"], outcome
        assert outcome["answered"] == outcome["sent"], outcome
        assert "offline" in without.reason and victim in without.reason
    finally:
        serve.close()


def test_a_joining_agent_is_scored_and_a_slowed_one_dropped(
    setup: Setup, tiny_models: dict[str, Path]
) -> None:
    a = setup.start_expert("animals", tiny_models["animals"])
    c = setup.start_expert("cooking", tiny_models["cooking"])
    setup.fleet.wait_online([a, c, setup.gateway], 60)
    serve = Running(setup, "serve-b")
    try:
        wait_decision(setup.url, pushed(APP, lambda s: set(s) == {a, c}), 60)
        joined = time.time()
        k = setup.start_expert("code", tiny_models["code"])
        setup.fleet.wait_online([k], 60)
        wait_decision(setup.url, lambda d: d.action == "scored" and k in d.reason, 60, since=joined)
        considered = wait_decision(
            setup.url,
            lambda d: d.app == APP and f"expert {k} is online and eligible" in d.reason,
            60,
            since=joined,
        )
        assert considered.action in ("pushed", "unchanged")
        reg = Registry.open(setup.url)
        assert reg.score_count("serve")[k] == reg.score_count("serve")[a]
        reg.close()
        # The cooking expert's profile says it became 10000x slower (a lower power mode):
        # at 10000x it breaks the 0.5 s/step limit, so it must leave the assignment.
        state = setup.fleet.view.copy()
        slowed_at = time.time()
        with Connection(setup.cfg, uid("pub")) as conn:
            prof = _profile(setup.cfg, c)
            conn.publish_acked(
                p.topics.agent_profile(c), p.encode(_slower(prof, 10000.0)), retain=True
            )
        dropped = wait_decision(
            setup.url, pushed(APP, lambda s: c not in s and len(s) >= 1), 30, since=slowed_at
        )
        assert f"profile of {c}" in dropped.reason
        del state
    finally:
        serve.close()


def test_two_serves_one_acts_and_the_other_takes_over(
    setup: Setup, tiny_models: dict[str, Path]
) -> None:
    a = setup.start_expert("animals", tiny_models["animals"])
    c = setup.start_expert("cooking", tiny_models["cooking"])
    setup.fleet.wait_online([a, c, setup.gateway], 60)
    s1, s2 = Running(setup, "serve-1"), Running(setup, "serve-2")
    try:
        wait_decision(setup.url, pushed(APP, lambda s: len(s) >= 1), 60)
        time.sleep(2.0)
        reg = Registry.open(setup.url)
        actors = {d.controller for d in reg.decisions()}
        assert len(actors) == 1, actors
        (first,) = actors
        holder = reg.lease_holder("serve")
        assert holder is not None and holder[0] == first
        reg.close()
        # The acting one dies without releasing its lease: the other takes over after the
        # lease expires, and acts on the next change.
        crashed = s1 if first == "serve-1" else s2
        other = "serve-2" if first == "serve-1" else "serve-1"
        crashed.rec.holding = False  # so closing does not release: as a crash would
        crashed.close()
        t = time.time()
        setup.fleet.kill(c)
        taken = wait_decision(
            setup.url, lambda d: d.controller == other and d.app == APP, 30, since=t
        )
        assert taken.action in ("pushed", "unchanged")
    finally:
        s1.close()
        s2.close()


def test_serve_resumes_after_a_broker_restart(setup: Setup, tiny_models: dict[str, Path]) -> None:
    a = setup.start_expert("animals", tiny_models["animals"])
    c = setup.start_expert("cooking", tiny_models["cooking"])
    setup.fleet.wait_online([a, c, setup.gateway], 60)
    serve = Running(setup, "serve-r")
    try:
        wait_decision(setup.url, pushed(APP, lambda s: set(s) == {a, c}), 60)
        restarted = time.time()
        setup.broker.stop()
        time.sleep(1.0)
        setup.broker.start()
        setup.fleet.wait_online([a, c, setup.gateway], 60)  # everyone reconnected
        # The broker forgot the retained assignment (no persistence): serve pushes it again
        # once the fleet is back, whoever reconnected first.
        wait_decision(setup.url, pushed(APP, lambda s: set(s) == {a, c}), 60, since=restarted)
        t = time.time()
        setup.fleet.kill(c)
        after = wait_decision(setup.url, pushed(APP, lambda s: c not in s), 40, since=t)
        assert setup.gateway in json.loads(after.detail_json)["accepted"]
    finally:
        serve.close()


def _profile(cfg: BrokerConfig, agent_id: str) -> p.AgentProfile:
    from moe2.shared.fleet import FleetView

    prof = FleetView.snapshot(cfg, ("profile",)).profile.get(agent_id)
    assert prof is not None, f"{agent_id} published no profile"
    return prof


def _slower(prof: p.AgentProfile, factor: float) -> p.AgentProfile:
    def scale(curve: Any) -> Any:
        return curve.model_copy(update={"coef": [c * factor for c in curve.coef]})

    c = prof.curves
    slow = {"prompt_seconds": scale(c.prompt_seconds), "token_seconds": scale(c.token_seconds)}
    if c.score_seconds is not None:  # a multiple-choice answer's options are scored
        slow["score_seconds"] = scale(c.score_seconds)
    curves = c.model_copy(update=slow)
    return prof.model_copy(update={"curves": curves, "profiled_at": time.time()})
