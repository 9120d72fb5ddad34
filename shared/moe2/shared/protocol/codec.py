"""Wire codecs of RPC payloads: ``json`` (the default, for people and old peers) and
``bin1``, a binary framing of the messages that carry numbers in bulk.

An agent announces the codecs it reads in ``AgentInfo.codecs``; a client sends ``bin1``
only to agents that list it, and an agent answers in the codec the request came in. A
``bin1`` payload starts with the byte 0xB1, which no JSON text can start with, so a reader
tells the two apart from the first byte.

    frame := 0xB1  version:u8  kind:u8  body          (little-endian throughout)
    kind 0  any message: body is its JSON text
    kind 1  DistributionReply   op:u8 session n_tokens:u32 compute_ms:f64 dist
    kind 2  DistributionsReply  op:u8 session n_tokens:u32 compute_ms:f64 count:u32
                                lengths:u32[count] drafted_count:u32 drafted:i32[..]
                                dist * count
    kind 3  ScoreReply          n:u32 target_tokens:i32[n] logprobs:f32[n] compute_ms:f64
    kind 4  ScoreManyReply      count:u32 result * count compute_ms:f64
    session := len:u16 utf-8
    dist    := 1 k:u32 tail:f64 ids:i32[k] logprobs:f32[k]       (top-k)
             | 2 n:u32 logprobs:f32[n]                            (full)
    result  := 0 n:u32 target_tokens:i32[n] logprobs:f32[n]
             | 1 code message                                     (the sample's error)

Log-probabilities travel as float32: what the agent computes is float32, so this is exact; a
message holding a value that float32 cannot hold exactly is sent as kind 0 instead. Decoding
validates what the JSON path validates (vectorised) and builds the same typed messages.

    payload = encode_rpc(reply, "bin1")
    reply = decode_reply(payload)          # any codec
"""

from __future__ import annotations

import math
import struct
from typing import Any, Final

import numpy as np

from moe2.shared.errors import BadMessage
from moe2.shared.protocol import rpc
from moe2.shared.protocol.base import Message, encode

MAGIC: Final = 0xB1
VERSION: Final = 1
CODECS: Final = ("json", "bin1")

_KIND_JSON, _KIND_DIST, _KIND_DISTS, _KIND_SCORE, _KIND_SCORE_MANY = 0, 1, 2, 3, 4
_OPS_DIST = ("open", "step")
_OPS_DISTS = ("draft", "verify")
_MAX_COUNT = 1 << 22


def payload_codec(payload: bytes | bytearray) -> str:
    """The codec a payload is written in (from its first byte)."""
    return "bin1" if payload[:1] == bytes((MAGIC,)) else "json"


def encode_rpc(message: Message, codec: str = "json") -> bytes:
    """A request or reply in ``codec`` (``json`` or ``bin1``)."""
    if codec == "json":
        return encode(message)
    if codec != "bin1":
        raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    try:
        body = _encode_binary(message)
    except _NotBinary:
        body = None
    if body is None:
        return bytes((MAGIC, VERSION, _KIND_JSON)) + encode(message)
    return body


def decode_bin1(payload: bytes | bytearray) -> tuple[int, Any]:
    """(kind, message or JSON text) of a bin1 frame; BadMessage when it is malformed."""
    if len(payload) < 3 or payload[0] != MAGIC:
        raise BadMessage("not a bin1 frame")
    if payload[1] != VERSION:
        raise BadMessage(f"bin1 version {payload[1]} is not supported; this peer reads {VERSION}")
    kind = payload[2]
    if kind == _KIND_JSON:
        return kind, bytes(payload[3:])
    r = _Reader(payload, 3)
    if kind == _KIND_DIST:
        msg: Any = _read_distribution_reply(r)
    elif kind == _KIND_DISTS:
        msg = _read_distributions_reply(r)
    elif kind == _KIND_SCORE:
        msg = _read_score_reply(r)
    elif kind == _KIND_SCORE_MANY:
        msg = _read_score_many_reply(r)
    else:
        raise BadMessage(f"unknown bin1 message kind {kind}")
    r.end()
    return kind, msg


# --------------------------------------------------------------------------- encoding


class _NotBinary(Exception):
    """This message has no exact binary form: send it as kind 0."""


def _f32(values: list[float] | np.ndarray) -> bytes:
    arr = np.asarray(values, dtype=np.float64)
    f = arr.astype("<f4")
    if not np.array_equal(f.astype(np.float64), arr, equal_nan=True):
        raise _NotBinary
    return f.tobytes()


def _i32(values: list[int]) -> bytes:
    return np.asarray(values, dtype="<i4").tobytes()


def _session(sid: str) -> bytes:
    raw = sid.encode()
    return struct.pack("<H", len(raw)) + raw


def _dist(d: rpc.TopKDist | rpc.FullDist) -> bytes:
    if isinstance(d, rpc.FullDist):
        arr = d.raw()
        return struct.pack("<BI", 2, arr.shape[0]) + np.ascontiguousarray(arr, "<f4").tobytes()
    if d.pieces is not None:
        raise _NotBinary
    return struct.pack("<BId", 1, len(d.ids), d.tail) + _i32(d.ids) + _f32(d.logprobs)


def _encode_binary(m: Message) -> bytes | None:
    head = bytes((MAGIC, VERSION))
    if isinstance(m, rpc.DistributionReply):
        return b"".join(
            (
                head,
                bytes((_KIND_DIST, _OPS_DIST.index(m.op))),
                _session(m.session),
                struct.pack("<Id", m.n_tokens, m.compute_ms),
                _dist(m.dist),
            )
        )
    if isinstance(m, rpc.DistributionsReply):
        return b"".join(
            (
                head,
                bytes((_KIND_DISTS, _OPS_DISTS.index(m.op))),
                _session(m.session),
                struct.pack("<IdI", m.n_tokens, m.compute_ms, len(m.dists)),
                np.asarray(m.lengths, "<u4").tobytes(),
                struct.pack("<I", len(m.drafted)),
                _i32(m.drafted),
                *(_dist(d) for d in m.dists),
            )
        )
    if isinstance(m, rpc.ScoreReply):
        n = len(m.target_tokens)
        return b"".join(
            (
                head,
                bytes((_KIND_SCORE,)),
                struct.pack("<I", n),
                _i32(m.target_tokens),
                _f32(m.logprobs),
                struct.pack("<d", m.compute_ms),
            )
        )
    if isinstance(m, rpc.ScoreManyReply):
        parts = [head, bytes((_KIND_SCORE_MANY,)), struct.pack("<I", len(m.results))]
        for res in m.results:
            if res.error is not None:
                code, message = res.error.code.encode(), res.error.message.encode()
                parts.append(struct.pack("<BHI", 1, len(code), len(message)) + code + message)
            else:
                parts.append(struct.pack("<BI", 0, len(res.target_tokens)))
                parts += [_i32(res.target_tokens), _f32(res.logprobs)]
        parts.append(struct.pack("<d", m.compute_ms))
        return b"".join(parts)
    return None


# --------------------------------------------------------------------------- decoding


class _Reader:
    def __init__(self, data: bytes | bytearray, pos: int) -> None:
        self.data = memoryview(data)
        self.pos = pos

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise BadMessage("bin1 frame is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def count(self) -> int:
        (n,) = self.unpack("<I")
        if n > _MAX_COUNT:
            raise BadMessage(f"bin1 count {n} is out of range")
        return int(n)

    def array(self, dtype: str, n: int) -> np.ndarray:
        return np.frombuffer(self.take(n * np.dtype(dtype).itemsize), dtype=dtype)

    def text(self, fmt: str = "<H") -> str:
        (n,) = self.unpack(fmt)
        try:
            return str(self.take(n).tobytes().decode())
        except UnicodeDecodeError:
            raise BadMessage("bin1 text is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise BadMessage(f"bin1 frame has {len(self.data) - self.pos} bytes too many")


def _finite(x: float, what: str) -> float:
    if not math.isfinite(x) or x < 0:
        raise BadMessage(f"bin1 {what} must be a finite non-negative number")
    return float(x)


def _read_dist(r: _Reader) -> rpc.TopKDist | rpc.FullDist:
    (kind,) = r.unpack("<B")
    if kind == 1:
        k = r.count()
        (tail,) = r.unpack("<d")
        ids = r.array("<i4", k)
        lps = r.array("<f4", k).astype(np.float64)
        if not 0.0 <= tail <= 1.0:
            raise BadMessage("top-k tail must be a probability")
        if (ids < 0).any() or len(np.unique(ids)) != k:
            raise BadMessage("top-k ids must be distinct non-negative token ids")
        if not (np.isfinite(lps) & (lps <= 1e-6)).all():
            raise BadMessage("top-k logprobs must be finite natural-log probabilities (<= 0)")
        mass = float(np.exp(lps).sum()) + tail
        if abs(mass - 1.0) > rpc.NORMALISATION_TOLERANCE:
            raise BadMessage(f"top-k probabilities plus tail sum to {mass:.4f}, expected 1")
        return rpc.TopKDist.model_construct(ids=ids.tolist(), logprobs=lps.tolist(), tail=tail)
    if kind == 2:
        n = r.count()
        if n < 1:
            raise BadMessage("a full distribution needs at least one token")
        dist = rpc.FullDist.from_array(r.array("<f4", n))
        dist.logprobs()  # validated now (the JSON path validates on first use)
        return dist
    raise BadMessage(f"unknown bin1 distribution kind {kind}")


def _read_distribution_reply(r: _Reader) -> rpc.DistributionReply:
    (op,) = r.unpack("<B")
    if op >= len(_OPS_DIST):
        raise BadMessage(f"unknown bin1 distribution op {op}")
    session = r.text()
    n_tokens, compute_ms = r.unpack("<Id")
    return rpc.DistributionReply.model_construct(
        op=_OPS_DIST[op],
        session=session,
        n_tokens=int(n_tokens),
        compute_ms=_finite(compute_ms, "compute_ms"),
        dist=_read_dist(r),
    )


def _read_distributions_reply(r: _Reader) -> rpc.DistributionsReply:
    (op,) = r.unpack("<B")
    if op >= len(_OPS_DISTS):
        raise BadMessage(f"unknown bin1 distributions op {op}")
    session = r.text()
    n_tokens, compute_ms = r.unpack("<Id")
    count = r.count()
    lengths = r.array("<u4", count).astype(np.int64)
    drafted = r.array("<i4", r.count())
    if (np.diff(lengths) < 0).any():
        raise BadMessage("lengths must not decrease")
    if _OPS_DISTS[op] == "draft" and len(drafted) != count:
        raise BadMessage("a draft has one distribution per drafted token")
    if (drafted < 0).any():
        raise BadMessage("drafted token ids must be non-negative")
    dists = [_read_dist(r) for _ in range(count)]
    return rpc.DistributionsReply.model_construct(
        op=_OPS_DISTS[op],
        session=session,
        n_tokens=int(n_tokens),
        compute_ms=_finite(compute_ms, "compute_ms"),
        dists=dists,
        lengths=lengths.tolist(),
        drafted=drafted.tolist(),
    )


def _scores(r: _Reader) -> tuple[list[int], list[float]]:
    n = r.count()
    tokens = r.array("<i4", n)
    lps = r.array("<f4", n).astype(np.float64)
    if (tokens < 0).any():
        raise BadMessage("target token ids must be non-negative")
    if np.isnan(lps).any() or (lps > 1e-6).any():
        raise BadMessage("scores must be natural-log probabilities (<= 0)")
    return tokens.tolist(), lps.tolist()


def _read_score_reply(r: _Reader) -> rpc.ScoreReply:
    tokens, lps = _scores(r)
    (compute_ms,) = r.unpack("<d")
    return rpc.ScoreReply.model_construct(
        target_tokens=tokens, logprobs=lps, compute_ms=_finite(compute_ms, "compute_ms")
    )


def _read_score_many_reply(r: _Reader) -> rpc.ScoreManyReply:
    results = []
    for _ in range(r.count()):
        (flag,) = r.unpack("<B")
        if flag == 0:
            tokens, lps = _scores(r)
            results.append(rpc.ScoreResult.model_construct(target_tokens=tokens, logprobs=lps))
        elif flag == 1:
            code_len, msg_len = r.unpack("<HI")
            try:
                code = r.take(code_len).tobytes().decode()
                message = r.take(msg_len).tobytes().decode()
            except UnicodeDecodeError:
                raise BadMessage("bin1 error text is not UTF-8") from None
            results.append(rpc.ScoreResult(error=rpc.ErrorBody(code=code, message=message)))
        else:
            raise BadMessage(f"unknown bin1 score result flag {flag}")
    (compute_ms,) = r.unpack("<d")
    return rpc.ScoreManyReply.model_construct(
        results=results, compute_ms=_finite(compute_ms, "compute_ms")
    )
