"""No collapse under overload, on a real moe2-agent process: work carries its deadline, and
nothing is computed for nobody. An expired request is never started; one in progress stops at
its next tick; new work that cannot finish in time gets ``busy`` at once with a retry-after
hint; the work and sessions of a requester that died are dropped and freed within seconds (a
gateway SIGKILLed mid-answer too); a request sent again while the first copy runs is answered
once. The agent's metrics say what was dropped and why."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prompting import PromptInbox
from test_metrics import scrape, total

from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.broker import free_port, start_broker
from moe2.shared.errors import Busy, Cancelled, Moe2Error, RequestTimeout
from moe2.shared.mqtt import BrokerConfig, RpcClient


def long_sample(n: int) -> p.ScoreSample:
    """A sample of a long score_many: 500 tokens, a prompt of its own (samples that share a
    prompt evaluate it once)."""
    return p.ScoreSample(
        prompt_tokens=[1, 200 + n % 256] + [100 + i % 50 for i in range(496)],
        target_tokens=[5, 6],
    )


def long_work(samples: int) -> p.ScoreManyRequest:
    """A few seconds of model time in all."""
    return p.ScoreManyRequest(samples=[long_sample(n) for n in range(samples)])


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.1)


@pytest.fixture
def agent(start_agent: Any, tiny_models: dict[str, Path]) -> tuple[str, int]:
    """A tiny expert with its metrics on a port: (agent id, port). Sessions would idle for
    300 s: anything freed sooner was freed on purpose."""
    port = free_port()
    agent_id = f"load-{uuid.uuid4().hex[:6]}"
    start_agent(
        tiny_models["animals"],
        agent_id,
        "--no-profile-on-start",
        "--metrics-port",
        str(port),
        "--max-sessions",
        "3",
        "--session-idle-s",
        "300",
    )
    return agent_id, port


def dropped(port: int, reason: str, op: str | None = None) -> float:
    labels = {"reason": reason} | ({"op": op} if op else {})
    return total(scrape(port), "moe2_agent_dropped_requests_total", **labels)


def test_an_expired_request_is_never_started(
    agent: tuple[str, int], broker_config: BrokerConfig
) -> None:
    """While a profile holds the model thread for one measurement at a time, requests whose
    deadline passes meanwhile are dropped before they start: counted as 'expired' (no model
    time: the scheduler drops them before their task exists) and answered with a timeout."""
    agent_id, port = agent
    with RpcClient(broker_config, timeout=120) as rpc:
        profile = rpc.call_async(
            agent_id,
            p.ProfileRequest(prompt_lengths=[16, 400], repeats=4, decode_tokens=256, publish=False),
        )
        quick: list[Any] = []
        while not profile.done():
            quick.append(
                rpc.call_async(
                    agent_id, p.ScoreRequest(prompt="the fox", target=" eats"), timeout=0.03
                )
            )
            time.sleep(0.02)
        rpc.wait(profile)
        outcomes = []
        for fut in quick:
            try:
                outcomes.append(fut.result(timeout=10))
            except (RequestTimeout, Busy) as exc:
                outcomes.append(exc)
    expired = dropped(port, "expired", "score")
    assert expired >= 1, outcomes
    assert sum(isinstance(o, RequestTimeout) for o in outcomes) >= expired
    # Every request was answered once: a score, or a timeout (never started, or finished
    # after its 30 ms).
    assert total(scrape(port), "moe2_agent_requests_total", op="score") == len(quick)


def test_work_past_its_deadline_stops_at_the_next_tick(
    agent: tuple[str, int], broker_config: BrokerConfig
) -> None:
    agent_id, port = agent
    with RpcClient(broker_config, timeout=30) as rpc:
        fut = rpc.call_async(agent_id, long_work(64), timeout=0.3)
        with pytest.raises(RequestTimeout):
            fut.result(timeout=30)  # the agent's own answer: it stopped the work
    assert dropped(port, "expired_running", "score_many") == 1
    # Nothing more is computed for it: the model time stands still afterwards.
    first = total(scrape(port), "moe2_agent_compute_seconds_total")
    time.sleep(1.0)
    assert total(scrape(port), "moe2_agent_compute_seconds_total") == first
    assert total(scrape(port), "moe2_agent_wasted_compute_seconds_total") > 0


def test_backpressure_busy_with_a_retry_after_hint_and_a_gone_requesters_work_dropped(
    agent: tuple[str, int], broker_config: BrokerConfig
) -> None:
    """New work the queued work would not let finish by its deadline is refused at once;
    the queued work of a requester that closes is dropped, not computed for nobody."""
    agent_id, port = agent
    with RpcClient(broker_config, timeout=120) as first:
        # 16 requests of ~24,000 tokens queued: far more than 3 s of work on this CPU, and
        # more than the 6 s an agent waits before it believes a requester is gone.
        running = [first.call_async(agent_id, long_work(48)) for _ in range(16)]
        wait_until(
            lambda: total(scrape(port), "moe2_agent_compute_seconds_total") > 0,
            30,
            "the long requests run",
        )
        with RpcClient(broker_config, timeout=3.0) as second:
            # One more such request, due in 3 s: alone it would fit, behind the others not.
            asked = time.monotonic()
            with pytest.raises(Busy) as refused:
                second.call(agent_id, long_work(16))
            assert time.monotonic() - asked < 3.0  # at once, not at the deadline
            assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 3
            # Small work is not held up by the big ones: it is answered.
            assert second.call(agent_id, p.ScoreRequest(prompt="the fox", target=" eats"))
        assert not any(f.done() for f in running)
    # The first requester closed: its work is dropped at the next tick.
    wait_until(lambda: dropped(port, "requester_gone") >= 1, 15, "the gone requester's work")
    assert dropped(port, "busy", "score_many") == 1


def test_a_dead_requesters_sessions_are_freed_within_seconds(
    agent: tuple[str, int], broker_config: BrokerConfig
) -> None:
    """A requester killed with SIGKILL holds every session of the agent; its last will
    frees them within seconds, not after the 300 s idle time."""
    agent_id, _port = agent
    script = (
        "import sys, time\n"
        "from moe2.shared import protocol as p\n"
        "from moe2.shared.mqtt import BrokerConfig, RpcClient\n"
        f"rpc = RpcClient(BrokerConfig(host={broker_config.host!r}, port={broker_config.port}, "
        "keepalive=2), timeout=30).start()\n"
        f"for _ in range(3): rpc.call({agent_id!r}, p.OpenRequest(prompt='the fox'))\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with RpcClient(broker_config, timeout=10) as rpc:
            assert rpc.call(agent_id, p.PingRequest()).active_sessions == 3
            with pytest.raises(Busy):
                rpc.call(agent_id, p.OpenRequest(prompt="the cat"))
            holder.kill()
            holder.wait(10)
            wait_until(
                lambda: rpc.call(agent_id, p.PingRequest()).active_sessions == 0,
                15,
                "the dead requester's sessions freed",
            )
            opened = [rpc.call(agent_id, p.OpenRequest(prompt="the cat")) for _ in range(3)]
            assert len({o.session for o in opened}) == 3
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_a_killed_gateways_sessions_on_its_experts_are_freed_within_seconds(
    start_agent: Any, tiny_models: dict[str, Path], broker_config: BrokerConfig
) -> None:
    """A gateway frozen mid-answer (its sessions on the expert held, no step, no close), then
    SIGKILLed: the expert frees those sessions within seconds of the gateway's last will, not
    after its idle time (300 s here)."""
    expert = start_agent(
        tiny_models["animals"],
        f"e-{uuid.uuid4().hex[:6]}",
        "--no-profile-on-start",
        "--max-sessions",
        "2",
        "--session-idle-s",
        "300",
    ).agent_id
    app = f"zoo-{uuid.uuid4().hex[:6]}"
    gateway = start_agent(
        tiny_models["code"],
        f"gw-{uuid.uuid4().hex[:6]}",
        "--no-profile-on-start",
        "--serve-app",
        f"{app}={expert}:1",
    )
    with RpcClient(broker_config, timeout=10) as rpc, PromptInbox(broker_config) as inbox:

        def sessions() -> int:
            return rpc.call(expert, p.PingRequest()).active_sessions

        held = 0
        for _ in range(20):  # until the gateway is caught holding sessions
            inbox.send(app, 4, max_tokens=400, temperature=1.0)
            end = time.monotonic() + 10
            while time.monotonic() < end and sessions() == 0:
                time.sleep(0.02)
            os.kill(gateway.proc.pid, signal.SIGSTOP)
            held = sessions()
            if held:
                break
            os.kill(gateway.proc.pid, signal.SIGCONT)
        assert held >= 1
        gateway.proc.kill()
        gateway.proc.wait(10)
        wait_until(lambda: sessions() == 0, 15, "the dead gateway's sessions freed")


def test_sessions_a_requester_lost_track_of_in_a_broker_restart_are_freed_within_seconds(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """A broker restart: the requester reconnects and goes on with the session it uses; the
    one it lost track of (an open whose reply the restart lost, a close that never came) is
    freed 10 s after the reconnection, not after the expert's idle time (300 s here)."""
    with start_broker("mosquitto") as own:
        cfg = BrokerConfig(host=own.host, port=own.port, keepalive=2)
        expert = f"e-{uuid.uuid4().hex[:6]}"
        with LocalFleet(cfg, tmp_path / "fleet") as fleet:
            fleet.start(expert, tiny_models["animals"], "--n-threads", "1",
                        "--no-profile-on-start", "--broker-keepalive", "2",
                        "--max-sessions", "2", "--session-idle-s", "300")  # fmt: skip
            fleet.wait_online([expert], 60)
            with RpcClient(cfg, timeout=5) as rpc:
                kept = rpc.call(expert, p.OpenRequest(prompt="the fox"))
                rpc.call(expert, p.OpenRequest(prompt="the cat"))  # never used again
                own.restart()

                def ping() -> int:
                    try:
                        return rpc.call(expert, p.PingRequest()).active_sessions
                    except Moe2Error:  # the broker or the expert is still coming back
                        return -1

                wait_until(lambda: ping() == 2, 30, "the expert back, holding both sessions")
                end = time.monotonic() + 30
                while ping() != 1:  # the requester keeps using one of them meanwhile
                    assert time.monotonic() < end, "the lost session was not freed"
                    step = p.StepRequest(session=kept.session, tokens=[5], rewind_to=kept.n_tokens)
                    assert rpc.call(expert, step).n_tokens == kept.n_tokens + 1
                    time.sleep(1.0)
                step = p.StepRequest(session=kept.session, tokens=[5], rewind_to=kept.n_tokens)
                assert rpc.call(expert, step).n_tokens == kept.n_tokens + 1


def test_a_request_sent_again_while_it_runs_is_answered_once(
    agent: tuple[str, int], broker_config: BrokerConfig
) -> None:
    agent_id, port = agent
    with RpcClient(broker_config, timeout=60) as rpc:
        fut = rpc.call_async(agent_id, long_work(32))
        wait_until(
            lambda: total(scrape(port), "moe2_agent_compute_seconds_total") > 0, 30, "it runs"
        )
        assert rpc.resend(agent_id) == 1  # as after a reconnection
        reply = rpc.wait(fut)
    assert len(reply.results) == 32
    assert dropped(port, "duplicate", "score_many") == 1
    assert total(scrape(port), "moe2_agent_requests_total", op="score_many") == 1


def test_a_stopping_agent_takes_no_new_work(
    start_agent: Any, tiny_models: dict[str, Path], broker_config: BrokerConfig
) -> None:
    """SIGTERM: work accepted before is finished; new work is refused at once
    ('cancelled': ask another expert), so nothing is computed after the agent leaves."""
    agent_id, port = f"stop-{uuid.uuid4().hex[:6]}", free_port()
    proc = start_agent(
        tiny_models["animals"], agent_id, "--no-profile-on-start", "--metrics-port", str(port)
    ).proc
    with RpcClient(broker_config, timeout=60) as rpc:
        accepted = rpc.call_async(agent_id, long_work(64))
        wait_until(
            lambda: total(scrape(port), "moe2_agent_compute_seconds_total") > 0, 30, "it runs"
        )
        proc.terminate()

        def refused() -> bool:  # once the agent has seen the signal
            try:
                rpc.call(agent_id, long_work(1))
            except Cancelled:
                return True
            return False

        wait_until(refused, 10, "new work refused")
        assert len(rpc.wait(accepted).results) == 64
    assert proc.wait(30) == 0
