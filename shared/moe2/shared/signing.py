"""Signed desired state: the controller signs what it asks the gateways to do, and a gateway
that trusts a fleet key applies only what that key signed.

The broker's ACL already lets only the controller write desired state; the signature holds
when the ACL does not (a broker misconfigured, a leaked login with more rights than it
should have): a gateway checks it in its ``AppRouter`` before applying an assignment, and in
its ``GateStore`` before fetching a gate. Ed25519 (RFC 8032): the controller holds the
private key, gateways hold only the public one, so no gateway can sign.

    openssl genpkey -algorithm ed25519 -out fleet-signing.pem     # or: moe2ctl keys generate
    openssl pkey -in fleet-signing.pem -pubout -out fleet-signing.pub

    signer = Signer.load(Path("fleet-signing.pem"))
    signed = signer.sign(assignment)                 # the same message with ``sig`` set
    Verifier.load([Path("fleet-signing.pub")]).verify(signed)   # BadSignature if forged

The signature covers the message's canonical JSON (keys sorted, no spaces, ``sig`` left out)
after a tag naming its type, so a signature on one kind of message never verifies another.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel

from moe2.shared.errors import BadSignature, ConfigError

M = TypeVar("M", bound=BaseModel)

_TAG = b"moe2-signed-v1\x00"


def signed_bytes(message: BaseModel) -> bytes:
    """What a signature covers: a tag with the message type, then its canonical JSON."""
    body = message.model_dump(mode="json", exclude={"sig"}, exclude_none=True)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _TAG + type(message).__name__.encode() + b"\x00" + canonical.encode()


class Signer:
    """The controller's private fleet key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> Signer:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise ConfigError(f"signing key {path} does not exist") from None
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"signing key {path} is not a PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(
                f"signing key {path} is not an Ed25519 key "
                "(make one with: openssl genpkey -algorithm ed25519)"
            )
        return cls(key)

    def save(self, path: Path) -> Path:
        """Write the private key (mode 0600) and the public key next to it (``.pub``)."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        public = path.with_suffix(".pub")
        public.write_bytes(self.public_pem())
        return public

    def public_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def verifier(self) -> Verifier:
        """A verifier of this key's own signatures (what did the controller sign?)."""
        return Verifier([self._key.public_key()])

    def sign(self, message: M) -> M:
        sig = base64.b64encode(self._key.sign(signed_bytes(message))).decode()
        return message.model_copy(update={"sig": sig})


class Verifier:
    """The public fleet keys a gateway trusts (more than one while a key is rotated)."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]) -> None:
        self._keys = list(keys)
        if not self._keys:
            raise ConfigError("a verifier needs at least one public key")

    @classmethod
    def load(cls, paths: Iterable[Path]) -> Verifier:
        keys = []
        for path in paths:
            try:
                key = serialization.load_pem_public_key(path.read_bytes())
            except FileNotFoundError:
                raise ConfigError(f"fleet key {path} does not exist") from None
            except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
                raise ConfigError(f"fleet key {path} is not a PEM public key: {exc}") from None
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(f"fleet key {path} is not an Ed25519 public key")
            keys.append(key)
        return cls(keys)

    def verify(self, message: BaseModel) -> None:
        """BadSignature unless one trusted key signed ``message`` as it is."""
        sig = getattr(message, "sig", None)
        if not sig:
            raise BadSignature("it is not signed, and this gateway trusts only signed state")
        try:
            raw = base64.b64decode(sig, validate=True)
        except ValueError:
            raise BadSignature("its signature is not valid base64") from None
        data = signed_bytes(message)
        for key in self._keys:
            try:
                key.verify(raw, data)
                return
            except InvalidSignature:
                continue
        raise BadSignature("its signature does not match any fleet key this gateway trusts")
