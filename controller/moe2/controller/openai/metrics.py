"""``/metrics`` of ``moe2-http``: its own traffic, the process, and the fleet's gauges.

The front: requests by endpoint and status, their duration (to the last byte, streams
included) and time to the first token, requests held and refused (by reason), clients that
went away, requests per model. The process: CPU, memory, open files, GC (prometheus_client's
collectors). The fleet, read from its retained announcements at each scrape (``summary.py``):
agents up, gateways up and their capacity, and per application the online gateways serving
it, the measured delay and energy per step of its real answers, and the limits ``moe2ctl
serve`` optimised for — so Prometheus can alert on an expert down, an application over its
limits, or a saturated fleet.

Every label value comes from the fleet's own names (agent ids, application names from
retained state) or from fixed sets (endpoints, statuses, reasons): a request for a model
nobody serves is counted under ``_unknown``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from moe2.controller.openai.summary import FleetSummary

UNKNOWN_MODEL = "_unknown"
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/models/{model}",
    "/health",
    "/ready",
    "/metrics",
    "/fleet",
    "/fleet.json",
)


def endpoint_of(path: str) -> str:
    """The route a path took, as a bounded label."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class FrontMetrics:
    def __init__(self, summary: Callable[[], FleetSummary]) -> None:
        self.registry = r = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        self.requests = Counter(
            "moe2_http_requests",
            "HTTP requests answered, by endpoint and status (499: the client left first)",
            ["endpoint", "status"],
            registry=r,
        )
        self.seconds = Histogram(
            "moe2_http_request_seconds",
            "from the request to the last byte of its response (streams included), seconds",
            ["endpoint"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "moe2_http_first_token_seconds",
            "from a completion request to the first token (or answer) from the fleet, seconds",
            ["endpoint"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "moe2_http_in_flight", "completion requests held (waiting or streaming)", registry=r
        )
        self.refused = Counter(
            "moe2_http_refused",
            "completion requests refused before reaching a gateway, by reason",
            ["reason"],
            registry=r,
        )
        self.client_gone = Counter(
            "moe2_http_client_disconnects",
            "completion requests whose client left before the answer (the prompt is cancelled)",
            registry=r,
        )
        self.by_model = Counter(
            "moe2_http_model_requests",
            "completion requests by model (application); others under _unknown",
            ["model"],
            registry=r,
        )
        r.register(FleetCollector(summary))


class FleetCollector(Collector):
    """The fleet's gauges, computed from its retained state at each scrape."""

    def __init__(self, summary: Callable[[], FleetSummary]) -> None:
        self._summary = summary

    def collect(self) -> Iterator[Metric]:
        s = self._summary()
        up = GaugeMetricFamily(
            "moe2_fleet_agent_up",
            "1 while the agent is online (its retained status)",
            labels=["agent"],
        )
        info = GaugeMetricFamily(
            "moe2_fleet_agent_info",
            "1 per agent: its model, device class and where the model runs",
            labels=["agent", "model", "device_class", "backend"],
        )
        gw_up = GaugeMetricFamily(
            "moe2_fleet_gateway_up", "1 per online gateway", labels=["gateway"]
        )
        gw_cap = GaugeMetricFamily(
            "moe2_fleet_gateway_capacity",
            "prompts a gateway takes at once (running and waiting), as it announces",
            labels=["gateway"],
        )
        for a in s.agents:
            up.add_metric([a.agent], 1.0 if a.online else 0.0)
            info.add_metric([a.agent, a.model or "", a.device_class or "", a.backend], 1.0)
            if a.serves is not None:
                gw_up.add_metric([a.agent], 1.0)
                if a.capacity is not None:
                    gw_cap.add_metric([a.agent], float(a.capacity))
        yield from (up, info, gw_up, gw_cap)

        def app_gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["app"])

        served = app_gauge("moe2_fleet_app_gateways", "online gateways serving the application")
        answers = app_gauge(
            "moe2_fleet_app_answers", "answers in the gateways' recent stats window"
        )
        errors = app_gauge("moe2_fleet_app_errors", "error replies in the gateways' stats window")
        delay = app_gauge(
            "moe2_fleet_app_delay_seconds_per_step",
            "measured delay per generated step of real answers (mean over the window)",
        )
        p95 = app_gauge(
            "moe2_fleet_app_delay_seconds_per_step_p95",
            "the highest gateway's 95th percentile of delay per step over its window",
        )
        energy = app_gauge(
            "moe2_fleet_app_energy_joules_per_step",
            "energy per step of real answers (from the experts' profiles; see their meters)",
        )
        delay_limit = app_gauge(
            "moe2_fleet_app_delay_limit_seconds_per_step",
            "the delay limit of the last moe2ctl serve decision for the application",
        )
        energy_limit = app_gauge(
            "moe2_fleet_app_energy_limit_joules_per_step",
            "the energy limit of the last moe2ctl serve decision for the application",
        )
        for app in s.apps:
            label = [app.app]
            served.add_metric(label, float(len(app.gateways)))
            answers.add_metric(label, float(app.answers))
            errors.add_metric(label, float(app.errors))
            for gauge, value in (
                (delay, app.delay_s_per_step),
                (p95, app.delay_s_per_step_p95),
                (energy, app.energy_j_per_step),
                (delay_limit, app.delay_limit),
                (energy_limit, app.energy_limit),
            ):
                if value is not None:
                    gauge.add_metric(label, value)
        yield from (served, answers, errors, delay, p95, energy, delay_limit, energy_limit)
        cap = GaugeMetricFamily(
            "moe2_fleet_capacity",
            "prompts the online gateways take at once, summed (absent when one announces none)",
        )
        if s.capacity is not None:
            cap.add_metric([], float(s.capacity))
        yield cap
        broker = GaugeMetricFamily(
            "moe2_http_broker_connected", "1 while moe2-http is connected to the MQTT broker"
        )
        broker.add_metric([], 1.0 if s.broker_connected else 0.0)
        yield broker
