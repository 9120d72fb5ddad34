"""Self-profiling in a real ``moe2-agent`` process behind a real mosquitto: the profile taken
at start and on request is published retained and read back, names the meter that produced
it, and a failure costs an error reply, never the agent."""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from moe2.agent.meters import RaplMeter
from moe2.agent.profiler import fit_points
from moe2.controller.cli import main as moe2ctl
from moe2.shared import protocol as p
from moe2.shared.devices import detect_device_class
from moe2.shared.errors import BadMessage, ConfigError
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import BrokerConfig, Connection, RpcClient
from moe2.shared.protocol.profiles import ProfilePoint


def expected_meter() -> str:
    # cpu-generic lists [rapl, modelled]: RAPL where its counters are readable, else modelled.
    return "rapl" if RaplMeter().available() else "modelled"


class ProfileWatcher:
    """Every profile published on one agent's topic, retained or live."""

    def __init__(self, cfg: BrokerConfig, agent_id: str) -> None:
        self.profiles: list[p.AgentProfile] = []
        self._cond = threading.Condition()
        self.conn = Connection(cfg, f"profiles-{uuid.uuid4().hex[:8]}")
        self.conn.subscribe(p.topics.agent_profile(agent_id), self._on)
        self.conn.start()

    def _on(self, msg: Any) -> None:
        prof = p.decode_message(p.AgentProfile, msg.payload)
        with self._cond:
            self.profiles.append(prof)
            self._cond.notify_all()

    def wait(self, count: int = 1, timeout: float = 30.0) -> p.AgentProfile:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.profiles) >= count, timeout):
                raise AssertionError(f"{count} profile(s) not published within {timeout} s")
            return self.profiles[-1]

    def close(self) -> None:
        self.conn.stop()


@pytest.fixture
def rpc(broker_config: BrokerConfig) -> Any:
    with RpcClient(broker_config, timeout=60) as client:
        yield client


def _broker_flags(cfg: BrokerConfig) -> list[str]:
    return ["--broker-host", cfg.host, "--broker-port", str(cfg.port)]


def _retained_profile(cfg: BrokerConfig, agent_id: str) -> p.AgentProfile | None:
    return FleetView.snapshot(cfg, ("profile",), wait_s=3.0).profile.get(agent_id)


def _check_measured_profile(prof: p.AgentProfile, agent_id: str) -> None:
    assert prof.agent_id == agent_id
    assert prof.device_class == "cpu-generic" and prof.power_mode == "default"
    assert prof.meter_source == expected_meter()
    assert prof.energy_measured == (prof.meter_source != "modelled")
    assert prof.delay_measured and prof.duration_s > 0
    for point in prof.points:
        assert all(s > 0 for s in point.prompt_seconds + point.token_seconds)
        assert all(j > 0 for j in point.prompt_joules + point.token_joules)
    # a longer prompt costs more: the fitted prompt curve rises
    assert prof.curves.prompt_seconds.coef[1] > 0


def test_startup_profile_is_published_retained_and_shown_by_moe2ctl(
    start_agent: Any, tiny_models: dict[str, Path], broker_config: BrokerConfig
) -> None:
    try:
        detected = detect_device_class().device_class
    except ConfigError as exc:  # e.g. a GPU that no firmware-configs file describes
        pytest.skip(f"device class detection fails here: {exc.message}")
    if detected != "cpu-generic":
        pytest.skip(f"this box is a {detected}; the expected meters here are cpu-generic's")
    agent_id = f"prof-{uuid.uuid4().hex[:6]}"
    watcher = ProfileWatcher(broker_config, agent_id)
    try:
        agent = start_agent(tiny_models["animals"], agent_id, "--device-class", "auto")
        live = watcher.wait(timeout=30)
        _check_measured_profile(live, agent_id)
        assert len(live.points) == 4 and all(pt.repeats == 1 for pt in live.points)  # defaults
        assert live.points[-1].prompt_tokens == int(0.5 * live.n_ctx)
        assert "start-up profile: 4 prompt lengths" in agent.log()

        # read back by a later subscriber: retained, and what moe2ctl shows
        broker = _broker_flags(broker_config)
        out = CliRunner().invoke(moe2ctl, ["profile", agent_id, "--at", "64", "--json", *broker])
        assert out.exit_code == 0, out.output
        (summary,) = json.loads(out.output)
        assert p.AgentProfile.model_validate(summary["profile"]) == live
        assert summary["at"][0]["prompt_seconds"] == pytest.approx(
            live.curves.prompt_seconds.at(64)
        )
        out = CliRunner().invoke(moe2ctl, ["agents", "--json", *broker])
        assert out.exit_code == 0, out.output
        (row,) = [r for r in json.loads(out.output) if r["agent_id"] == agent_id]
        assert row["meter_source"] == expected_meter() and row["device_class"] == "cpu-generic"

        # moe2ctl profile --refresh: the agent profiles itself now and publishes the new one
        refresh = ["--refresh", "--points", "2", "--max-prompt-fraction", "0.9"]
        out = CliRunner().invoke(moe2ctl, ["profile", agent_id, *refresh, "--json", *broker])
        assert out.exit_code == 0, out.output
        (summary,) = json.loads(out.output)
        fresh = p.AgentProfile.model_validate(summary["profile"])
        assert [pt.prompt_tokens for pt in fresh.points] == [16, int(0.9 * fresh.n_ctx)]
        assert fresh.profiled_at > live.profiled_at
        assert watcher.wait(count=2, timeout=10) == fresh
    finally:
        watcher.close()


def test_profile_on_request_runs_alone_and_replaces_the_retained_one(
    start_agent: Any, tiny_models: dict[str, Path], broker_config: BrokerConfig, rpc: RpcClient
) -> None:
    agent = start_agent(
        tiny_models["code"], f"prof-{uuid.uuid4().hex[:6]}", "--no-profile-on-start"
    )
    aid = agent.agent_id
    assert _retained_profile(broker_config, aid) is None

    asked = rpc.call_async(aid, p.ProfileRequest(prompt_lengths=[8, 40, 120], repeats=2))
    # served between two measurements (never beside one), not after the whole profile
    ping = rpc.call_async(aid, p.PingRequest())
    assert rpc.wait(ping).agent_id == aid
    reply = rpc.wait(asked)
    assert isinstance(reply, p.ProfileReply) and reply.published
    prof = reply.profile
    _check_measured_profile(prof, aid)
    assert [pt.prompt_tokens for pt in prof.points] == [8, 40, 120]
    assert all(pt.repeats == 2 and pt.decode_tokens >= 8 for pt in prof.points)
    assert _retained_profile(broker_config, aid) == prof

    # publish=false measures without replacing the retained profile
    quiet = rpc.call(aid, p.ProfileRequest(points=2, decode_tokens=2, publish=False))
    assert not quiet.published and len(quiet.profile.points) == 2
    assert _retained_profile(broker_config, aid) == prof


def test_bad_profile_requests_get_error_replies(
    start_agent: Any, tiny_models: dict[str, Path], rpc: RpcClient
) -> None:
    agent = start_agent(
        tiny_models["code"], f"prof-{uuid.uuid4().hex[:6]}", "--no-profile-on-start"
    )
    aid = agent.agent_id
    # refused by the protocol: out of bounds, not distinct
    for raw in (
        {"v": 1, "op": "profile", "repeats": 0},
        {"v": 1, "op": "profile", "prompt_lengths": [16, 16]},
        {"v": 1, "op": "profile", "decode_tokens": 100_000},
        {"v": 1, "op": "profile", "max_prompt_fraction": 0},
    ):
        with pytest.raises(BadMessage):
            rpc.wait(rpc.send_raw(aid, json.dumps(raw).encode()))
    # refused by the agent: no room in its context for such a prompt
    with pytest.raises(BadMessage, match="context"):
        rpc.call(aid, p.ProfileRequest(prompt_lengths=[16, 1_000_000]))
    assert rpc.call(aid, p.PingRequest()).agent_id == aid


@pytest.mark.skipif(shutil.which("tegrastats") is not None, reason="tegrastats exists here")
def test_an_unavailable_meter_gives_no_profile_and_the_agent_keeps_serving(
    start_agent: Any, tiny_models: dict[str, Path], broker_config: BrokerConfig, rpc: RpcClient
) -> None:
    agent = start_agent(
        tiny_models["code"], f"prof-{uuid.uuid4().hex[:6]}", "--profile-meter", "tegrastats"
    )
    aid = agent.agent_id
    with pytest.raises(ConfigError) as err:  # the agent's error, mapped onto the error tree
        rpc.call(aid, p.ProfileRequest(points=2, decode_tokens=2))
    assert err.value.code == "config" and "tegrastats" in err.value.message
    assert "start-up profile failed (config)" in agent.log()
    # never a profile labelled with a meter that did not measure it, nor a silent fallback
    assert _retained_profile(broker_config, aid) is None
    opened = rpc.call(aid, p.OpenRequest(prompt="the cat", top_k=2))
    assert opened.n_tokens > 0


def _points(costs: dict[int, float]) -> list[ProfilePoint]:
    return [
        ProfilePoint(
            prompt_tokens=n,
            decode_tokens=8,
            prompt_seconds=[s],
            token_seconds=[0.02 + 1e-5 * n],
            prompt_joules=[95 * s],
            token_joules=[95 * (0.02 + 1e-5 * n)],
        )
        for n, s in costs.items()
    ]


def test_fitted_prompt_curves_hold_at_short_prompts_and_bend_only_when_measured() -> None:
    lengths = [16, 52, 172, 563, 1843]
    # What SmolLM2-135M showed on one CPU thread here: attention makes long prompts dearer
    # per token (0.1 s + 10 ms/token + 4.5 us/token^2). An unweighted line through these
    # dips below zero at 16 tokens; the fit is relative and takes the quadratic term.
    bent = fit_points(_points({n: 0.1 + 0.01 * n + 4.5e-6 * n * n for n in lengths}))
    assert bent.prompt_seconds.coef == pytest.approx([0.1, 0.01, 4.5e-6], rel=1e-6)
    assert bent.prompt_joules.coef == pytest.approx([9.5, 0.95, 95 * 4.5e-6], rel=1e-6)
    assert len(bent.token_seconds.coef) == 2  # per-token costs stay lines
    # a straight line stays a line, and relative weighting leaves exact data exact
    line = fit_points(_points({n: 0.1 + 0.01 * n for n in lengths}))
    assert line.prompt_seconds.coef == pytest.approx([0.1, 0.01], rel=1e-9)
    # noise around a line is not mistaken for a bend: the quadratic must halve the misfit
    noisy = {n: (0.1 + 0.01 * n) * f for n, f in zip(lengths, [1.1, 0.9, 1.1, 0.9, 1.1])}
    assert len(fit_points(_points(noisy)).prompt_seconds.coef) == 2


def test_a_long_profile_does_not_hold_requests_back(
    start_agent: Any, broker_config: BrokerConfig, tiny_models: dict[str, Path]
) -> None:
    """Defect 7: an agent profiling itself (here ~10 s of measurements) serves the requests
    that arrive meanwhile between two measurements, so each waits one measurement at most.
    Before, a profile held the model for its whole duration while the agent showed online."""
    agent = start_agent(tiny_models["animals"], f"prof-{uuid.uuid4().hex[:6]}")
    aid = agent.agent_id
    with RpcClient(broker_config, timeout=120) as rpc:
        big = p.ProfileRequest(
            prompt_lengths=[16, 400, 800, 1200, 1600],
            repeats=20,
            decode_tokens=64,
            publish=False,
        )
        profiling = rpc.call_async(aid, big)
        time.sleep(0.5)
        waits = []
        session = rpc.call(aid, p.OpenRequest(tokens=[1, 5], top_k=3)).session
        while not profiling.done():
            t0 = time.monotonic()
            rpc.call(aid, p.StepRequest(session=session, tokens=[5], top_k=3), timeout=60)
            waits.append(time.monotonic() - t0)
            time.sleep(0.2)
        profile = rpc.wait(profiling).profile
    assert profile.duration_s > 4, profile.duration_s  # long enough to mean something
    assert len(waits) >= 5, waits
    assert max(waits) < 1.5, f"a request waited {max(waits):.1f} s during the profile"
