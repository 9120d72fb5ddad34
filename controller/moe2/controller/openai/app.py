"""The Starlette application behind ``moe2-http``.

Each request is one prompt on the MQTT prompt API. ``PromptClient.ask`` blocks, so it runs
in a worker thread; streamed deltas cross to the event loop through a queue and leave as
server-sent events (``data: {chunk}``, then ``data: [DONE]``). Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` with moe2's code: a missing or wrong key
is 401, an application no gateway serves 404, a saturated gateway 429, no expert online 503,
a gateway past its deadline 504.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio.to_thread
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moe2.controller.openai.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    Unsupported,
    finish_reason,
    moe2_extension,
    usage,
)
from moe2.controller.openai.settings import HttpSettings
from moe2.shared import protocol as p
from moe2.shared.client import PromptClient
from moe2.shared.errors import Moe2Error
from moe2.shared.fleet import FleetView
from moe2.shared.protocol.base import describe_error

log = logging.getLogger(__name__)

# moe2 error code -> HTTP status, OpenAI error type.
_STATUS: dict[str, tuple[int, str]] = {
    "unknown_app": (404, "invalid_request_error"),
    "bad_request": (400, "invalid_request_error"),
    "too_large": (413, "invalid_request_error"),
    "context_overflow": (400, "invalid_request_error"),
    "busy": (429, "rate_limit_error"),
    "no_experts": (503, "server_error"),
    "broker": (503, "server_error"),
    "deadline": (504, "server_error"),
    "timeout": (504, "server_error"),
}


def error_response(
    status: int,
    message: str,
    *,
    code: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def moe2_error_response(exc: Moe2Error) -> JSONResponse:
    status, kind = _STATUS.get(exc.code, (500, "server_error"))
    code = "model_not_found" if exc.code == "unknown_app" else exc.code
    return error_response(status, exc.message, code=code, kind=kind)


class Front:
    """The application's state: one prompt client and one fleet view for the process."""

    def __init__(self, settings: HttpSettings, client: PromptClient, fleet: FleetView) -> None:
        self.settings = settings
        self.client = client
        self.fleet = fleet
        self._keys = [k.encode() for k in settings.accepted_keys()]

    # ------------------------------------------------------------------ plumbing

    def authorised(self, request: Request) -> bool:
        if self.settings.no_auth:
            return True
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            return False
        given = key.strip().encode()
        # Compare with every key, in constant time each: no early exit reveals which matched.
        return any([hmac.compare_digest(given, k) for k in self._keys])

    async def body(self, request: Request, model: type[Any]) -> Any:
        raw = await request.body()
        if len(raw) > self.settings.max_request_bytes:
            raise Unsupported("body", f"request body over {self.settings.max_request_bytes} bytes")
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise Unsupported("body", f"invalid request: {describe_error(exc)}") from None

    def served(self) -> dict[str, list[str]]:
        """Application -> the online gateways serving it."""
        apps: dict[str, list[str]] = {}
        for gw, status in sorted(self.fleet.online_gateways().items()):
            for app in status.apps:
                apps.setdefault(app, []).append(gw)
        return apps

    # ------------------------------------------------------------------ endpoints

    async def models(self, request: Request) -> Response:
        created = int(time.time())
        data = [
            {
                "id": app,
                "object": "model",
                "created": created,
                "owned_by": "moe2",
                "moe2": {"gateways": gws},
            }
            for app, gws in sorted(self.served().items())
        ]
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        app = request.path_params["model"]
        gws = self.served().get(app)
        if gws is None:
            return error_response(
                404, f"no online gateway serves application {app!r}", code="model_not_found"
            )
        return JSONResponse(
            {
                "id": app,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "moe2",
                "moe2": {"gateways": gws},
            }
        )

    async def chat(self, request: Request) -> Response:
        req: ChatCompletionRequest = await self.body(request, ChatCompletionRequest)
        req.check_supported()
        conversation = req.conversation()
        return await self._answer(req, conversation, "chat.completion")

    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = await self.body(request, CompletionRequest)
        req.check_supported()
        return await self._answer(req, req.text(), "text_completion")

    # ------------------------------------------------------------------ answering

    def _ask(
        self,
        model: str,
        prompt: Any,
        sampling: dict[str, Any],
        on_delta: Callable[[str], None] | None,
    ) -> p.PromptAnswer:
        return self.client.ask(
            model, prompt, on_delta=on_delta, timeout=self.settings.request_timeout_s, **sampling
        )

    async def _answer(self, req: Any, prompt: Any, kind: str) -> Response:
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self._stream(req, prompt, kind, rid, created, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        answer = await anyio.to_thread.run_sync(self._ask, req.model, prompt, req.sampling(), None)
        if kind == "chat.completion":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "logprobs": None,
                "finish_reason": finish_reason(answer),
            }
        else:
            choice = {
                "index": 0,
                "text": answer.text,
                "logprobs": None,
                "finish_reason": finish_reason(answer),
            }
        return JSONResponse(
            {
                "id": rid,
                "object": kind,
                "created": created,
                "model": req.model,
                "choices": [choice],
                "usage": usage(answer),
                "moe2": moe2_extension(answer),
            }
        )

    async def _stream(
        self, req: Any, prompt: Any, kind: str, rid: str, created: int, include_usage: bool
    ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def put(item: tuple[str, Any]) -> None:  # from other threads
            with contextlib.suppress(RuntimeError):  # the loop closed: the client is gone
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:  # a worker thread; it finishes even if the client went away
            try:
                answer = self._ask(req.model, prompt, req.sampling(), lambda d: put(("delta", d)))
            except Moe2Error as exc:
                put(("error", exc))
            except Exception as exc:  # never leave the stream hanging
                log.exception("streamed request failed")
                put(("error", Moe2Error(f"{type(exc).__name__}: {exc}")))
            else:
                put(("done", answer))

        chat = kind == "chat.completion"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict[str, Any] | None, **extra: Any) -> str:
            body = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": req.model,
                "choices": [] if choice is None else [choice],
                **extra,
            }
            return f"data: {json.dumps(body)}\n\n"

        def delta_choice(
            text: str | None, finish: str | None, role: bool = False
        ) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        loop.run_in_executor(None, work)
        if chat:
            yield chunk(delta_choice("", None, role=True))
        while True:
            what, value = await queue.get()
            if what == "delta":
                yield chunk(delta_choice(value, None))
                continue
            if what == "error":
                # The status line is sent already: the error travels as an event.
                _status, etype = _STATUS.get(value.code, (500, "server_error"))
                code = "model_not_found" if value.code == "unknown_app" else value.code
                err = {"message": value.message, "type": etype, "param": None, "code": code}
                yield f"data: {json.dumps({'error': err})}\n\n"
                break
            answer: p.PromptAnswer = value
            yield chunk(
                delta_choice(None if chat else "", finish_reason(answer)),
                moe2=moe2_extension(answer),
            )
            if include_usage:
                yield chunk(None, usage=usage(answer))
            break
        yield "data: [DONE]\n\n"


def build_app(front: Front) -> Starlette:
    async def guarded(request: Request, handler: Callable[[Request], Any]) -> Response:
        if not front.authorised(request):
            return error_response(
                401,
                "missing or invalid API key (Authorization: Bearer KEY)",
                code="invalid_api_key",
            )
        try:
            response: Response = await handler(request)
            return response
        except Unsupported as exc:
            return error_response(400, str(exc), code="unsupported_parameter", param=exc.param)
        except Moe2Error as exc:
            return moe2_error_response(exc)

    def route(path: str, handler: Callable[[Request], Any], method: str) -> Route:
        async def endpoint(request: Request) -> Response:
            return await guarded(request, handler)

        return Route(path, endpoint, methods=[method])

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": front.client.connected})

    return Starlette(
        routes=[
            route("/v1/models", front.models, "GET"),
            route("/v1/models/{model:path}", front.model, "GET"),
            route("/v1/chat/completions", front.chat, "POST"),
            route("/v1/completions", front.completions, "POST"),
            Route("/health", health, methods=["GET"]),
        ]
    )
