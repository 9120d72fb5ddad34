"""Raw prompt traffic for tests, as any MQTT client would send it: publish prompts with a
``reply_to`` and count what comes back per prompt id (finals, errors, duplicates).

    with PromptInbox(broker_config) as inbox:
        ids = inbox.send("zoo", 10, max_tokens=8)
        inbox.wait_all(ids, timeout=60)
        inbox.finals("p-1"), inbox.errors(...)
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import defaultdict
from typing import Any

from moe2.shared import protocol as p
from moe2.shared.mqtt import BrokerConfig, Connection


class PromptInbox:
    def __init__(self, cfg: BrokerConfig, *, session_expiry_s: int = 0) -> None:
        self.client_id = f"inbox-{uuid.uuid4().hex[:8]}"
        self.topic = p.topics.client_answers(cfg.owner(self.client_id), self.client_id)
        self.user = cfg.username  # on a broker with logins: prompts/<app>/<user>
        self.by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.cond = threading.Condition()
        self.conn = Connection(cfg, self.client_id, session_expiry_s=session_expiry_s)
        self.conn.subscribe(self.topic, self._on)
        self._n = 0

    def __enter__(self) -> PromptInbox:
        self.conn.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.stop()

    def _on(self, msg: Any) -> None:
        obj = json.loads(msg.payload)
        with self.cond:
            self.by_id[str(obj.get("id"))].append(obj)
            self.cond.notify_all()

    def send(self, app: str, n: int, *, prompt: str = "the fox eats", **fields: Any) -> list[str]:
        """Publish ``n`` prompts (QoS 1); returns their ids."""
        ids = []
        for _ in range(n):
            self._n += 1
            pid = f"{self.client_id}-{self._n}"
            body = {"id": pid, "prompt": prompt, "reply_to": self.topic, **fields}
            topic = p.topics.prompts(app, self.user)
            self.conn.publish(topic, json.dumps(body).encode(), qos=1)
            ids.append(pid)
        return ids

    def terminal(self, pid: str) -> list[dict[str, Any]]:
        """The final answers and errors received for ``pid`` (chunks left out)."""
        with self.cond:
            return [m for m in self.by_id.get(pid, []) if "text" in m or "error" in m]

    def wait_all(self, ids: list[str], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: all(self._done(i) for i in ids), timeout)

    def _done(self, pid: str) -> bool:
        return any("text" in m or "error" in m for m in self.by_id.get(pid, []))

    def summary(self, ids: list[str]) -> dict[str, Any]:
        """answered / errors by code / lost / duplicated over ``ids``."""
        out: dict[str, Any] = {"answered": 0, "errors": {}, "lost": [], "duplicated": []}
        for pid in ids:
            got = self.terminal(pid)
            if not got:
                out["lost"].append(pid)
                continue
            if len(got) > 1:
                out["duplicated"].append(pid)
            if "text" in got[0]:
                out["answered"] += 1
            else:
                code = got[0]["error"]["code"]
                out["errors"][code] = out["errors"].get(code, 0) + 1
        return out
