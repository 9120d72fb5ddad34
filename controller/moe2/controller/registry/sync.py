"""Keeping the registry current from the fleet's state: agents' info, status and profiles,
and the gateways' acknowledgements of assignments and gates.

    counts = sync_once(registry, broker)     # {"info": 3, "status": 3, ...}

    writer = RegistryWriter(registry)        # a long-lived controller (moe2ctl serve)
    writer.store(view.copy())                # writes only what changed since its last store

Writes are bulk: one transaction for every agent row, one for every acknowledgement, however
large the fleet (a thousand agents were three thousand commits before).
"""

from __future__ import annotations

from typing import Any

from moe2.controller.registry.db import Registry
from moe2.shared import protocol as p
from moe2.shared.fleet import FleetState, FleetView
from moe2.shared.mqtt import BrokerConfig

KINDS = ("info", "status", "profile", "assignment_ack", "gate_ack")


class RegistryWriter:
    """Stores fleet states, remembering what it stored so that the next store writes only
    the messages that changed (the registry's rows are only ever written from the fleet's
    state, so what was stored stays stored)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._stored: dict[str, dict[Any, Any]] = {k: {} for k in KINDS}
        self.rows_written = 0  # agent and acknowledgement rows written so far

    def store(self, state: FleetState) -> dict[str, int]:
        """Store ``state``; the number of messages of each kind it holds (not only the
        changed ones: what a sync reports)."""
        new: dict[str, dict[Any, Any]] = {}
        for kind in KINDS:
            table: dict[Any, Any] = getattr(state, kind)
            seen = self._stored[kind]
            new[kind] = {key: m for key, m in table.items() if seen.get(key) != m}
        statuses: dict[str, p.AgentStatus] = new["status"]
        written = self.registry.store_agents(
            new["info"].values(),
            {st.agent_id: st.state for st in statuses.values()},
            new["profile"].values(),
        )
        written += self.registry.record_acks(
            new["assignment_ack"].values(), new["gate_ack"].values()
        )
        for kind in KINDS:
            self._stored[kind].update(new[kind])
        self.rows_written += written
        counts = {k: len(getattr(state, k)) for k in KINDS}
        return {k: n for k, n in counts.items() if n}


def store(registry: Registry, state: FleetState) -> dict[str, int]:
    """Store a fleet state; the number of messages of each kind stored."""
    return RegistryWriter(registry).store(state)


def sync_once(registry: Registry, broker: BrokerConfig, wait_s: float = 3.0) -> dict[str, int]:
    return store(registry, FleetView.snapshot(broker, KINDS, wait_s))


def online_experts(registry: Registry) -> dict[str, p.AgentInfo]:
    """Agent id -> info of every agent the registry last saw online."""
    out: dict[str, p.AgentInfo] = {}
    for a in registry.agents():
        if a.state == "online" and a.info_json:
            out[a.id] = p.AgentInfo.model_validate_json(a.info_json)
    return out
