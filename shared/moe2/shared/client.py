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
  client reads only ``moe2/v1/replies/<user>/#``.
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
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

from moe2.shared import protocol as p
from moe2.shared.errors import (
    BadMessage,
    BrokerError,
    RequestTimeout,
    UnknownApp,
    error_from_reply,
)
from moe2.shared.mqtt import BrokerConfig, Connection, response_properties

AnswerT = TypeVar("AnswerT", bound=BaseModel)


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
        self.inbox = p.topics.client_answers(broker.owner(self.client_id), self.client_id)
        self.wait_for_gateway_s = wait_for_gateway_s
        self._conn = Connection(broker, self.client_id, session_expiry_s=session_expiry_s)
        self._waiting: dict[str, queue.Queue[dict[str, Any]]] = {}
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
            q = self._waiting.get(str(obj.get("id")))
        if q is not None:
            q.put(obj)

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
        logprobs: bool = False,
        top_logprobs: int | None = None,
        on_chunk: Callable[[p.StreamChunk], None] | None = None,
    ) -> p.PromptAnswer:
        """The answer to ``prompt``: a text, or a conversation that each expert renders with
        its own chat template. With ``logprobs`` every token's fused log-probability (and
        ``top_logprobs`` alternatives) comes in ``answer.logprobs``, and streamed, in each
        chunk ``on_chunk`` gets."""
        pid = uuid.uuid4().hex
        text, messages = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        req = p.PromptRequest(
            id=pid,
            prompt=text,
            messages=messages,
            reply_to=self.inbox,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stream=on_delta is not None or on_chunk is not None,
            seed=seed,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )
        return self._exchange(app, req, p.PromptAnswer, on_delta, timeout, on_chunk)

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
        on_chunk: Callable[[p.StreamChunk], None] | None = None,
    ) -> AnswerT:
        """Publish one prompt and wait for its one final answer (or error)."""
        pid = req.id
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            self._waiting[pid] = q
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
                if "error" in obj:
                    err = obj["error"] if isinstance(obj["error"], dict) else {}
                    raise error_from_reply(str(err.get("code")), str(err.get("message")))
                if "delta" in obj:
                    if on_delta is not None:
                        on_delta(str(obj["delta"]))
                    if on_chunk is not None:
                        try:
                            on_chunk(p.StreamChunk.model_validate(obj))
                        except ValueError as exc:
                            raise BadMessage(f"malformed chunk from the gateway: {exc}") from None
                    continue
                try:
                    return answer_type.model_validate(obj)
                except ValueError as exc:
                    raise BadMessage(f"malformed answer from the gateway: {exc}") from None
        finally:
            with self._lock:
                self._waiting.pop(pid, None)

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
                if self._conn.publish_acked(p.topics.prompts(app), payload, properties=props):
                    return
            except BrokerError:
                if self._conn.connected:
                    raise  # refused (not authorized, too large): not a connection blip
                continue  # the connection dropped under us: publish again once back
            if time.monotonic() >= give_up:
                raise UnknownApp(f"no gateway is subscribed to application {app!r} on this broker")
            time.sleep(0.2)
