"""The moe2 wire protocol: every topic and every payload, defined once.

Topics (``v1`` is the protocol's major version; a breaking change gets ``v2`` topics):

    moe2/v1/agents/<agent>/info      retained  AgentInfo       what the agent serves
    moe2/v1/agents/<agent>/status    retained  AgentStatus     online/offline (offline is the LWT)
    moe2/v1/agents/<agent>/profile   retained  AgentProfile    delay and energy cost curves
    moe2/v1/agents/<gw>/links        retained  LinkReport      gateway-to-expert round trip, rate
    moe2/v1/agents/<gw>/gateway      retained  GatewayStatus   apps a gateway serves (LWT offline)
    moe2/v1/agents/<gw>/stats        retained  AppStats        measured cost of each app's answers
    moe2/v1/agents/<agent>/rpc                 RpcRequest      MQTT 5 request/response
    moe2/v1/replies/<user>/rpc/<agent>         RpcReply        the agent's answer to <user>
    moe2/v1/replies/<user>/answers/<client>    prompt answers  a PromptClient's inbox
    moe2/v1/replies/<user>/...                 prompt answers  any other reply_to of <user>
    moe2/v1/prompts/<app>[/<user>]             (the public prompt API, prompts.py)
    moe2/v1/cancel/<app>[/<user>]              PromptCancel    stop answering a prompt
    moe2/v1/desired/apps/<app>       retained  AppAssignment   desired state (desired.py)
    moe2/v1/agents/<gw>/acks/<app>   retained  AssignmentAck   a gateway accepted/rejected it
    moe2/v1/gates/<version>          retained  GateManifest    a trained gate (gates.py)
    moe2/v1/blobs/<sha256>/<i>       retained  raw bytes       chunks of a gate's files
    moe2/v1/agents/<gw>/gates/<ver>  retained  GateAck         a gateway loaded/rejected it
    moe2/v1/requesters/<user>/<c>    retained  RequesterStatus an RPC client online/gone (LWT)

Topics are built and parsed only in ``topics.py``.

Every JSON payload carries ``"v": SCHEMA_VERSION``. RPC requests name their operation in
``op``; replies are ``{"v", "ok": true, ...}`` or ``{"v", "ok": false, "error": {code, message}}``
and travel to the request's MQTT 5 ResponseTopic with its CorrelationData.

Distributions are compact: the top-k token ids with their natural-log probabilities and the
probability mass left outside the top-k (``tail``), or on request the full distribution as
base64 little-endian float32 log-probabilities. RPC payloads may also travel in the binary
``bin1`` codec (``codec.py``), negotiated per agent through ``AgentInfo.codecs``.
"""

from moe2.shared.protocol.agents import (
    AdapterInfo,
    AgentInfo,
    AgentStatus,
    ComputeBackend,
    ComputeDevice,
)
from moe2.shared.protocol.base import (
    MAX_CHOICES,
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
from moe2.shared.protocol.codec import CODECS, encode_rpc, payload_codec
from moe2.shared.protocol.desired import (
    MAX_VERSION,
    AppAssignment,
    AppFigures,
    AppStats,
    AssignmentAck,
    GateRef,
    GatewayOverhead,
    GatewayStatus,
    assignment_digest,
    describe_version,
)
from moe2.shared.protocol.gates import BlobRef, GateAck, GateManifest, gate_digest
from moe2.shared.protocol.profiles import AgentProfile, LinkFigures, LinkReport
from moe2.shared.protocol.prompts import (
    ChatMessage,
    ChoiceAnswer,
    DroppedExpert,
    ExpertWeight,
    PromptAnswer,
    PromptCancel,
    PromptError,
    PromptRequest,
    StreamChunk,
    TokenLogprob,
    TopLogprob,
    decode_cancel,
    decode_prompt,
    prompt_error,
)
from moe2.shared.protocol.rpc import (
    MAX_SCORE_SAMPLES,
    OPERATIONS,
    CloseReply,
    CloseRequest,
    DetokenizeReply,
    DetokenizeRequest,
    DistributionReply,
    DistributionsReply,
    DraftRequest,
    ErrorBody,
    ErrorReply,
    FullDist,
    OpenRequest,
    PingReply,
    PingRequest,
    ProfileReply,
    ProfileRequest,
    RequesterStatus,
    ScoreChoicesReply,
    ScoreChoicesRequest,
    ScoreManyReply,
    ScoreManyRequest,
    ScoreReply,
    ScoreRequest,
    ScoreResult,
    ScoreSample,
    StepRequest,
    TokenizeReply,
    TokenizeRequest,
    TopKDist,
    VerifyRequest,
    VocabReply,
    VocabRequest,
    decode_reply,
    decode_request,
    encode_full,
    encode_topk,
    encode_vocab,
    error_reply,
    request_op,
)
from moe2.shared.protocol.topics import Topic, topics

__all__ = [
    "CODECS",
    "MAX_CHOICES",
    "MAX_SCORE_SAMPLES",
    "MAX_TEXT_CHARS",
    "MAX_TOKENS_PER_REQUEST",
    "MAX_TOP_K",
    "MAX_VERSION",
    "NAME_PATTERN",
    "OPERATIONS",
    "SCHEMA_VERSION",
    "TOPIC_ROOT",
    "AdapterInfo",
    "AgentInfo",
    "AgentProfile",
    "AgentStatus",
    "AppAssignment",
    "AppFigures",
    "AppStats",
    "AssignmentAck",
    "BlobRef",
    "ChatMessage",
    "ChoiceAnswer",
    "CloseReply",
    "CloseRequest",
    "ComputeBackend",
    "ComputeDevice",
    "DetokenizeReply",
    "DetokenizeRequest",
    "DistributionReply",
    "DistributionsReply",
    "DraftRequest",
    "DroppedExpert",
    "ErrorBody",
    "ErrorReply",
    "ExpertWeight",
    "FullDist",
    "GateAck",
    "GateManifest",
    "GateRef",
    "GatewayOverhead",
    "GatewayStatus",
    "LinkFigures",
    "LinkReport",
    "Message",
    "OpenRequest",
    "PingReply",
    "PingRequest",
    "ProfileReply",
    "ProfileRequest",
    "PromptAnswer",
    "PromptCancel",
    "PromptError",
    "PromptRequest",
    "RequesterStatus",
    "ScoreChoicesReply",
    "ScoreChoicesRequest",
    "ScoreManyReply",
    "ScoreManyRequest",
    "ScoreReply",
    "ScoreRequest",
    "ScoreResult",
    "ScoreSample",
    "StepRequest",
    "StreamChunk",
    "TokenLogprob",
    "TokenizeReply",
    "TokenizeRequest",
    "TopKDist",
    "TopLogprob",
    "Topic",
    "VerifyRequest",
    "VocabReply",
    "VocabRequest",
    "assignment_digest",
    "check_name",
    "decode_cancel",
    "decode_message",
    "decode_prompt",
    "decode_reply",
    "decode_request",
    "describe_version",
    "encode",
    "encode_full",
    "encode_rpc",
    "encode_topk",
    "encode_vocab",
    "error_reply",
    "gate_digest",
    "payload_codec",
    "prompt_error",
    "request_op",
    "topics",
]
