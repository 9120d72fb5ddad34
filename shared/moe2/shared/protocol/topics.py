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

    @staticmethod
    def replies(client_id: str) -> str:
        """Inbox of an RPC client; requests name it as their ResponseTopic."""
        return f"{TOPIC_ROOT}/replies/{check_name('client id', client_id)}"

    @staticmethod
    def prompts(app: str) -> str:
        return f"{TOPIC_ROOT}/prompts/{check_name('application', app)}"

    @staticmethod
    def agent_id_from(topic: str) -> str | None:
        parts = topic.split("/")
        if len(parts) == 5 and f"{parts[0]}/{parts[1]}" == TOPIC_ROOT and parts[2] == "agents":
            return parts[3]
        return None
