"""Publishing desired state: the one way assignments and gates reach the gateways.

    with DesiredState(BrokerConfig(host="10.0.0.2")) as desired:
        result = desired.push_assignment("qa", ["orin-1", "rtx-1"], k=1)
        result.accepted, result.rejected, result.missing

The version of an application's assignment comes from one place: what the fleet shows (the
retained assignment and what each gateway serves: ``FleetState.version_floor``), plus one.
Each push waits for the acknowledgement of every online gateway (``GatewayStatus``) and
reports who accepted, who rejected (with the gateway's reason) and who stayed silent; a
gateway that rejects a version as stale says which version it serves, and the push is
repeated once above it.

With the fleet key, only what that key signed counts as a version the fleet serves (the
retained assignment, and the assignment each gateway shows as proof of its version): a
login without the key (an expert, a gateway, a leaked controller password) cannot move the
next version, so versions grow by one per push and never reach the end of their range.
``force_version`` is the operator's way out when they did (before this rule, or in a fleet
without a key): a new epoch of versions starting at the number given, which every gateway
accepts whatever version it serves.

A gate travels as content-addressed, chunked, retained blobs and a manifest, published before
the assignments that name it (``protocol/gates.py``); gateways acknowledge each gate version
once they have verified and loaded it, or rejected it.

With the controller's fleet key (``signer``), every assignment and manifest is signed; gateways
that trust the key (``trusted_keys``) apply nothing else. ``revert`` sends an application back
to the gateways' local configuration as a signed version of its own.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from moe2.shared import protocol as p
from moe2.shared.errors import BadSignature, BrokerError, ConfigError, StaleVersion
from moe2.shared.fleet import FleetView
from moe2.shared.mqtt import BrokerConfig, Connection
from moe2.shared.protocol.desired import describe_version
from moe2.shared.protocol.gates import chunk
from moe2.shared.signing import Signer

log = logging.getLogger(__name__)


@dataclass
class PushResult:
    """What became of one pushed assignment."""

    assignment: p.AppAssignment
    expected: list[str]  # the gateways whose answer was awaited (online when pushed)
    acks: dict[str, p.AssignmentAck] = field(default_factory=dict)  # gateway -> its answer
    gate_acks: dict[str, p.GateAck] = field(default_factory=dict)  # gateway -> gate outcome

    @property
    def accepted(self) -> list[str]:
        return sorted(g for g, a in self.acks.items() if a.accepted)

    @property
    def rejected(self) -> dict[str, str]:
        return {g: a.reason or "rejected" for g, a in sorted(self.acks.items()) if not a.accepted}

    @property
    def missing(self) -> list[str]:
        """Gateways that were expected to answer and did not."""
        return sorted(g for g in self.expected if g not in self.acks)

    @property
    def gate_pending(self) -> list[str]:
        """Serving gateways that accepted a gate-bearing assignment but have not loaded it."""
        if self.assignment.gate is None:
            return []
        serving = [g for g, a in self.acks.items() if a.accepted and a.serving]
        return sorted(g for g in serving if g not in self.gate_acks)

    def summary(self) -> dict[str, object]:
        a = self.assignment
        return {
            "app": a.app,
            "version": a.version,
            "epoch": a.epoch or 0,
            "subset": list(a.subset),
            "k": a.k,
            "gate": a.gate.model_dump() if a.gate else None,
            "gateways": a.gateways,
            "revert": a.revert,
            "signed": a.sig is not None,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "missing": self.missing,
            "gate_loaded": sorted(g for g, x in self.gate_acks.items() if x.state == "loaded"),
            "gate_rejected": {
                g: x.reason or "rejected" for g, x in self.gate_acks.items() if x.state != "loaded"
            },
        }


class DesiredState:
    """A controller's connection for publishing desired state (see the module docstring)."""

    def __init__(
        self,
        broker: BrokerConfig,
        *,
        wait_retained_s: float = 3.0,
        signer: Signer | None = None,
    ) -> None:
        self.signer = signer  # None: published unsigned (gateways with trusted keys refuse)
        # Our own public key: which versions the fleet shows did we sign?
        self._verifier = signer.verifier() if signer is not None else None
        client_id = f"moe2ctl-desired-{uuid.uuid4().hex[:8]}"
        self.conn = Connection(broker, client_id)
        self.view = FleetView(
            self.conn, ("info", "gateway", "assignment_ack", "gate_ack", "desired_app")
        )
        self._wait_retained_s = wait_retained_s

    def __enter__(self) -> DesiredState:
        self.conn.start()
        # Everything retained arrives before the view's marker: versions and gateways known.
        if not self.view.synced.wait(self._wait_retained_s):
            log.warning("the broker did not return the retained state in time; versions may lag")
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.stop()

    # ------------------------------------------------------------------ versions

    def _proven(self, a: p.AppAssignment) -> bool:
        """Whether our own key signed ``a`` as it is."""
        if self._verifier is None:
            return True
        try:
            self._verifier.verify(a)
        except BadSignature:
            return False
        return True

    def version_floor(self, app: str) -> tuple[int, int]:
        """(epoch, version) the fleet serves ``app`` at, from what we may trust (see the
        module docstring); says in the log which gateways' versions did not count."""
        proven = self._proven if self._verifier is not None else None
        floor = self.view.version_floor(app, proven)
        if proven is not None:
            claimed = self.view.version_floor(app)
            if claimed > floor:
                log.warning(
                    "%s: the fleet shows version %s, which this controller's key did not sign; "
                    "going on from %s",
                    app,
                    describe_version(claimed),
                    describe_version(floor),
                )
        return floor

    def next_key(self, app: str, force_version: int | None = None) -> tuple[int, int]:
        """(epoch, version) of the next push of ``app``; with ``force_version``, that number
        in a new epoch."""
        epoch, version = self.version_floor(app)
        if force_version is not None:
            if not 1 <= force_version <= p.MAX_VERSION:
                raise ConfigError(f"a version is 1 to {p.MAX_VERSION}, not {force_version}")
            if epoch + 1 > p.MAX_VERSION:
                raise ConfigError(f"application {app!r} is at the last epoch allowed")
            return epoch + 1, force_version
        if version + 1 > p.MAX_VERSION:
            raise ConfigError(
                f"application {app!r} is at version {version}, the largest allowed: start "
                "again with moe2ctl push --force-version 1 (a new epoch every gateway accepts)"
            )
        return epoch, version + 1

    def next_version(self, app: str) -> int:
        """The version number of the next push of ``app`` (within its epoch)."""
        return self.next_key(app)[1]

    # ------------------------------------------------------------------ assignments

    def push_assignment(
        self,
        app: str,
        subset: Sequence[str],
        k: int,
        *,
        gate: p.GateRef | None = None,
        gateways: Sequence[str] | None = None,
        wait_s: float = 5.0,
        force_version: int | None = None,
    ) -> PushResult:
        """Publish the next version of ``app``'s assignment and wait for the answers;
        ``force_version``: as that version of a new epoch (see the module docstring)."""
        return self._push_many([(app, subset, k)], gate, gateways, wait_s, force_version)[0]

    def revert(
        self, app: str, *, wait_s: float = 5.0, force_version: int | None = None
    ) -> PushResult:
        """Send ``app`` back to the gateways' local configuration (a signed version of its
        own; clearing the retained message would not be signed, so gateways that trust a
        fleet key ignore that)."""
        return self._push_many([(app, [], 0)], None, None, wait_s, force_version)[0]

    def _push_many(
        self,
        apps: Sequence[tuple[str, Sequence[str], int]],  # k=0 with no subset: a revert
        gate: p.GateRef | None,
        gateways: Sequence[str] | None,
        wait_s: float,
        force_version: int | None = None,
    ) -> list[PushResult]:
        deadline = time.monotonic() + wait_s
        self.check(apps, None)
        results = [
            self._publish_assignment(a, s, k, gate, gateways, self.next_key(a, force_version))
            for a, s, k in apps
        ]
        self._await(results, wait_s)
        for i, (app, subset, k) in enumerate(apps):
            acks = results[i].acks
            stale = [a for a in acks.values() if not a.accepted and a.code == StaleVersion.code]
            if stale and len(stale) == len(acks):
                # The broker lost the retained state (a restart without persistence) but the
                # gateways remember: go on above the highest version they show (and prove).
                key = self.next_key(app)
                if key <= results[i].assignment.key:
                    continue  # nothing proven above it: the rejections stand, as reported
                log.warning("gateways serve %s above it; pushing %s", app, describe_version(key))
                results[i] = self._publish_assignment(app, subset, k, gate, gateways, key)
                self._await([results[i]], max(0.5, deadline - time.monotonic()))
        return results

    def check(
        self, apps: Sequence[tuple[str, Sequence[str], int]], gate_experts: Sequence[str] | None
    ) -> None:
        """Refuse, before anything is published, an assignment no gateway could serve: an
        expert that never announced itself on this broker (a typo would take the application
        down: every prompt ``no_experts``), k outside 1..|subset|, an expert the gate was not
        trained on."""
        known = set(self.view.copy().info)
        for app, subset, k in apps:
            p.check_name("application", app)
            if not subset and k == 0:
                continue  # a revert
            if not 1 <= k <= len(subset):
                raise ConfigError(
                    f"{app}: k={k} is impossible with a subset of {len(subset)} experts "
                    f"(1 to {len(subset)})"
                )
            if len(set(subset)) != len(subset):
                raise ConfigError(f"{app}: the subset names an expert twice: {list(subset)}")
            unknown = [e for e in subset if e not in known]
            if unknown:
                raise ConfigError(
                    f"{app}: no agent {', '.join(unknown)} has announced itself on this broker "
                    f"(known: {', '.join(sorted(known)) or 'none'}); nothing was published"
                )
            if gate_experts is not None:
                untrained = [e for e in subset if e not in gate_experts]
                if untrained:
                    raise ConfigError(
                        f"{app}: the gate was not trained on {', '.join(untrained)} (it weighs "
                        f"{', '.join(gate_experts)}); nothing was published"
                    )

    def clear_assignment(self, app: str) -> None:
        """Remove ``app``'s retained assignment: gateways go back to their local configuration
        for it (none: they stop serving it) and keep its version floor."""
        self._publish(p.topics.desired_app(app), b"")

    def _publish_assignment(
        self,
        app: str,
        subset: Sequence[str],
        k: int,
        gate: p.GateRef | None,
        gateways: Sequence[str] | None,
        key: tuple[int, int],  # (epoch, version)
    ) -> PushResult:
        revert = k == 0 and not subset
        assignment = p.AppAssignment(
            app=app,
            version=key[1],
            epoch=key[0] or None,
            subset=list(subset),
            k=max(1, k),
            gate=gate,
            gateways=list(gateways) if gateways and not revert else None,
            revert=revert,
        )
        if self.signer is not None:
            assignment = self.signer.sign(assignment)
        result = PushResult(assignment, sorted(self.view.online_gateways()))
        self._publish(p.topics.desired_app(app), p.encode(assignment))
        return result

    def _publish(self, topic: str, payload: bytes) -> None:
        try:
            self.conn.publish_acked(topic, payload, retain=True, timeout=30)
        except BrokerError as exc:
            raise BrokerError(f"publishing desired state failed: {exc.message}") from None

    def _await(self, results: Sequence[PushResult], wait_s: float) -> None:
        """Collect answers until every expected gateway answered (and loaded the gate where
        one is named) or ``wait_s`` passed."""

        def collect(state: object) -> bool:
            done = True
            for r in results:
                a = r.assignment
                ours = p.assignment_digest(a)
                for g in r.expected:
                    ack = self.view.assignment_ack.get((g, a.app))
                    if ack is not None and ack.version == a.version and ack.answers in (None, ours):
                        r.acks[g] = ack
                    if a.gate is not None:
                        gack = self.view.gate_ack.get((g, a.gate.version))
                        if gack is not None and gack.sha256 == a.gate.sha256:
                            r.gate_acks[g] = gack
                if r.missing or r.gate_pending:
                    done = False
            return done

        self.view.wait(collect, wait_s)

    # ------------------------------------------------------------------ gates

    def publish_gate(self, manifest: p.GateManifest, files: Mapping[str, bytes]) -> None:
        """Blobs first, manifest last: a gateway that sees the manifest finds every chunk."""
        for ref in manifest.files:
            data = files[ref.role]
            if len(data) != ref.size:
                raise ConfigError(f"gate file {ref.role} has {len(data)} bytes, not {ref.size}")
            for i in range(ref.chunks):
                self._publish(p.topics.blob_chunk(ref.sha256, i), chunk(data, ref, i))
        if self.signer is not None:
            manifest = self.signer.sign(manifest)
        self._publish(p.topics.gate_manifest(manifest.version), p.encode(manifest))

    def push_gate(
        self,
        manifest: p.GateManifest,
        files: Mapping[str, bytes],
        apps: Sequence[tuple[str, Sequence[str], int]],  # (app, subset, k)
        *,
        gateways: Sequence[str] | None = None,
        wait_s: float = 60.0,
    ) -> list[PushResult]:
        """Publish a gate, then one assignment per application naming it; wait for the
        gateways to accept the assignments and load (or reject) the gate."""
        ref = p.GateRef(version=manifest.version, sha256=p.gate_digest(manifest))
        self.check(apps, manifest.experts)
        self.publish_gate(manifest, files)
        return self._push_many(apps, ref, gateways, wait_s)
