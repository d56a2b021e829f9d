"""Signed, hash-chained transaction records and their canonical encoding.

Pure functions only: the clearing host verifies records with this same module.

Canonical encoding of a record: the JSON object of ``seq, created_at, terminal_id, kind,
card_id, amount, fields, prev_hash`` (not ``hash``/``signature``), keys sorted by code point at
every level, no whitespace, non-ASCII left as is, UTF-8. ``hash`` is the hex SHA-256 of that;
``signature`` is the hex Ed25519 signature of the 32-byte digest.

A *quarantine notice* stands in for a stored record whose content no longer verifies (see
:class:`QuarantineNotice`): signed by the same device key over :data:`NOTICE_DOMAIN` + the
canonical JSON of every notice field but ``signature``. The domain prefix keeps a notice
signature from ever verifying as a record signature (those sign a bare 32-byte digest).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

GENESIS_HASH = "0" * 64

FieldValue = str | int | bool | None

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

_HASH_PATTERN = re.compile(r"[0-9a-f]{64}")
_SIGNATURE_PATTERN = re.compile(r"[0-9a-f]{128}")
_TIMESTAMP_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")

# The columns of a stored record, in the store's order (a quarantined row is kept by these names).
RECORD_COLUMNS = (
    "seq",
    "created_at",
    "terminal_id",
    "kind",
    "card_id",
    "amount",
    "fields",
    "prev_hash",
    "hash",
    "signature",
)
RECORD_KEYS = frozenset(RECORD_COLUMNS)


NOTICE_DOMAIN = b"CARDAGENT-QUARANTINE-V1\n"
NOTICE_KIND = "quarantine"
# The verbatim row travels base64 in the notice up to this many bytes (one upload line stays
# under the protocol's 64 KiB); the terminal keeps the whole row in its quarantine table.
NOTICE_RAW_MAX_BYTES = 16 * 1024
NOTICE_KEYS = frozenset(
    {
        "notice",
        "seq",
        "terminal_id",
        "quarantined_at",
        "reason",
        "chain_hash",
        "raw",
        "raw_size",
        "signature",
    }
)


@dataclass(frozen=True)
class RecordBody:
    """What the caller decides about a record; the store adds sequence, time, chain and seal."""

    kind: str
    card_id: str
    amount: int
    fields: Mapping[str, FieldValue] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        require_text("kind", self.kind)
        require_text("card_id", self.card_id)
        _check_int("amount", self.amount, minimum=0)
        object.__setattr__(self, "fields", _frozen_fields(self.fields))


@dataclass(frozen=True)
class Record:
    seq: int
    created_at: str
    terminal_id: str
    kind: str
    card_id: str
    amount: int
    fields: Mapping[str, FieldValue] = field(hash=False)
    prev_hash: str
    hash: str
    signature: str

    def __post_init__(self) -> None:
        _check_int("seq", self.seq, minimum=1)
        _check_timestamp(self.created_at)
        require_text("terminal_id", self.terminal_id)
        require_text("kind", self.kind)
        require_text("card_id", self.card_id)
        _check_int("amount", self.amount, minimum=0)
        object.__setattr__(self, "fields", _frozen_fields(self.fields))
        _check_hex("prev_hash", self.prev_hash, _HASH_PATTERN)
        _check_hex("hash", self.hash, _HASH_PATTERN)
        _check_hex("signature", self.signature, _SIGNATURE_PATTERN)

    @property
    def body(self) -> RecordBody:
        return RecordBody(self.kind, self.card_id, self.amount, self.fields)

    def canonical_bytes(self) -> bytes:
        return _encode_canonical(
            seq=self.seq,
            created_at=self.created_at,
            terminal_id=self.terminal_id,
            kind=self.kind,
            card_id=self.card_id,
            amount=self.amount,
            fields=self.fields,
            prev_hash=self.prev_hash,
        )

    def to_dict(self) -> dict[str, Any]:
        """Every field, including ``hash`` and ``signature``, as plain JSON-ready values."""
        return {
            "seq": self.seq,
            "created_at": self.created_at,
            "terminal_id": self.terminal_id,
            "kind": self.kind,
            "card_id": self.card_id,
            "amount": self.amount,
            "fields": dict(self.fields),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
            "signature": self.signature,
        }


@dataclass(frozen=True)
class QuarantineNotice:
    """The terminal's signed statement that its record ``seq`` is corrupted and quarantined.

    ``chain_hash`` is the record's hash as it was written (what record ``seq + 1`` chains onto:
    its ``prev_hash``, or the store's last hash when ``seq`` is the newest), ``raw`` the stored
    row verbatim (base64, at most :data:`NOTICE_RAW_MAX_BYTES` of its ``raw_size`` bytes),
    ``reason`` what failed (parse, hash, signature). It fills the record's ``(terminal, seq)``
    slot at the clearing host so the records after it chain on; it carries no amount and no
    card, and it never replaces a record the host holds.
    """

    seq: int
    terminal_id: str
    quarantined_at: str
    reason: str
    chain_hash: str
    raw: str
    raw_size: int
    signature: str

    def __post_init__(self) -> None:
        _check_int("seq", self.seq, minimum=1)
        require_text("terminal_id", self.terminal_id)
        _check_timestamp(self.quarantined_at)
        require_text("reason", self.reason)
        _check_hex("chain_hash", self.chain_hash, _HASH_PATTERN)
        _check_int("raw_size", self.raw_size, minimum=0)
        if not isinstance(self.raw, str):
            raise TypeError(f"raw must be str, not {type(self.raw).__name__}")
        try:
            raw = base64.b64decode(self.raw, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("raw is not base64") from exc
        if len(raw) > min(self.raw_size, NOTICE_RAW_MAX_BYTES):
            raise ValueError(f"raw holds {len(raw)} bytes, more than raw_size or the cap")
        _check_hex("signature", self.signature, _SIGNATURE_PATTERN)

    @property
    def hash(self) -> str:
        """The hash the next record chains onto (the ``last_hash`` of a batch ending here)."""
        return self.chain_hash

    def signed_fields(self) -> dict[str, Any]:
        return {
            "notice": NOTICE_KIND,
            "seq": self.seq,
            "terminal_id": self.terminal_id,
            "quarantined_at": self.quarantined_at,
            "reason": self.reason,
            "chain_hash": self.chain_hash,
            "raw": self.raw,
            "raw_size": self.raw_size,
        }

    def signed_bytes(self) -> bytes:
        return notice_signed_bytes(self.signed_fields())

    def to_dict(self) -> dict[str, Any]:
        return {**self.signed_fields(), "signature": self.signature}

    def raw_bytes(self) -> bytes:
        return base64.b64decode(self.raw)


def notice_signed_bytes(fields: Mapping[str, Any]) -> bytes:
    return NOTICE_DOMAIN + canonical_json(fields).encode("utf-8")


def seal_notice(
    *,
    seq: int,
    terminal_id: str,
    quarantined_at: str,
    reason: str,
    chain_hash: str,
    raw: bytes,
    sign: Callable[[bytes], bytes],
) -> QuarantineNotice:
    """Build and sign (device key) the notice for quarantined record ``seq``."""
    fields: dict[str, Any] = {
        "notice": NOTICE_KIND,
        "seq": seq,
        "terminal_id": terminal_id,
        "quarantined_at": quarantined_at,
        "reason": reason[:500],
        "chain_hash": chain_hash,
        "raw": base64.b64encode(raw[:NOTICE_RAW_MAX_BYTES]).decode("ascii"),
        "raw_size": len(raw),
    }
    signature = sign(notice_signed_bytes(fields)).hex()
    del fields["notice"]
    return QuarantineNotice(**fields, signature=signature)


def canonical_json(value: Mapping[str, Any]) -> str:
    return json.dumps(
        dict(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def canonical_bytes(
    seq: int, created_at: str, terminal_id: str, body: RecordBody, prev_hash: str
) -> bytes:
    """The bytes that are hashed: every record field except ``hash`` and ``signature``."""
    return _encode_canonical(
        seq=seq,
        created_at=created_at,
        terminal_id=terminal_id,
        kind=body.kind,
        card_id=body.card_id,
        amount=body.amount,
        fields=body.fields,
        prev_hash=prev_hash,
    )


def _encode_canonical(
    *,
    seq: int,
    created_at: str,
    terminal_id: str,
    kind: str,
    card_id: str,
    amount: int,
    fields: Mapping[str, FieldValue],
    prev_hash: str,
) -> bytes:
    return canonical_json(
        {
            "seq": seq,
            "created_at": created_at,
            "terminal_id": terminal_id,
            "kind": kind,
            "card_id": card_id,
            "amount": amount,
            "fields": dict(fields),
            "prev_hash": prev_hash,
        }
    ).encode("utf-8")


def hash_hex(canonical: bytes) -> str:
    return hashlib.sha256(canonical).hexdigest()


def seal_record(
    *,
    seq: int,
    created_at: str,
    terminal_id: str,
    body: RecordBody,
    prev_hash: str,
    sign: Callable[[bytes], bytes],
) -> Record:
    """Hash the canonical encoding, sign the 32-byte digest, and build the :class:`Record`."""
    digest = hashlib.sha256(canonical_bytes(seq, created_at, terminal_id, body, prev_hash))
    return Record(
        seq=seq,
        created_at=created_at,
        terminal_id=terminal_id,
        kind=body.kind,
        card_id=body.card_id,
        amount=body.amount,
        fields=body.fields,
        prev_hash=prev_hash,
        hash=digest.hexdigest(),
        signature=sign(digest.digest()).hex(),
    )


def format_timestamp(moment: datetime) -> str:
    """UTC ISO-8601 with milliseconds and ``Z``: ``2024-05-01T08:30:00.123Z``."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("timestamps must be timezone-aware")
    utc = moment.astimezone(UTC)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z"


def parse_timestamp(text: str) -> datetime:
    """Inverse of :func:`format_timestamp`; an aware UTC datetime."""
    _check_timestamp(text)
    return datetime.fromisoformat(text)


def record_to_json(record: Record) -> str:
    """One canonical JSON line (without newline), including ``hash`` and ``signature``."""
    return canonical_json(record.to_dict())


def record_from_json(text: str) -> Record:
    """Parse :func:`record_to_json` output. Raises ``ValueError`` or ``TypeError`` if malformed."""
    return _record_from_value(_json_object(text))


def notice_to_json(notice: QuarantineNotice) -> str:
    return canonical_json(notice.to_dict())


def entry_from_json(text: str) -> Record | QuarantineNotice:
    """One upload line: a record, or a quarantine notice (an object with ``"notice"``)."""
    value = _json_object(text)
    if "notice" not in value:
        return _record_from_value(value)
    keys = set(value)
    if keys != NOTICE_KEYS or value["notice"] != NOTICE_KIND:
        raise ValueError(f"not a quarantine notice (keys: {', '.join(sorted(keys))[:200]})")
    return QuarantineNotice(**{k: v for k, v in value.items() if k != "notice"})


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise ValueError("record JSON is nested too deeply") from exc
    if not isinstance(value, dict):
        raise TypeError(f"a record is a JSON object, not {type(value).__name__}")
    return value


def _record_from_value(value: dict[str, Any]) -> Record:
    keys = set(value)
    if keys != RECORD_KEYS:
        missing = ", ".join(sorted(RECORD_KEYS - keys)) or "none"
        unexpected = ", ".join(sorted(keys - RECORD_KEYS)) or "none"
        raise ValueError(f"wrong record keys (missing: {missing}; unexpected: {unexpected})")
    if not isinstance(value["fields"], dict):
        raise TypeError("record fields must be a JSON object")
    return Record(**value)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in a record")


def _frozen_fields(fields: Mapping[str, FieldValue]) -> Mapping[str, FieldValue]:
    if not isinstance(fields, Mapping):
        raise TypeError(f"fields must be a mapping, not {type(fields).__name__}")
    for key, value in fields.items():
        require_text("field name", key)
        if isinstance(value, str):
            require_text(f"field {key!r}", value, allow_empty=True)
        elif isinstance(value, int) and not isinstance(value, bool):
            _check_int(f"field {key!r}", value, minimum=INT64_MIN)
        elif value is not None and not isinstance(value, bool):
            raise TypeError(
                f"field {key!r} must be str, int, bool or None, not {type(value).__name__}"
            )
    return MappingProxyType(dict(fields))


def require_text(name: str, value: object, *, allow_empty: bool = False) -> None:
    """``TypeError``/``ValueError`` unless ``value`` is (non-empty) UTF-8-encodable text."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, not {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not valid Unicode text") from exc


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if not minimum <= value <= INT64_MAX:
        raise ValueError(f"{name} {value} is outside {minimum}..{INT64_MAX}")


def _check_hex(name: str, value: object, pattern: re.Pattern[str]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, not {type(value).__name__}")
    if not pattern.fullmatch(value):
        raise ValueError(f"{name} must be lowercase hex of the right length")


def _check_timestamp(value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"created_at must be str, not {type(value).__name__}")
    if not _TIMESTAMP_PATTERN.fullmatch(value):
        raise ValueError(f"created_at {value!r} is not YYYY-MM-DDTHH:MM:SS.mmmZ")
    try:
        datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"created_at {value!r} is not a valid time") from exc
