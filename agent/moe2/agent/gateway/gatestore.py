"""Receiving gates: follow each application's ``GateRef``, fetch the manifest and the
content-addressed blobs it names (retained, chunked), verify every hash, load the gate with
ONNX Runtime off the network thread, and only then hand it to the gateway. A gate that is
half received, does not match its reference, is not signed by a trusted fleet key (when the
gateway has some) or fails to load is never used: the application keeps its previous gate
meanwhile. Each outcome is acknowledged in a retained ``GateAck``; a loaded gate's ack carries
the seconds it takes per prompt here (timed at load, then over the prompts it gates:
``record``), announced again by ``announce`` when that figure moves.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe2.agent.gateway.gate import Gate, GateLatency, probe
from moe2.shared import protocol as p
from moe2.shared.costmodel import CostCurve
from moe2.shared.errors import BadSignature, Moe2Error
from moe2.shared.mqtt import Connection
from moe2.shared.signing import Verifier

if TYPE_CHECKING:
    from moe2.agent.gateway.onnxgate import ProviderChoice

log = logging.getLogger(__name__)

# A loaded gate's latency is announced again when it moved by more than this (relative), or
# when its first prompts replace the load-time figure.
ANNOUNCE_MOVE = 0.1

OnGate = Callable[[str, Gate | None], None]  # (application, gate or None for uniform)


class _Blob:
    def __init__(self, ref: p.BlobRef) -> None:
        self.ref = ref
        self.parts: dict[int, bytes] = {}
        self.data: bytes | None = None  # set once complete and verified
        self.waiters: list[str] = []  # gate versions that need it


def onnx_loader(
    providers: ProviderChoice = "auto", engine_cache: Path | None = None
) -> Callable[[p.GateManifest, dict[str, bytes]], Gate]:
    """Loads gates with ONNX Runtime on these providers (``GatewayConfig.gate_providers``)."""

    def load(manifest: p.GateManifest, files: dict[str, bytes]) -> Gate:
        from moe2.agent.gateway.onnxgate import OnnxGate

        return OnnxGate(manifest, files, providers, engine_cache)

    return load


_load_onnx_gate = onnx_loader()


class GateStore:
    def __init__(
        self,
        conn: Connection,
        gateway_id: str,
        on_gate: OnGate,
        loader: Callable[[p.GateManifest, dict[str, bytes]], Gate] = _load_onnx_gate,
        verifier: Verifier | None = None,
    ) -> None:
        self.verifier = verifier  # None: unsigned manifests are accepted
        self.conn = conn
        self.gateway_id = gateway_id
        self.on_gate = on_gate
        self.loader = loader
        self._lock = threading.Lock()
        self._wanted: dict[str, p.GateRef] = {}  # app -> the gate it should run
        self._manifests: dict[str, p.GateManifest] = {}  # version -> verified manifest
        self._blobs: dict[str, _Blob] = {}  # sha256 -> blob being fetched or fetched
        self._loaded: dict[str, Gate] = {}  # gate digest -> loaded gate
        self._latency: dict[str, GateLatency] = {}  # gate digest -> its measured latency
        self._announced: dict[str, tuple[float, int]] = {}  # digest -> (τ at 32 tokens, prompts)
        self._versions: dict[str, str] = {}  # gate digest -> version
        self._subscribed: set[str] = set()
        self._loading: set[str] = set()  # versions handed to the loader
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gate-load")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ desired state

    def want(self, app: str, ref: p.GateRef | None) -> None:
        """The assignment of ``app`` names ``ref`` (None: uniform weights)."""
        with self._lock:
            if ref is None:
                self._wanted.pop(app, None)
                gate = None
            else:
                self._wanted[app] = ref
                gate = self._loaded.get(ref.sha256)
        if ref is None or gate is not None:
            self.on_gate(app, gate)
            if gate is not None and ref is not None:
                self._ack(ref.version, ref.sha256, "loaded", gate=gate)
            return
        self._subscribe(p.topics.gate_manifest(ref.version), self._on_manifest)

    def _subscribe(self, topic_filter: str, handler: Callable[[Any], None]) -> None:
        with self._lock:
            if topic_filter in self._subscribed:
                return
            self._subscribed.add(topic_filter)
        self.conn.subscribe(topic_filter, handler)

    # ------------------------------------------------------------------ manifest

    def _on_manifest(self, msg: Any) -> None:
        if not msg.payload:
            return
        try:
            manifest = p.decode_message(p.GateManifest, msg.payload)
        except Moe2Error as exc:
            log.warning("ignoring bad gate manifest on %s: %s", msg.topic, exc.message)
            return
        digest = p.gate_digest(manifest)
        with self._lock:
            refs = [r for r in self._wanted.values() if r.version == manifest.version]
            if manifest.version in self._manifests:
                return
        if not refs:
            return
        if self.verifier is not None:
            try:
                self.verifier.verify(manifest)
            except BadSignature as exc:
                self._ack(manifest.version, digest, "rejected", reason=f"bad signature: {exc}")
                return
        if all(r.sha256 != digest for r in refs):
            self._ack(
                manifest.version,
                digest,
                "rejected",
                reason=f"manifest digest {digest[:12]} does not match the assignment's "
                f"{refs[0].sha256[:12]}",
            )
            return
        with self._lock:
            self._manifests[manifest.version] = manifest
            fetch = []
            for ref in manifest.files:
                blob = self._blobs.get(ref.sha256)
                if blob is None:
                    blob = self._blobs[ref.sha256] = _Blob(ref)
                    fetch.append(ref.sha256)
                blob.waiters.append(manifest.version)
        for sha in fetch:
            self._subscribe(p.topics.blob_chunks(sha), self._on_chunk)
        self._maybe_load(manifest.version)

    # ------------------------------------------------------------------ blobs

    def _on_chunk(self, msg: Any) -> None:
        topic = p.topics.parse(msg.topic)
        if topic is None or topic.sha256 is None or topic.index is None:
            return
        sha, index = topic.sha256, topic.index
        with self._lock:
            blob = self._blobs.get(sha)
            if blob is None or blob.data is not None or not 0 <= index < blob.ref.chunks:
                return
            blob.parts[index] = bytes(msg.payload)
            if len(blob.parts) < blob.ref.chunks:
                return
            data = b"".join(blob.parts[i] for i in range(blob.ref.chunks))
            blob.parts = {}
            ok = len(data) == blob.ref.size and hashlib.sha256(data).hexdigest() == sha
            if ok:
                blob.data = data
            else:  # corrupt or mixed chunks: forget them; a republish fetches afresh
                del self._blobs[sha]
                self._subscribed.discard(p.topics.blob_chunks(sha))
            versions = list(blob.waiters)
        for version in versions:
            if ok:
                self._maybe_load(version)
            else:
                self._ack(version, sha, "rejected", reason=f"blob {sha[:12]} failed its hash check")

    # ------------------------------------------------------------------ loading

    def _maybe_load(self, version: str) -> None:
        with self._lock:
            manifest = self._manifests.get(version)
            if manifest is None:
                return
            blobs = [self._blobs.get(r.sha256) for r in manifest.files]
            if any(b is None or b.data is None for b in blobs):
                return  # still arriving
            files = {r.role: b.data for r, b in zip(manifest.files, blobs)}  # type: ignore[union-attr]
            if version in self._loading:
                return
            self._loading.add(version)
        self._pool.submit(self._load, manifest, files)  # type: ignore[arg-type]

    def _load(self, manifest: p.GateManifest, files: dict[str, bytes]) -> None:
        digest = p.gate_digest(manifest)
        try:
            gate = self.loader(manifest, files)
            probed = probe(gate, manifest.experts)
        except Exception as exc:
            log.warning("gate %s failed to load: %s", manifest.version, exc)
            self._ack(manifest.version, digest, "rejected", reason=f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            self._loaded[digest] = gate
            self._latency[digest] = GateLatency(probed)
            self._versions[digest] = manifest.version
            apps = [a for a, r in self._wanted.items() if r.sha256 == digest]
        for app in apps:
            self.on_gate(app, gate)
        log.info("gate %s loaded for %s", manifest.version, ", ".join(apps) or "no application")
        self._ack(manifest.version, digest, "loaded", gate=gate)

    # ------------------------------------------------------------------ latency

    def record(self, gate: Gate, tokens: int, seconds: float) -> None:
        """``gate`` took ``seconds`` on a prompt of ``tokens`` of its tokens."""
        with self._lock:
            for digest, loaded in self._loaded.items():
                if loaded is gate:
                    self._latency[digest].add(tokens, seconds)
                    return

    def announce(self) -> None:
        """Acknowledge again every loaded gate whose latency figure moved."""
        with self._lock:
            due = []
            for digest, latency in self._latency.items():
                now = _gist(latency.figure())
                before = self._announced.get(digest)
                moved = (
                    before is None
                    or (before[1] == 0) != (now[1] == 0)
                    or abs(now[0] - before[0]) > ANNOUNCE_MOVE * max(before[0], 1e-9)
                )
                if moved:
                    due.append((self._versions[digest], digest, self._loaded[digest]))
        for version, digest, gate in due:
            self._ack(version, digest, "loaded", gate=gate)

    def _ack(
        self,
        version: str,
        sha256: str,
        state: str,
        *,
        gate: Gate | None = None,
        reason: str | None = None,
    ) -> None:
        with self._lock:
            apps = sorted(a for a, r in self._wanted.items() if r.sha256 == sha256)
            latency = self._latency.get(sha256) if state == "loaded" else None
            figure = None if latency is None else latency.figure()
            if figure is not None:
                self._announced[sha256] = _gist(figure)
        ack = p.GateAck(
            gateway=self.gateway_id,
            version=version,
            sha256=sha256,
            state=state,  # type: ignore[arg-type]
            apps=apps if state == "loaded" else [],
            providers=list(getattr(gate, "providers", [])),
            reason=reason,
            latency=None if figure is None else figure[0],
            latency_prompts=0 if figure is None else figure[1],
        )
        self.conn.publish(p.topics.gate_ack(self.gateway_id, version), p.encode(ack), retain=True)


def _gist(figure: tuple[CostCurve, int]) -> tuple[float, int]:
    """(seconds at a typical prompt length, prompts behind it): what "moved" compares."""
    curve, prompts = figure
    return curve.at(32), prompts
