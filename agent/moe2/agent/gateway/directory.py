"""What the gateway knows about the fleet: every agent's retained info and status, and the
retained assignment of every application."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from moe2.shared import protocol as p
from moe2.shared.errors import Moe2Error
from moe2.shared.mqtt import Connection

log = logging.getLogger(__name__)


class Directory:
    def __init__(self, conn: Connection) -> None:
        self._lock = threading.Lock()
        self._info: dict[str, p.AgentInfo] = {}
        self._online: dict[str, bool] = {}
        self._apps: dict[str, p.AppAssignment] = {}
        self.on_assignment: list[Any] = []  # callbacks(AppAssignment)
        conn.subscribe(p.topics.ALL_AGENT_INFO, self._on_info)
        conn.subscribe(p.topics.ALL_AGENT_STATUS, self._on_status)
        conn.subscribe(p.topics.ALL_DESIRED_APPS, self._on_assignment)

    def _on_info(self, msg: Any) -> None:
        if not msg.payload:
            return
        try:
            info = p.decode_message(p.AgentInfo, msg.payload)
        except Moe2Error as exc:
            log.warning("ignoring bad agent info on %s: %s", msg.topic, exc.message)
            return
        with self._lock:
            self._info[info.agent_id] = info

    def _on_status(self, msg: Any) -> None:
        if not msg.payload:
            return
        with contextlib.suppress(Moe2Error):
            st = p.decode_message(p.AgentStatus, msg.payload)
            with self._lock:
                self._online[st.agent_id] = st.state == "online"

    def _on_assignment(self, msg: Any) -> None:
        if not msg.payload:
            return
        try:
            a = p.decode_message(p.AppAssignment, msg.payload)
        except Moe2Error as exc:
            log.warning("ignoring bad assignment on %s: %s", msg.topic, exc.message)
            return
        with self._lock:
            old = self._apps.get(a.app)
            if old is not None and old.version >= a.version:
                return
            self._apps[a.app] = a
        for cb in list(self.on_assignment):
            cb(a)

    def online(self, agent_id: str) -> p.AgentInfo | None:
        with self._lock:
            return self._info.get(agent_id) if self._online.get(agent_id) else None

    def assigned_experts(self) -> set[str]:
        with self._lock:
            return {e for a in self._apps.values() for e in a.subset}

    def assignment(self, app: str) -> p.AppAssignment | None:
        with self._lock:
            return self._apps.get(app)
