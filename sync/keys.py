"""The clearing host's public key as terminals are given it (provisioning, out of band).

Terminals never learn the host key from the host itself, so a host impostor cannot make them
accept its lists. The private half lives in :mod:`clearinghost.keys`.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import ConfigurationError


def parse_public_key(text: str) -> bytes:
    """A host public key from 64 hex digits, or from a file holding hex or a PEM public key."""
    value = text.strip()
    if len(value) == 64:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    path = Path(value)
    if not path.is_file():
        raise ConfigurationError(
            f"host public key {value[:80]!r} is neither 64 hex digits nor a readable file"
        )
    content = path.read_bytes()
    if b"BEGIN" in content:
        try:
            public = serialization.load_pem_public_key(content)
        except ValueError as exc:
            raise ConfigurationError(f"host public key {path} is not a PEM key: {exc}") from exc
        if not isinstance(public, Ed25519PublicKey):
            raise ConfigurationError(f"host public key {path} is not an Ed25519 key")
        return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return parse_public_key(content.decode("ascii", "replace"))
