"""The gateway's view of transmission delay (paper eqs. 5-6): it probes the round trip and
payload rate to every expert it serves with, now and then, and publishes them retained so
the controller can add them to each expert's per-token delay."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable

from moe2.agent.linkprobe import probe_link
from moe2.shared import protocol as p
from moe2.shared.errors import Moe2Error
from moe2.shared.mqtt import Connection, RpcClient

log = logging.getLogger(__name__)

# An expert without a measured link (new, or its probe failed: busy profiling at start) is
# probed this soon, not a whole interval later.
RETRY_S = 10.0


class LinkMonitor:
    def __init__(
        self,
        gateway_id: str,
        conn: Connection,
        rpc: RpcClient,
        experts: Callable[[], Iterable[str]],  # the online experts worth probing
        interval_s: float,
        first_after_s: float,
    ) -> None:
        self.gateway_id = gateway_id
        self.conn = conn
        self.rpc = rpc
        self.experts = experts
        self.interval_s = interval_s
        self.first_after_s = first_after_s
        self.links: dict[str, p.LinkFigures] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="link-probe", daemon=True)

    def start(self) -> None:
        if self.interval_s > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def probe_once(self, only: set[str] | None = None) -> p.LinkReport:
        """Probe every expert (or ``only`` these) and publish the links known."""
        for expert in sorted(set(self.experts()) if only is None else only):
            if self._stop.is_set():
                break
            try:
                link = probe_link(self.rpc, expert, timeout=5.0)
            except Moe2Error as exc:
                log.info("link probe to %s failed: %s", expert, exc.message)
                continue
            rate = link.bytes_per_s if math.isfinite(link.bytes_per_s) else 1e12
            self.links[expert] = p.LinkFigures(
                rtt_s=link.rtt_s, bytes_per_s=rate, measured_at=time.time()
            )
        report = p.LinkReport(gateway=self.gateway_id, links=dict(self.links))
        self.conn.publish(p.topics.gateway_links(self.gateway_id), p.encode(report), retain=True)
        return report

    def _run(self) -> None:
        if self._stop.wait(self.first_after_s):
            return
        last = -math.inf  # when every expert was last probed
        while not self._stop.is_set():
            missing = set(self.experts()) - set(self.links)
            due = time.monotonic() - last >= self.interval_s
            try:
                if due:
                    last = time.monotonic()
                    self.probe_once()
                elif missing:
                    self.probe_once(missing)
            except Exception:  # probing is best effort; the gateway keeps serving
                log.exception("link probing failed")
            if self._stop.wait(min(self.interval_s, RETRY_S)):
                return
