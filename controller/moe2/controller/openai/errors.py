"""Errors of the HTTP front, in OpenAI's shape, with the status an SDK acts on.

``{"error": {"message", "type", "param", "code"}}``: a missing or wrong key is 401, a body
that is too slow 408 or too large 413, an invalid or unsupported request 400, an application
nobody serves 404 (``model_not_found``; 503 while the fleet knows it but no gateway serves it
right now), a saturated fleet 429 with ``Retry-After``, a broker or every gateway away 503
with ``Retry-After``, a gateway past its deadline 504. SDKs retry 429 and 5xx; they do not
retry 404, so a stopped gateway must not look like an unknown model.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from moe2.shared.errors import Moe2Error

# moe2 error code -> HTTP status, OpenAI error type, OpenAI error code.
_STATUS: dict[str, tuple[int, str, str]] = {
    "unknown_app": (404, "invalid_request_error", "model_not_found"),
    "bad_request": (400, "invalid_request_error", "bad_request"),
    "too_large": (413, "invalid_request_error", "too_large"),
    "context_overflow": (400, "invalid_request_error", "context_length_exceeded"),
    "busy": (429, "rate_limit_error", "busy"),
    "no_experts": (503, "server_error", "no_experts"),
    "cancelled": (503, "server_error", "cancelled"),  # the gateway stopped mid-answer
    "broker": (503, "server_error", "broker_unavailable"),
    "deadline": (504, "server_error", "deadline"),
    "timeout": (504, "server_error", "timeout"),
}
_RETRY = {429, 503}  # statuses that tell a client to come back (with Retry-After)


class HttpError(Exception):
    """An error answered as an HTTP status (before the first byte of a response)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.kind = kind
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_moe2(exc: Moe2Error, retry_after_s: int) -> HttpError:
    """The HTTP form of an error from the fleet (a gateway's reply, the broker)."""
    status, kind, code = _STATUS.get(exc.code, (502, "server_error", exc.code))
    headers = {"Retry-After": str(retry_after_s)} if status in _RETRY else None
    return HttpError(status, exc.message, code=code, kind=kind, headers=headers)


def unavailable(message: str, code: str, retry_after_s: int) -> HttpError:
    """503: come back later (the broker or the gateways are away)."""
    return HttpError(
        503,
        message,
        code=code,
        kind="server_error",
        headers={"Retry-After": str(retry_after_s)},
    )
