"""Every MQTT topic moe2 uses: built here, and parsed here (``parse``), nowhere else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moe2.shared.errors import BadMessage
from moe2.shared.protocol.base import TOPIC_ROOT, check_name

TopicKind = Literal[
    "info",  # agents/<agent>/info            retained AgentInfo
    "status",  # agents/<agent>/status        retained AgentStatus (LWT offline)
    "profile",  # agents/<agent>/profile      retained AgentProfile
    "links",  # agents/<gateway>/links        retained LinkReport
    "gateway",  # agents/<gateway>/gateway    retained GatewayStatus (LWT offline)
    "stats",  # agents/<gateway>/stats        retained AppStats (measured per-app costs)
    "rpc",  # agents/<agent>/rpc              RPC requests
    "assignment_ack",  # agents/<gateway>/acks/<app>      retained AssignmentAck
    "gate_ack",  # agents/<gateway>/gates/<version>       retained GateAck
    "desired_app",  # desired/apps/<app>                  retained AppAssignment
    "gate_manifest",  # gates/<version>                   retained GateManifest
    "blob_chunk",  # blobs/<sha256>/<index>               retained raw bytes
    "prompt",  # prompts/<app>[/<owner>]                  the public prompt API
    "cancel",  # cancel/<app>[/<owner>]                   PromptCancel of a prompt to <app>
    "reply",  # replies/<owner>/...                       answers and RPC replies
    "requester",  # requesters/<owner>/<client>           retained RequesterStatus (LWT gone)
]

_AGENT_LEAVES = {
    "info": "info",
    "status": "status",
    "profile": "profile",
    "links": "links",
    "gateway": "gateway",
    "stats": "stats",
    "rpc": "rpc",
}


@dataclass(frozen=True)
class Topic:
    """A parsed moe2 topic: its kind and the names its levels carry."""

    kind: TopicKind
    agent: str | None = None  # agents/<agent>/...: the agent (or gateway) the topic belongs to
    app: str | None = None
    version: str | None = None  # gate version
    sha256: str | None = None
    index: int | None = None  # blob chunk index
    # replies/<owner>/...: the user (or client) it is addressed to; prompts/<app>/<owner>: the
    # login that published it (the broker's ACL lets user <owner> publish only there);
    # requesters/<owner>/<client>: the requester's login, likewise
    client: str | None = None
    rest: tuple[str, ...] = ()  # replies/<owner>/<rest...>; requesters/<owner>/<client>


def parse(topic: str) -> Topic | None:
    """The moe2 meaning of ``topic``, or None when it is not one of ours (or malformed:
    names that could not have been built by ``topics`` are refused)."""
    parts = topic.split("/")
    if len(parts) < 3 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT:
        return None
    head, tail = parts[2], parts[3:]
    try:
        if head == "agents" and len(tail) == 2 and tail[1] in _AGENT_LEAVES:
            return Topic(_AGENT_LEAVES[tail[1]], agent=check_name("agent id", tail[0]))  # type: ignore[arg-type]
        if head == "agents" and len(tail) == 3 and tail[1] == "acks":
            return Topic(
                "assignment_ack",
                agent=check_name("agent id", tail[0]),
                app=check_name("application", tail[2]),
            )
        if head == "agents" and len(tail) == 3 and tail[1] == "gates":
            return Topic(
                "gate_ack",
                agent=check_name("agent id", tail[0]),
                version=check_name("gate version", tail[2]),
            )
        if head == "desired" and len(tail) == 2 and tail[0] == "apps":
            return Topic("desired_app", app=check_name("application", tail[1]))
        if head == "gates" and len(tail) == 1:
            return Topic("gate_manifest", version=check_name("gate version", tail[0]))
        if head == "blobs" and len(tail) == 2 and tail[1].isdigit() and len(tail[1]) <= 9:
            return Topic("blob_chunk", sha256=check_name("blob hash", tail[0]), index=int(tail[1]))
        if head == "prompts" and len(tail) in (1, 2):
            owner = check_name("client id", tail[1]) if len(tail) == 2 else None
            return Topic("prompt", app=check_name("application", tail[0]), client=owner)
        if head == "cancel" and len(tail) in (1, 2):
            owner = check_name("client id", tail[1]) if len(tail) == 2 else None
            return Topic("cancel", app=check_name("application", tail[0]), client=owner)
        if head == "requesters" and len(tail) == 2:
            return Topic(
                "requester",
                client=check_name("client id", tail[0]),
                rest=(check_name("client id", tail[1]),),
            )
        if head == "replies" and len(tail) >= 1:
            return Topic("reply", client=check_name("client id", tail[0]), rest=tuple(tail[1:]))
    except BadMessage:
        return None
    return None


def reply_owner(topic: str) -> str | None:
    """The user whose replies a prompt's answer may go to on ``topic``: ``<user>`` of
    ``moe2/v1/replies/<user>[/...]`` outside its ``rpc`` subtree (RPC replies) and with no
    empty level. None for any other topic (outside ``moe2/``, or another moe2 topic)."""
    parsed = parse(topic)
    if parsed is None or parsed.kind != "reply":
        return None
    if (parsed.rest and parsed.rest[0] == "rpc") or not all(parsed.rest):
        return None
    return parsed.client


def prompt_owner(topic: str) -> str | None:
    """The login a prompt's topic names as its publisher: the level after the application
    (``prompts/<app>/<owner>``), also when the rest of the topic is not valid (an invalid
    application name, more levels), so that even a refusal stays in that user's replies.
    None when the topic has no such level; BadMessage when the level is not a valid name."""
    parts = topic.split("/")
    if len(parts) < 5 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT or parts[2] != "prompts":
        return None
    return check_name("client id", parts[4])


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

    @staticmethod
    def gateway_status(gateway: str) -> str:
        """Retained GatewayStatus: the applications a gateway serves (LWT: offline)."""
        return f"{TOPIC_ROOT}/agents/{check_name('agent id', gateway)}/gateway"

    @staticmethod
    def gateway_stats(gateway: str) -> str:
        """Retained AppStats: what each application's answers cost at this gateway."""
        return f"{TOPIC_ROOT}/agents/{check_name('agent id', gateway)}/stats"

    @staticmethod
    def gateway_links(gateway: str) -> str:
        """Retained LinkReport: round trip and payload rate from a gateway to each expert."""
        return f"{TOPIC_ROOT}/agents/{check_name('agent id', gateway)}/links"

    # Wildcard subscriptions of the fleet view (moe2.shared.fleet).
    ALL_AGENT_INFO = f"{TOPIC_ROOT}/agents/+/info"
    ALL_AGENT_STATUS = f"{TOPIC_ROOT}/agents/+/status"
    ALL_AGENT_PROFILES = f"{TOPIC_ROOT}/agents/+/profile"
    ALL_GATEWAY_LINKS = f"{TOPIC_ROOT}/agents/+/links"
    ALL_GATEWAY_STATUS = f"{TOPIC_ROOT}/agents/+/gateway"
    ALL_GATEWAY_STATS = f"{TOPIC_ROOT}/agents/+/stats"

    # ------------------------------------------------------------------ replies
    # Everything addressed to one client lives under replies/<owner>/, where <owner> is the
    # client's broker login (or its client id on a broker without logins): the broker's ACL
    # lets user <owner> read exactly that subtree. replies/<owner>/rpc/... is kept for RPC
    # replies; prompt answers may go anywhere else below replies/<owner>/.

    REPLIES_ROOT = f"{TOPIC_ROOT}/replies"

    @staticmethod
    def replies(owner: str) -> str:
        """The subtree of everything addressed to ``owner`` (subscribe to ``.../#``)."""
        return f"{TOPIC_ROOT}/replies/{check_name('client id', owner)}"

    @staticmethod
    def rpc_reply(owner: str, agent_id: str) -> str:
        """Where ``agent_id`` answers the RPC requests of ``owner``: the topic names the
        replier, so a reply is accepted only from the agent that was asked."""
        return (
            f"{TOPIC_ROOT}/replies/{check_name('client id', owner)}/rpc/"
            f"{check_name('agent id', agent_id)}"
        )

    @staticmethod
    def rpc_replies(owner: str) -> str:
        """The filter an RPC client subscribes to: replies from every agent."""
        return f"{TOPIC_ROOT}/replies/{check_name('client id', owner)}/rpc/+"

    @staticmethod
    def sync_marker(owner: str, client_id: str) -> str:
        """A client's own end-of-retained marker: published after subscribing, it arrives
        after every retained message of those subscriptions."""
        return (
            f"{TOPIC_ROOT}/replies/{check_name('client id', owner)}/sync/"
            f"{check_name('client id', client_id)}"
        )

    @staticmethod
    def client_answers(owner: str, client_id: str) -> str:
        """Inbox of one prompt client (``PromptClient``, ``moe2ctl ask``) of user ``owner``."""
        return (
            f"{TOPIC_ROOT}/replies/{check_name('client id', owner)}/answers/"
            f"{check_name('client id', client_id)}"
        )

    # ------------------------------------------------------------------ requesters

    @staticmethod
    def requester(owner: str, client_id: str) -> str:
        """Retained RequesterStatus of one RPC client of user ``owner`` (its last will says
        ``gone``): agents drop the work and free the sessions of a requester that is gone."""
        return (
            f"{TOPIC_ROOT}/requesters/{check_name('client id', owner)}/"
            f"{check_name('client id', client_id)}"
        )

    ALL_REQUESTERS = f"{TOPIC_ROOT}/requesters/+/+"

    # ------------------------------------------------------------------ prompts
    # A client publishes to prompts/<app>, or, on a broker with logins, to
    # prompts/<app>/<its user>: the broker's ACL lets user <owner> publish only there, so the
    # topic says who asked, and a gateway answers such a prompt only inside
    # replies/<owner>/ (where that user reads). On a broker with moe2's ACL nobody but the
    # controller and the gateways may publish to prompts/<app> itself.

    PROMPTS_ROOT = f"{TOPIC_ROOT}/prompts"

    @staticmethod
    def prompts(app: str, owner: str | None = None) -> str:
        """Where to publish a prompt for ``app``; ``owner``: the publisher's broker login."""
        base = f"{TOPIC_ROOT}/prompts/{check_name('application', app)}"
        return base if owner is None else f"{base}/{check_name('client id', owner)}"

    @staticmethod
    def prompts_shared(group: str, app: str) -> tuple[str, str]:
        """A gateway's subscriptions to one application it serves (MQTT 5 shared
        subscriptions: each prompt goes to one gateway of the group that serves the app),
        one for prompts/<app> and one for prompts/<app>/<owner>. Two filters, not
        prompts/<app>/#: a kept session of an earlier run holds the first already."""
        share = f"$share/{check_name('gateway group', group)}/{TOPIC_ROOT}/prompts/"
        app = check_name("application", app)
        return f"{share}{app}", f"{share}{app}/+"

    @staticmethod
    def prompts_unrouted(group: str) -> str:
        """Every gateway's catch-all (a group of its own): one gateway of the fleet sees each
        prompt, and answers ``unknown_app`` when no online gateway serves its application, or
        ``bad_request`` when its topic names no valid application (or publisher)."""
        return f"$share/{check_name('gateway group', group)}.unrouted/{TOPIC_ROOT}/prompts/#"

    @staticmethod
    def reply_probe(gateway: str) -> str:
        """A topic outside ``moe2/`` that a gateway publishes one empty message to at start,
        to learn from the broker's PUBACK whether it may answer prompts outside ``moe2/``
        (a broker without logins lets it; moe2's ACL does not). Nobody subscribes to it."""
        return f"moe2-reply-check/{check_name('agent id', gateway)}"

    @staticmethod
    def prompt_errors(owner: str) -> str:
        """Where a gateway answers a prompt of ``owner`` (published on prompts/<app>/<owner>)
        that names no reply topic it may use: malformed, or another user's inbox."""
        return f"{TOPIC_ROOT}/replies/{check_name('client id', owner)}/errors"

    @staticmethod
    def cancel(app: str, owner: str | None = None) -> str:
        """Where a client cancels a prompt it sent to ``app`` (``PromptCancel``); every
        gateway reads it (no shared subscription: the one holding the prompt acts).
        ``owner``: the publisher's broker login, a level a broker ACL can bind to it."""
        base = f"{TOPIC_ROOT}/cancel/{check_name('application', app)}"
        return base if owner is None else f"{base}/{check_name('client id', owner)}"

    ALL_CANCELS = f"{TOPIC_ROOT}/cancel/#"

    # ------------------------------------------------------------------ desired state

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

    parse = staticmethod(parse)
    prompt_owner = staticmethod(prompt_owner)
    reply_owner = staticmethod(reply_owner)
