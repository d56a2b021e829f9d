"""The terminal's Ed25519 device key: created once at provisioning, never leaves the device."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import structlog
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent.errors import StoreError

log = structlog.get_logger(__name__)

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
KEY_FILE_MODE = 0o600


def key_id_for(public_key_raw: bytes) -> str:
    """Short, stable name of a public key for logs: first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_key_raw).hexdigest()[:16]


class DeviceKey:
    """An Ed25519 signing key. ``repr`` and ``str`` show only the key id."""

    __slots__ = ("_key_id", "_private_key", "_public_key_raw")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self._public_key_raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._key_id = key_id_for(self._public_key_raw)

    @classmethod
    def generate(cls) -> DeviceKey:
        """A fresh key held only in memory (tests, simulators)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def create(cls, path: Path) -> DeviceKey:
        """Generate a key and write it to ``path`` (PKCS#8 PEM, mode 0600).

        The file is created with ``O_EXCL``: an existing file is never overwritten.
        """
        key = cls.generate()
        pem = key._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags, KEY_FILE_MODE)
        except FileExistsError as exc:
            raise StoreError(f"store: refusing to overwrite existing device key {path}") from exc
        except OSError as exc:
            raise StoreError(f"store: could not create device key {path}: {exc.strerror}") from exc
        try:
            try:
                os.fchmod(fd, KEY_FILE_MODE)
                _write_all(fd, pem)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_directory(path.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            raise StoreError(f"store: could not write device key {path}: {exc.strerror}") from exc
        log.info("device key created", path=str(path), key_id=key.key_id)
        return key

    @classmethod
    def load(cls, path: Path) -> DeviceKey:
        """Read a key written by :meth:`create`. A file that other users can read or write
        (``mode & 0o077``) is refused with :class:`StoreError` naming the path and the mode."""
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                raise StoreError(
                    f"store: device key {path} has mode {mode:04o}: other users can read or "
                    f"write it; refusing to use it (chmod 600 {path}, and consider the key "
                    "exposed)"
                )
            pem = path.read_bytes()
        except FileNotFoundError as exc:
            raise StoreError(f"store: device key {path} does not exist") from exc
        except OSError as exc:
            raise StoreError(f"store: could not read device key {path}: {exc.strerror}") from exc
        try:
            private_key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise StoreError(
                f"store: device key {path} is corrupt or not an unencrypted PKCS#8 PEM key"
            ) from exc
        if not isinstance(private_key, Ed25519PrivateKey):
            raise StoreError(
                f"store: device key {path} is a {type(private_key).__name__}, not an Ed25519 key"
            )
        return cls(private_key)

    @property
    def public_key_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        return self._public_key_raw

    @property
    def key_id(self) -> str:
        return self._key_id

    def sign(self, data: bytes) -> bytes:
        """A 64-byte Ed25519 signature over ``data``."""
        return self._private_key.sign(data)

    def __repr__(self) -> str:
        return f"DeviceKey(key_id={self._key_id!r})"

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a DeviceKey cannot be pickled")


def signature_verifier(public_key_raw: bytes) -> Callable[[bytes, bytes], bool]:
    """A ``(signature, data) -> bool`` check bound to one public key (parsed once).

    Raises ``ValueError`` if ``public_key_raw`` is not a 32-byte Ed25519 public key.
    """
    if len(public_key_raw) != PUBLIC_KEY_SIZE:
        raise ValueError(
            f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes, not {len(public_key_raw)}"
        )
    public_key = Ed25519PublicKey.from_public_bytes(public_key_raw)

    def verify(signature: bytes, data: bytes) -> bool:
        if len(signature) != SIGNATURE_SIZE:
            return False
        try:
            public_key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    return verify


def verify_signature(public_key_raw: bytes, signature: bytes, data: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``data`` by that public key."""
    return signature_verifier(public_key_raw)(signature, data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
