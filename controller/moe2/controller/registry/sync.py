"""Keeping the registry current from the fleet's state: agents' info, status and profiles,
and the gateways' acknowledgements of assignments and gates.

    counts = sync_once(registry, broker)     # {"info": 3, "status": 3, ...}
"""

from __future__ import annotations

from moe2.controller.registry.db import Registry
from moe2.shared import protocol as p
from moe2.shared.fleet import FleetState, FleetView
from moe2.shared.mqtt import BrokerConfig

KINDS = ("info", "status", "profile", "assignment_ack", "gate_ack")


def store(registry: Registry, state: FleetState) -> dict[str, int]:
    """Store a fleet state; the number of messages of each kind stored."""
    for info in state.info.values():
        registry.upsert_agent_info(info)
    for st in state.status.values():
        registry.set_agent_state(st.agent_id, st.state)
    for prof in state.profile.values():
        registry.set_agent_profile(prof)
    for ack in state.assignment_ack.values():
        registry.record_assignment_ack(ack)
    for gack in state.gate_ack.values():
        registry.record_gate_ack(gack)
    counts = {k: len(getattr(state, k)) for k in KINDS}
    return {k: n for k, n in counts.items() if n}


def sync_once(registry: Registry, broker: BrokerConfig, wait_s: float = 3.0) -> dict[str, int]:
    return store(registry, FleetView.snapshot(broker, KINDS, wait_s))


def online_experts(registry: Registry) -> dict[str, p.AgentInfo]:
    """Agent id -> info of every agent the registry last saw online."""
    out: dict[str, p.AgentInfo] = {}
    for a in registry.agents():
        if a.state == "online" and a.info_json:
            out[a.id] = p.AgentInfo.model_validate_json(a.info_json)
    return out
