"""Rollout: publish a gate's files and manifest (retained), then the applications'
assignments that name it, and wait for the gateways' acknowledgements.

    push(broker, manifest, files, [AppAssignment(app="zoo", version=3, subset=[...], k=2,
         gate=GateRef(version=..., sha256=...))])
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from moe2.shared import protocol as p
from moe2.shared.errors import BrokerError, Moe2Error
from moe2.shared.mqtt import BrokerConfig, Connection
from moe2.shared.protocol.gates import chunk


def publish_gate(conn: Connection, manifest: p.GateManifest, files: dict[str, Path]) -> None:
    """Blobs first, manifest last: a gateway that sees the manifest finds every chunk."""
    infos = []
    for ref in manifest.files:
        data = files[ref.role].read_bytes()
        for i in range(ref.chunks):
            infos.append(
                conn.publish(p.topics.blob_chunk(ref.sha256, i), chunk(data, ref, i), retain=True)
            )
        for info in infos:
            info.wait_for_publish(60)
        infos = []
    conn.publish(
        p.topics.gate_manifest(manifest.version), p.encode(manifest), retain=True
    ).wait_for_publish(30)


def push(
    broker: BrokerConfig,
    manifest: p.GateManifest,
    files: dict[str, Path],
    assignments: Sequence[p.AppAssignment],
    *,
    wait_s: float = 0.0,
    gateways: int = 1,
) -> dict[str, p.GateAck]:
    """Publish; with ``wait_s`` > 0 wait until ``gateways`` gateways acknowledged the version
    (or the time is up). Returns the acknowledgements seen, by gateway."""
    acks: dict[str, p.GateAck] = {}
    cond = threading.Condition()

    def on_ack(msg: object) -> None:
        try:
            ack = p.decode_message(p.GateAck, msg.payload)  # type: ignore[attr-defined]
        except Moe2Error:
            return
        if ack.version == manifest.version:
            with cond:
                acks[ack.gateway] = ack
                cond.notify_all()

    conn = Connection(broker, f"moe2ctl-push-{uuid.uuid4().hex[:8]}")
    conn.subscribe(p.topics.ALL_GATE_ACKS, on_ack)
    with conn:
        try:
            publish_gate(conn, manifest, files)
            for a in assignments:
                conn.publish(
                    p.topics.desired_app(a.app), p.encode(a), retain=True
                ).wait_for_publish(30)
        except (RuntimeError, ValueError) as exc:
            raise BrokerError(f"publishing gate {manifest.version} failed: {exc}") from None
        deadline = time.monotonic() + wait_s
        with cond:
            while len(acks) < gateways and (left := deadline - time.monotonic()) > 0:
                cond.wait(min(left, 0.5))
    return acks
