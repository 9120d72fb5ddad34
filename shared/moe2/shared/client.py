"""A small client of the public prompt API, as a mobile app would use it.

    with PromptClient(BrokerConfig(host="gw.local")) as client:
        answer = client.ask("qa", "the fox eats", max_tokens=16, on_delta=print)
        print(answer.text, answer.experts)
        picked = client.choose("qa", "The capital of France is", [" Paris", " Rome"])
        print(picked.choice, picked.logprobs)

Errors come back as the matching ``Moe2Error`` (``UnknownApp``, ``NoExperts``, ``Busy``...).
A prompt for an application that no gateway serves reaches no subscriber; the broker says so
in its MQTT 5 acknowledgement and ``ask`` raises ``UnknownApp`` at once.
"""

from __future__ import annotations

import json
import queue
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

from moe2.shared import protocol as p
from moe2.shared.errors import BadMessage, RequestTimeout, UnknownApp, error_from_reply
from moe2.shared.mqtt import BrokerConfig, Connection, response_properties

AnswerT = TypeVar("AnswerT", bound=BaseModel)


class PromptClient:
    def __init__(self, broker: BrokerConfig, client_id: str | None = None) -> None:
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:12]}"
        self.inbox = p.topics.client_answers(self.client_id)
        self._conn = Connection(broker, self.client_id)
        self._waiting: dict[str, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._conn.subscribe(self.inbox, self._on_message)

    def __enter__(self) -> PromptClient:
        self._conn.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.stop()

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
        prompt: str,
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_delta: Callable[[str], None] | None = None,
        timeout: float = 120.0,
    ) -> p.PromptAnswer:
        pid = uuid.uuid4().hex
        req = p.PromptRequest(
            id=pid,
            prompt=prompt,
            reply_to=self.inbox,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stream=on_delta is not None,
            seed=seed,
        )
        return self._exchange(app, req, p.PromptAnswer, on_delta, timeout)

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
            self._waiting[pid] = q
        try:
            delivered = self._conn.publish_acked(
                p.topics.prompts(app),
                req.model_dump_json(exclude_none=True).encode(),
                properties=response_properties(self.inbox, pid.encode()),
            )
            if not delivered:
                raise UnknownApp(f"no gateway serves application {app!r} on this broker")
            while True:
                try:
                    obj = q.get(timeout=timeout)
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
                    continue
                try:
                    return answer_type.model_validate(obj)
                except ValueError as exc:
                    raise BadMessage(f"malformed answer from the gateway: {exc}") from None
        finally:
            with self._lock:
                self._waiting.pop(pid, None)
