"""Bounded sessions over KV-cache sequences.

Each session owns one ``Sequence`` (one KV cache). Contexts are created lazily up to
``max_sessions`` and reused after a session closes or expires, so steady-state opening costs
no allocation.

A full agent refuses a new session (``Busy``) rather than evicting one: several gateways may
share an expert, and evicting a session that a generation is still stepping would cost that
prompt its expert mid-answer, while a refused open can be retried or queued by the gateway
that asked. What frees room is a close, or a session left idle for ``idle_s`` (its gateway
failed or died before closing it): idle sessions are reclaimed when room is needed and now
and then, and using one afterwards is a ``session_evicted`` error, not a silent fresh history.

Each session remembers its owner (the requester that opened it), so capacity held by the
dead is freed within seconds rather than after ``idle_s``: ``close_owned`` frees every session
of a requester that is gone, and after a requester reconnects (``resync``: a broker restart,
a network blip) its sessions it does not use again within ``orphan_s`` are reclaimed (it lost
track of them with its connection: an open whose reply was lost, a close that never came).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as Seq

import numpy as np

from moe2.agent.backend import ModelBackend, Sequence
from moe2.shared.errors import Busy, SessionEvicted, UnknownSession

_REMEMBER_EXPIRED = 4096  # ids kept to tell "expired" from "unknown"


class SessionManager:
    def __init__(
        self,
        backend: ModelBackend,
        max_sessions: int,
        idle_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        orphan_s: float = 10.0,
    ) -> None:
        self._backend = backend
        self.max_sessions = max_sessions
        self.idle_s = idle_s  # seconds unused after which a session is reclaimed
        # Seconds after its owner reconnected that a session it has not used since is
        # reclaimed (a live generation steps every few seconds).
        self.orphan_s = orphan_s
        self._clock = clock
        self._owners: dict[str, str] = {}  # session -> the requester that opened it
        self._resynced: dict[str, float] = {}  # requester -> when it reconnected
        # id -> (sequence, last use); oldest use first. The lock guards the tables against
        # readers on other threads (the daemon's drain); all model work is on one thread.
        self._live: OrderedDict[str, tuple[Sequence, float]] = OrderedDict()
        self._free: list[Sequence] = []
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self.reclaimed = 0  # sessions reclaimed after idling
        # Sessions a request is working on (batched decoding): never reclaimed under it.
        self.busy: set[str] = set()

    def __len__(self) -> int:
        return len(self._live)

    def in_use(self, within_s: float) -> int:
        """Sessions used in the last ``within_s`` seconds."""
        now = self._clock()
        with self._lock:
            return sum(1 for _, used in self._live.values() if now - used < within_s)

    def open(self, tokens: Seq[int], owner: str | None = None) -> tuple[str, Sequence, np.ndarray]:
        """A new session holding ``tokens``; returns (id, sequence, next-token log-probs).
        ``Busy`` when every session is in use."""
        seq = self._acquire()
        try:
            logprobs = seq.extend(tokens)
        except Exception:
            seq.truncate(0)
            self._free.append(seq)
            raise
        return self._add(seq, owner), seq, logprobs

    def reserve(self, owner: str | None = None) -> tuple[str, Sequence]:
        """A new, empty session of ``owner`` (the caller evaluates its prompt, or
        ``discard`` s it)."""
        seq = self._acquire()
        return self._add(seq, owner), seq

    def _add(self, seq: Sequence, owner: str | None) -> str:
        sid = f"s-{secrets.token_hex(8)}"
        with self._lock:
            self._live[sid] = (seq, self._clock())
            if owner is not None:
                self._owners[sid] = owner
        return sid

    def owned(self, owner: str) -> list[str]:
        with self._lock:
            return [sid for sid, o in self._owners.items() if o == owner]

    def close_owned(self, owner: str) -> int:
        """Close every session of ``owner`` that no request is working on; how many."""
        closed = 0
        for sid in self.owned(owner):
            if sid not in self.busy:
                self.close(sid)
                closed += 1
        return closed

    def resync(self, owner: str) -> None:
        """``owner`` reconnected: its sessions it does not use within ``orphan_s`` go."""
        with self._lock:
            self._resynced[owner] = self._clock()

    def discard(self, sid: str) -> None:
        """Forget a session whose opening failed (no ``SessionEvicted`` for it later)."""
        with self._lock:
            entry = self._live.pop(sid, None)
            self._owners.pop(sid, None)
        self.busy.discard(sid)
        if entry is not None:
            entry[0].truncate(0)
            self._free.append(entry[0])

    def get(self, sid: str) -> Sequence:
        with self._lock:
            entry = self._live.get(sid)
            if entry is not None:
                self._live[sid] = (entry[0], self._clock())
                self._live.move_to_end(sid)
                return entry[0]
            expired = sid in self._expired
        if expired:
            raise SessionEvicted(
                f"session {sid} was reclaimed after {self.idle_s:g} s unused; open a new one"
            )
        raise UnknownSession(f"no session {sid} on this agent (never opened, or closed)")

    def close(self, sid: str) -> None:
        with self._lock:
            entry = self._live.pop(sid, None)
            self._owners.pop(sid, None)
        if entry is None:
            self.get(sid)  # raises the right error
            return
        entry[0].truncate(0)
        self._free.append(entry[0])

    def close_all(self) -> None:
        with self._lock:
            seqs = [s for s, _ in self._live.values()] + self._free
            self._live.clear()
            self._owners.clear()
            self._free = []
        for seq in seqs:
            seq.close()

    def reclaim_idle(self) -> int:
        """Close the sessions unused for ``idle_s``, and those their owner did not use
        within ``orphan_s`` of reconnecting; returns how many."""
        now = self._clock()
        with self._lock:
            self._resynced = {o: t for o, t in self._resynced.items() if now - t < self.idle_s}

            def orphaned(sid: str, used: float) -> bool:
                since = self._resynced.get(self._owners.get(sid, ""))
                return since is not None and used < since and now - since >= self.orphan_s

            stale = [
                sid
                for sid, (_, used) in self._live.items()
                if (now - used >= self.idle_s or orphaned(sid, used)) and sid not in self.busy
            ]
            seqs = [self._live.pop(sid)[0] for sid in stale]
            for sid in stale:
                self._owners.pop(sid, None)
                self._expired[sid] = None
            while len(self._expired) > _REMEMBER_EXPIRED:
                self._expired.popitem(last=False)
            self.reclaimed += len(stale)
        for seq in seqs:
            seq.truncate(0)
            self._free.append(seq)
        return len(stale)

    def _acquire(self) -> Sequence:
        if not self._free and len(self._live) >= self.max_sessions:
            self.reclaim_idle()
        if self._free:
            return self._free.pop()
        if len(self._live) < self.max_sessions:
            return self._backend.new_sequence()
        raise Busy(
            f"all {self.max_sessions} sessions of this agent are in use; retry when one closes"
        )
