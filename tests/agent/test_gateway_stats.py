"""Gateways report what each application's answers really cost (windowed, retained): eq. 8's
delay measured (the gate's part once), the energy by the one cost function on the tokens the
experts evaluated, failed answers apart."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from moe2.agent.gateway.stats import AppStatsWindow, Energy, answer_energy
from moe2.controller.localfleet import LocalFleet
from moe2.shared.answercost import GENERATED, Work, answer_cost, measured_delay_per_step
from moe2.shared.client import PromptClient
from moe2.shared.fleet import FleetState, FleetView
from moe2.shared.mqtt import BrokerConfig


def test_the_window_forgets_old_answers() -> None:
    now = [100.0]
    w = AppStatsWindow("gw", window_s=10, clock=lambda: now[0])
    w.answered("qa", latency_s=1.0, gate_s=0.2, steps=10, energy=Energy(20.0, True))
    w.errored("qa")  # counted, in no figure
    fig = w.report().apps["qa"]
    assert (fig.answers, fig.errors, fig.steps) == (1, 1, 10)
    # eq. 8: the gate once, not once per step
    assert fig.delay_s_per_step == (1.0 - 0.2) / 10 + 0.2 and fig.gate_s == 0.2
    assert fig.energy_j_per_step == 2.0 and fig.energy_j_per_prompt == 20.0
    assert fig.energy_measured
    now[0] += 11
    assert w.report().apps == {}


def test_a_gateway_publishes_each_apps_measured_delay(
    broker_config: BrokerConfig, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    a, gw, app = f"a-{tag}", f"gw-{tag}", f"qa-{tag}"
    with LocalFleet(broker_config, tmp_path / "fleet") as fleet:
        fleet.start(a, tiny_models["animals"], "--n-threads", "1")
        fleet.start(
            gw,
            tiny_models["code"],
            "--n-threads",
            "1",
            "--no-profile-on-start",
            "--serve-app",
            f"{app}={a}:1",
            "--gateway-stats-interval-s",
            "0.3",
        )
        fleet.wait_online([a, gw], 60)
        # An answer's energy comes from its expert's profile: unknown (None, rightly) until
        # the start-up profile is in. Wait for it (CI once asked before it was).
        deadline = time.monotonic() + 60
        while a not in FleetView.snapshot(broker_config, ("profile",), 2).profile:
            assert time.monotonic() < deadline, "no start-up profile"
            time.sleep(0.3)
        time.sleep(0.5)  # the gateway's own view has it too
        with PromptClient(broker_config) as client:
            answers = [client.ask(app, "the fox eats", max_tokens=4) for _ in range(5)]

        def reported() -> FleetState | None:
            state = FleetView.snapshot(broker_config, ("stats", "profile"), 5)
            st = state.stats.get(gw)
            done = st is not None and app in st.apps and st.apps[app].answers == 5
            return state if done else None

        deadline = time.monotonic() + 10
        while (state := reported()) is None:
            assert time.monotonic() < deadline, "no figures for the app"
            time.sleep(0.3)
    fig = state.stats[gw].apps[app]
    assert fig.steps == sum(max(1, x.tokens) for x in answers)
    mean = sum(
        measured_delay_per_step(x.latency_ms / 1e3, (x.gate_ms or 0.0) / 1e3, max(1, x.tokens))
        for x in answers
    ) / 5
    assert fig.delay_s_per_step is not None and abs(fig.delay_s_per_step - mean) < 0.01 * mean
    # Energy from the answering expert's profile on its real prompt length: modelled on this
    # VM, so not "measured"; the one cost function's figure.
    prof = state.profile[a]
    assert fig.energy_j_per_step is not None and fig.energy_measured == prof.energy_measured
    e = answer_energy({a: prof}, {a: Work(4)}, 4, GENERATED)
    assert e is not None and e.joules > 0
    want = answer_cost({a: prof.curves}, {a: Work(4)}, steps=4, kind=GENERATED)
    assert e.joules == want.energy_j
