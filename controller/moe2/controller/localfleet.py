"""A fleet on one machine: agent processes started from here, for the demo and for trying
moe2 out without any edge boxes. Each agent is a real ``moe2-agent`` process.

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
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moe2.shared import protocol as p
from moe2.shared.errors import Moe2Error
from moe2.shared.mqtt import BrokerConfig, Connection


class LocalFleet:
    def __init__(self, broker: BrokerConfig, workdir: Path) -> None:
        self.broker = broker
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.info: dict[str, p.AgentInfo] = {}
        self.states: dict[str, str] = {}
        self._cond = threading.Condition()
        self._conn = Connection(broker, f"localfleet-{os.getpid()}")
        self._conn.subscribe(p.topics.ALL_AGENT_STATUS, self._on_status)
        self._conn.subscribe(p.topics.ALL_AGENT_INFO, self._on_info)

    def __enter__(self) -> LocalFleet:
        self._conn.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
        self._conn.stop()

    def _on_status(self, msg: Any) -> None:
        with contextlib.suppress(Moe2Error):
            st = p.decode_message(p.AgentStatus, msg.payload)
            with self._cond:
                self.states[st.agent_id] = st.state
                self._cond.notify_all()

    def _on_info(self, msg: Any) -> None:
        with contextlib.suppress(Moe2Error):
            info = p.decode_message(p.AgentInfo, msg.payload)
            with self._cond:
                self.info[info.agent_id] = info
                self._cond.notify_all()

    def start(self, agent_id: str, model: Path, *flags: str) -> subprocess.Popen[bytes]:
        self.workdir.mkdir(parents=True, exist_ok=True)
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
            *flags,
        ]
        with (self.workdir / f"{agent_id}.log").open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.procs[agent_id] = proc
        return proc

    def wait_online(self, agent_ids: Iterable[str], timeout: float) -> None:
        ids = list(agent_ids)
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(self.states.get(a) == "online" and a in self.info for a in ids):
                dead = [a for a in ids if a in self.procs and self.procs[a].poll() is not None]
                if dead:
                    raise Moe2Error(f"agent {dead[0]} exited: {self.log_tail(dead[0])}")
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [a for a in ids if self.states.get(a) != "online"]
                    raise Moe2Error(f"agents {missing} not online within {timeout:.0f} s")
                self._cond.wait(min(left, 0.5))

    def log_tail(self, agent_id: str, n: int = 1500) -> str:
        path = self.workdir / f"{agent_id}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def stop(self, agent_id: str) -> None:
        proc = self.procs.pop(agent_id, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop_all(self) -> None:
        for agent_id in list(self.procs):
            self.stop(agent_id)
