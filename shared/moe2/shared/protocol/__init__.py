"""The moe2 wire protocol: every topic and every payload, defined once.

Topics (``v1`` is the protocol's major version; a breaking change gets ``v2`` topics):

    moe2/v1/agents/<agent>/info      retained  AgentInfo       what the agent serves
    moe2/v1/agents/<agent>/status    retained  AgentStatus     online/offline (offline is the LWT)
    moe2/v1/agents/<agent>/rpc                 RpcRequest      MQTT 5 request/response
    moe2/v1/prompts/<app>                      (prompt API, see DESIGN.md §3)

Every JSON payload carries ``"v": SCHEMA_VERSION``. RPC requests name their operation in
``op``; replies are ``{"v", "ok": true, ...}`` or ``{"v", "ok": false, "error": {code, message}}``
and travel to the request's MQTT 5 ResponseTopic with its CorrelationData.

Distributions are compact: the top-k token ids with their natural-log probabilities and the
probability mass left outside the top-k (``tail``), or on request the full distribution as
base64 little-endian float32 log-probabilities.
"""

from moe2.shared.protocol.agents import AgentInfo, AgentStatus
from moe2.shared.protocol.base import (
    MAX_TEXT_CHARS,
    MAX_TOKENS_PER_REQUEST,
    MAX_TOP_K,
    NAME_PATTERN,
    SCHEMA_VERSION,
    TOPIC_ROOT,
    Message,
    check_name,
    decode_message,
    encode,
)
from moe2.shared.protocol.profiles import AgentProfile
from moe2.shared.protocol.rpc import (
    OPERATIONS,
    CloseReply,
    CloseRequest,
    DetokenizeReply,
    DetokenizeRequest,
    DistributionReply,
    ErrorBody,
    ErrorReply,
    FullDist,
    OpenRequest,
    PingReply,
    PingRequest,
    ScoreReply,
    ScoreRequest,
    StepRequest,
    TokenizeReply,
    TokenizeRequest,
    TopKDist,
    decode_reply,
    decode_request,
    encode_full,
    encode_topk,
    error_reply,
    request_op,
)
from moe2.shared.protocol.topics import topics

__all__ = [
    "MAX_TEXT_CHARS",
    "MAX_TOKENS_PER_REQUEST",
    "MAX_TOP_K",
    "NAME_PATTERN",
    "OPERATIONS",
    "SCHEMA_VERSION",
    "TOPIC_ROOT",
    "AgentInfo",
    "AgentProfile",
    "AgentStatus",
    "CloseReply",
    "CloseRequest",
    "DetokenizeReply",
    "DetokenizeRequest",
    "DistributionReply",
    "ErrorBody",
    "ErrorReply",
    "FullDist",
    "Message",
    "OpenRequest",
    "PingReply",
    "PingRequest",
    "ScoreReply",
    "ScoreRequest",
    "StepRequest",
    "TokenizeReply",
    "TokenizeRequest",
    "TopKDist",
    "check_name",
    "decode_message",
    "decode_reply",
    "decode_request",
    "encode",
    "encode_full",
    "encode_topk",
    "error_reply",
    "request_op",
    "topics",
]
