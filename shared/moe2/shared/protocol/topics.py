"""Every MQTT topic moe2 uses, built in one place."""

from __future__ import annotations

from moe2.shared.protocol.base import TOPIC_ROOT, check_name


class topics:
    @staticmethod
    def agent_info(agent_id: str) -> str:
        return f"{TOPIC_ROOT}/agents/{check_name('agent id', agent_id)}/info"

    @staticmethod
    def agent_status(agent_id: str) -> str:
        return f"{TOPIC_ROOT}/agents/{check_name('agent id', agent_id)}/status"

    @staticmethod
    def agent_profile(agent_id: str) -> str:
        """Retained cost profile of the agent (delay and energy curves)."""
        return f"{TOPIC_ROOT}/agents/{check_name('agent id', agent_id)}/profile"

    @staticmethod
    def agent_rpc(agent_id: str) -> str:
        return f"{TOPIC_ROOT}/agents/{check_name('agent id', agent_id)}/rpc"

    # Wildcard subscriptions used by the controller and the gateway.
    ALL_AGENT_INFO = f"{TOPIC_ROOT}/agents/+/info"
    ALL_AGENT_STATUS = f"{TOPIC_ROOT}/agents/+/status"
    ALL_AGENT_PROFILES = f"{TOPIC_ROOT}/agents/+/profile"
    ALL_GATEWAY_LINKS = f"{TOPIC_ROOT}/agents/+/links"

    @staticmethod
    def gateway_links(gateway: str) -> str:
        """Retained LinkReport: round trip and payload rate from a gateway to each expert."""
        return f"{TOPIC_ROOT}/agents/{check_name('agent id', gateway)}/links"

    @staticmethod
    def replies(client_id: str) -> str:
        """Inbox of an RPC client; requests name it as their ResponseTopic."""
        return f"{TOPIC_ROOT}/replies/{check_name('client id', client_id)}"

    @staticmethod
    def prompts(app: str) -> str:
        return f"{TOPIC_ROOT}/prompts/{check_name('application', app)}"

    # Gateways share the prompts of every application (MQTT 5 shared subscription: each
    # prompt goes to one gateway of the group).
    @staticmethod
    def prompts_shared(group: str) -> str:
        return f"$share/{check_name('gateway group', group)}/{TOPIC_ROOT}/prompts/+"

    @staticmethod
    def app_from_prompt_topic(topic: str) -> str | None:
        parts = topic.split("/")
        if len(parts) == 4 and f"{parts[0]}/{parts[1]}" == TOPIC_ROOT and parts[2] == "prompts":
            return parts[3]
        return None

    @staticmethod
    def desired_app(app: str) -> str:
        """Retained AppAssignment: the subset and k that serve ``app``."""
        return f"{TOPIC_ROOT}/desired/apps/{check_name('application', app)}"

    ALL_DESIRED_APPS = f"{TOPIC_ROOT}/desired/apps/+"

    @staticmethod
    def assignment_ack(gateway: str, app: str) -> str:
        return (
            f"{TOPIC_ROOT}/agents/{check_name('agent id', gateway)}/acks/"
            f"{check_name('application', app)}"
        )

    ALL_ASSIGNMENT_ACKS = f"{TOPIC_ROOT}/agents/+/acks/+"

    @staticmethod
    def agent_id_from(topic: str) -> str | None:
        parts = topic.split("/")
        if len(parts) == 5 and f"{parts[0]}/{parts[1]}" == TOPIC_ROOT and parts[2] == "agents":
            return parts[3]
        return None

    # Gate rollout (protocol/gates.py).
    @staticmethod
    def gate_manifest(version: str) -> str:
        """Retained GateManifest of one gate version."""
        return f"{TOPIC_ROOT}/gates/{check_name('gate version', version)}"

    @staticmethod
    def blob_chunk(sha256: str, index: int) -> str:
        """Retained raw-byte chunk ``index`` of the content-addressed blob ``sha256``."""
        return f"{TOPIC_ROOT}/blobs/{check_name('blob hash', sha256)}/{int(index)}"

    @staticmethod
    def blob_chunks(sha256: str) -> str:
        return f"{TOPIC_ROOT}/blobs/{check_name('blob hash', sha256)}/+"

    @staticmethod
    def gate_ack(gateway: str, version: str) -> str:
        return (
            f"{TOPIC_ROOT}/agents/{check_name('agent id', gateway)}/gates/"
            f"{check_name('gate version', version)}"
        )

    ALL_GATE_ACKS = f"{TOPIC_ROOT}/agents/+/gates/+"
