"""The parameter set in force: fare table and issuer allow-list pulled by the sync daemon.

The daemon (``cardsync run``) verifies each signed set from the clearing host (signature,
version, expiry) before it atomically replaces ``params.json`` in the device's data directory,
the same trust domain as the offline store. The agent does not take the daemon's word for it: it
verifies the set's Ed25519 signature again, against the host public key, before applying it.

Where the agent gets the signing keys: ``root.json`` in the data directory, whose chain of root
statements it verifies from the pinned root (:mod:`agent.trust`); without it (an older daemon),
``host-key.pub`` (64 hex digits), written by the daemon from its ``--host-public-key``
(:func:`write_host_key`). Without either, or with a set that is unsigned, badly signed or signed
by a key not in force, the agent logs an error naming the file and applies nothing: the
firmware profile's values stand. An expired set is not applied either (logged once).
A verified set is applied only from its ``effective_from`` time until it expires.

The signed bytes are ``b"CARDSYNC-PARAMS-V1\\n" + canonical JSON of the payload`` (the host
and the sync daemon use this function too; the agent does not import the sync package).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.blacklist import Keys, keys_by_id, write_atomically
from agent.errors import AgentError, ConfigurationError
from agent.files import FileStamp, file_stamp
from agent.offline_store.records import canonical_json
from agent.products.fare_policy import FarePolicy, FarePolicyError, parse_fare_policy
from agent.trust import ROOT_FILE, RootRejected, load_signing_keys

log = structlog.get_logger(__name__)

PARAMS_FILE = "params.json"
HOST_KEY_FILE = "host-key.pub"
PARAMS_DOMAIN = b"CARDSYNC-PARAMS-V1\n"
MAX_PARAMS_FILE_BYTES = 4 * 1024 * 1024


class ParamsRejected(AgentError):
    """A ``params.json`` the agent will not apply: unsigned, forged, another key's, corrupt."""


def params_signed_bytes(payload: Mapping[str, Any]) -> bytes:
    """The bytes the host signs for a parameter set (domain prefix + canonical JSON)."""
    return PARAMS_DOMAIN + canonical_json(payload).encode("utf-8")


def params_content_digest(payload: Mapping[str, Any]) -> str:
    """What a version names: the payload without its signing times (``issued_at``,
    ``expires_at``), which a re-issue of the same set changes (SHA-256 hex)."""
    content = {k: v for k, v in payload.items() if k not in ("issued_at", "expires_at")}
    return hashlib.sha256(canonical_json(content).encode("utf-8")).hexdigest()


def verify_envelope(data: bytes, keys: Keys) -> dict[str, Any]:
    """The payload of a signed envelope ``{payload, key_id, signature}``, verified against the
    signing keys in force. Raises :class:`ParamsRejected`."""
    try:
        envelope = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ParamsRejected(f"not JSON: {exc}") from exc
    if not isinstance(envelope, dict) or set(envelope) != {"payload", "key_id", "signature"}:
        raise ParamsRejected("not a signed envelope (payload, key_id, signature)")
    payload, key_id, signature = envelope["payload"], envelope["key_id"], envelope["signature"]
    if not isinstance(payload, dict) or not isinstance(signature, str):
        raise ParamsRejected("unsigned or malformed envelope")
    by_hex = {k.hex(): v for k, v in keys_by_id(keys).items()}
    host_public_key = by_hex.get(key_id) if isinstance(key_id, str) else None
    if host_public_key is None:
        raise ParamsRejected(f"signed by key {str(key_id)[:40]!r}, not a signing key in force")
    try:
        Ed25519PublicKey.from_public_bytes(host_public_key).verify(
            bytes.fromhex(signature), params_signed_bytes(payload)
        )
    except (InvalidSignature, ValueError, RecursionError):
        raise ParamsRejected("bad signature (forged or corrupted set)") from None
    return payload


def write_host_key(data_dir: Path, host_public_key: bytes) -> None:
    """Pin the host public key for the agent (``host-key.pub``); rewritten only if it changed."""
    if len(host_public_key) != 32:
        raise ConfigurationError("a host public key is 32 bytes (Ed25519)")
    path = data_dir / HOST_KEY_FILE
    text = host_public_key.hex() + "\n"
    try:
        if path.read_text(encoding="ascii") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    write_atomically(path, text.encode("ascii"))
    log.info("host key pinned for the agent", path=str(path))


def read_host_key(path: Path) -> bytes:
    """The host public key of ``host-key.pub``. Raises :class:`ParamsRejected`."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ParamsRejected(f"no host public key {path} (written by cardsync run)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsRejected(f"host public key {path} is unreadable: {exc}") from exc
    if mode & 0o022:
        raise ParamsRejected(f"host public key {path} is writable by others (mode {mode:o})")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ParamsRejected(f"host public key {path} is not 64 hex digits")
    return key


@dataclass(frozen=True, slots=True)
class ParamsInForce:
    version: int
    flat_fare: int | None
    issuer_allow_list: tuple[str, ...] | None
    fare_policy: FarePolicy | None = None


Stamp = tuple[FileStamp | None, ...]


class ActiveParams:
    """Reads ``params.json`` lazily and verifies it; a missing, corrupt, unverified or
    out-of-window file means 'none' (the profile's values).

    ``host_public_key`` is the key (or keys) sets must be signed by; ``None`` takes the signing
    keys in force from ``root.json`` beside ``params.json`` (its chain verified from the pinned
    root), else from ``host-key.pub`` (the daemon writes both)."""

    def __init__(
        self,
        path: Path,
        host_public_key: Keys | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.host_public_key = host_public_key
        self.host_key_path = path.parent / HOST_KEY_FILE
        self.root_path = path.parent / ROOT_FILE
        self.clock = clock
        self._stamp: Stamp | None = None
        self._payload: dict[str, object] | None = None
        self._fare_policy: FarePolicy | None = None
        self._expired_logged = False

    def current(self) -> ParamsInForce | None:
        self._reload_if_changed()
        payload = self._payload
        if payload is None:
            return None
        now = self.clock()
        effective = payload.get("effective_from")
        expires = payload.get("expires_at")
        if not isinstance(effective, int) or not isinstance(expires, int):
            return None
        if now >= expires:
            if not self._expired_logged:  # freeze: the daemon has not renewed the set
                self._expired_logged = True
                log.error(
                    "params_expired",
                    path=str(self.path),
                    version=payload.get("version"),
                    expired_s=round(now - expires),
                    detail="the firmware profile's values are in force until a fresh set",
                )
            return None
        if now < effective:
            return None
        fare_table = payload.get("fare_table")
        fare = fare_table.get("flat_fare") if isinstance(fare_table, dict) else None
        allow = payload.get("issuer_allow_list")
        version = payload.get("version")
        return ParamsInForce(
            version=version if isinstance(version, int) else 0,
            flat_fare=fare
            if isinstance(fare, int) and not isinstance(fare, bool) and fare >= 0
            else None,
            issuer_allow_list=tuple(str(x).upper() for x in allow)
            if isinstance(allow, list) and allow
            else None,
            fare_policy=self._fare_policy,
        )

    def _reload_if_changed(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._payload, self._fare_policy = None, None, None
            return
        except OSError as exc:
            log.warning("params_unreadable", path=str(self.path), error=str(exc))
            return
        stamp: Stamp = (file_stamp(st),)
        if self.host_public_key is None:
            stamp += (_stamp_of(self.host_key_path), _stamp_of(self.root_path))
        if stamp == self._stamp:
            return
        self._stamp = stamp
        self._payload, self._fare_policy = None, None
        self._expired_logged = False
        try:
            if st.st_size > MAX_PARAMS_FILE_BYTES:
                raise ParamsRejected(f"larger than {MAX_PARAMS_FILE_BYTES} bytes")
            payload = verify_envelope(self.path.read_bytes(), self._signing_keys())
            # The validator the host and the daemon ran: a policy one refuses, all refuse.
            policy = parse_fare_policy(payload["fare_policy"]) if "fare_policy" in payload else None
        except FarePolicyError as exc:
            log.error(
                "params_refused",
                path=str(self.path),
                error=f"fare policy: {exc}",
                detail="the firmware profile's values stay in force",
            )
            return
        except (ParamsRejected, OSError) as exc:
            log.error(
                "params_refused",
                path=str(self.path),
                error=str(exc),
                detail="the firmware profile's values stay in force",
            )
            return
        self._payload, self._fare_policy = payload, policy
        log.info("params_loaded", path=str(self.path), version=payload.get("version"))

    def _signing_keys(self) -> Keys:
        if self.host_public_key is not None:
            return self.host_public_key
        try:
            return load_signing_keys(self.root_path)
        except FileNotFoundError:
            return read_host_key(self.host_key_path)
        except (RootRejected, OSError) as exc:
            raise ParamsRejected(str(exc)) from None


def _stamp_of(path: Path) -> FileStamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return file_stamp(st)
