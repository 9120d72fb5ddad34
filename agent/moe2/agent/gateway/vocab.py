"""Token texts known ahead: one vocabulary table per tokenizer hash, fetched once from an
agent that has it (when the gateway first sees that agent online), so the token loop never
asks an expert what a token says.

    cache = VocabCache(rpc)
    cache.prefetch("orin-1", info)          # in the background, when orin-1 comes online
    vocab = cache.get(info, timeout=30)     # the table; waits only for a fetch in flight
    vocab.pieces[token_id]                  # the bytes that token adds to the output
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from moe2.shared import protocol as p
from moe2.shared.errors import BadMessage, Moe2Error, RequestTimeout
from moe2.shared.mqtt import RpcClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Vocab:
    tokenizer_hash: str
    pieces: list[bytes]  # (n_vocab,) the bytes each token adds to the output; b"" for controls
    by_bytes: dict[bytes, int] = field(repr=False)  # bytes -> the lowest id spelling them
    by_bytes_last: dict[bytes, int] = field(repr=False)  # bytes -> the highest id spelling them

    @classmethod
    def build(cls, tokenizer_hash: str, pieces: list[bytes]) -> Vocab:
        by_bytes: dict[bytes, int] = {}
        last: dict[bytes, int] = {}
        for t, piece in enumerate(pieces):
            if piece:
                by_bytes.setdefault(piece, t)
                last[piece] = t
        return cls(tokenizer_hash, pieces, by_bytes, last)

    @property
    def n_vocab(self) -> int:
        return len(self.pieces)


class VocabCache:
    def __init__(self, rpc: RpcClient, timeout_s: float = 30.0) -> None:
        self.rpc = rpc
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._tables: dict[str, Future[Vocab]] = {}  # tokenizer hash -> table (or its fetch)
        self.fetches = 0

    def known(self, tokenizer_hash: str) -> Vocab | None:
        with self._lock:
            fut = self._tables.get(tokenizer_hash)
        return fut.result() if fut is not None and fut.done() and not fut.exception() else None

    def prefetch(self, agent_id: str, info: p.AgentInfo) -> Future[Vocab]:
        """Fetch ``info``'s vocabulary from ``agent_id`` unless known or under way."""
        h = info.tokenizer_hash
        with self._lock:
            table = self._tables.get(h)
            if table is not None:
                return table
            table = self._tables[h] = Future()
            self.fetches += 1
        asked = self.rpc.call_async(agent_id, p.VocabRequest(), timeout=self.timeout_s)
        asked.add_done_callback(lambda f: self._done(agent_id, info, f, table))
        return table

    def _done(
        self, agent_id: str, info: p.AgentInfo, asked: Future[p.VocabReply], table: Future[Vocab]
    ) -> None:
        h = info.tokenizer_hash
        try:
            reply = asked.result()
            if reply.tokenizer_hash != h or reply.n_vocab != info.n_vocab:
                raise BadMessage(
                    f"vocabulary {reply.tokenizer_hash[:12]}/{reply.n_vocab} does not match the "
                    f"announced {h[:12]}/{info.n_vocab}"
                )
            table.set_result(Vocab.build(h, reply.pieces()))
        except Exception as exc:  # a bad or failed fetch: forget it, the next sighting retries
            message = exc.message if isinstance(exc, Moe2Error) else repr(exc)
            log.warning("vocabulary of %s (%s) unavailable: %s", agent_id, h[:12], message)
            with self._lock:
                if self._tables.get(h) is table:
                    del self._tables[h]
            table.set_exception(BadMessage(f"vocabulary of {agent_id} unavailable: {message}"))

    def get(self, agent_id: str, info: p.AgentInfo, timeout: float | None = None) -> Vocab:
        """The vocabulary of ``info``'s tokenizer, fetching it from ``agent_id`` if needed
        (waits only while a fetch is under way)."""
        table = self.prefetch(agent_id, info)
        try:
            return table.result(timeout=self.timeout_s if timeout is None else timeout)
        except TimeoutError:
            raise RequestTimeout(f"vocabulary of {agent_id} did not arrive in time") from None
