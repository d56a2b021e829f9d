"""The clearing host's Ed25519 signing key (blacklists, parameter sets, acknowledgements).

Terminals hold only its public half (:func:`sync.keys.parse_public_key`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.blacklist import key_id_of
from agent.errors import ConfigurationError
from agent.params import params_signed_bytes
from agent.trust import (
    RootRejected,
    TrustRoot,
    root_payload,
    root_signed_bytes,
    verify_chain,
)
from sync.params import check_payload


class HostKey:
    """The host's signing key. ``repr`` shows only the key id."""

    __slots__ = ("_private", "public_key_bytes")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key_bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> HostKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> HostKey:
        """Load ``path``, or create it (PKCS#8 PEM, mode 0600) if it does not exist."""
        if path.exists():
            return cls.load(path)
        key = cls.generate()
        pem = key._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        return key

    @classmethod
    def load(cls, path: Path) -> HostKey:
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigurationError(f"host key {path} is unreadable: {exc}") from exc
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ConfigurationError(f"host key {path} is not an Ed25519 key")
        return cls(loaded)

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_key_bytes).hex()

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def public_key_hex(self) -> str:
        return self.public_key_bytes.hex()

    def __repr__(self) -> str:
        return f"HostKey(key_id={self.key_id!r})"


def sign_params(payload: Mapping[str, Any], key: HostKey) -> bytes:
    """The envelope the host serves (JSON bytes)."""
    check_payload(payload)
    envelope = {
        "payload": dict(payload),
        "key_id": key.key_id,
        "signature": key.sign(params_signed_bytes(payload)).hex(),
    }
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sign_root_statement(payload: Mapping[str, Any], keys: Sequence[HostKey]) -> bytes:
    """A root statement (``agent.trust``) signed by each of ``keys`` (JSON bytes). Root keys
    may sign in several sittings: see :func:`add_root_signature`."""
    envelope: dict[str, Any] = {"payload": dict(payload), "signatures": []}
    data = json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    for key in keys:
        data = add_root_signature(data, key)
    return data


def add_root_signature(statement: bytes, key: HostKey) -> bytes:
    """``statement`` with ``key``'s signature added (once). Raises ``RootRejected`` if the
    statement is malformed."""
    try:
        envelope = json.loads(statement)
        payload, signatures = envelope["payload"], list(envelope["signatures"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RootRejected(f"root statement: malformed: {exc}") from None
    root_payload(
        version=payload["version"],
        issued_at=payload["issued_at"],
        root_keys=[bytes.fromhex(k) for k in payload["root_keys"]],
        root_threshold=payload["root_threshold"],
        signing_keys=[bytes.fromhex(k) for k in payload["signing_keys"]],
    )
    signatures = [s for s in signatures if s.get("key_id") != key.key_id]
    signatures.append(
        {"key_id": key.key_id, "signature": key.sign(root_signed_bytes(payload)).hex()}
    )
    envelope = {"payload": payload, "signatures": signatures}
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def check_root_statements(statements: Sequence[bytes], key: HostKey) -> None:
    """What the host can check of the statements it serves: versions 1, 2, ... in order, each
    signed by its predecessor's root threshold, and ``key`` a signing key of the last one.
    Raises ``RootRejected`` (a host serving a chain terminals would refuse)."""
    if not statements:
        return
    try:
        first = json.loads(statements[0])["payload"]
        own = tuple(bytes.fromhex(k) for k in first["root_keys"])
        threshold = int(first["root_threshold"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RootRejected(f"root statement 1: malformed: {exc}") from None
    # Statement 1 is signed by the terminals' pinned root, which the host does not know:
    # check it against its own root keys only, and every later one as a terminal would.
    root = verify_chain(TrustRoot(0, own, threshold, own), statements)
    if key.public_key_bytes not in root.signing_keys:
        raise RootRejected(
            f"root statement {root.version} does not name this host's key {key.key_id} as a "
            "signing key: terminals would refuse everything it signs"
        )
