"""Transmission delay to one expert (paper eqs. 5-6): round trip and payload rate over MQTT.

    with RpcClient(broker) as rpc:
        link = probe_link(rpc, "orin-1")               # Link(rtt_s=0.0011, bytes_per_s=3.2e7)
        transmission_delay(request_bytes + reply_bytes, link)    # seconds the link adds

The round trip is a ``ping`` (a tiny request and reply); the rate comes from ``detokenize``
requests of growing size (ids of ordinary text out, the text back), whose model work is
negligible next to moving and parsing the bytes. ``payload bytes`` counts both directions
(request + reply JSON), so the rate is what one byte of a round trip costs as a gateway sees
it, serialisation included. Each size is timed ``repeats`` times and the median kept: a
request that waited behind another on a busy agent is an outlier, not the link. The line
``seconds = rtt + bytes / rate`` is fitted to the medians (``costmodel.fit_link``).

Requests queue on the agent's model thread like any other, so probe an idle agent (the
gateway does so before it serves, and may repeat it between prompts).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel

from moe2.shared import protocol as p
from moe2.shared.costmodel import Link, fit_link
from moe2.shared.errors import ModelError
from moe2.shared.mqtt import RpcClient

# Round-trip payloads (request + reply, bytes) of the detokenize probes: from a step's top-k
# reply (a few KB) to a full distribution of a 64k vocabulary (~350 KB as base64).
DEFAULT_SIZES = (8 << 10, 64 << 10, 256 << 10)

# Ordinary prose: its tokens detokenize to plain text in every vocabulary.
_TEXT = "the quick brown fox jumps over the lazy dog and runs towards the river bank "


@dataclass(frozen=True)
class LinkSample:
    payload_bytes: int  # request + reply, bytes
    seconds: tuple[float, ...]  # one round trip per repeat, seconds

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)


@dataclass(frozen=True)
class LinkMeasurement:
    agent_id: str
    link: Link  # fitted to the medians of ping and samples
    ping: LinkSample  # empty round trips
    samples: tuple[LinkSample, ...]  # detokenize round trips, smallest first


def measure_link(
    rpc: RpcClient,
    agent_id: str,
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    repeats: int = 5,
    timeout: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> LinkMeasurement:
    """Time pings and detokenize round trips of ``sizes`` bytes to ``agent_id``.

    Raises RequestTimeout when the agent does not answer within ``timeout`` seconds (the
    client's default when None), and the agent's error for anything it refuses.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sizes must hold at least one positive byte count, got {list(sizes)}")

    def round_trip(request: BaseModel) -> tuple[float, int]:
        body = p.encode(request)
        t0 = clock()
        reply = rpc.wait(rpc.send_raw(agent_id, body, timeout))
        seconds = clock() - t0
        return seconds, len(body) + len(p.encode(reply))

    def sample(request: BaseModel) -> LinkSample:
        runs = [round_trip(request) for _ in range(repeats)]
        return LinkSample(max(n for _, n in runs), tuple(s for s, _ in runs))

    round_trip(p.PingRequest())  # warm-up: the first request pays for caches and routes
    ping = sample(p.PingRequest())

    unit = rpc.call(agent_id, p.TokenizeRequest(text=_TEXT), timeout).tokens
    if not unit:
        raise ModelError(f"agent {agent_id} tokenized the probe text into no tokens")
    # Bytes one token adds to a round trip (its id out, its text back), from one small probe.
    _, small = round_trip(p.DetokenizeRequest(tokens=unit * 8))
    _, tiny = round_trip(p.DetokenizeRequest(tokens=unit))
    per_token = max(1.0, (small - tiny) / (7 * len(unit)))

    samples = []
    for size in sorted(set(sizes)):
        n = max(1, min(p.MAX_TOKENS_PER_REQUEST, round(size / per_token)))
        tokens = (unit * (n // len(unit) + 1))[:n]
        samples.append(sample(p.DetokenizeRequest(tokens=tokens)))

    points = [ping, *samples]
    link = fit_link([s.payload_bytes for s in points], [s.median_s for s in points])
    return LinkMeasurement(agent_id, link, ping, tuple(samples))


def probe_link(
    rpc: RpcClient,
    agent_id: str,
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    repeats: int = 5,
    timeout: float | None = None,
) -> Link:
    """The fitted link to ``agent_id`` (``measure_link`` keeps the samples too)."""
    return measure_link(rpc, agent_id, sizes=sizes, repeats=repeats, timeout=timeout).link
