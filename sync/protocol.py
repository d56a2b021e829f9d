"""The cardsync wire protocol, version 1 — sans-I/O: encoding, decoding and checks only.

Both sides use this module; ``clearinghost/openapi.json`` documents the same thing for other
implementers. All paths are under ``/v1``.

Upload (``POST /v1/terminals/{terminal_id}/records``)
    Body: JSON Lines, one record per line exactly as ``agent.offline_store.records.record_to_json``
    writes it (canonical JSON with ``hash`` and ``signature``), in ascending ``seq``, gzip
    compressed (``Content-Encoding: gzip``, ``Content-Type: application/x-ndjson``).
    ``Idempotency-Key: {first_seq}-{last_seq}-{sha256(uncompressed body)[:32]}`` — the same
    batch always gets the same key, even after a daemon restart, so a replay is recognised.
    The host keeps ``(terminal_id, seq)`` unique: a record it already holds with the same hash is
    a duplicate (harmless). Records must verify to count: a record whose ``terminal_id`` is not
    the URL's, whose hash or device signature does not verify under the terminal's registered
    key, whose ``prev_hash`` is not the hash of the terminal's previous record (held by the host,
    or the previous line of the batch), that leaves a gap after the host's acknowledgement, or
    that differs from the record the host already holds at its seq, is refused: ``409``/``422``
    ``{"error": ..., "seq": S, "reason": ...}`` naming the first such record. The records of the
    batch before it are stored (they verified and link to the acknowledgement); none from it on.
    A refused record never takes a ``(terminal_id, seq)`` slot and never moves the
    acknowledgement.
    Batch signature (optional header ``Cardsync-Batch-Signature``, 128 hex digits): the device
    key's Ed25519 signature over :data:`BATCH_DOMAIN` + canonical JSON of
    :data:`BATCH_SIGNED_FIELDS`: ``terminal_id``, ``first_seq``, ``last_seq``, ``count`` (lines
    that are entries), ``last_hash`` (the last entry's hash: the chain head) and ``body_sha256``
    (SHA-256 hex of the whole uncompressed body). The host rebuilds these fields from the body
    it received and verifies the one signature under the terminal's registered key, then the
    hash of every record (the SHA-256 of its canonical encoding) and every link of the chain;
    it does not verify each record's own signature at upload (each stays in the record as the
    terminal's evidence, stored verbatim and re-verified by ``cardhost audit``). A missing
    header is the v1 upload (every record's signature verified, slower) unless the host
    requires batch signatures (422 ``batch_signature_required``); a header that does not verify
    (forged, another key, made for another terminal, batch or body) is 422 ``record_refused``
    with reason ``bad_batch_signature`` naming the first seq, and nothing of the batch is
    stored.
    Quarantine notices: a record the terminal found corrupted in its own store (content that no
    longer matches its hash or signature, or does not parse) is sent as a line
    ``{"notice": "quarantine", "seq", "terminal_id", "quarantined_at", "reason", "chain_hash",
    "raw", "raw_size", "signature"}`` in its place (``agent.offline_store.records``
    :class:`QuarantineNotice`): signed by the device key over ``CARDAGENT-QUARANTINE-V1\n`` +
    canonical JSON of the other fields; ``chain_hash`` is the record's hash as written (the
    next record's ``prev_hash``), ``raw`` the stored row base64 (first 16 KiB). The host checks
    the terminal binding and the signature (422 otherwise) and that the seq is the next free
    slot (409 ``gap``). A notice never replaces a record the host holds: at a held seq it is a
    duplicate when the held hash is its ``chain_hash`` (the host has the intact record), else a
    409 ``conflict``. Stored, it fills the slot as a ``quarantined`` entry (no card, no
    amount), raises an anomaly naming terminal and seq, and the next record must chain onto
    ``chain_hash``; the link from the previous record to it cannot be checked.
    Abuse: only the device key makes a notice count, and a notice cannot take a slot the host
    holds or skip one. A stolen terminal (its device key) could send a notice instead of a
    genuine record it has not uploaded yet, hiding that transaction; it could already sign any
    record it likes (another amount, no such tap), so the notice adds no power, and it is the
    louder choice: every notice is an anomaly naming terminal and seq. The link into a
    quarantined slot and its ``chain_hash`` rest on the device key alone.
    Answer ``200 {"ack_seq": N, ...}``: the *cumulative acknowledgement*, the highest seq such
    that every record of this terminal with ``seq <= N`` is stored. The answer is signed by the
    host key (the one that signs blacklists and parameter sets), over ``ACK_DOMAIN +
    canonical_json`` of :data:`ACK_SIGNED_FIELDS` (terminal, batch key, last seq and hash of the
    batch, ack_seq and its hash, stored and duplicate counts). The terminal verifies it against
    the pinned host key and marks and may compact only through ``min(N, last seq of the batch)``;
    an unsigned, badly signed or inconsistent answer is refused and nothing is marked. Retrying
    any upload is safe.

Blacklist (``GET /v1/blacklist?since=V``)
    A signed binary list (``agent.blacklist`` documents the bytes): a delta from V when the host
    can compute one, else a snapshot; when V is current, an empty delta V -> V re-issued with a
    fresh expiry. ``since=0`` asks for a snapshot.

Parameters (``GET /v1/params?since=V``)
    A signed JSON envelope ``{"payload": {...}, "key_id": hex, "signature": hex}``. The signed
    bytes are ``b"CARDSYNC-PARAMS-V1\\n" + canonical_json(payload)`` (keys sorted, no
    whitespace, UTF-8 — the same canonical JSON as the records). 304 when V is current.

Enrolment (``POST /v1/terminals/{id}/register``)
    ``{"public_key": hex, "issued_at": unix_s, "enrolment_code": str | null, "signature": hex}``.
    The terminal proves it holds the device key that signs its records: ``signature`` is
    Ed25519 by that key over :data:`ENROL_DOMAIN` + canonical JSON of ``terminal_id``,
    ``public_key``, ``code_sha256`` (SHA-256 hex of the normalised enrolment code, ``""``
    without one) and ``issued_at``. The host binds the terminal id to the key only if an
    operator created the terminal entry and issued that one-time code (or pre-registered that
    key); the same key again is answered 200; another key is 409 unless an operator authorised
    a rotation. Terminal ids follow :data:`agent.terminal_id.TERMINAL_ID_RULE` on every route.

Root statements (``GET /v1/root?since=V``)
    ``{"statements": [...]}``: the host's signed root statements with a version above V, oldest
    first (``agent.trust`` documents them: root keys and threshold, the signing keys in force).
    404 ``no_root`` when the host publishes none (its pinned key signs everything).

Health: ``POST /v1/terminals/{id}/heartbeat`` with health figures.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import re
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.blacklist import Keys, keys_by_id
from agent.offline_store.records import (
    INT64_MAX,
    INT64_MIN,
    RECORD_KEYS,
    FieldValue,
    QuarantineNotice,
    Record,
    canonical_json,
    entry_from_json,
    notice_to_json,
    record_from_json,
    record_to_json,
)
from sync.errors import ProtocolError, UnknownSigner

API_PREFIX = "/v1"
PROTOCOL_VERSION = 1
NDJSON = "application/x-ndjson"
BLACKLIST_MEDIA_TYPE = "application/vnd.cardsync.blacklist"
IDEMPOTENCY_HEADER = "Idempotency-Key"
BATCH_SIGNATURE_HEADER = "Cardsync-Batch-Signature"
# the terminal a request is from, on calls whose path names none (list pulls): the host's
# per-terminal rate limit counts them (clearinghost.server.ClientRateLimit)
TERMINAL_HEADER = "Cardsync-Terminal"

MAX_BATCH_RECORDS = 5000
MAX_BATCH_BYTES = 32 * 1024 * 1024  # uncompressed
MAX_LINE_BYTES = 64 * 1024  # one record, uncompressed
_KEY_PATTERN = re.compile(r"[0-9]{1,19}-[0-9]{1,19}-[0-9a-f]{32}")


def records_path(terminal_id: str) -> str:
    return f"{API_PREFIX}/terminals/{quote(terminal_id, safe='')}/records"


def register_path(terminal_id: str) -> str:
    return f"{API_PREFIX}/terminals/{quote(terminal_id, safe='')}/register"


def heartbeat_path(terminal_id: str) -> str:
    return f"{API_PREFIX}/terminals/{quote(terminal_id, safe='')}/heartbeat"


Entry = Record | QuarantineNotice  # one upload line

BLACKLIST_PATH = f"{API_PREFIX}/blacklist"
PARAMS_PATH = f"{API_PREFIX}/params"
ROOT_PATH = f"{API_PREFIX}/root"


# --- upload ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UploadBatch:
    """One upload request: the gzip body and its idempotency key."""

    terminal_id: str
    first_seq: int
    last_seq: int
    count: int
    body: bytes  # gzip-compressed JSON Lines
    raw_size: int
    idempotency_key: str
    last_hash: str = ""  # hash of the batch's last record (bound into the signed ack)
    signature: str = ""  # the device key's batch signature (hex), "" for a v1 upload

    def headers(self) -> dict[str, str]:
        """The request headers of this upload."""
        headers = {
            "Content-Type": NDJSON,
            "Content-Encoding": "gzip",
            IDEMPOTENCY_HEADER: self.idempotency_key,
        }
        if self.signature:
            headers[BATCH_SIGNATURE_HEADER] = self.signature
        return headers


BATCH_DOMAIN = b"CARDSYNC-BATCH-V1\n"
BATCH_SIGNED_FIELDS = ("terminal_id", "first_seq", "last_seq", "count", "last_hash", "body_sha256")
_SIGNATURE_HEX = re.compile(r"[0-9a-f]{128}")


def batch_head(
    terminal_id: str, first_seq: int, last_seq: int, count: int, last_hash: str, body_sha256: str
) -> dict[str, Any]:
    """The fields a batch signature covers (:data:`BATCH_SIGNED_FIELDS`)."""
    return {
        "terminal_id": terminal_id,
        "first_seq": first_seq,
        "last_seq": last_seq,
        "count": count,
        "last_hash": last_hash,
        "body_sha256": body_sha256,
    }


def batch_signed_bytes(fields: Mapping[str, Any]) -> bytes:
    """The bytes a terminal signs for one upload (domain prefix + canonical JSON). The domain
    keeps a batch signature from ever verifying as a record's (a bare 32-byte digest), a
    notice's, an enrolment's or the host's answer."""
    return BATCH_DOMAIN + canonical_json({n: fields[n] for n in BATCH_SIGNED_FIELDS}).encode(
        "utf-8"
    )


def parse_batch_signature(value: str | None) -> bytes | None:
    """The header's signature as 64 bytes; ``None`` when absent; :class:`BadBatch` when it is
    not 128 lowercase hex digits."""
    if value is None:
        return None
    text = value.strip()
    if not _SIGNATURE_HEX.fullmatch(text):
        raise BadBatch(f"malformed {BATCH_SIGNATURE_HEADER} {text[:40]!r}")
    return bytes.fromhex(text)


def entry_to_json(entry: Entry) -> str:
    return record_to_json(entry) if isinstance(entry, Record) else notice_to_json(entry)


def encode_batch(
    terminal_id: str, records: Sequence[Entry], sign: Callable[[bytes], bytes] | None = None
) -> UploadBatch:
    """Encode consecutive records (or quarantine notices) of one terminal, ascending seq, as
    one upload; with ``sign`` (the device key's) the batch carries its batch signature."""
    if not records:
        raise ValueError("an upload batch needs at least one record")
    for previous, record in itertools.pairwise(records):
        if record.seq <= previous.seq:
            raise ValueError("records of a batch must be in ascending seq order")
    if any(r.terminal_id != terminal_id for r in records):
        raise ValueError(f"every record of the batch must belong to terminal {terminal_id!r}")
    raw = "".join(entry_to_json(r) + "\n" for r in records).encode("utf-8")
    body_sha256 = hashlib.sha256(raw).hexdigest()
    digest = body_sha256[:32]
    first, last = records[0].seq, records[-1].seq
    signature = ""
    if sign is not None:
        head = batch_head(terminal_id, first, last, len(records), records[-1].hash, body_sha256)
        signature = sign(batch_signed_bytes(head)).hex()
    return UploadBatch(
        terminal_id=terminal_id,
        first_seq=first,
        last_seq=last,
        count=len(records),
        body=gzip.compress(raw, compresslevel=5, mtime=0),
        raw_size=len(raw),
        idempotency_key=f"{first}-{last}-{digest}",
        last_hash=records[-1].hash,
        signature=signature,
    )


class BadBatch(ValueError):
    """An upload the host refuses as a whole (malformed, too big, wrong terminal)."""


class BatchTooLarge(BadBatch):
    """An upload above a limit (inflated bytes, line length, record count): the host answers
    413 and stops reading at the limit."""


INFLATE_CHUNK = 64 * 1024


def _inflated_chunks(body: bytes, encoding: str, max_bytes: int) -> Iterator[bytes]:
    """The upload's uncompressed bytes in chunks of at most :data:`INFLATE_CHUNK`, never more
    than ``max_bytes`` in all (:class:`BatchTooLarge` as soon as the limit is passed)."""
    total = 0
    if encoding == "identity":
        if len(body) > max_bytes:
            raise BatchTooLarge(f"body exceeds {max_bytes} bytes")
        for start in range(0, len(body), INFLATE_CHUNK):
            yield body[start : start + INFLATE_CHUNK]
        return
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    pending = body
    while True:
        try:
            chunk = inflater.decompress(pending, INFLATE_CHUNK)
        except zlib.error as exc:
            raise BadBatch(f"body is not valid gzip: {exc}") from exc
        pending = inflater.unconsumed_tail
        total += len(chunk)
        if total > max_bytes:
            raise BatchTooLarge(f"uncompressed body exceeds {max_bytes} bytes")
        if chunk:
            yield chunk
        if inflater.eof:
            if inflater.unused_data.strip(b"\0"):
                raise BadBatch("data after the end of the gzip body")
            return
        if not chunk and not pending:
            raise BadBatch("gzip body is truncated")


def _lines(chunks: Iterable[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes]]:
    """Numbered lines (without the line end) of a byte stream, each checked against
    ``max_line_bytes`` while it is read: a longer line is refused before it is all held (the
    unfinished line held between chunks never exceeds ``max_line_bytes`` plus one chunk).
    Each chunk is split in one call; lines come out in order, the same as a byte-by-byte
    reading would give them, errors included."""
    number = 0
    partial = b""
    for chunk in chunks:
        parts = chunk.split(b"\n")
        if partial:
            parts[0] = partial + parts[0]
        partial = parts.pop()  # after the chunk's last line end: not a whole line yet
        for line in parts:
            number += 1
            if len(line) > max_line_bytes:
                raise BatchTooLarge(f"line {number} is longer than {max_line_bytes} bytes")
            yield number, line
        if len(partial) > max_line_bytes:
            raise BatchTooLarge(f"line {number + 1} is longer than {max_line_bytes} bytes")
    if partial:
        yield number + 1, partial


def _body_lines(
    body: bytes,
    content_encoding: str | None,
    digest: Any,
    *,
    max_bytes: int,
    max_records: int,
    max_line_bytes: int,
) -> Iterable[tuple[int, str]]:
    """The non-blank lines of an upload, decoded, with every limit applied while the body is
    read; ``digest`` (a hashlib object) is fed every uncompressed byte."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding not in ("gzip", "identity"):
        raise BadBatch(f"unsupported Content-Encoding {encoding[:40]!r}")
    whole = _small_body_lines(body, encoding, max_bytes, max_records, max_line_bytes)
    if whole is not None:
        data, lines = whole
        digest.update(data)
        # blank lines are allowed and skipped
        return [
            (number, line) for number, line in enumerate(lines, 1) if line and not line.isspace()
        ]
    return _streamed_body_lines(body, encoding, digest, max_bytes, max_records, max_line_bytes)


SMALL_BODY_BYTES = 4 * 1024 * 1024  # a daemon's batch (500 records, ~250 KB) is far below


def _small_body_lines(
    body: bytes, encoding: str, max_bytes: int, max_records: int, max_line_bytes: int
) -> tuple[bytes, list[str]] | None:
    """An upload that is small, complete, ASCII and within every limit, inflated, decoded and
    split in one C call each (a daemon's batch: its lines are canonical JSON, ASCII); ``None``
    for any other, which :func:`_streamed_body_lines` then reads in steps, to the same lines
    or to the refusal that names what is wrong. Never more than :data:`SMALL_BODY_BYTES`
    inflated here."""
    limit = min(max_bytes, SMALL_BODY_BYTES)
    if encoding == "identity":
        if len(body) > limit:
            return None
        data = body
    else:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            data = inflater.decompress(body, limit + 1)
        except zlib.error:
            return None
        if len(data) > limit or not inflater.eof or inflater.unused_data.strip(b"\0"):
            return None
    if not data.isascii():  # then a line's length in characters is its length in bytes
        return None
    lines = data.decode("ascii").split("\n")
    if not lines[-1]:  # after the last line end: no line
        lines.pop()
    if len(lines) > max_records or max(map(len, lines), default=0) > max_line_bytes:
        return None
    return data, lines


def _streamed_body_lines(
    body: bytes,
    encoding: str,
    digest: Any,
    max_bytes: int,
    max_records: int,
    max_line_bytes: int,
) -> Iterator[tuple[int, str]]:
    """The body read a chunk at a time, every limit applied as it is read (any upload)."""

    def hashed(chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            digest.update(chunk)
            yield chunk

    for number, raw_line in _lines(
        hashed(_inflated_chunks(body, encoding, max_bytes)), max_line_bytes
    ):
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadBatch(f"line {number} is not UTF-8") from exc
        if number > max_records:  # blank lines count too: a bomb of newlines stops here
            raise BatchTooLarge(f"more than {max_records} records in one batch (line {number})")
        if line and not line.isspace():  # blank lines are allowed and skipped
            yield number, line


def decode_batch(
    body: bytes,
    content_encoding: str | None,
    terminal_id: str | None,
    *,
    max_bytes: int = MAX_BATCH_BYTES,
    max_records: int = MAX_BATCH_RECORDS,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> tuple[list[Entry], str]:
    """Host side: decompress and parse an upload line by line; returns records (and quarantine
    notices) and the body's
    SHA-256 (first 32 hex digits, as in the idempotency key). Raises :class:`BadBatch`
    (:class:`BatchTooLarge` for a limit). The limits hold while the body is read: inflation
    stops at ``max_bytes``, a line at ``max_line_bytes``, parsing at line ``max_records + 1``;
    only a body of at most :data:`SMALL_BODY_BYTES` is ever inflated, decoded or split at once.
    ``terminal_id=None``: the caller checks each record's terminal binding itself."""
    digest = hashlib.sha256()
    records: list[Entry] = []
    for number, line in _body_lines(
        body,
        content_encoding,
        digest,
        max_bytes=max_bytes,
        max_records=max_records,
        max_line_bytes=max_line_bytes,
    ):
        try:
            record = entry_from_json(line)
        except (ValueError, TypeError, RecursionError) as exc:
            raise BadBatch(f"line {number} is not a record: {str(exc)[:200]}") from exc
        if terminal_id is not None and record.terminal_id != terminal_id:
            raise BadBatch(
                f"line {number}: record of terminal {record.terminal_id!r} uploaded for "
                f"{terminal_id!r}"
            )
        records.append(record)
    if not records:
        raise BadBatch("the batch holds no records")
    return records, digest.hexdigest()[:32]


# --- the host's fast path for signed batches ---------------------------------------------------

_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)  # the encoder of agent.offline_store.records.canonical_json, built once


def _no_default(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not JSON")


# The C encoder that JSONEncoder.encode builds on every call, built once with the same
# settings as _CANONICAL (sorted keys, "," and ":", no ASCII escaping, no NaN): the same bytes
# without the per-call setup. None where the C accelerator is missing (then _CANONICAL).
_C_MAKE_ENCODER = getattr(json.encoder, "c_make_encoder", None)
_C_CANONICAL: Callable[[Any, int], Sequence[str]] | None = (
    None
    if _C_MAKE_ENCODER is None
    else _C_MAKE_ENCODER(
        None, _no_default, json.encoder.encode_basestring, None, ":", ",", True, False, False
    )
)


def _canonical_text(value: dict[str, Any]) -> str:
    if _C_CANONICAL is None:
        return _CANONICAL.encode(value)
    return "".join(_C_CANONICAL(value, 0))


_HASH_HEX = re.compile(r"[0-9a-f]{64}")
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")


def _reject(name: str) -> None:
    raise ValueError(f"{name} is not allowed in a record")


_DECODE = json.JSONDecoder(parse_constant=_reject)
# the decoder's scanner, without decode()'s whitespace handling
_SCAN: Callable[[str, int], tuple[Any, int]] = getattr(_DECODE, "scan_once")  # noqa: B009


@dataclass(slots=True)
class RecordLine:
    """One record line of an upload, its shape checked exactly as :class:`Record` checks it
    but not built into one (the host's fast path: no frozen mapping, no second encoding of
    the whole line). ``digest`` is the SHA-256 hex of the record's canonical encoding (all
    fields but ``hash`` and ``signature``): the record verifies its hash when ``digest ==
    hash``. ``line`` is the line as received, which the host stores as the record's body;
    :meth:`record` builds the full :class:`Record` from it when one is needed (TACs)."""

    seq: int
    created_at: str
    terminal_id: str
    kind: str
    card_id: str
    amount: int
    fields: dict[str, FieldValue]
    prev_hash: str
    hash: str
    signature: str
    digest: str
    line: str

    def record(self) -> Record:
        return record_from_json(self.line)


# A record line that *is* its canonical encoding (what ``record_to_json`` writes: every daemon's
# line). Canonical JSON (agent.offline_store.records) sorts keys by code point, so the members
# stand in this order: amount, card_id, created_at, fields, hash, kind, prev_hash, seq,
# signature, terminal_id; without separating whitespace. Text here is matched only where it
# needs no escape (no '"', '\\', U+0000..U+001F, which the canonical encoder escapes; no lone
# surrogate, which Record refuses): such a string's JSON text is its value and its canonical
# encoding at once. Integers are matched in canonical form (no sign, no leading zero). A line
# this does not match (escaped text, another member order, whitespace, a malformed value)
# takes the quick or the full path below, which decide alone.
_PLAIN_TEXT = r'[^"\\\x00-\x1f\ud800-\udfff]+'
_CANONICAL_LINE = re.compile(
    r'\{"amount":(0|[1-9][0-9]{0,18}),"card_id":"(' + _PLAIN_TEXT + r')",'
    r'"created_at":"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z)",'
    # the fields object's extent (its strings may hold braces and escapes): what it holds is
    # proven below by parsing that extent and encoding it again. Possessive (JSON text has one
    # reading: a string ends at its first unescaped quote, the object at the first brace out
    # of a string), which spares the matcher its backtracking records: about half its time
    r'"fields":(\{(?:"(?:[^"\\]++|\\.)*+"|[^"{}]++)*+\})'
    r'(,"hash":"([0-9a-f]{64})")'  # group 5: the member the canonical encoding lacks
    r',"kind":"(' + _PLAIN_TEXT + r')","prev_hash":"([0-9a-f]{64})","seq":([1-9][0-9]{0,18})'
    r'(,"signature":"([0-9a-f]{128})")'  # group 10: the other one
    r',"terminal_id":"(' + _PLAIN_TEXT + r')"\}'
)


def _plain_fields(fields: dict[str, Any]) -> bool:
    """Record's rule for ``fields``: non-empty names; values text, booleans, null or 64-bit
    integers (a float, a list, an object is not a record field value)."""
    for name, item in fields.items():
        kind_of = type(item)
        if not name:
            return False
        if kind_of is int:
            if not INT64_MIN <= item <= INT64_MAX:
                return False
        elif kind_of is not str and kind_of is not bool and item is not None:
            return False
    return True


def _canonical_record_line(line: str) -> RecordLine | None:
    """The record of a line that is exactly its canonical encoding plus ``hash`` and
    ``signature``, with :class:`Record`'s checks; ``None`` for any other line (the caller then
    takes the quick or full path, which gives the same record or names what is wrong).

    Why the hash needs no re-encoding here: the pattern fixes every member but ``fields`` in
    canonical form (sorted keys, no whitespace, canonical integers, text needing no escape),
    and ``fields`` is parsed from its exact span and must re-encode to those very characters;
    so the line is ``canonical[:-n] + hash member + ... + signature member + ...``, and the
    canonical encoding the record's hash covers is the line with those two members cut out."""
    match = _CANONICAL_LINE.fullmatch(line)
    if match is None:
        return None
    start, end = match.span(4)
    try:
        fields, stop = _SCAN(line, start)
    except (StopIteration, ValueError, RecursionError):
        return None
    if stop != end or type(fields) is not dict:
        return None
    if not _plain_fields(fields):
        return None
    (amount, card_id, created_at, fields_text, _, hash_, kind, prev_hash, seq, _, signature,
     terminal_id) = match.groups()  # fmt: skip
    seq, amount = int(seq), int(amount)
    if seq > INT64_MAX or amount > INT64_MAX:
        return None
    try:
        datetime.fromisoformat(created_at)  # Record's rule: a real time
        # the fields' own text is their canonical encoding: sorted, no repeated key, each
        # value as the encoder writes it; and every key and text encodes as UTF-8
        if _canonical_text(fields) != fields_text:
            return None
        canonical = (
            line[: match.start(5)] + line[match.end(5) : match.start(10)] + line[match.end(10) :]
        ).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return None
    return RecordLine(
        seq,
        created_at,
        terminal_id,
        kind,
        card_id,
        amount,
        fields,
        prev_hash,
        hash_,
        signature,
        hashlib.sha256(canonical).hexdigest(),
        line,
    )


def parse_record_line(line: str) -> RecordLine | QuarantineNotice:
    """One upload line as a :class:`RecordLine` (or a quarantine notice). Raises
    ``ValueError``/``TypeError`` for anything :func:`entry_from_json` refuses: a line that is
    not its own canonical encoding (:func:`_canonical_record_line`) and does not pass the quick
    checks below whole goes through the full parser, which either names what is wrong or (an
    unusual but valid record) gives the record."""
    quickest = _canonical_record_line(line)
    if quickest is not None:
        return quickest
    try:
        value, end = _SCAN(line, 0)
    except (StopIteration, ValueError, RecursionError):
        value, end = None, -1  # the full parser below names what is wrong
    parsed = _quick_record(value, line) if type(value) is dict and end == len(line) else None
    if parsed is not None:
        return parsed
    entry = entry_from_json(line)
    if isinstance(entry, QuarantineNotice):
        return entry
    canonical = entry.canonical_bytes()
    return RecordLine(
        entry.seq,
        entry.created_at,
        entry.terminal_id,
        entry.kind,
        entry.card_id,
        entry.amount,
        dict(entry.fields),
        entry.prev_hash,
        entry.hash,
        entry.signature,
        hashlib.sha256(canonical).hexdigest(),
        line,
    )


def _quick_record(value: dict[str, Any], line: str) -> RecordLine | None:
    """The checks of :class:`Record` (``agent.offline_store.records``) for a parsed JSON object,
    written for speed; ``None`` when any does not pass (the caller then runs the full parser
    for its message). JSON gives only dict, list, str, int, float, bool and None, so
    ``type(x) is int`` is Record's "int and not bool"; text must encode as UTF-8, which the
    canonical encoding below checks for every text field at once."""
    if value.keys() != RECORD_KEYS:
        return None
    seq, amount, created_at = value["seq"], value["amount"], value["created_at"]
    terminal_id, kind, card_id = value["terminal_id"], value["kind"], value["card_id"]
    fields, prev_hash = value["fields"], value["prev_hash"]
    hash_, signature = value.pop("hash"), value.pop("signature")
    if not (
        type(seq) is int
        and 1 <= seq <= INT64_MAX
        and type(amount) is int
        and 0 <= amount <= INT64_MAX
        and type(created_at) is str
        and _TIMESTAMP.fullmatch(created_at)
        and type(terminal_id) is str
        and terminal_id
        and type(kind) is str
        and kind
        and type(card_id) is str
        and card_id
        and type(fields) is dict
        and type(prev_hash) is str
        and _HASH_HEX.fullmatch(prev_hash)
        and type(hash_) is str
        and _HASH_HEX.fullmatch(hash_)
        and type(signature) is str
        and _SIGNATURE_HEX.fullmatch(signature)
    ):
        return None
    if not _plain_fields(fields):
        return None
    try:
        datetime.fromisoformat(created_at)
        # every key and text value encodes as UTF-8 (no lone surrogates): Record's rule
        canonical = _canonical_text(value).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return None
    return RecordLine(
        seq,
        created_at,
        terminal_id,
        kind,
        card_id,
        amount,
        fields,
        prev_hash,
        hash_,
        signature,
        hashlib.sha256(canonical).hexdigest(),
        line,
    )


SignedEntry = RecordLine | QuarantineNotice


def decode_signed_batch(
    body: bytes,
    content_encoding: str | None,
    *,
    max_bytes: int = MAX_BATCH_BYTES,
    max_records: int = MAX_BATCH_RECORDS,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> tuple[list[SignedEntry], str]:
    """Host side, an upload with a batch signature: like :func:`decode_batch` (the same limits
    while reading, the same :class:`BadBatch` refusals), each record as a :class:`RecordLine`;
    returns the entries and the body's full SHA-256 hex (the batch signature covers it). The
    caller checks the terminal binding and hash of each record."""
    digest = hashlib.sha256()
    entries: list[SignedEntry] = []
    for number, line in _body_lines(
        body,
        content_encoding,
        digest,
        max_bytes=max_bytes,
        max_records=max_records,
        max_line_bytes=max_line_bytes,
    ):
        try:
            entries.append(parse_record_line(line))
        except (ValueError, TypeError, RecursionError) as exc:
            raise BadBatch(f"line {number} is not a record: {str(exc)[:200]}") from exc
    if not entries:
        raise BadBatch("the batch holds no records")
    return entries, digest.hexdigest()


def check_idempotency_key(
    key: str | None, records: Sequence[Entry] | Sequence[SignedEntry], digest: str
) -> str:
    """Host side: the key must name this batch (first and last seq, body digest)."""
    if key is None:
        raise BadBatch(f"missing {IDEMPOTENCY_HEADER} header")
    if not _KEY_PATTERN.fullmatch(key):
        raise BadBatch(f"malformed {IDEMPOTENCY_HEADER} {key[:80]!r}")
    expected = f"{records[0].seq}-{records[-1].seq}-{digest[:32]}"
    if key != expected:
        raise BadBatch(f"{IDEMPOTENCY_HEADER} does not match the body (expected {expected})")
    return key


ACK_DOMAIN = b"CARDSYNC-ACK-V1\n"
ACK_SIGNED_FIELDS = (
    "terminal_id",
    "idempotency_key",
    "last_seq",
    "last_hash",
    "ack_seq",
    "ack_hash",
    "stored",
    "duplicates",
)


def ack_signed_bytes(fields: Mapping[str, Any]) -> bytes:
    """The bytes the host signs for an upload answer (domain prefix + canonical JSON of
    :data:`ACK_SIGNED_FIELDS`)."""
    return ACK_DOMAIN + canonical_json({n: fields[n] for n in ACK_SIGNED_FIELDS}).encode("utf-8")


def sign_ack(fields: Mapping[str, Any], sign: Any, key_id: str) -> dict[str, Any]:
    """Host side: the upload answer with ``key_id`` and the host's ``signature`` added."""
    signature: bytes = sign(ack_signed_bytes(fields))
    return dict(fields, key_id=key_id, signature=signature.hex())


@dataclass(frozen=True, slots=True)
class Ack:
    """The host's answer to an upload, verified. ``ack_seq`` is what the terminal may mark:
    the host's cumulative acknowledgement, capped at the batch's last seq."""

    ack_seq: int
    stored: int
    duplicates: int
    conflicts: int
    anomalies: int
    host_ack_seq: int = 0


def parse_ack(payload: Any, batch: UploadBatch, local_last_seq: int, host_public_key: Keys) -> Ack:
    """Terminal side: verify the host's signed answer. Raises :class:`ProtocolError` when it is
    unsigned, signed by another key, for another batch or terminal, or impossible (an ack beyond
    the records this terminal has written, counts that do not add up to the batch)."""
    if not isinstance(payload, Mapping):
        raise ProtocolError("host: upload answer is not a JSON object")
    values: dict[str, int] = {}
    for name in ("ack_seq", "stored", "duplicates", "conflicts", "anomalies", "last_seq"):
        value = payload.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ProtocolError(f"host: upload answer field {name!r} is not a count: {value!r}")
        values[name] = value
    if "ack_seq" not in payload:
        raise ProtocolError("host: upload answer has no ack_seq")
    signature, key_id = payload.get("signature"), payload.get("key_id")
    if not isinstance(signature, str) or not signature:
        raise ProtocolError("host: upload answer is not signed; nothing is marked acknowledged")
    by_hex = {k.hex(): v for k, v in keys_by_id(host_public_key).items()}
    signer = by_hex.get(key_id) if isinstance(key_id, str) else None
    if signer is None:
        raise UnknownSigner(
            f"host: upload answer signed by key {str(key_id)[:40]!r}, not a signing key in force"
        )
    try:
        Ed25519PublicKey.from_public_bytes(signer).verify(
            bytes.fromhex(signature), ack_signed_bytes(payload)
        )
    except (InvalidSignature, ValueError, KeyError, TypeError):
        raise ProtocolError("host: upload answer has a bad signature (forged, corrupted)") from None
    expected = {
        "terminal_id": batch.terminal_id,
        "idempotency_key": batch.idempotency_key,
        "last_seq": batch.last_seq,
        "last_hash": batch.last_hash,
    }
    for name, value in expected.items():
        if payload.get(name) != value:
            raise ProtocolError(
                f"host: signed answer is for {name} {payload.get(name)!r}, not {value!r}"
            )
    if values["ack_seq"] > local_last_seq:
        raise ProtocolError(
            f"host: acknowledged seq {values['ack_seq']} but this terminal's last record is "
            f"{local_last_seq}"
        )
    if values["stored"] + values["duplicates"] != batch.count or values["ack_seq"] < batch.last_seq:
        raise ProtocolError(
            f"host: answer does not add up: {values['stored']} stored + {values['duplicates']} "
            f"duplicates for a batch of {batch.count}, ack_seq {values['ack_seq']} for records "
            f"{batch.first_seq}..{batch.last_seq}"
        )
    del values["last_seq"]
    host_ack = values["ack_seq"]
    values["ack_seq"] = min(host_ack, batch.last_seq)
    return Ack(**values, host_ack_seq=host_ack)


def error_body(code: str, detail: str) -> dict[str, str]:
    """The JSON body of every host error: a stable code and a message for the operator."""
    return {"error": code, "detail": detail}


def json_bytes(value: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(value), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --- enrolment ---------------------------------------------------------------------------------

ENROL_DOMAIN = b"CARDSYNC-ENROL-V1\n"
ENROL_SIGNED_FIELDS = ("terminal_id", "public_key", "code_sha256", "issued_at")
MAX_CODE_LENGTH = 64


def normalise_code(code: str) -> str:
    """An enrolment code as typed (case, spaces and dashes do not matter) in one form."""
    text = unicodedata.normalize("NFKC", code)
    return "".join(c for c in text if c not in " -\t\r\n").upper()


def code_digest(code: str) -> str:
    """SHA-256 hex of the normalised code: what the host stores and the terminal signs."""
    return hashlib.sha256(normalise_code(code).encode("utf-8")).hexdigest()


def enrolment_signed_bytes(fields: Mapping[str, Any]) -> bytes:
    """The bytes a terminal signs with its device key to enrol (domain + canonical JSON)."""
    return ENROL_DOMAIN + canonical_json({n: fields[n] for n in ENROL_SIGNED_FIELDS}).encode(
        "utf-8"
    )


def enrolment_request(
    terminal_id: str,
    public_key: bytes,
    sign: Callable[[bytes], bytes],
    code: str | None,
    issued_at: int,
) -> dict[str, Any]:
    """Terminal side: the body of ``POST /v1/terminals/{id}/register``, signed by the device
    key whose raw public key is ``public_key`` (proof of possession)."""
    fields = {
        "terminal_id": terminal_id,
        "public_key": public_key.hex(),
        "code_sha256": code_digest(code) if code else "",
        "issued_at": issued_at,
    }
    signature = sign(enrolment_signed_bytes(fields))
    return {
        "public_key": fields["public_key"],
        "issued_at": issued_at,
        "enrolment_code": code or None,
        "signature": signature.hex(),
    }
