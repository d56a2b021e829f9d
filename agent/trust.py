"""The terminal's root of trust: root keys with a threshold, and the host's online signing keys.

Modelled on TUF's root role (the reasons this is not python-tuf are in the project's notes):
the terminal is provisioned with one or more **root keys** and a **threshold** (today's single
``--host-public-key`` is the smooth path: that key as the only root key, threshold 1, and also
the only signing key). The keys that sign blacklists, parameter sets and upload answers, the
**signing keys**, are named by **root statements**, each a signed JSON envelope::

    {"payload": {"type": "cardsync-root", "version": N, "issued_at": T,
                 "root_keys": [hex, ...], "root_threshold": t, "signing_keys": [hex, ...]},
     "signatures": [{"key_id": hex, "signature": hex}, ...]}

The signed bytes are ``b"CARDSYNC-ROOT-V1\\n" + canonical JSON of the payload``. Rules (TUF
5.3.4-5.3.5 in spirit):

* statement N+1 is accepted only if ``root_threshold`` distinct keys of the root in force
  (statement N, or the pinned root for N = 1) **and** its own threshold of its new root keys
  signed it: rotating or revoking a key needs the old root, and the new root proves possession;
* versions go up by exactly one: a lower version is a rollback (refused), the same version with
  other bytes is an attack (refused, logged), a jump needs the statements in between;
* signatures by unknown keys or that do not verify are ignored; duplicates count once.

A root statement has no expiry: a terminal offline for months must still know who signs its
lists. Freshness is the lists' business (their signed ``expires_at``).

The daemon keeps the pinned root and every accepted statement in ``root.json`` in the data
directory (:class:`RootFile`); the agent reads the same file and verifies the chain again before
it trusts a signing key. Everything here but :class:`RootFile` is pure (bytes in, values out).
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.blacklist import key_id_of, write_atomically
from agent.errors import AgentError, ConfigurationError
from agent.offline_store.records import canonical_json

log = structlog.get_logger(__name__)

ROOT_FILE = "root.json"
ROOT_DOMAIN = b"CARDSYNC-ROOT-V1\n"
ROOT_TYPE = "cardsync-root"
MAX_ROOT_KEYS = 16
MAX_ROOT_FILE_BYTES = 1024 * 1024


class RootRejected(AgentError):
    """A root statement (or ``root.json``) the terminal will not trust."""

    party = "host"


@dataclass(frozen=True, slots=True)
class TrustRoot:
    """The root in force: who may sign the next root statement, and who signs lists."""

    version: int
    root_keys: tuple[bytes, ...]
    root_threshold: int
    signing_keys: tuple[bytes, ...]
    digest: str = ""  # SHA-256 of the signed bytes; "" for the pinned root

    @property
    def signing_key_ids(self) -> list[str]:
        return [key_id_of(k).hex() for k in self.signing_keys]


def pinned_root(root_keys: Sequence[bytes], threshold: int = 1) -> TrustRoot:
    """The root given at provisioning (version 0). Its root keys also sign lists until a root
    statement names other signing keys: a single pinned host key keeps working as it is.
    Raises :class:`ConfigurationError` (no keys, a bad key, a threshold out of range)."""
    try:
        keys = _check_keys(list(root_keys), "pinned root key")
    except RootRejected as exc:
        raise ConfigurationError(str(exc)) from None
    if not 1 <= threshold <= len(keys):
        raise ConfigurationError(f"root threshold {threshold} is not within 1..{len(keys)} keys")
    return TrustRoot(0, keys, threshold, keys)


def root_signed_bytes(payload: Mapping[str, Any]) -> bytes:
    """The bytes every root key signs for a statement (domain prefix + canonical JSON)."""
    return ROOT_DOMAIN + canonical_json(payload).encode("utf-8")


def root_payload(
    *,
    version: int,
    issued_at: int,
    root_keys: Sequence[bytes],
    root_threshold: int,
    signing_keys: Sequence[bytes],
) -> dict[str, Any]:
    """A statement's payload (host side); checked as the terminal will check it."""
    payload = {
        "type": ROOT_TYPE,
        "version": version,
        "issued_at": issued_at,
        "root_keys": [k.hex() for k in root_keys],
        "root_threshold": root_threshold,
        "signing_keys": [k.hex() for k in signing_keys],
    }
    _parse_payload(payload)
    return payload


def _check_keys(keys: list[bytes], what: str) -> tuple[bytes, ...]:
    if not keys or len(keys) > MAX_ROOT_KEYS:
        raise RootRejected(f"{what}s: {len(keys)} given, 1..{MAX_ROOT_KEYS} allowed")
    for key in keys:
        if len(key) != 32:
            raise RootRejected(f"{what} {key.hex()[:16]}… is not 32 bytes (Ed25519)")
    if len(set(keys)) != len(keys):
        raise RootRejected(f"{what}s are listed twice")
    return tuple(keys)


def _hex_keys(value: object, name: str) -> tuple[bytes, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RootRejected(f"root statement: {name} is not a list of hex keys")
    try:
        keys = [bytes.fromhex(v) for v in value]
    except ValueError:
        raise RootRejected(f"root statement: {name} holds a key that is not hex") from None
    return _check_keys(keys, f"root statement {name[:-1]}")


def _parse_payload(
    payload: Mapping[str, Any],
) -> tuple[int, tuple[bytes, ...], int, tuple[bytes, ...]]:
    if payload.get("type") != ROOT_TYPE:
        raise RootRejected(f"root statement: type is {payload.get('type')!r}, not {ROOT_TYPE!r}")
    for name in ("version", "issued_at", "root_threshold"):
        value = payload.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RootRejected(f"root statement: {name} is not a non-negative integer")
    root_keys = _hex_keys(payload.get("root_keys"), "root_keys")
    signing_keys = _hex_keys(payload.get("signing_keys"), "signing_keys")
    threshold = int(payload["root_threshold"])
    if not 1 <= threshold <= len(root_keys):
        raise RootRejected(
            f"root statement: threshold {threshold} is not within 1..{len(root_keys)} root keys"
        )
    if int(payload["version"]) < 1:
        raise RootRejected("root statement: version must be at least 1")
    return int(payload["version"]), root_keys, threshold, signing_keys


def _signers(signed: bytes, signatures: object, candidates: Iterable[bytes]) -> set[bytes]:
    """The distinct candidate keys whose signature over ``signed`` verifies."""
    by_id = {key_id_of(k).hex(): k for k in candidates}
    good: set[bytes] = set()
    if not isinstance(signatures, list):
        return good
    for entry in signatures:
        if not isinstance(entry, Mapping):
            continue
        key = by_id.get(str(entry.get("key_id")))
        signature = entry.get("signature")
        if key is None or not isinstance(signature, str) or key in good:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(bytes.fromhex(signature), signed)
        except (InvalidSignature, ValueError):
            continue
        good.add(key)
    return good


def verify_root_statement(data: bytes, trusted: TrustRoot) -> TrustRoot:
    """The root that statement ``data`` establishes over ``trusted``; ``trusted`` itself if
    ``data`` is the statement already in force. Raises :class:`RootRejected`."""
    try:
        envelope = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise RootRejected(f"root statement: not JSON: {exc}") from None
    if not isinstance(envelope, dict) or set(envelope) != {"payload", "signatures"}:
        raise RootRejected("root statement: not a signed envelope (payload, signatures)")
    payload = envelope["payload"]
    if not isinstance(payload, dict):
        raise RootRejected("root statement: payload is not an object")
    version, root_keys, threshold, signing_keys = _parse_payload(payload)
    signed = root_signed_bytes(payload)
    digest = hashlib.sha256(signed).hexdigest()
    if version == trusted.version and trusted.version > 0:
        if digest == trusted.digest:
            return trusted
        # The version names the content: other bytes under a version already trusted are an
        # attack (or a host that lost its history), never an update.
        raise RootRejected(
            f"root statement: version {version} again with other content (refused as an attack)"
        )
    if version <= trusted.version:
        raise RootRejected(
            f"root statement: version {version} is not newer than the root in force "
            f"{trusted.version} (rollback refused)"
        )
    if version != trusted.version + 1:
        raise RootRejected(
            f"root statement: version {version} skips from {trusted.version}; the statements "
            "in between are needed"
        )
    # TUF's rule: the old root's threshold authorises the change, the new root's threshold
    # proves the new root keys are held.
    old = _signers(signed, envelope["signatures"], trusted.root_keys)
    if len(old) < trusted.root_threshold:
        raise RootRejected(
            f"root statement {version}: {len(old)} valid signature(s) of the root in force, "
            f"{trusted.root_threshold} needed"
        )
    new = _signers(signed, envelope["signatures"], root_keys)
    if len(new) < threshold:
        raise RootRejected(
            f"root statement {version}: {len(new)} valid signature(s) of its own root keys, "
            f"{threshold} needed"
        )
    return TrustRoot(version, root_keys, threshold, signing_keys, digest)


def verify_chain(pinned: TrustRoot, statements: Sequence[bytes]) -> TrustRoot:
    """The root in force after ``statements`` (in version order) on top of ``pinned``."""
    root = pinned
    for statement in statements:
        root = verify_root_statement(statement, root)
    return root


class RootFile:
    """``root.json``: the pinned root and the accepted statements, kept by the sync daemon and
    verified again by the agent. Written atomically; refused if others may write it."""

    def __init__(self, path: Path, pinned: TrustRoot, statements: Sequence[bytes] = ()) -> None:
        self.path = path
        self.pinned = pinned
        self.statements = list(statements)
        self.current = verify_chain(pinned, self.statements)

    @classmethod
    def open(cls, path: Path, pinned: TrustRoot) -> RootFile:
        """The daemon's view: its pinned root (from provisioning) and the statements in
        ``path`` if they chain from it; a file for another pinned root is started afresh."""
        try:
            stored_pinned, statements = read_root_file(path)
        except FileNotFoundError:
            return cls(path, pinned)
        except RootRejected as exc:
            log.error("root_file_unusable", path=str(path), error=str(exc))
            return cls(path, pinned)
        if stored_pinned != pinned:
            log.warning("root_file_for_another_pinned_root", path=str(path))
            return cls(path, pinned)
        return cls(path, pinned, statements)

    def update(self, statement: bytes) -> bool:
        """Accept the next statement (persisted before it is in force); False if it is the
        statement already in force. Raises :class:`RootRejected`."""
        new = verify_root_statement(statement, self.current)
        if new is self.current:
            return False
        self.statements.append(statement)
        try:
            self.save()
        except AgentError:
            self.statements.pop()
            raise
        self.current = new
        log.info(
            "root statement accepted",
            version=new.version,
            root_threshold=new.root_threshold,
            signing_keys=new.signing_key_ids,
        )
        return True

    def save(self) -> None:
        document = {
            "pinned": {
                "root_keys": [k.hex() for k in self.pinned.root_keys],
                "root_threshold": self.pinned.root_threshold,
            },
            "statements": [json.loads(s) for s in self.statements],
        }
        write_atomically(self.path, json.dumps(document, indent=1).encode("utf-8"))


def read_root_file(path: Path) -> tuple[TrustRoot, list[bytes]]:
    """The pinned root and the statements of a ``root.json``. Raises ``FileNotFoundError`` or
    :class:`RootRejected` (unreadable, writable by others, malformed)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o022:
        raise RootRejected(f"root file {path} is writable by others (mode {mode:o})")
    try:
        raw = path.read_bytes()
        if len(raw) > MAX_ROOT_FILE_BYTES:
            raise RootRejected(f"root file {path} is larger than {MAX_ROOT_FILE_BYTES} bytes")
        document = json.loads(raw)
        pinned_raw = document["pinned"]
        pinned = pinned_root(
            [bytes.fromhex(k) for k in pinned_raw["root_keys"]], int(pinned_raw["root_threshold"])
        )
        statements = [canonical_json(s).encode("utf-8") for s in document["statements"]]
    except RootRejected:
        raise
    except (ConfigurationError, OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise RootRejected(f"root file {path} is unreadable: {exc}") from None
    return pinned, statements


def load_signing_keys(path: Path) -> tuple[bytes, ...]:
    """The agent's view: the signing keys in force after verifying ``root.json``'s chain from
    its pinned root. Raises ``FileNotFoundError`` or :class:`RootRejected`."""
    pinned, statements = read_root_file(path)
    return verify_chain(pinned, statements).signing_keys
