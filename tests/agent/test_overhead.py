"""The time an answer spends outside the models: each agent's own handling of a request
(beyond a ping, which a link's round trip already holds), announced with its profile, and a
gateway's own time per answer, announced in its status; promises add both."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from moe2.agent.config import ProfilerSettings
from moe2.agent.gateway.stats import OwnTime, overhead_moved
from moe2.agent.llama import LlamaCppBackend
from moe2.agent.meters import thread_cpu_seconds
from moe2.agent.overhead import OPS, RequestTimes, moved, probe
from moe2.agent.profiler import SelfProfiler
from moe2.agent.service import AgentService
from moe2.controller.gate.weights import UNIFORM
from moe2.controller.localfleet import LocalFleet
from moe2.controller.optimize.fromregistry import gate_delay_of
from moe2.shared.answercost import GENERATED, SCORED
from moe2.shared.client import PromptClient
from moe2.shared.costmodel import RequestOverhead
from moe2.shared.devices import load_device_class
from moe2.shared.fleet import FleetState, FleetView
from moe2.shared.mqtt import BrokerConfig


def test_request_times_are_beyond_a_ping_and_served_ones_replace_the_probes() -> None:
    times = RequestTimes()
    assert times.figure() is None
    probed = [("ping", 0.001), ("ping", 0.001), ("ping", 0.02), ("open", 0.004)]
    probed += [("step", 0.003), ("step", 0.003), ("step", 0.03)]  # one held up: the median
    times.seed(probed)
    seeded = times.figure()
    assert seeded is not None
    assert seeded.seconds == pytest.approx({"open": 0.003, "step": 0.002})
    # served before any served ping: beyond the probe's ping
    times.served("step", 0.0025)
    # then beyond the pings served (the link probes'), as their round trip holds them
    times.served("ping", 0.0005)
    times.served("step", 0.0025)
    times.served("close", 0.5)  # no part of an answer's cost
    fig = times.figure()
    assert fig is not None and fig.requests == 3  # the open's seed, two steps served
    assert fig.seconds["step"] == pytest.approx((0.0015 + 0.002) / 2)
    assert fig.seconds["open"] == pytest.approx(0.003)
    assert "close" not in fig.seconds
    # announced again only when it moved
    assert moved(None, fig) and not moved(fig, fig) and not moved(fig, None)
    assert seeded.requests == 2  # a probe's figure counts once per operation
    assert not moved(seeded, fig)  # step 0.002 -> 0.00175 (< 15%), on 3 requests (< twice 2)
    assert moved(seeded, fig.model_copy(update={"requests": 4}))  # on twice as many

    faster = RequestOverhead(seconds={**fig.seconds, "step": 0.0012}, requests=4)
    assert moved(fig, faster)
    tiny = RequestOverhead(seconds={**fig.seconds, "open": 0.0035}, requests=4)
    assert not moved(tiny, RequestOverhead(seconds={**tiny.seconds, "open": 0.00351}, requests=7))
    assert moved(fig, RequestOverhead(seconds={"open": 0.003}, requests=1))  # another set


def test_the_probe_runs_every_kind_of_request_through_the_agents_own_path(
    animals_backend: LlamaCppBackend,
) -> None:
    service = AgentService("probe", animals_backend, max_sessions=4)
    samples = probe(service, rounds=2, steps=2)
    kinds = {op for op, _ in samples}
    assert kinds == {*OPS, "ping"}
    assert sum(op == "step" for op, _ in samples) == 4
    assert all(s > 0 for _, s in samples)
    assert len(service.sessions) == 0  # its sessions are closed
    times = RequestTimes()
    times.seed(samples)
    fig = times.figure()
    assert fig is not None and set(fig.seconds) == set(OPS)


def test_the_gateways_own_time_is_a_line_in_t_when_generated_a_mean_when_scored() -> None:
    own = OwnTime()
    assert own.figure() is None
    for t, s in ((4, 0.003), (8, 0.005), (12, 0.007)):
        own.add(GENERATED, steps=t, seconds=s)
    own.add(SCORED, steps=2, seconds=0.002)
    own.add(SCORED, steps=3, seconds=0.004)
    fig = own.figure()
    assert fig is not None and fig.answers == 5
    assert fig.seconds(GENERATED, 10) == pytest.approx(0.006)  # 0.001 + 0.0005 T
    assert fig.seconds(SCORED, 1) == pytest.approx(0.003)  # the mean, whatever T
    assert overhead_moved(None, fig) and not overhead_moved(fig, fig)
    only_gen = OwnTime()
    only_gen.add(GENERATED, steps=4, seconds=0.003)
    assert overhead_moved(only_gen.figure(), fig)  # a kind newly measured
    assert only_gen.figure().seconds(SCORED, 2) == 0.0  # type: ignore[union-attr]


def test_agents_and_gateways_announce_their_own_time_and_promises_take_it(
    broker_config: BrokerConfig, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    a, gw, app = f"a-{tag}", f"gw-{tag}", f"qa-{tag}"
    with LocalFleet(broker_config, tmp_path / "fleet") as fleet:
        fleet.start(a, tiny_models["animals"], "--n-threads", "1", "--profile-points", "2")
        fleet.start(
            gw,
            tiny_models["code"],
            "--n-threads",
            "1",
            "--no-profile-on-start",
            "--serve-app",
            f"{app}={a}:1",
            "--gateway-decoding",
            "per-token",
            "--gateway-stats-interval-s",
            "0.3",
        )
        fleet.wait_online([a, gw], 60)
        deadline = time.monotonic() + 60
        while a not in FleetView.snapshot(broker_config, ("profile",), 2).profile:
            assert time.monotonic() < deadline, "no start-up profile"
            time.sleep(0.3)
        # The start-up profile carries the agent's own time per request (probed: nothing
        # served yet), and, energy being modelled here, the power it charges per model second.
        prof = FleetView.snapshot(broker_config, ("profile",), 2).profile[a]
        overhead = prof.curves.overhead
        assert overhead is not None and set(overhead.seconds) == set(OPS)
        assert all(s >= 0 for s in overhead.seconds.values()) and overhead.requests > 0
        assert (prof.curves.model_watts is not None) == (prof.meter_source == "modelled")

        with PromptClient(broker_config) as client:
            for _ in range(3):
                client.ask(app, "the fox eats", max_tokens=4)
            for _ in range(2):
                client.choose(app, "the fox eats", [" the hen", " grass"])

        def announced() -> FleetState | None:
            state = FleetView.snapshot(broker_config, ("gateway", "gate_ack"), 2)
            own = state.gateway_overhead()
            done = own is not None and own.generated is not None and own.scored is not None
            return state if done and own is not None and own.answers == 5 else None

        deadline = time.monotonic() + 15
        while (state := announced()) is None:
            assert time.monotonic() < deadline, "the gateway did not announce its own time"
            time.sleep(0.3)
    own = state.gateway_overhead()
    assert own is not None and own.seconds(GENERATED, 4) > 0 and own.seconds(SCORED, 2) > 0
    # what the controller promises with: gated or not, the gateway's own time comes along
    delay = gate_delay_of(state, UNIFORM)
    assert delay.own == own


def test_a_modelled_meter_charges_cpu_time_where_the_model_computes_on_the_cpu(
    animals_backend: LlamaCppBackend,
) -> None:
    """A fleet may declare a GPU class for its power figures while its models run on this
    machine's CPU: where the model computes decides what a modelled meter charges."""
    assert animals_backend.offload is None or not animals_backend.offload.on_gpu
    for declared in ("cpu-generic", "rtx4090"):
        device = load_device_class(declared)
        profiler = SelfProfiler(
            animals_backend, device, None, ProfilerSettings(), agent_id="p", meter="modelled"
        )
        assert profiler.model_clock() is thread_cpu_seconds
