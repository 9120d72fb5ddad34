"""The Starlette application behind ``moe2-http``.

Each completion request is one prompt on the MQTT prompt API, held on the event loop
(``PromptClient.stream``: no thread per request), so the front keeps as many requests in
flight as the gateways announce they take (``admission.py``) and answers 429 with
``Retry-After`` beyond.

Before the first byte of a response, everything the fleet can say is an HTTP status, for
streamed requests too: the front checks the broker (503), the gateways (503 when none is
online; for an application nobody serves, 503 while the fleet knows it, else 404) and the
capacity (429), then waits for the gateway's first message — a token, the answer, or an
error that becomes its status (404, 429, 503, 504...) — and only then starts the response
(server-sent events for ``stream: true``: ``data: {chunk}`` ... ``data: [DONE]``). Only an
error after the first token travels as an event. A client that disconnects, before or
during its answer, cancels the prompt at the gateway (``PromptCancel``), which frees the
experts' sessions.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` everywhere,
unknown routes and methods included (``errors.py``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Any, TypeVar

import anyio.to_thread
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moe2.controller.openai import fleetpage
from moe2.controller.openai.admission import Admission, capacities
from moe2.controller.openai.errors import HttpError, from_moe2, unavailable
from moe2.controller.openai.metrics import UNKNOWN_MODEL, FrontMetrics, endpoint_of
from moe2.controller.openai.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    Unsupported,
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    moe2_extension,
    prompt_logprobs,
    tokens_of,
    usage,
)
from moe2.controller.openai.settings import HttpSettings
from moe2.controller.openai.summary import FleetSummary, RegistryReader, summarise
from moe2.shared import protocol as p
from moe2.shared.client import PromptClient
from moe2.shared.errors import BadMessage, Moe2Error
from moe2.shared.fleet import FleetView
from moe2.shared.protocol.base import describe_error

log = logging.getLogger(__name__)
access_log = logging.getLogger("moe2.http.access")

T = TypeVar("T")
R = TypeVar("R", bound=BaseModel)
Event = p.StreamChunk | p.PromptAnswer
# The views of the fleet moe2-http keeps (the page and /metrics read all of them).
FLEET_KINDS = ("info", "status", "profile", "gateway", "stats", "assignment_ack", "desired_app")
CLIENT_GONE = 499  # nginx's "client closed request": logged and counted, never sent


class ClientGone(Exception):
    """The HTTP client disconnected before its answer."""


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has disconnected (the body must have been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class Front:
    """The application's state: one prompt client and one fleet view for the process."""

    def __init__(
        self,
        settings: HttpSettings,
        client: PromptClient,
        fleet: FleetView,
        registry: RegistryReader | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.fleet = fleet
        self.registry = registry or RegistryReader(settings.db_url)
        self.admission = Admission(settings.max_in_flight)
        self.metrics = FrontMetrics(self.summary)
        self.metrics.in_flight.set_function(lambda: float(self.admission.total))
        self._keys = [k.encode() for k in settings.accepted_keys()]
        self._known_apps: set[str] = set()  # applications some gateway served since start

    # ------------------------------------------------------------------ plumbing

    def authorised(self, request: Request) -> bool:
        """``Authorization: Bearer KEY``, or Basic with the key as password (browsers)."""
        if self.settings.no_auth:
            return True
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = value.strip()
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        if not given:
            return False
        raw = given.encode()
        # Compare with every key, in constant time each: no early exit reveals which matched.
        return any([hmac.compare_digest(raw, k) for k in self._keys])

    async def body(self, request: Request, model: type[R]) -> R:
        """The request body, read within ``body_timeout_s`` and ``max_request_bytes``."""
        limit = self.settings.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HttpError(413, f"request body over {limit} bytes", code="too_large")

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HttpError(413, f"request body over {limit} bytes", code="too_large")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            raw = await asyncio.wait_for(read(), self.settings.body_timeout_s)
        except TimeoutError:
            raise HttpError(
                408,
                f"the request body did not arrive within {self.settings.body_timeout_s:g} s",
                code="request_timeout",
                headers={"Connection": "close"},
            ) from None
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
        self._known_apps |= set(apps)
        return apps

    def model_label(self, app: str) -> str:
        return app if app in self._known_apps else UNKNOWN_MODEL

    def route(self, app: str) -> tuple[int | None, int | None]:
        """Whether a prompt to ``app`` can be answered now; (its gateways' capacity, the
        fleet's). Raises the HttpError a client must see instead."""
        retry = self.settings.retry_after_s
        if not self.client.connected:
            self.metrics.refused.labels("broker").inc()
            raise unavailable(
                "the MQTT broker is unreachable; retry later", "broker_unavailable", retry
            )
        if not self.fleet.synced.is_set():
            self.metrics.refused.labels("starting").inc()
            raise unavailable("the fleet's state is not in yet; retry", "starting", retry)
        gateways = self.fleet.online_gateways()
        if not gateways:
            self.metrics.refused.labels("no_gateway").inc()
            raise unavailable("no gateway is online; retry later", "no_gateway", retry)
        served = self.served()
        if app not in served:
            if app in self._known_apps or app in self.fleet.copy().desired_app:
                self.metrics.refused.labels("model_unavailable").inc()
                raise unavailable(
                    f"no online gateway serves application {app!r} right now; retry later",
                    "model_unavailable",
                    retry,
                )
            self.metrics.refused.labels("unknown_model").inc()
            raise HttpError(
                404,
                f"no online gateway serves application {app!r}; served: "
                f"{', '.join(sorted(served)) or 'none'}",
                code="model_not_found",
                param="model",
            )
        return capacities(gateways, app)

    def summary(self) -> FleetSummary:
        """The fleet as the page and /metrics show it (reads the registry: a worker thread)."""
        return summarise(
            self.fleet.copy(),
            self.registry.figures(),
            broker_connected=self.client.connected,
            synced=self.fleet.synced.is_set(),
            in_flight=self.admission.total,
        )

    async def _until_gone(self, request: Request, work: Awaitable[T]) -> T:
        """``work``'s result, unless the client disconnects first: then ``work`` is
        cancelled (a prompt in it is cancelled at the gateway) and ClientGone raised."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            gone.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self.metrics.client_gone.inc()
        request.state.gone = True
        raise ClientGone

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
            raise HttpError(
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
        req = await self.body(request, ChatCompletionRequest)
        req.check_supported()
        return await self._answer(request, req, req.conversation(), "chat.completion")

    async def completions(self, request: Request) -> Response:
        req = await self.body(request, CompletionRequest)
        req.check_supported()
        return await self._answer(request, req, req.text(), "text_completion")

    async def fleet_page(self, request: Request) -> Response:
        summary = await anyio.to_thread.run_sync(self.summary)
        return HTMLResponse(fleetpage.render(summary), headers={"Cache-Control": "no-store"})

    async def fleet_json(self, request: Request) -> Response:
        summary = await anyio.to_thread.run_sync(self.summary)
        return JSONResponse(asdict(summary))

    async def prometheus(self, request: Request) -> Response:
        text = await anyio.to_thread.run_sync(generate_latest, self.metrics.registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def health(self, request: Request) -> Response:
        """Liveness: 200 while connected to the broker, else 503."""
        ok = self.client.connected
        body = {"ok": ok, "broker": ok}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def ready(self, request: Request) -> Response:
        """Readiness: 200 when prompts can be answered (broker, fleet state, a gateway)."""
        connected, synced = self.client.connected, self.fleet.synced.is_set()
        served = self.served() if connected else {}
        reasons = [
            why
            for bad, why in (
                (not connected, "the MQTT broker is unreachable"),
                (connected and not synced, "the fleet's state is not in yet"),
                (connected and synced and not served, "no online gateway serves an application"),
            )
            if bad
        ]
        body = {
            "ready": not reasons,
            "reasons": reasons,
            "broker": connected,
            "models": sorted(served),
            "in_flight": self.admission.total,
        }
        return JSONResponse(body, status_code=503 if reasons else 200)

    # ------------------------------------------------------------------ answering

    async def _answer(
        self,
        request: Request,
        req: ChatCompletionRequest | CompletionRequest,
        prompt: str | list[p.ChatMessage],
        kind: str,
    ) -> Response:
        app = req.model
        request.state.model = app
        app_cap, fleet_cap = self.route(app)
        self.metrics.by_model.labels(self.model_label(app)).inc()
        why = self.admission.enter(app, app_cap, fleet_cap)
        if why is not None:
            self.metrics.refused.labels("capacity").inc()
            raise HttpError(
                429,
                f"{why}; retry later",
                code="rate_limit_exceeded",
                kind="rate_limit_error",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        handed_over = False
        try:
            preq = prompt_logprobs(
                self.client.request(prompt, stream=req.stream, **req.sampling()),
                req.top_logprobs_asked(),
            )
            events = self.client.stream(app, preq, timeout=self.settings.request_timeout_s)
            started = time.perf_counter()
            endpoint = endpoint_of(request.url.path)
            try:
                if not req.stream:
                    answer = await self._until_gone(request, _final(events))
                    self.metrics.first_token.labels(endpoint).observe(time.perf_counter() - started)
                    return JSONResponse(_complete(req, kind, answer, _rid(kind)))
                first = await self._until_gone(request, anext(events))
            except Moe2Error as exc:
                raise from_moe2(exc, self.settings.retry_after_s) from None
            except ClientGone:
                return Response(status_code=CLIENT_GONE)
            self.metrics.first_token.labels(endpoint).observe(time.perf_counter() - started)
            stream = _EventStream(
                _sse(req, kind, _rid(kind), first, events, self.settings.retry_after_s),
                events,
                lambda: self.admission.leave(app),
                self.metrics.client_gone.inc,
            )
            handed_over = True  # the stream leaves its place when it ends
            return stream
        finally:
            if not handed_over:
                self.admission.leave(app)


def _rid(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex


async def _final(events: AsyncIterator[Event]) -> p.PromptAnswer:
    async for event in events:
        if isinstance(event, p.PromptAnswer):
            return event
    raise BadMessage("the gateway's replies ended without an answer")


def _complete(
    req: ChatCompletionRequest | CompletionRequest, kind: str, answer: p.PromptAnswer, rid: str
) -> dict[str, Any]:
    logprobs: dict[str, Any] | None = None
    if req.top_logprobs_asked() is not None:
        tokens = tokens_of(answer)
        logprobs = (
            chat_logprobs(tokens) if kind == "chat.completion" else completion_logprobs(tokens)
        )
    if kind == "chat.completion":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": answer.text},
            "logprobs": logprobs,
            "finish_reason": finish_reason(answer),
        }
    else:
        choice = {
            "index": 0,
            "text": answer.text,
            "logprobs": logprobs,
            "finish_reason": finish_reason(answer),
        }
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": req.model,
        "choices": [choice],
        "usage": usage(answer),
        "moe2": moe2_extension(answer),
    }


async def _sse(
    req: ChatCompletionRequest | CompletionRequest,
    kind: str,
    rid: str,
    first: Event,
    events: AsyncIterator[Event],
    retry_after_s: int,
) -> AsyncIterator[str]:
    """Server-sent events of an answer whose first event came already."""
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())
    want_logprobs = req.top_logprobs_asked() is not None
    offset = 0  # characters sent so far (completions' text_offset)

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

    def delta(text: str | None, finish: str | None, event: Event | None) -> dict[str, Any]:
        logprobs = None
        if want_logprobs and isinstance(event, p.StreamChunk):
            tokens = tokens_of(event)
            logprobs = chat_logprobs(tokens) if chat else completion_logprobs(tokens, offset)
        if chat:
            body: dict[str, Any] = {}
            if text is not None:
                body["content"] = text
            return {"index": 0, "delta": body, "logprobs": logprobs, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    if chat:
        yield chunk(
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        )
    event: Event = first
    while True:
        if isinstance(event, p.StreamChunk):
            yield chunk(delta(event.delta, None, event))
            offset += len(event.delta)
        else:
            yield chunk(
                delta(None if chat else "", finish_reason(event), None), moe2=moe2_extension(event)
            )
            if req.stream_options is not None and req.stream_options.include_usage:
                yield chunk(None, usage=usage(event))
            break
        try:
            event = await anext(events)
        except Moe2Error as exc:
            # The status line went out with the first token: the error travels as an event.
            yield f"data: {json.dumps(from_moe2(exc, retry_after_s).body())}\n\n"
            break
        except StopAsyncIteration:
            break
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """A stream of server-sent events that, however it ends (the answer is done, the client
    left, the server stops), closes the prompt's replies (cancelling the prompt if it was
    not answered) and gives its place back; a stream cut short counts as a client gone."""

    def __init__(
        self,
        content: AsyncIterator[str],
        events: AsyncGenerator[Event, None],
        release: Callable[[], None],
        gone: Callable[[], None],
    ) -> None:
        super().__init__(
            self._tracked(content),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._events = events
        self._release = release
        self._gone = gone
        self._completed = False

    async def _tracked(self, content: AsyncIterator[str]) -> AsyncIterator[str]:
        async for item in content:
            yield item
        self._completed = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._events.aclose()
            finally:
                self._release()
                if not self._completed:
                    scope.setdefault("state", {})["gone"] = True
                    self._gone()


# ---------------------------------------------------------------------- the application


class Observed:
    """Access log and request metrics around the application (pure ASGI, so streamed
    responses are measured to their last byte)."""

    def __init__(self, app: ASGIApp, front: Front) -> None:
        self.app = app
        self.front = front

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = CLIENT_GONE
        sent = 0

        async def observe(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            state = scope.get("state") or {}
            if state.get("gone"):
                status = CLIENT_GONE
            elapsed = time.perf_counter() - started
            endpoint = endpoint_of(scope["path"])
            m = self.front.metrics
            m.requests.labels(endpoint, str(status)).inc()
            m.seconds.labels(endpoint).observe(elapsed)
            if self.front.settings.access_log:
                client = scope.get("client")
                model = state.get("model")
                access_log.info(
                    '%s "%s %s" %d %d bytes %.1f ms%s',
                    client[0] if client else "-",
                    scope["method"],
                    scope["path"],
                    status,
                    sent,
                    elapsed * 1e3,
                    f" model={model}" if model else "",
                    extra={
                        "moe2": {
                            "client": client[0] if client else None,
                            "method": scope["method"],
                            "path": scope["path"],
                            "status": status,
                            "bytes": sent,
                            "ms": round(elapsed * 1e3, 2),
                            "model": self.front.model_label(model) if model else None,
                        }
                    },
                )


def build_app(front: Front) -> ASGIApp:
    def guarded(
        handler: Callable[[Request], Awaitable[Response]], *, basic: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if not front.authorised(request):
                headers = {"WWW-Authenticate": 'Basic realm="moe2 fleet"'} if basic else None
                return HttpError(
                    401,
                    "missing or invalid API key (Authorization: Bearer KEY)",
                    code="invalid_api_key",
                    headers=headers,
                ).response()
            try:
                return await handler(request)
            except HttpError as exc:
                return exc.response()
            except Unsupported as exc:
                return HttpError(
                    400, str(exc), code="unsupported_parameter", param=exc.param
                ).response()
            except Moe2Error as exc:
                return from_moe2(exc, front.settings.retry_after_s).response()

        return endpoint

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = (
            f"no route {request.method} {request.url.path} (see /v1/models, "
            "/v1/chat/completions, /v1/completions, /health, /ready, /metrics, /fleet)"
            if exc.status_code == 404
            else f"{request.method} is not allowed on {request.url.path}"
            if exc.status_code == 405
            else str(exc.detail)
        )
        return HttpError(
            exc.status_code, message, code=code, headers=dict(exc.headers or {})
        ).response()

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
        return HttpError(
            500, f"internal error: {type(exc).__name__}", code="internal", kind="server_error"
        ).response()

    app = Starlette(
        routes=[
            Route("/v1/models", guarded(front.models), methods=["GET"]),
            Route("/v1/models/{model:path}", guarded(front.model), methods=["GET"]),
            Route("/v1/chat/completions", guarded(front.chat), methods=["POST"]),
            Route("/v1/completions", guarded(front.completions), methods=["POST"]),
            Route("/fleet", guarded(front.fleet_page, basic=True), methods=["GET"]),
            Route("/fleet.json", guarded(front.fleet_json, basic=True), methods=["GET"]),
            Route("/metrics", guarded(front.prometheus), methods=["GET"]),
            Route("/health", front.health, methods=["GET"]),
            Route("/ready", front.ready, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    return Observed(app, front)
