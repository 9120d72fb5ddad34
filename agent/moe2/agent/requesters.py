"""Who is still waiting: the agent's view of its requesters (RPC clients), from their
retained ``RequesterStatus`` on ``requesters/<owner>/<client>``.

A requester that is gone (its last will, or its clean close, says ``gone``) waits for nothing
any more: the agent drops its queued and running work and frees its sessions. A broker that
restarts publishes the last will of every client it drops, live ones included, so ``gone``
stands only once confirmed: ``confirm_s`` later while our own connection stayed up, or, when
we reconnected meanwhile, ``grace_s`` after our reconnection without the requester saying
``online`` again. ``confirm_s`` (6 s) outlasts a client's reconnection (paho backs off 1 to 5
s), so a requester whose connection blips keeps its work and sessions. A requester that says
``online`` again after having been online (it reconnected) may have lost track of sessions
with its connection: ``on_resync`` says so.

    watch = Requesters(conn, on_gone=lambda key: ..., on_resync=lambda key: ...)
    watch.is_gone("gw-orin-1/gw-orin-1")     # keys are "<owner>/<client id>"
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import paho.mqtt.client as mqtt

from moe2.shared import protocol as p
from moe2.shared.errors import Moe2Error
from moe2.shared.mqtt import Connection

log = logging.getLogger(__name__)

_REMEMBER = 4096  # requesters remembered (online or gone), oldest forgotten first
_CHECK_EVERY_S = 0.5  # how often pending "gone"s are looked at


class Requesters:
    def __init__(
        self,
        conn: Connection,
        on_gone: Callable[[str], None],
        on_resync: Callable[[str], None],
        *,
        confirm_s: float = 6.0,
        grace_s: float = 10.0,
    ) -> None:
        self._conn = conn
        self._on_gone = on_gone
        self._on_resync = on_resync
        self.confirm_s = confirm_s
        self.grace_s = grace_s
        self._lock = threading.Lock()
        self._online: OrderedDict[str, float] = OrderedDict()  # key -> its "online" since
        self._gone: OrderedDict[str, None] = OrderedDict()  # confirmed gone
        self._pending: dict[str, float] = {}  # key -> when its "gone" came (monotonic)
        self._connected_at = 0.0  # monotonic time of our last (re)connection
        self.confirmed = 0  # requesters found gone
        self._wake = threading.Event()
        threading.Thread(target=self._watch, name="requesters", daemon=True).start()
        conn.on_connected.append(self._on_connected)
        conn.subscribe(p.topics.ALL_REQUESTERS, self._on_status, retained_state=True)

    def is_gone(self, key: str | None) -> bool:
        if key is None:
            return False
        with self._lock:
            return key in self._gone

    def _on_connected(self) -> None:
        self._connected_at = time.monotonic()

    def _on_status(self, msg: mqtt.MQTTMessage) -> None:
        topic = p.topics.parse(msg.topic)
        if topic is None or topic.kind != "requester" or not msg.payload:
            return
        key = f"{topic.client}/{topic.rest[0]}"
        try:
            status = p.decode_message(p.RequesterStatus, msg.payload, 4096)
        except Moe2Error as exc:
            log.warning("ignoring requester status on %s: %s", msg.topic, exc.message)
            return
        resync = False
        with self._lock:
            known = self._online.get(key)
            if status.state == "online":
                self._pending.pop(key, None)
                self._gone.pop(key, None)
                resync = known is not None and status.since > known
                self._online[key] = max(status.since, known or 0.0)
                self._online.move_to_end(key)
                while len(self._online) > _REMEMBER:
                    self._online.popitem(last=False)
                start_timer = False
            else:  # its last will (whose "since" is when the client was made) or its close
                start_timer = key not in self._gone and key not in self._pending
                if start_timer:
                    self._pending[key] = time.monotonic()
        if resync:
            log.info("requester %s reconnected: its sessions it no longer uses will go", key)
            self._on_resync(key)
        if status.state == "gone" and start_timer:
            self._wake.set()

    def _watch(self) -> None:
        """One thread confirms every pending "gone" when its time comes (a retained "gone"
        of each client that came and went in the last minute arrives at every connection:
        no thread each)."""
        while True:
            self._wake.wait(_CHECK_EVERY_S)
            self._wake.clear()
            with self._lock:
                pending = list(self._pending.items())
            for key, since in pending:
                if self._due(since):
                    self._confirm(key)

    def _due(self, since: float) -> bool:
        now = time.monotonic()
        if now < since + self.confirm_s or not self._conn.connected:
            return False  # too early; or our connection is down too (the broker, likely)
        # We reconnected meanwhile: give it time to say it is back.
        return (
            self._connected_at < since - self.confirm_s or now >= self._connected_at + self.grace_s
        )

    def _confirm(self, key: str) -> None:
        with self._lock:
            if self._pending.pop(key, None) is None:
                return  # back online meanwhile
            self._gone[key] = None
            while len(self._gone) > _REMEMBER:
                self._gone.popitem(last=False)
            self._online.pop(key, None)
            self.confirmed += 1
        log.info("requester %s is gone: dropping its work and freeing its sessions", key)
        self._on_gone(key)
