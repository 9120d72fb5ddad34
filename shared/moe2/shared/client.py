"""A small client of the public prompt API, as a mobile app would use it.

    with PromptClient(BrokerConfig(host="gw.local")) as client:
        answer = client.ask("qa", "the fox eats", max_tokens=16, on_delta=print)
        print(answer.text, answer.experts)
        answer = client.ask("qa", [ChatMessage(role="user", content="Name a prime.")])
        picked = client.choose("qa", "The capital of France is", [" Paris", " Rome"])
        print(picked.choice, picked.logprobs)

Errors come back as the matching ``Moe2Error`` (``UnknownApp``, ``NoExperts``, ``Busy``...).

Delivery and deadlines, as a phone app should handle them too:

- The inbox is ``moe2/v1/replies/<user>/answers/<client id>``: on a broker with logins a
  client reads only ``moe2/v1/replies/<user>/#``, and publishes its prompts to
  ``moe2/v1/prompts/<app>/<user>`` (the only prompt topic its login may write: it tells the
  gateway whose inbox the answer may go to).
- The client keeps its MQTT session (``session_expiry_s``): answers published while its
  connection blips wait at the broker and arrive when it reconnects.
- The prompt carries an MQTT 5 message expiry of ``timeout``: a prompt that no gateway took
  by then (queued for a gateway that died and did not come back) is dropped by the broker,
  and ``ask`` raises ``RequestTimeout`` at its deadline. That deadline is the only answer a
  client gets for a prompt whose gateway vanished with it and never returned.
- When the broker says no gateway at all is subscribed (MQTT 5 "no matching subscribers":
  none connected, e.g. right after a broker restart), ``ask`` publishes again for up to
  ``wait_for_gateway_s``, then raises ``UnknownApp``. A prompt for an application that no
  online gateway serves is answered ``unknown_app`` by a gateway at once.

From an event loop (a web front holding many prompts at once, no thread each), ``stream``
yields the chunks and then the final answer; leaving it early (the caller was cancelled, its
user went away) publishes a ``PromptCancel``, so the gateway stops generating and frees the
experts' sessions. It fails at once with ``BrokerError`` while the broker is away::

    req = client.request("the fox eats", max_tokens=16)
    async for event in client.stream("qa", req, timeout=60):
        ...  # StreamChunk..., then one PromptAnswer
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

from moe2.shared import protocol as p
from moe2.shared.errors import (
    BadMessage,
    BrokerError,
    Moe2Error,
    RequestTimeout,
    UnknownApp,
    error_from_reply,
)
from moe2.shared.mqtt import BrokerConfig, Connection, response_properties

AnswerT = TypeVar("AnswerT", bound=BaseModel)

log = logging.getLogger(__name__)

_PUBACK_S = 10.0  # longest wait for the broker to acknowledge a prompt, seconds


def read_reply(obj: dict[str, Any], answer_type: type[AnswerT]) -> p.StreamChunk | AnswerT:
    """One message of a prompt's replies: a chunk or the final answer; an error reply raises
    its ``Moe2Error`` (by code), a malformed one ``BadMessage``."""
    if "error" in obj:
        err = obj["error"] if isinstance(obj["error"], dict) else {}
        raise error_from_reply(str(err.get("code")), str(err.get("message")))
    try:
        if "delta" in obj:
            return p.StreamChunk.model_validate(obj)
        return answer_type.model_validate(obj)
    except ValueError as exc:
        raise BadMessage(f"malformed answer from the gateway: {exc}") from None


class PromptClient:
    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str | None = None,
        *,
        session_expiry_s: int = 300,
        wait_for_gateway_s: float = 5.0,
    ) -> None:
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:12]}"
        self.user = broker.username  # None: a broker without logins
        self.inbox = p.topics.client_answers(broker.owner(self.client_id), self.client_id)
        self.wait_for_gateway_s = wait_for_gateway_s
        self._conn = Connection(broker, self.client_id, session_expiry_s=session_expiry_s)
        self._waiting: dict[str, Callable[[dict[str, Any]], None]] = {}  # prompt id -> sink
        self._lock = threading.Lock()
        self._conn.subscribe(self.inbox, self._on_message)

    def __enter__(self) -> PromptClient:
        self._conn.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.stop()

    @property
    def connected(self) -> bool:
        return self._conn.connected

    def _on_message(self, msg: Any) -> None:
        try:
            obj = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        with self._lock:
            sink = self._waiting.get(str(obj.get("id")))
        if sink is not None:
            sink(obj)

    def ask(
        self,
        app: str,
        prompt: str | Sequence[p.ChatMessage],
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_delta: Callable[[str], None] | None = None,
        timeout: float = 120.0,
    ) -> p.PromptAnswer:
        """The answer to ``prompt``: a text, or a conversation that each expert renders with
        its own chat template."""
        req = self.request(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stream=on_delta is not None,
        )
        return self._exchange(app, req, p.PromptAnswer, on_delta, timeout)

    def request(
        self,
        prompt: str | Sequence[p.ChatMessage],
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stream: bool = False,
    ) -> p.PromptRequest:
        """A prompt of a new id, answered to this client's inbox."""
        text, messages = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        return p.PromptRequest(
            id=uuid.uuid4().hex,
            prompt=text,
            messages=messages,
            reply_to=self.inbox,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stream=stream,
            seed=seed,
        )

    def choose(
        self, app: str, prompt: str, choices: Sequence[str], *, timeout: float = 120.0
    ) -> p.ChoiceAnswer:
        """A multiple-choice question: the index of the option the experts find most likely
        after ``prompt`` (``answer.choice``), with every option's fused log-likelihood."""
        req = p.PromptRequest(
            id=uuid.uuid4().hex, prompt=prompt, reply_to=self.inbox, choices=list(choices)
        )
        return self._exchange(app, req, p.ChoiceAnswer, None, timeout)

    def _exchange(
        self,
        app: str,
        req: p.PromptRequest,
        answer_type: type[AnswerT],
        on_delta: Callable[[str], None] | None,
        timeout: float,
    ) -> AnswerT:
        """Publish one prompt and wait for its one final answer (or error)."""
        pid = req.id
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            self._waiting[pid] = q.put
        deadline = time.monotonic() + timeout
        try:
            self._publish(app, req, pid, timeout, deadline)
            while True:
                try:
                    obj = q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise RequestTimeout(
                        f"no answer to prompt {pid} within {timeout:.0f} s"
                    ) from None
                event = read_reply(obj, answer_type)
                if isinstance(event, p.StreamChunk):
                    if on_delta is not None:
                        on_delta(event.delta)
                    continue
                return event
        finally:
            with self._lock:
                self._waiting.pop(pid, None)

    # ------------------------------------------------------------------ from an event loop

    async def stream(
        self, app: str, req: p.PromptRequest, *, timeout: float = 120.0
    ) -> AsyncGenerator[p.StreamChunk | p.PromptAnswer, None]:
        """The chunks of ``req`` (made by ``request``), then its one final answer; an error
        reply raises its ``Moe2Error``. Leaving early cancels the prompt at the gateway."""
        if req.reply_to != self.inbox:
            raise ValueError(f"the request must be answered to this client's inbox {self.inbox}")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def sink(obj: dict[str, Any]) -> None:  # on the network thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(q.put_nowait, obj)

        with self._lock:
            self._waiting[req.id] = sink
        deadline = loop.time() + timeout
        published = finished = False
        try:
            await self._publish_async(app, req, deadline)
            published = True
            while True:
                try:
                    obj = await asyncio.wait_for(q.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    raise RequestTimeout(
                        f"no answer to prompt {req.id} within {timeout:.0f} s"
                    ) from None
                try:
                    event = read_reply(obj, p.PromptAnswer)
                except Moe2Error:
                    finished = True  # the gateway is done with it
                    raise
                if isinstance(event, p.PromptAnswer):
                    finished = True
                yield event
                if finished:
                    return
        finally:
            with self._lock:
                self._waiting.pop(req.id, None)
            if published and not finished:
                self.cancel(app, req)

    def cancel(self, app: str, req: p.PromptRequest) -> None:
        """Ask the gateway holding ``req`` to stop (best effort: QoS 1, not waited for)."""
        cancel = p.PromptCancel(id=req.id, reply_to=req.reply_to)
        topic = p.topics.cancel(app, self.user)  # the prompt's owner level: the gateway matches it
        try:
            self._conn.publish(topic, cancel.model_dump_json().encode(), qos=1)
        except Exception as exc:  # never raise from a finally
            log.warning("could not cancel prompt %s: %s", req.id, exc)

    async def _publish_async(self, app: str, req: p.PromptRequest, deadline: float) -> None:
        """``_publish`` for an event loop; raises BrokerError at once while disconnected."""
        loop = asyncio.get_running_loop()
        timeout = max(1.0, deadline - loop.time())
        props = response_properties(self.inbox, req.id.encode())
        props.MessageExpiryInterval = max(1, math.ceil(timeout))
        payload = req.model_dump_json(exclude_none=True).encode()
        give_up = min(deadline, loop.time() + self.wait_for_gateway_s)
        while True:
            if not self._conn.connected:
                raise BrokerError("not connected to the MQTT broker")
            topic = p.topics.prompts(app, self.user)  # the login, where there is one, as _publish
            fut = self._conn.publish_future(topic, payload, properties=props)
            wait = min(_PUBACK_S, max(0.0, deadline - loop.time()))
            try:
                delivered = await asyncio.wait_for(asyncio.wrap_future(fut), wait)
            except TimeoutError:
                raise BrokerError(
                    f"the broker did not acknowledge the prompt within {wait:.0f} s"
                ) from None
            if delivered:
                return
            if loop.time() >= give_up:
                raise UnknownApp(f"no gateway is subscribed to application {app!r} on this broker")
            await asyncio.sleep(0.2)

    def _publish(
        self, app: str, req: p.PromptRequest, pid: str, timeout: float, deadline: float
    ) -> None:
        """Publish until the broker has a gateway to hand the prompt to (see the module
        docstring); raises UnknownApp when none subscribes within ``wait_for_gateway_s``."""
        props = response_properties(self.inbox, pid.encode())
        props.MessageExpiryInterval = max(1, math.ceil(timeout))  # the broker drops it after
        payload = req.model_dump_json(exclude_none=True).encode()
        give_up = min(deadline, time.monotonic() + self.wait_for_gateway_s)
        while True:
            if not self._conn.wait_connected(max(0.0, deadline - time.monotonic())):
                raise RequestTimeout(f"not connected to the broker within {timeout:.0f} s")
            try:
                topic = p.topics.prompts(app, self.user)
                if self._conn.publish_acked(topic, payload, properties=props):
                    return
            except BrokerError:
                if self._conn.connected:
                    raise  # refused (not authorized, too large): not a connection blip
                continue  # the connection dropped under us: publish again once back
            if time.monotonic() >= give_up:
                raise UnknownApp(f"no gateway is subscribed to application {app!r} on this broker")
            time.sleep(0.2)
