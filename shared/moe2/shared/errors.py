"""The moe2 error tree.

Errors are raised where the problem is and turned into exit codes (CLI) or error replies
(MQTT) only at the edge. Every error carries a stable ``code`` that travels on the wire, so
callers never parse message text.

    Moe2Error
    ├── ConfigError                 bad configuration file, flag or environment value
    ├── ProtocolError               a peer sent something we cannot accept
    │   ├── BadMessage              not JSON, wrong shape, out-of-range field   (bad_request)
    │   ├── UnsupportedVersion      schema version we do not speak          (unsupported_version)
    │   ├── MessageTooLarge         payload over the configured limit           (too_large)
    │   └── UnknownOperation        op we do not implement                      (unknown_op)
    ├── SessionError
    │   ├── UnknownSession          never opened, or closed                     (unknown_session)
    │   └── SessionEvicted          pushed out by the LRU bound                 (session_evicted)
    ├── ModelError
    │   ├── ContextOverflow         history would exceed the context size       (context_overflow)
    │   └── InvalidToken            token id outside the vocabulary             (invalid_token)
    ├── Busy                        no room now, retry later (after its hint)   (busy)
    ├── UnknownApp                  no assignment for this application          (unknown_app)
    ├── NoExperts                   no chosen expert online / all failed        (no_experts)
    ├── DeadlineExceeded            the prompt's deadline passed                (deadline)
    ├── Cancelled                   abandoned: the peer stops, or the client cancelled (cancelled)
    ├── ExpertOffline               an expert's last will came while it was waited for (offline)
    ├── InternalError               a bug in the peer; the request failed, the peer lives (internal)
    ├── RemoteError                 an error reply with a code this version does not know
    ├── RequestTimeout              no reply within the deadline                (timeout)
    ├── NotAcknowledged             desired state that no gateway acknowledged  (not_acked)
    ├── NotProven                   a subset not proven near enough the optimum  (not_proven)
    └── BrokerError                 cannot start or reach the MQTT broker       (broker)
"""

from __future__ import annotations


class Moe2Error(Exception):
    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(Moe2Error):
    code = "config"


class ProtocolError(Moe2Error):
    code = "bad_request"


class BadMessage(ProtocolError):
    code = "bad_request"


class BadSignature(BadMessage):
    """Desired state that the trusted fleet keys did not sign (missing, forged, altered)."""

    code = "bad_signature"


class StaleVersion(BadMessage):
    """Desired state older than what a gateway serves (or the same version naming another
    assignment): the publisher goes on above the version the gateway names."""

    code = "stale_version"


class UnsupportedVersion(ProtocolError):
    code = "unsupported_version"


class MessageTooLarge(ProtocolError):
    code = "too_large"


class UnknownOperation(ProtocolError):
    code = "unknown_op"


class SessionError(Moe2Error):
    code = "unknown_session"


class UnknownSession(SessionError):
    code = "unknown_session"


class SessionEvicted(SessionError):
    code = "session_evicted"


class ModelError(Moe2Error):
    code = "model_error"


class ContextOverflow(ModelError):
    code = "context_overflow"


class InvalidToken(ModelError):
    code = "invalid_token"


class Busy(Moe2Error):
    """``retry_after_s``: when the refuser expects to have room (None: it did not say)."""

    code = "busy"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnknownApp(Moe2Error):
    code = "unknown_app"


class NoExperts(Moe2Error):
    code = "no_experts"


class DeadlineExceeded(Moe2Error):
    code = "deadline"


class Cancelled(Moe2Error):
    code = "cancelled"


class ExpertOffline(Moe2Error):
    """An expert's last will said it is offline while a reply from it was awaited (a reason
    to drop it, never sent as a reply)."""

    code = "offline"


class InternalError(Moe2Error):
    code = "internal"


class NotAcknowledged(Moe2Error):
    code = "not_acked"


class NotProven(Moe2Error):
    """An optimisation whose answer is not proven within the accepted gap of the optimum
    (a time limit, a heuristic solver): its subsets are not pushed."""

    code = "not_proven"


class RequestTimeout(Moe2Error):
    code = "timeout"


class BrokerError(Moe2Error):
    code = "broker"


class RemoteError(Moe2Error):
    """An error reply from a peer; ``code`` is the peer's code (one of the codes above)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.remote_message = message


def _all_codes() -> dict[str, type[Moe2Error]]:
    """Code -> the most specific class of the tree that carries it."""
    out: dict[str, type[Moe2Error]] = {}
    todo: list[type[Moe2Error]] = [Moe2Error]
    while todo:
        cls = todo.pop()
        if cls is not RemoteError and cls.__module__ == __name__:  # not other modules' leaves
            out[cls.code] = cls
        todo.extend(cls.__subclasses__())
    out["bad_request"] = BadMessage
    out["unknown_session"] = UnknownSession
    out["model_error"] = ModelError
    return out


def error_from_reply(code: str, message: str, *, retry_after_s: float | None = None) -> Moe2Error:
    """The local exception for a peer's error reply (``RemoteError`` for unknown codes);
    ``retry_after_s``: the hint a ``busy`` reply carries."""
    cls = _all_codes().get(code)
    if cls is None or cls is Moe2Error:
        return RemoteError(code, message)
    if cls is Busy:
        return Busy(message, retry_after_s)
    return cls(message)
