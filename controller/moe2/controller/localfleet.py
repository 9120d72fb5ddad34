"""A fleet on one machine: agent processes started from here, for the demo and for trying
moe2 out without any edge boxes. Each agent is a real ``moe2-agent`` process, in a process
group of its own, that dies with this process even when it is killed with SIGKILL
(``moe2.shared.children``: start the fleet from a thread that lives as long as it should).

    with LocalFleet(broker_cfg, workdir) as fleet:
        fleet.start("code-1", Path("tiny-code.gguf"))
        fleet.wait_online(["code-1"], timeout=60)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from moe2.shared import protocol as p
from moe2.shared.children import child_options
from moe2.shared.errors import Moe2Error
from moe2.shared.fleet import FleetState, FleetView
from moe2.shared.mqtt import BrokerConfig, Connection


class LocalFleet:
    def __init__(self, broker: BrokerConfig, workdir: Path) -> None:
        self.broker = broker
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.gateways: set[str] = set()  # agents started as gateways
        self._conn = Connection(broker, f"localfleet-{os.getpid()}-{id(self)}")
        self.view = FleetView(self._conn, ("info", "status", "gateway"))

    def __enter__(self) -> LocalFleet:
        self._conn.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
        self._conn.stop()

    def start(
        self, agent_id: str, model: Path, *flags: str, broker: BrokerConfig | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``moe2-agent``; ``broker``: its own login and TLS settings (default: the
        fleet's broker as is). The password travels in the environment, not the command line."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        login = broker or self.broker
        env = dict(os.environ)
        extra: list[str] = []
        if login.username:
            extra += ["--broker-username", login.username]
        if login.password:
            env["MOE2_AGENT_BROKER__PASSWORD"] = login.password
        if login.tls_ca:
            extra += ["--broker-tls-ca", login.tls_ca]
        cmd = [
            sys.executable,
            "-m",
            "moe2.agent",
            "--model",
            str(model),
            "--id",
            agent_id,
            "--broker-host",
            self.broker.host,
            "--broker-port",
            str(self.broker.port),
            *extra,
            *flags,
        ]
        with (self.workdir / f"{agent_id}.log").open("ab") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, **child_options()
            )
        self.procs[agent_id] = proc
        if "--serve-app" in flags or "--gateway-enabled" in flags:
            self.gateways.add(agent_id)
        return proc

    @property
    def info(self) -> dict[str, p.AgentInfo]:
        """Every agent the broker announces as online, by id."""
        return self.view.online_agents()

    def wait_online(self, agent_ids: Iterable[str], timeout: float) -> None:
        """Wait until the agents are online (and, for gateways, serving); fails fast when
        one of our processes exits."""
        ids = list(agent_ids)

        def ready(state: FleetState) -> bool:
            dead = [a for a in ids if a in self.procs and self.procs[a].poll() is not None]
            if dead:
                raise Moe2Error(f"agent {dead[0]} exited: {self.log_tail(dead[0])}")
            gateways = [a for a in ids if a in self.gateways]
            return all(state.online(a) is not None for a in ids) and all(
                (g := state.gateway.get(a)) is not None and g.state == "online" for a in gateways
            )

        if not self.view.wait(ready, timeout):
            missing = [a for a in ids if self.view.online(a) is None]
            raise Moe2Error(f"agents {missing} not online within {timeout:.0f} s")

    def log_tail(self, agent_id: str, n: int = 1500) -> str:
        path = self.workdir / f"{agent_id}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def stop(self, agent_id: str, timeout: float = 10.0) -> None:
        """SIGTERM (the agent drains what is in flight), then SIGKILL after ``timeout``."""
        proc = self.procs.pop(agent_id, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self, agent_id: str, sig: int = signal.SIGKILL) -> None:
        """Kill an agent as a crash or a power cut would (no goodbye: its last will says
        offline), and forget its process."""
        proc = self.procs.pop(agent_id)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        proc.wait(10)

    def stop_all(self) -> None:
        for agent_id in list(self.procs):
            self.stop(agent_id)
