"""Keeping the registry current from the fleet's retained messages: agents' info, status and
profiles, and the gateways' acknowledgements of assignments and gates.

    counts = sync_once(registry, broker)     # {"info": 3, "status": 3, ...}
"""

from __future__ import annotations

import logging

from moe2.controller.fleet import read_retained
from moe2.controller.registry.db import Registry
from moe2.shared import protocol as p
from moe2.shared.errors import Moe2Error
from moe2.shared.mqtt import BrokerConfig

log = logging.getLogger(__name__)

FILTERS = (
    p.topics.ALL_AGENT_INFO,
    p.topics.ALL_AGENT_STATUS,
    p.topics.ALL_AGENT_PROFILES,
    p.topics.ALL_ASSIGNMENT_ACKS,
    p.topics.ALL_GATE_ACKS,
)


def apply(registry: Registry, topic: str, payload: bytes) -> str | None:
    """Store one retained message; returns its kind, or None when it is not one we keep."""
    kind = topic.split("/")[-1] if topic.count("/") == 4 else topic.split("/")[-2]
    try:
        if kind == "info":
            registry.upsert_agent_info(p.decode_message(p.AgentInfo, payload))
        elif kind == "status":
            st = p.decode_message(p.AgentStatus, payload)
            registry.set_agent_state(st.agent_id, st.state)
        elif kind == "profile":
            registry.set_agent_profile(p.decode_message(p.AgentProfile, payload))
        elif kind == "acks":
            registry.record_assignment_ack(p.decode_message(p.AssignmentAck, payload))
        elif kind == "gates":
            registry.record_gate_ack(p.decode_message(p.GateAck, payload))
        else:
            return None
    except Moe2Error as exc:
        log.warning("ignoring %s: %s", topic, exc.message)
        return None
    return kind


def sync_once(registry: Registry, broker: BrokerConfig, wait_s: float = 3.0) -> dict[str, int]:
    counts: dict[str, int] = {}
    for topic, payload in sorted(read_retained(broker, FILTERS, wait_s).items()):
        kind = apply(registry, topic, payload)
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def online_experts(registry: Registry) -> dict[str, p.AgentInfo]:
    """Agent id -> info of every agent the registry last saw online."""
    out: dict[str, p.AgentInfo] = {}
    for a in registry.agents():
        if a.state == "online" and a.info_json:
            out[a.id] = p.AgentInfo.model_validate_json(a.info_json)
    return out
