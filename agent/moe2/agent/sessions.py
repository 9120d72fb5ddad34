"""Bounded sessions over KV-cache sequences, least recently used evicted first.

Each session owns one ``Sequence`` (one KV cache). Contexts are created lazily up to
``max_sessions`` and reused after a session closes or is evicted, so steady-state opening
costs no allocation. A caller that uses an evicted session gets ``SessionEvicted``, not a
silent fresh history.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Sequence as Seq

import numpy as np

from moe2.agent.backend import ModelBackend, Sequence
from moe2.shared.errors import Busy, SessionEvicted, UnknownSession

_REMEMBER_EVICTED = 4096  # ids kept to tell "evicted" from "unknown"


class SessionManager:
    def __init__(self, backend: ModelBackend, max_sessions: int) -> None:
        self._backend = backend
        self.max_sessions = max_sessions
        self._live: OrderedDict[str, Sequence] = OrderedDict()  # oldest use first
        self._free: list[Sequence] = []
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self.evictions = 0
        # Sessions a request is working on (batched decoding): never evicted under it.
        self.busy: set[str] = set()

    def __len__(self) -> int:
        return len(self._live)

    def open(self, tokens: Seq[int]) -> tuple[str, Sequence, np.ndarray]:
        """A new session holding ``tokens``; returns (id, sequence, next-token log-probs)."""
        seq = self._acquire()
        try:
            logprobs = seq.extend(tokens)
        except Exception:
            seq.truncate(0)
            self._free.append(seq)
            raise
        sid = f"s-{secrets.token_hex(8)}"
        self._live[sid] = seq
        return sid, seq, logprobs

    def reserve(self) -> tuple[str, Sequence]:
        """A new, empty session (the caller evaluates its prompt, or ``discard`` s it)."""
        seq = self._acquire()
        sid = f"s-{secrets.token_hex(8)}"
        self._live[sid] = seq
        return sid, seq

    def discard(self, sid: str) -> None:
        """Forget a session whose opening failed (no ``SessionEvicted`` for it later)."""
        seq = self._live.pop(sid, None)
        self.busy.discard(sid)
        if seq is not None:
            seq.truncate(0)
            self._free.append(seq)

    def get(self, sid: str) -> Sequence:
        seq = self._live.get(sid)
        if seq is None:
            if sid in self._evicted:
                raise SessionEvicted(
                    f"session {sid} was evicted to make room (this agent keeps at most "
                    f"{self.max_sessions} sessions); open a new one"
                )
            raise UnknownSession(f"no session {sid} on this agent (never opened, or closed)")
        self._live.move_to_end(sid)
        return seq

    def close(self, sid: str) -> None:
        seq = self._live.pop(sid, None)
        if seq is None:
            self.get(sid)  # raises the right error
            return
        seq.truncate(0)
        self._free.append(seq)

    def close_all(self) -> None:
        for seq in [*self._live.values(), *self._free]:
            seq.close()
        self._live.clear()
        self._free.clear()

    def _acquire(self) -> Sequence:
        if self._free:
            return self._free.pop()
        if len(self._live) < self.max_sessions:
            return self._backend.new_sequence()
        victim = next((sid for sid in self._live if sid not in self.busy), None)
        if victim is None:
            raise Busy(
                f"all {self.max_sessions} sessions of this agent are in use by requests; "
                "retry later"
            )
        sid, seq = victim, self._live.pop(victim)
        self._evicted[sid] = None
        while len(self._evicted) > _REMEMBER_EVICTED:
            self._evicted.popitem(last=False)
        self.evictions += 1
        seq.truncate(0)
        return seq
