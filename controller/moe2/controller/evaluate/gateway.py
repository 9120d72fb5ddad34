"""Answers the way the system really answers: through a gateway, with the route pushed as an
application's subset and gate, each question sent by a client as a multiple-choice prompt.

    with GatewayAnswerer(broker, profiles, gate=GateArtefact.load(row)) as answerer:
        answers = answerer.answer(questions, Route(("a", "b", "c"), k=2, weights="gate"))
        answers[0].choice, answers[0].delay_s, answers[0].energy_j

Per route the answerer pushes one application, ``eval-<hash of the route and gate>``, through
the controller's one publisher of desired state (``moe2.controller.options.desired_state``:
signed with the fleet key when there is one, so gateways with ``trusted_keys`` accept it; the
gate's files published first, named by its ``GateRef`` when the route is gated; uniform
weights otherwise), waits until every accepting gateway serves it, then asks the questions one
at a time with ``PromptClient.choose`` (so a latency is one answer's, not a queue's) and reverts
the application (signed, as the push) and clears its retained message when it closes.

What each answer cost, as the limits are stated (paper eqs. 8 and 11, per step):

- **delay**: eq. 8's quantity measured: the gateway's latency (receiving the prompt to its
  answer) less the gate's part, over T, plus the gate's part once; T = the correct option's
  length in the answering experts' tokens, the T the promise uses for the question;
- **energy**: Σ over the answering experts of their power while processing a prompt (their
  profile's joules / seconds at the prompt's length in their tokens) × the model time each
  one reported, / T (× T: per prompt). Measured when every answering expert's profile comes
  from a real meter, else modelled;
- **spread**: the largest relative spread the answering experts' profiles state (repeats,
  curve residuals): how far a measurement may fall from its profile on the same box.

A question the fleet does not answer (an error, a timeout) counts as wrong and is counted
apart: it enters no cost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe2.controller.evaluate.answerer import Answer, Answerer, Question, Route
from moe2.shared import protocol as p
from moe2.shared.answercost import measured_delay_per_step, power_w
from moe2.shared.client import PromptClient
from moe2.shared.desired import DesiredState
from moe2.shared.errors import ConfigError, Moe2Error, NoExperts, NotAcknowledged, UnknownApp
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import BrokerConfig

log = logging.getLogger(__name__)

APP_PREFIX = "eval-"
# How long an application may take to reach the gateways' subscriptions after being accepted.
SERVING_WAIT_S = 10.0


@dataclass(frozen=True)
class GateArtefact:
    """An exported gate as the gateways receive it: its manifest and files."""

    manifest: p.GateManifest
    files: dict[str, bytes]

    @property
    def ref(self) -> p.GateRef:
        return p.GateRef(version=self.manifest.version, sha256=p.gate_digest(self.manifest))

    @classmethod
    def load(cls, artefact_dir: Path, version: str) -> GateArtefact:
        from moe2.controller.gate.export import gate_files

        if not (artefact_dir / "manifest.json").exists():
            raise ConfigError(
                f"gate {version} is not exported, so no gateway can run it: `moe2ctl export "
                f"--version {version}` first (or evaluate with --answerer scores)"
            )
        manifest = p.GateManifest.model_validate_json((artefact_dir / "manifest.json").read_text())
        files = {role: path.read_bytes() for role, path in gate_files(artefact_dir).items()}
        return cls(manifest, files)


@dataclass
class RouteRun:
    """What answering one route took."""

    app: str
    experts: list[str]
    k: int
    weights: str
    gateways: list[str]  # the gateways that accepted (and loaded the gate)
    questions: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # error code -> answers lost to it
    partial: int = 0  # answers fused from fewer experts than the route's top-k (some dropped)

    def as_dict(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "experts": self.experts,
            "k": self.k,
            "weights": self.weights,
            "gateways": self.gateways,
            "questions": self.questions,
            "seconds": round(self.seconds, 3),
            "errors": self.errors,
            "partial": self.partial,
        }


Progress = Callable[[RouteRun, int, int], None]  # (route, answered so far, questions)
Publisher = Callable[[BrokerConfig], DesiredState]  # who publishes (and signs) desired state


def _controller_publisher(broker: BrokerConfig) -> DesiredState:
    from moe2.controller.options import desired_state

    return desired_state(broker)


class GatewayAnswerer(Answerer):
    name = "gateway"
    measures_costs = True

    def __init__(
        self,
        broker: BrokerConfig,
        profiles: Mapping[str, p.AgentProfile],
        *,
        gate: GateArtefact | None,
        gateways: Sequence[str] | None = None,
        timeout_s: float = 120.0,
        push_wait_s: float = 60.0,
        progress: Progress | None = None,
        publisher: Publisher = _controller_publisher,
    ) -> None:
        self.broker = broker
        self.publisher = publisher
        self.profiles = dict(profiles)
        self.gate = gate
        self.gateways = list(gateways) if gateways else None
        self.timeout_s = timeout_s
        self.push_wait_s = push_wait_s
        self.progress = progress
        self.runs: list[RouteRun] = []
        self._desired: DesiredState | None = None
        self._client: PromptClient | None = None
        self._gate_published = False
        self._pushed: list[str] = []

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> GatewayAnswerer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> tuple[DesiredState, PromptClient]:
        if self._desired is None or self._client is None:
            self._desired = self.publisher(self.broker).__enter__()
            self._client = PromptClient(self.broker).__enter__()
        return self._desired, self._client

    def close(self) -> None:
        """Take back every application this answerer pushed, then disconnect: a signed
        revert first (a gateway that trusts only the fleet key ignores an unsigned clear and
        would go on serving the route), then the retained message is cleared."""
        if self._desired is not None:
            for app in self._pushed:
                try:
                    self._desired.revert(app, wait_s=min(5.0, self.push_wait_s))
                    self._desired.clear_assignment(app)
                except Moe2Error as exc:
                    log.warning("could not clear %s: %s", app, exc.message)
            self._desired.__exit__(None, None, None)
        if self._client is not None:
            self._client.__exit__(None, None, None)
        self._desired = self._client = None
        self._pushed = []

    def describe(self) -> dict[str, Any]:
        return {
            "gate": None if self.gate is None else self.gate.ref.model_dump(),
            "routes": [r.as_dict() for r in self.runs],
        }

    # ------------------------------------------------------------------ answering

    def app_for(self, route: Route) -> str:
        gate = self.gate.ref.sha256 if self.gate is not None and self._gated(route) else "uniform"
        key = json.dumps([list(route.experts), route.k, route.weights, gate])
        return APP_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:12]

    def _gated(self, route: Route) -> bool:
        # As an optimised assignment is pushed: with its gate, whatever the subset's size
        # (the gateway runs it on every prompt, and the promise counts it).
        return route.weights == "gate"

    def answer(self, questions: Sequence[Question], route: Route) -> list[Answer]:
        unknown = [e for e in route.experts if e not in self.profiles]
        if unknown:
            raise ConfigError(f"no profile of expert(s) {unknown}: cannot cost their answers")
        desired, client = self._open()
        run = self._push(desired, route)
        t0 = time.monotonic()
        answers = []
        for i, q in enumerate(questions):
            answers.append(self._ask(client, run, q, first=i == 0))
            if self.progress is not None:
                self.progress(run, i + 1, len(questions))
        run.questions = len(questions)
        run.seconds = time.monotonic() - t0
        return answers

    def _push(self, desired: DesiredState, route: Route) -> RouteRun:
        """Push the route as its own application and wait until it is served."""
        self._check_online(route)
        app = self.app_for(route)
        k = min(route.k, len(route.experts))
        ref = None
        if self.gate is not None and self._gated(route):
            if not self._gate_published:
                desired.publish_gate(self.gate.manifest, self.gate.files)
                self._gate_published = True
            ref = self.gate.ref
        result = desired.push_assignment(
            app, list(route.experts), k, gate=ref, gateways=self.gateways, wait_s=self.push_wait_s
        )
        self._pushed.append(app)
        if not result.accepted:
            raise NotAcknowledged(
                f"no gateway accepted {app} ({', '.join(route.experts)}, top-{k}): "
                f"rejected {result.rejected}, silent {result.missing}; is a gateway running?"
            )
        serving = [g for g in result.accepted if result.acks[g].serving]
        if not serving:  # accepted only by gateways the route does not name
            raise NotAcknowledged(
                f"no gateway serves {app} ({', '.join(route.experts)}, top-{k}): accepted but "
                f"not serving {result.accepted}, rejected {result.rejected}, silent "
                f"{result.missing}"
            )
        if ref is not None:
            loaded = {g for g, a in result.gate_acks.items() if a.state == "loaded"}
            missing = [g for g in serving if g not in loaded]
            if missing:
                why = {g: result.gate_acks[g].reason for g in missing if g in result.gate_acks}
                raise NotAcknowledged(
                    f"gateway(s) {missing} did not load gate {ref.version} within "
                    f"{self.push_wait_s:g} s: {why or 'no answer'}"
                )
        version = result.assignment.version

        def subscribed(state: Any) -> bool:
            # A gateway announces its applications after subscribing to their prompts.
            return all(
                (g := state.gateway.get(gw)) is not None and g.apps.get(app) == version
                for gw in serving
            )

        if not desired.view.wait(subscribed, SERVING_WAIT_S):
            log.warning("gateways %s do not announce %s yet; asking anyway", serving, app)
        run = RouteRun(app, list(route.experts), k, route.weights, serving)
        self.runs.append(run)
        return run

    def _check_online(self, route: Route) -> None:
        state = FleetView.snapshot(self.broker, ("info", "status"), 3.0)
        offline = [e for e in route.experts if state.online(e) is None]
        if offline:
            raise NoExperts(
                f"expert(s) {', '.join(offline)} of the route are not online: answers through "
                "the gateway would silently leave them out"
            )

    def _ask(self, client: PromptClient, run: RouteRun, q: Question, *, first: bool) -> Answer:
        t0 = time.monotonic()
        deadline = t0 + (SERVING_WAIT_S if first else 0.0)
        while True:
            try:
                reply = client.choose(run.app, q.prompt, q.choices, timeout=self.timeout_s)
                break
            except UnknownApp:  # the gateway's subscription is still on its way
                if time.monotonic() >= deadline:
                    return self._failed(run, UnknownApp.code)
                time.sleep(0.2)
            except Moe2Error as exc:
                log.warning("%s: question %d failed: %s", run.app, q.position, exc.message)
                return self._failed(run, exc.code)
        experts = tuple(e.id for e in reply.experts)
        if reply.dropped or len(experts) < run.k:
            run.partial += 1
        t = max(1, reply.steps[q.answer])  # the T the promise uses
        gate_s = (reply.gate_ms or 0.0) / 1e3
        joules = 0.0
        for e in experts:
            power = power_w(self.profiles[e].curves, max(1, reply.prompt_tokens.get(e, 1)))
            joules += power * reply.compute_ms.get(e, 0.0) / 1e3
        return Answer(
            reply.choice,
            experts,
            delay_s=measured_delay_per_step(reply.latency_ms / 1e3, gate_s, t),
            energy_j=joules / t,
            energy_measured=all(self.profiles[e].energy_measured for e in experts),
            spread=max(spread(self.profiles[e]) for e in experts),
            steps=t,
            gate_s=gate_s,
        )

    def _failed(self, run: RouteRun, code: str) -> Answer:
        """A question the fleet did not answer: wrong, and counted apart (no cost)."""
        run.errors[code] = run.errors.get(code, 0) + 1
        return Answer(None, tuple(run.experts), failed=code)


def spread(profile: p.AgentProfile) -> float:
    """The profile's stated relative spread of its costs (delay or energy, the larger)."""
    return max(profile.spread("s"), profile.spread("J"))
