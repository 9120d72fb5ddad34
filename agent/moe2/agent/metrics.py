"""Prometheus metrics of an agent and of its gateway role, on one ``/metrics`` endpoint per
agent process (``--metrics-port``; off by default).

    moe2-agent --model m.gguf --metrics-port 9464        # then scrape http://box:9464/metrics

Agent: requests and errors by operation and code, model time per request, queue depth,
open sessions, tokens evaluated, requests dropped and why, model time in all and the part
spent on answers nobody got, where the model runs (``moe2_agent_offload_info``, GPU
layers). Gateway: prompts and errors by application and code, generated tokens, tokens per
second of each answer, the latency of each fused step, experts dropped, prompts in flight.
Each agent holds its own registry, so several agents in one process (tests) do not mix.

Label values come only from the fleet's own names (applications a gateway serves, expert
ids, error codes): prompts for any other application are counted under ``_unknown``, so a
client inventing topic names cannot grow the number of series.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from moe2.shared.errors import ConfigError

if TYPE_CHECKING:
    from moe2.agent.offload import Offload

log = logging.getLogger(__name__)

# Seconds: a tiny expert's step is ~1 ms, a 0.5B model's prompt on a CPU ~0.5 s.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TOKENS_PER_S_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
# The label of every application a gateway does not serve (not a valid application name).
UNKNOWN_APP = "_unknown"


class AgentMetrics:
    def __init__(self, agent_id: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "moe2_agent_requests", "RPC requests handled, by operation", ["op"], registry=r
        )
        self.errors = Counter(
            "moe2_agent_errors", "RPC requests answered with an error", ["op", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "moe2_agent_request_seconds",
            "time on the model thread per request, seconds",
            ["op"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "moe2_agent_tokens_evaluated", "tokens evaluated by open and step", registry=r
        )
        self.queue_depth = Gauge(
            "moe2_agent_queue_depth", "requests waiting for the model thread", registry=r
        )
        self.sessions = Gauge("moe2_agent_sessions", "open sessions (KV caches)", registry=r)
        self.busy = Counter(
            "moe2_agent_busy_refusals",
            "requests refused with 'busy' (queue full, or backpressure: the work queued ahead "
            "would not let them finish by their deadline)",
            registry=r,
        )
        self.dropped = Counter(
            "moe2_agent_dropped_requests",
            "requests not computed to their end, by operation and why: expired (deadline "
            "passed before it started: never started), expired_running (stopped at a tick "
            "after its deadline), requester_gone, stopping, duplicate (sent again while the "
            "first copy ran), busy (refused at once)",
            ["op", "reason"],
            registry=r,
        )
        self.compute_seconds = Counter(
            "moe2_agent_compute_seconds", "model time of every batched tick, seconds", registry=r
        )
        self.late_seconds = Counter(
            "moe2_agent_late_compute_seconds",
            "model time spent on requests in ticks begun after their deadline had passed "
            "(nobody waited for them any more), seconds",
            registry=r,
        )
        self.wasted_seconds = Counter(
            "moe2_agent_wasted_compute_seconds",
            "model time spent on requests whose answer nobody got (stopped after their "
            "deadline, their requester gone, or finished after the deadline), seconds",
            registry=r,
        )
        self.gpu_layers = Gauge(
            "moe2_agent_gpu_layers", "model layers offloaded to a GPU", registry=r
        )
        self.model_layers = Gauge("moe2_agent_model_layers", "layers of the model", registry=r)
        self.offload = Gauge(
            "moe2_agent_offload_info",
            "1 for the compute backend the model runs on",
            ["agent", "backend", "device"],
            registry=r,
        )
        self._agent_id = agent_id

    def watch(self, queue_depth: Callable[[], int], sessions: Callable[[], int]) -> None:
        self.queue_depth.set_function(lambda: float(queue_depth()))
        self.sessions.set_function(lambda: float(sessions()))

    def set_offload(self, offload: Offload) -> None:
        self.gpu_layers.set(offload.gpu_layers)
        self.model_layers.set(offload.n_layers)
        device = offload.devices[0].description if offload.devices else "cpu"
        self.offload.labels(self._agent_id, offload.backend, device).set(1)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.prompts = Counter(
            "moe2_gateway_prompts", "prompts answered (final answer sent)", ["app"], registry=r
        )
        self.errors = Counter(
            "moe2_gateway_prompt_errors",
            "prompts answered with an error",
            ["app", "code"],
            registry=r,
        )
        self.tokens = Counter(
            "moe2_gateway_tokens", "tokens generated (fused steps)", ["app"], registry=r
        )
        self.tokens_per_s = Histogram(
            "moe2_gateway_tokens_per_second",
            "generated tokens per second of each answer (prompt processing included)",
            ["app"],
            buckets=TOKENS_PER_S_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "moe2_gateway_step_seconds",
            "latency of one fused step: ask every chosen expert, wait, fuse (the first step "
            "includes the prompt)",
            ["app"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.dropped = Counter(
            "moe2_gateway_dropped_experts",
            "experts dropped from an answer",
            ["app", "expert"],
            registry=r,
        )
        self.in_flight = Gauge(
            "moe2_gateway_prompts_in_flight", "prompts being generated or waiting", registry=r
        )
        self.max_concurrent = Gauge(
            "moe2_gateway_max_concurrent",
            "prompts this gateway generates at once (more wait, up to max_pending, then busy)",
            registry=r,
        )
        self.max_pending = Gauge(
            "moe2_gateway_max_pending", "prompts it lets wait beyond those", registry=r
        )
        self.cancelled = Counter(
            "moe2_gateway_prompts_cancelled",
            "prompts their client cancelled while this gateway held them",
            registry=r,
        )


def serve(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Serve ``/metrics`` in a daemon thread (``server.server_address[1]`` is the port,
    useful when 0 was asked; ``server.shutdown()`` stops it)."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from None
    log.info("metrics on http://%s:%d/metrics", host, server.server_address[1])
    return server
