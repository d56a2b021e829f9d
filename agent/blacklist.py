"""The terminal's card blacklist: signed lists from the clearing host, a packed set for lookups.

Lookup key: the card's 8-byte ASN (application serial EF15[12..19], cpu-purse.md §6.1 step 4) as
an unsigned integer — the last 16 hex digits of ``CpuCard.card_id``.

On disk the set is a *bucketed packed array*: the top 16 bits of the ASN pick one of 65,536
buckets, an offset table says where each bucket starts, and each entry keeps only the remaining 6
bytes, big-endian, sorted, so ``bytes`` comparison is numeric comparison. A lookup is one offset
read, a search of in-memory fence keys (every 32nd entry's full key, built at load: a guess by
interpolation checked on two fences, else a C ``bisect``) if the bucket holds more than 256
entries, and one bounded ``bytes.find`` over at most 256 entries
(:class:`_Packed`); 10 million entries take 60 MB plus a 256 KB offset table and 2.4 MiB of
fences. The agent holds the file's image and the fences for its lookups; the sync daemon, which
never looks cards up, holds only the header and offset table (``lookups=False``).

Local file (``blacklist.bin`` next to the store; replaced atomically, so a delta applies
entirely or not at all)::

    magic "CBLFILE1" (8) | version u64 | issued_at u64 | expires_at u64 | count u64 |
    applied_at u64 | SHA-256 of the rest (32)          -- big-endian, 80 bytes
    offsets: 65,537 x u32 little-endian (bucket b spans entries offsets[b]..offsets[b+1])
    entries: count x 6 bytes

Signed list from the host (wire format, see ``clearinghost/openapi.json``)::

    magic "CBLIST03" (8) | kind (1: 'S' snapshot, 'D' delta) | version u64 | base_version u64 |
    issued_at u64 | expires_at u64 | content digest (32) | n_add u32 | n_remove u32
                                                                     -- big-endian, 81 bytes
    add:    n_add x u64 ASN, strictly ascending
    remove: n_remove x u64 ASN, strictly ascending (always 0 in a snapshot)
    trailer: key id (8 = first 8 bytes of SHA-256 of the host public key) | Ed25519 signature (64)

**Two key spaces** (issue 15): the card's raw serial (above) and its *printed* number, the
digits on the card that an operator or a customer quotes (``CpuCard.printed_number``: Shenzhen
Tong 881146306 is not its ASN). They are two separate lists, each in this format with its own
magic, version chain and local file: ``CBLIST03`` / ``blacklist.bin`` for serials,
``CBLPRN04`` / ``blacklist-printed-issuer.bin`` for printed numbers. A printed number therefore
never meets a raw serial: they are never looked up in the same set, and the magic (signed)
keeps a list of one space from being accepted as the other. A lookup costs one search per
space; a terminal that only knows ``CBLIST03`` ignores printed numbers and keeps working.

**Printed numbers are scoped by issuer** (issue 15): they are unique only within their issuer
(Shenzhen Tong 881146306 and another city's card printed 881146306 are two cards). An entry
names the issuer's 4-digit city code (``CpuCard.issuer_code``: the dialect's ``issuer_city``,
else the card's city code, T-Union EF17[6..7], CJ/T 166 EF15[2..3]) and the number, and
:func:`printed_key` packs them into the list's u64 key::

    key = issuer code as 4 BCD digits (16 bits) << 48 | the number's value (48 bits)

The top 16 bits of a key are the packed set's bucket, so the bucket *is* the issuer: the offset
table is a per-issuer index and a lookup searches only its own issuer's entries (nothing in the
lookup changes). 48 bits hold every number of up to 14 digits; longer printed numbers (T-Union's
19 digits, the 16-digit CJ/T 166 and Beijing numbers) are the card's serial itself and are
listed in the serial list. ``CBLPRN03`` (unscoped: the key was the number alone) is refused by
name, and its local file ``blacklist-printed.bin`` is never read: an unscoped key read as a
scoped one would name issuer 0000.

The signature covers the header (the magic makes it useless as any other signed document)
followed by the SHA-256 of the entries section (add and remove, as sent): a terminal verifies a
list of any size while it streams past, holding only the running hash (:class:`ListReader`, sans
I/O). ``CBLIST02`` signed the whole body, so the terminal had to hold it whole to verify it.

The **content digest** binds the version to the whole list it names (snapshot or the result of
the delta): SHA-256 of the local file's offset table and entries, the checksum the local file
header keeps (:func:`list_digest`). A snapshot replaces the list; a delta from ``base_version``
(= the terminal's version) adds and removes, and its result must have the signed digest.

Applying (the sync daemon, :meth:`Blacklist.incoming` then :meth:`Blacklist.apply_incoming`): the
answer streams into a file next to ``blacklist.bin`` (a snapshot already as the new file's
entries, a delta as its sorted u64 sections) while it is hashed and checked for order; the
signature is checked at the end, then a delta is merged bucket by bucket with the current file
(read sequentially, never held whole), the result's digest is compared with the signed one, and
only then is the new file renamed over the old one. Memory stays a few MB whatever the size.

Refused: bad magic or length, unsorted entries, a signature that does not verify under one of
the signing keys in force (:mod:`agent.trust`), a version below the current one (rollback), the
current version with another content digest (logged as an attack: a version names one list), an
expired list, a delta whose base is not the current version or whose result is not the signed
content (the terminal then asks for a snapshot). The current version again with the same content
and a later ``issued_at`` is a re-issue: it may only extend the expiry (freeze protection: the
host re-signs the list it has, the terminal notices when that stops).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import operator
import os
import struct
import sys
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import AgentError, StoreError
from agent.files import FileStamp, file_stamp, replace_file

log = structlog.get_logger(__name__)

BLACKLIST_FILE = "blacklist.bin"

KIND_SNAPSHOT = ord("S")
KIND_DELTA = ord("D")

LIST_MAGIC = b"CBLIST03"
SPACE_SERIAL = "serial"
SPACE_PRINTED = "printed"
# the signed magic of each key space's list: a list of one space is refused as the other
LIST_MAGICS = {SPACE_SERIAL: LIST_MAGIC, SPACE_PRINTED: b"CBLPRN04"}
# signed magics of lists this terminal no longer takes, with the reason it says
RETIRED_MAGICS = {
    b"CBLPRN03": "an unscoped printed-number list (CBLPRN03, from a host before issuer scoping): "
    "refused, printed numbers are listed with their issuer (CBLPRN04)"
}
PRINTED_BLACKLIST_FILE = "blacklist-printed-issuer.bin"
UNSCOPED_PRINTED_FILE = "blacklist-printed.bin"  # CBLPRN03's local file: never read
ISSUER_DIGITS = 4  # a city code: 4 decimal digits, packed as BCD in a printed key's top 16 bits
PRINTED_NUMBER_BITS = 48  # the low bits of a printed key: the number's value
PRINTED_MAX_DIGITS = 14  # 10**14 - 1 < 2**48: every printed number of up to 14 digits fits
_LIST_HEADER = struct.Struct(">8sBQQQQ32sII")
DIGEST_SIZE = 32
LIST_KEY_ID_SIZE = 8
LIST_SIGNATURE_SIZE = 64
_LIST_TRAILER = LIST_KEY_ID_SIZE + LIST_SIGNATURE_SIZE

FILE_MAGIC = b"CBLFILE1"
_FILE_HEADER = struct.Struct(">8sQQQQQ32s")
_BUCKETS = 1 << 16
_OFFSETS_SIZE = 4 * (_BUCKETS + 1)
_DATA_START = _FILE_HEADER.size + _OFFSETS_SIZE
_STEP = 1 << 20  # bytes read, written or hashed at a time
_ENTRY = 6
_LOW_MASK = (1 << 48) - 1
_FENCE = 32  # a lookup searches runs of up to this many entries with bytes.find
_SCAN = 256  # ...or a whole bucket of up to this many (1.5 KB): one find beats bisect + find
_OFFSETS_AT = _FILE_HEADER.size
_BUCKET_BOUNDS = struct.Struct("<II").unpack_from  # offsets[b], offsets[b + 1] at _OFFSETS_AT + 4b
ASN_MAX = (1 << 64) - 1


class BlacklistRejected(AgentError):
    """A signed list from the host was refused (forged, corrupt, older, expired, wrong base)."""

    party = "host"


class BlacklistBaseMismatch(BlacklistRejected):
    """A delta whose base is not the loaded version: the terminal needs a snapshot."""


class BlacklistFileError(StoreError):
    """The local blacklist file is unreadable, truncated or corrupt."""


def asn_of(card_id: str) -> int:
    """The lookup key of a card id (hex application serial): its last 8 bytes as an integer."""
    text = card_id.strip()
    if not text:
        raise ValueError("card id is empty")
    try:
        return int(text[-16:], 16)
    except ValueError:
        raise ValueError(f"card id {card_id!r} is not hexadecimal") from None


def uid_key(uid: bytes) -> int:
    """The lookup key of an M1 card: its UID (4 or 7 bytes) as an integer, which is
    ``asn_of(uid.hex())``, the key :meth:`Blacklist.contains` derives from an M1 card id (the UID
    hex). A host lists M1 cards by this number, CPU cards by their ASN."""
    if len(uid) not in (4, 7, 10):
        raise ValueError(f"a UID is 4, 7 or 10 bytes, not {len(uid)}")
    return int.from_bytes(uid, "big")


def issuer_code(issuer: str) -> str:
    """An issuer code as the printed-number list names issuers: the issuer's 4-digit city code
    (``5180``). Raises ValueError, naming the code, for anything else."""
    text = issuer.strip()
    if len(text) != ISSUER_DIGITS or not text.isascii() or not text.isdigit():
        raise ValueError(f"issuer {issuer!r} is not a {ISSUER_DIGITS}-digit city code (e.g. 5180)")
    return text


def printed_key(issuer: str, number: str) -> int:
    """The lookup key of a printed card number of one issuer (the printed-number list, a space
    of its own): the issuer's city code as BCD in the top 16 bits, the number's decimal value
    in the low 48 (module docstring). The number has 1 to 14 digits; spaces are ignored, so
    ``8811 4630 6`` is ``881146306``, and leading zeros do not count (``0881146306`` is the
    same entry, as people quote it). Raises ValueError, naming the issuer or the number, for
    anything else (hex serials and longer numbers belong in the serial list)."""
    code = issuer_code(issuer)
    text = "".join(number.split())
    if not text or not text.isascii() or not text.isdigit():
        raise ValueError(f"printed card number {number!r} is not decimal digits")
    digits = len(text.lstrip("0")) or 1
    if digits > PRINTED_MAX_DIGITS:
        raise ValueError(
            f"printed card number {number!r} has {digits} digits, at most "
            f"{PRINTED_MAX_DIGITS} are listed with an issuer (a longer number, T-Union's 19 "
            "digits or a 16-digit CJ/T 166 one, is the card's serial: list it by serial)"
        )
    return int(code, 16) << PRINTED_NUMBER_BITS | int(text)


def printed_entry(key: int) -> tuple[str, str]:
    """The (issuer code, number) a printed key names: :func:`printed_key` read back."""
    if not 0 <= key <= ASN_MAX:
        raise ValueError(f"printed key {key} is outside 0..2^64-1")
    issuer = f"{key >> PRINTED_NUMBER_BITS:04X}"
    number = key & ((1 << PRINTED_NUMBER_BITS) - 1)
    if not issuer.isdigit() or number >= 10**PRINTED_MAX_DIGITS:
        raise ValueError(f"printed key {key:016X} names no issuer and printed number")
    return issuer, str(number)


def _magic_of(space: str) -> bytes:
    try:
        return LIST_MAGICS[space]
    except KeyError:
        raise ValueError(f"unknown blacklist key space {space!r}") from None


def key_id_of(public_key_raw: bytes) -> bytes:
    """The 8-byte key id carried in a signed list: SHA-256 of the raw public key, first 8 bytes."""
    return hashlib.sha256(public_key_raw).digest()[:LIST_KEY_ID_SIZE]


Keys = bytes | Iterable[bytes]
"""One raw Ed25519 public key, or the signing keys in force (after a rotation, see
:mod:`agent.trust`)."""


def keys_by_id(keys: Keys) -> dict[bytes, bytes]:
    """The signing keys in force by their 8-byte key id."""
    listed = [keys] if isinstance(keys, bytes) else list(keys)
    return {key_id_of(k): k for k in listed}


# --- the signed wire document -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListHeader:
    """The header of a signed list (not yet verified until :meth:`ListReader.finish`)."""

    kind: int
    version: int
    base_version: int
    issued_at: int
    expires_at: int
    content_digest: bytes
    n_add: int
    n_remove: int

    @property
    def is_snapshot(self) -> bool:
        return self.kind == KIND_SNAPSHOT

    @property
    def kind_name(self) -> str:
        return "snapshot" if self.is_snapshot else "delta"

    @property
    def document_size(self) -> int:
        return int(_LIST_HEADER.size + 8 * (self.n_add + self.n_remove) + _LIST_TRAILER)


@dataclass(frozen=True, slots=True)
class SignedList:
    """A decoded and verified blacklist document. ``add``/``remove`` are packed u64 BE ASNs."""

    kind: int
    version: int
    base_version: int
    issued_at: int
    expires_at: int
    content_digest: bytes
    add: bytes
    remove: bytes

    @property
    def is_snapshot(self) -> bool:
        return self.kind == KIND_SNAPSHOT

    @property
    def kind_name(self) -> str:
        return "snapshot" if self.is_snapshot else "delta"

    def added(self) -> list[int]:
        return _unpack_u64(self.add)

    def removed(self) -> list[int]:
        return _unpack_u64(self.remove)


def signed_message(header: bytes, entries_sha256: bytes) -> bytes:
    """The bytes a list's signature covers: its header, then SHA-256 of its entries section."""
    return header + entries_sha256


def encode_list(
    *,
    kind: int,
    version: int,
    base_version: int,
    issued_at: int,
    expires_at: int,
    add: Iterable[int],
    remove: Iterable[int] = (),
    content_digest: bytes | None = None,
    sign: Callable[[bytes], bytes],
    public_key_raw: bytes,
    space: str = SPACE_SERIAL,
) -> bytes:
    """Build a signed list (host side) of one key space (its magic). ``add``/``remove`` are
    sorted and de-duplicated here.

    ``content_digest`` is :func:`list_digest` of the whole list at ``version``; a snapshot's
    is computed here, a delta must be given it (the host knows the list it names)."""
    if kind not in (KIND_SNAPSHOT, KIND_DELTA):
        raise ValueError(f"unknown list kind {kind!r}")
    added = _pack_u64(sorted(set(add)))
    removed = _pack_u64(sorted(set(remove)))
    if kind == KIND_SNAPSHOT and (removed or base_version):
        raise ValueError("a snapshot has no removals and no base version")
    if kind == KIND_SNAPSHOT and content_digest is None:
        content_digest = _image_digest(*_image_from_sorted_u64(added))
    if content_digest is None or len(content_digest) != DIGEST_SIZE:
        raise ValueError("a delta needs the content digest of the list it leads to")
    header = _LIST_HEADER.pack(
        _magic_of(space),
        kind,
        version,
        base_version,
        issued_at,
        expires_at,
        content_digest,
        len(added) // 8,
        len(removed) // 8,
    )
    entries_hash = hashlib.sha256(added)
    entries_hash.update(removed)
    signature = sign(signed_message(header, entries_hash.digest()))
    return b"".join((header, added, removed, key_id_of(public_key_raw), signature))


def parse_list_header(prefix: bytes | bytearray, space: str = SPACE_SERIAL) -> ListHeader | None:
    """The header of a signed list of ``space`` from the document's first bytes; ``None`` until
    the whole header is there. Raises :class:`BlacklistRejected` as soon as the bytes cannot be
    a list of that space."""
    magic = _magic_of(space)
    if len(prefix) >= len(magic) and bytes(prefix[: len(magic)]) != magic:
        other = [n for n, m in LIST_MAGICS.items() if m == bytes(prefix[: len(magic)])]
        retired = RETIRED_MAGICS.get(bytes(prefix[: len(magic)]))
        if retired is not None:
            raise BlacklistRejected(f"blacklist: {retired}")
        if other:
            raise BlacklistRejected(
                f"blacklist: a {other[0]}-number list where a {space}-number list was expected"
            )
        raise BlacklistRejected("blacklist: not a signed blacklist (bad magic)")
    if len(prefix) < _LIST_HEADER.size:
        return None
    _magic, kind, version, base, issued, expires, digest, n_add, n_remove = (
        _LIST_HEADER.unpack_from(prefix)
    )
    if kind not in (KIND_SNAPSHOT, KIND_DELTA):
        raise BlacklistRejected(f"blacklist: unknown document kind 0x{kind:02X}")
    if kind == KIND_SNAPSHOT and (n_remove or base):
        raise BlacklistRejected("blacklist: a snapshot must not carry removals or a base version")
    if expires <= issued:
        raise BlacklistRejected("blacklist: expires before it was issued")
    return ListHeader(kind, version, base, issued, expires, bytes(digest), n_add, n_remove)


def list_document_size(prefix: bytes, space: str = SPACE_SERIAL) -> int | None:
    """The size a signed list's header declares (header, entries, key id, signature), read from
    the document's first bytes; ``None`` until the whole header is there. Raises
    :class:`BlacklistRejected` as soon as the bytes cannot be a list (a reader stops there)."""
    header = parse_list_header(prefix, space)
    return None if header is None else header.document_size


SECTION_ADD = "add"
SECTION_REMOVE = "remove"


class ListReader:
    """Reads a signed list as it streams in, sans I/O: :meth:`feed` takes bytes as they come
    and returns the whole u64 entries they complete, by section (``add``/``remove``), checked
    strictly ascending and hashed on the way; :meth:`finish` checks the length and verifies the
    signature over the header and the running hash. Nothing is kept but the header, a partial
    entry and the trailer. Every refusal is :class:`BlacklistRejected`."""

    _CHUNK = 1 << 16  # entries checked per step

    def __init__(self, space: str = SPACE_SERIAL) -> None:
        _magic_of(space)
        self.space = space
        self.header: ListHeader | None = None
        self._raw_header = b""
        self._pending = bytearray()
        self._hash = hashlib.sha256()
        self._left = {SECTION_ADD: 0, SECTION_REMOVE: 0}
        self._last = {SECTION_ADD: -1, SECTION_REMOVE: -1}
        self._trailer = bytearray()
        self.received = 0

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        """Take the next bytes; the complete entries they give, as (section, packed u64 BE)."""
        self.received += len(data)
        self._pending += data
        out: list[tuple[str, bytes]] = []
        if self.header is None:
            header = parse_list_header(self._pending, self.space)
            if header is None:
                return out
            self.header = header
            self._raw_header = bytes(self._pending[: _LIST_HEADER.size])
            del self._pending[: _LIST_HEADER.size]
            self._left = {SECTION_ADD: header.n_add, SECTION_REMOVE: header.n_remove}
        for section in (SECTION_ADD, SECTION_REMOVE):
            while self._left[section] and len(self._pending) >= 8:
                take = min(self._left[section], len(self._pending) // 8, self._CHUNK)
                chunk = bytes(self._pending[: 8 * take])
                del self._pending[: 8 * take]
                self._check_ascending(section, chunk)
                self._hash.update(chunk)
                self._left[section] -= take
                out.append((section, chunk))
            if self._left[section]:
                return out
        self._trailer += self._pending
        self._pending.clear()
        if len(self._trailer) > _LIST_TRAILER:
            raise BlacklistRejected(
                f"blacklist: document runs past the {self.header.document_size} bytes its "
                "header declares (padded)"
            )
        return out

    def _check_ascending(self, section: str, chunk: bytes) -> None:
        values = array("Q", chunk)
        if sys.byteorder == "little":
            values.byteswap()
        if values[0] <= self._last[section] or not all(
            map(operator.lt, values, itertools.islice(values, 1, None))
        ):
            raise BlacklistRejected(f"blacklist: {section}ed entries are not strictly ascending")
        self._last[section] = values[-1]

    def finish(self, keys: Keys) -> ListHeader:
        """The whole document is in: check its length and verify its signature against the
        signing keys in force. Returns the (now verified) header."""
        header = self.header
        if header is None or self._left[SECTION_ADD] or self._left[SECTION_REMOVE]:
            raise BlacklistRejected(
                f"blacklist: document of {self.received} bytes is truncated"
                + (f" (its header says {header.document_size})" if header else "")
            )
        if len(self._trailer) != _LIST_TRAILER:
            raise BlacklistRejected(
                f"blacklist: document is {self.received} bytes, its header says "
                f"{header.document_size} (truncated)"
            )
        key_id = bytes(self._trailer[:LIST_KEY_ID_SIZE])
        signature = bytes(self._trailer[LIST_KEY_ID_SIZE:])
        trusted = keys_by_id(keys)
        public_key_raw = trusted.get(key_id)
        if public_key_raw is None:
            raise BlacklistRejected(
                f"blacklist: signed by key {key_id.hex()}, not a signing key in force "
                f"({', '.join(k.hex() for k in trusted)})"
            )
        message = signed_message(self._raw_header, self._hash.digest())
        try:
            Ed25519PublicKey.from_public_bytes(public_key_raw).verify(signature, message)
        except InvalidSignature:
            raise BlacklistRejected("blacklist: bad signature (forged or corrupted list)") from None
        return header


def decode_list(data: bytes, keys: Keys, space: str = SPACE_SERIAL) -> SignedList:
    """Parse and verify a signed list of ``space`` held in memory (small lists, tools, tests)
    against the signing keys in force. Raises :class:`BlacklistRejected` with the reason."""
    reader = ListReader(space)
    sections: dict[str, list[bytes]] = {SECTION_ADD: [], SECTION_REMOVE: []}
    for section, chunk in reader.feed(data):
        sections[section].append(chunk)
    header = reader.finish(keys)
    return SignedList(
        header.kind,
        header.version,
        header.base_version,
        header.issued_at,
        header.expires_at,
        header.content_digest,
        b"".join(sections[SECTION_ADD]),
        b"".join(sections[SECTION_REMOVE]),
    )


def list_digest(asns: Iterable[int]) -> bytes:
    """The content digest of a whole list (host side; the terminal gets the same bytes as its
    file's checksum): SHA-256 of the offset table and the 6-byte entries."""
    return _image_digest(*_image_from_sorted_u64(_pack_u64(sorted(set(asns)))))


def _pack_u64(values: list[int]) -> bytes:
    for v in values[:1] + values[-1:]:
        if not 0 <= v <= ASN_MAX:
            raise ValueError(f"ASN {v} is outside 0..2^64-1")
    packed = array("Q", values)
    if sys.byteorder == "little":
        packed.byteswap()
    return packed.tobytes()


def _unpack_u64(packed: bytes) -> list[int]:
    values = array("Q")
    values.frombytes(packed)
    if sys.byteorder == "little":
        values.byteswap()
    return values.tolist()


# --- the packed set -----------------------------------------------------------------------------


class _Packed:
    """The bucketed packed array inside one immutable ``bytes`` (the local file's image; or only
    its header and offset table, when the entries are not loaded).

    With the entries loaded, a lookup also uses *fences*: the full u64 key of every
    ``_FENCE``-th entry, in memory only (never in the file, so the file format and the signed
    content digest are unchanged). The top 16 bits give the bucket's range; if it is longer than
    ``_SCAN`` entries, the fences inside it narrow it to one run of at most ``_FENCE`` entries:
    a guess by linear interpolation between the bucket's first and last fence, kept if the two
    fences around it enclose the key (one issuer's consecutive serials: nearly always), else a
    C ``bisect``; then one C ``bytes.find`` (bounded by start and end, no slice, no copy)
    searches the run for the 6-byte key. A lookup is thus a fixed handful of Python operations
    whatever the bucket's size: ASNs of one issuer are consecutive serials that share their top
    16 bits, so all of a city's cards may sit in one bucket. The fences cost 8 bytes per
    ``_FENCE`` entries (0.25 bytes an entry: 2.4 MiB at 10 million)."""

    __slots__ = ("buf", "count", "fences", "offsets")

    def __init__(self, buf: bytes, count: int) -> None:
        self.buf = buf
        self.count = count
        raw = memoryview(buf)[_FILE_HEADER.size : _DATA_START]
        if sys.byteorder == "little":
            self.offsets: memoryview | array[int] = raw.cast("I")
        else:  # pragma: no cover - big-endian hosts
            swapped = array("I", raw.tobytes())
            swapped.byteswap()
            self.offsets = swapped
        self.fences: array[int] = array("Q")

    @property
    def has_entries(self) -> bool:
        return len(self.buf) == _DATA_START + _ENTRY * self.count

    def build_fences(self) -> None:
        """The in-memory fence keys (entry 0, ``_FENCE``, 2 ``_FENCE``, ...), built with slice
        copies in C: each fence's low 6 bytes from the entries, its 2 bucket bytes per bucket."""
        count, base, offsets = self.count, _DATA_START, self.offsets
        n = -(-count // _FENCE)
        raw = bytearray(8 * n)
        end = base + _ENTRY * count
        for k in range(_ENTRY):  # u64 big-endian: bytes 2..7 are the entry's 6 bytes
            raw[2 + k :: 8] = self.buf[base + k : end : _ENTRY * _FENCE]
        for bucket in range(_BUCKETS):
            first, last = -(-offsets[bucket] // _FENCE), -(-offsets[bucket + 1] // _FENCE)
            if last > first:  # the fences first..last-1 fall in this bucket: its 2 top bytes
                raw[8 * first : 8 * last : 8] = bytes((bucket >> 8,)) * (last - first)
                raw[8 * first + 1 : 8 * last : 8] = bytes((bucket & 0xFF,)) * (last - first)
        fences = array("Q", raw)
        del raw
        if sys.byteorder == "little":
            fences.byteswap()
        self.fences = fences

    def contains(self, asn: int) -> bool:
        # the bucket's two offsets in one unpack, the fences only in a bucket too long for one
        # find, then the find
        lo, hi = _BUCKET_BOUNDS(self.buf, _OFFSETS_AT + 4 * (asn >> 48))
        if hi - lo > _SCAN:
            # fences k with k * _FENCE in lo..hi-1 belong to this bucket; k is then found with
            # fences[k-1] <= asn < fences[k] (bisect_right), so the key, if listed, is in
            # entries (k-1)F..kF-1. First a guess by interpolation, checked on its two fences:
            # one issuer's serials are spread evenly, and the guess saves the bisect's steps
            fences = self.fences
            first, last = -(-lo // _FENCE), -(-hi // _FENCE)
            low, high = fences[first], fences[last - 1]
            if asn < low:
                k = first
            elif asn >= high:
                k = last
            else:  # first <= guess <= last - 2
                guess = first + (asn - low) * (last - 1 - first) // (high - low)
                if fences[guess] <= asn < fences[guess + 1]:
                    k = guess + 1
                else:
                    k = bisect_right(fences, asn, first, last)
            lo = max(lo, (k - 1) * _FENCE)
            hi = min(hi, k * _FENCE)
        start = _DATA_START + _ENTRY * lo
        end = _DATA_START + _ENTRY * hi
        key = (asn & _LOW_MASK).to_bytes(_ENTRY, "big")
        find = self.buf.find
        at = find(key, start, end)
        while at >= 0:  # a match straddling two entries is not the key: search on
            if (at - start) % _ENTRY == 0:
                return True
            at = find(key, at + 1, end)
        return False

    def counts(self) -> array[int]:
        """Entries per bucket."""
        offsets = self.offsets
        return array("I", (offsets[b + 1] - offsets[b] for b in range(_BUCKETS)))


def _offsets_from_counts(counts: array[int]) -> array[int]:
    offsets = array("I", bytes(4 * (_BUCKETS + 1)))
    running = 0
    for b in range(_BUCKETS):
        offsets[b] = running
        running += counts[b]
    offsets[_BUCKETS] = running
    return offsets


def _table_bytes(offsets: array[int]) -> bytes:
    table = array("I", offsets)
    if sys.byteorder != "little":  # pragma: no cover
        table.byteswap()
    return table.tobytes()


def _build_image(
    offsets: array[int], entries: bytes, *, version: int, issued_at: int, expires_at: int
) -> bytes:
    """The local file's bytes (header with checksum, offsets, entries)."""
    table_bytes = _table_bytes(offsets)
    digest = hashlib.sha256(table_bytes)
    digest.update(entries)
    header = _file_header(
        version, issued_at, expires_at, len(entries) // _ENTRY, digest.digest(), int(time.time())
    )
    return header + table_bytes + entries


def _file_header(
    version: int, issued_at: int, expires_at: int, count: int, digest: bytes, applied_at: int
) -> bytes:
    return _FILE_HEADER.pack(FILE_MAGIC, version, issued_at, expires_at, count, applied_at, digest)


def _image_digest(offsets: array[int], entries: bytes) -> bytes:
    """The checksum :func:`_build_image` writes: SHA-256 of offsets (u32 LE) and entries."""
    digest = hashlib.sha256(_table_bytes(offsets))
    digest.update(entries)
    return digest.digest()


def _six_byte_entries(packed: bytes) -> tuple[bytes, array[int]]:
    """Ascending u64 BE ASNs as 6-byte low parts, and their bucket ids (ascending)."""
    n = len(packed) // 8
    entries = bytearray(_ENTRY * n)
    for k in range(_ENTRY):  # drop the 2 bucket bytes of every entry, in C
        entries[k::_ENTRY] = packed[2 + k :: 8]
    buckets = bytearray(2 * n)
    buckets[0::2] = packed[0::8]
    buckets[1::2] = packed[1::8]
    ids = array("H", bytes(buckets))
    if sys.byteorder == "little":
        ids.byteswap()
    return bytes(entries), ids


def _count_buckets(ids: array[int], counts: array[int]) -> None:
    """Add the ascending bucket ids ``ids`` to the per-bucket ``counts``."""
    lo = 0
    while lo < len(ids):
        bucket = ids[lo]
        hi = bisect_right(ids, bucket, lo)
        counts[bucket] += hi - lo
        lo = hi


def _image_from_sorted_u64(packed: bytes) -> tuple[array[int], bytes]:
    """Offsets and 6-byte entries from strictly ascending u64 BE ASNs (a snapshot)."""
    entries, ids = _six_byte_entries(packed)
    counts = array("I", bytes(4 * _BUCKETS))
    _count_buckets(ids, counts)
    return _offsets_from_counts(counts), entries


_SPLITTERS: dict[int, struct.Struct] = {}


def _split_entries(seg: bytes, m: int) -> tuple[bytes, ...]:
    """The ``m`` 6-byte entries of a bucket as a tuple (one C call: ``struct``)."""
    splitter = _SPLITTERS.get(m)
    if splitter is None:
        if len(_SPLITTERS) > 512:
            _SPLITTERS.clear()
        splitter = _SPLITTERS[m] = struct.Struct(f"{_ENTRY}s" * m)
    return splitter.unpack(seg)


def _edit_bucket(seg: bytes, adds: list[bytes], removes: list[bytes]) -> tuple[bytes, int, int]:
    """Remove then add 6-byte keys (each list strictly ascending) in one sorted bucket: the
    bucket is split into its entries (in C) and each key placed by ``bisect``.

    Returns the new bucket and how many keys were really added and removed.
    """
    m = len(seg) // _ENTRY
    listed = _split_entries(seg, m)
    if not removes or not adds:  # the common case: one kind of change, one ascending pass
        out: list[bytes] = []
        pos = changed = 0
        for key in adds or removes:
            i = bisect_left(listed, key, pos)
            found = i < m and listed[i] == key
            if found == bool(adds):
                continue  # an addition already listed, or a removal not listed
            out.append(seg[_ENTRY * pos : _ENTRY * i])
            if adds:
                out.append(key)
                pos = i
            else:
                pos = i + 1
            changed += 1
        out.append(seg[_ENTRY * pos :])
        return b"".join(out), changed if adds else 0, 0 if adds else changed
    cuts: list[tuple[int, int, bytes]] = []  # (index, 0 = delete entry / 1 = insert before, key)
    deleted: set[bytes] = set()
    for key in removes:
        i = bisect_left(listed, key)
        if i < m and listed[i] == key:
            cuts.append((i, 0, key))
            deleted.add(key)
    inserted = 0
    for key in adds:
        i = bisect_left(listed, key)
        if i < m and listed[i] == key and key not in deleted:
            continue  # already listed
        cuts.append((i, 1, key))
        inserted += 1
    if not cuts:
        return seg, 0, 0
    cuts.sort()
    out = []
    pos = 0
    for i, op, key in cuts:
        if i > pos:
            out.append(seg[_ENTRY * pos : _ENTRY * i])
            pos = i
        if op == 0:
            pos = i + 1
        else:
            out.append(key)
    out.append(seg[_ENTRY * pos :])
    re_added = len(deleted.intersection(adds)) if deleted else 0
    return b"".join(out), inserted - re_added, len(deleted) - re_added


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What :meth:`Blacklist.apply` did; ``kind`` is snapshot, delta or unchanged."""

    kind: str
    version: int
    previous_version: int
    count: int
    added: int
    removed: int


class Blacklist:
    """Membership of card ASNs in the host's blacklist, read from the local file.

    Safe for one writer process (the sync daemon, :meth:`apply`) and any number of readers (the
    agent): readers notice a replaced file within ``auto_refresh_s`` on their next lookup.
    """

    def __init__(
        self,
        path: Path,
        *,
        auto_refresh_s: float | None = 1.0,
        lookups: bool = True,
        space: str = SPACE_SERIAL,
    ) -> None:
        _magic_of(space)
        self.path = path
        self.space = space
        self.auto_refresh_s = auto_refresh_s
        # False (the sync daemon, status tools): only the header and offset table are held;
        # the entries are read at the first lookup, if any
        self.lookups = lookups
        self._packed = _Packed(_empty_image(), 0)
        self._entries_loaded = True
        self.version = 0
        self.issued_at = 0
        self.expires_at = 0
        self.applied_at = 0
        self.content_digest = _image_digest(array("I", bytes(4 * (_BUCKETS + 1))), b"")
        self.checked_at: float | None = None  # the newest verified list from the host
        self._stamp: FileStamp | None = None
        self._checked_at = time.monotonic()

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        auto_refresh_s: float | None = 1.0,
        lookups: bool = True,
        space: str = SPACE_SERIAL,
    ) -> Blacklist:
        """Load ``path`` if it exists (an absent file is the empty list, version 0); with
        ``lookups=False`` only its header and offset table (the file is still checked whole).

        Raises :class:`BlacklistFileError` if the file is corrupt or truncated.
        """
        blacklist = cls(path, auto_refresh_s=auto_refresh_s, lookups=lookups, space=space)
        blacklist.refresh(force=True)
        return blacklist

    # --- lookups ---------------------------------------------------------------------------

    def contains(self, card_id: str) -> bool:
        """True if the card is blacklisted: ``card_id`` is the hex application serial (as
        ``CpuCard.card_id``) in the serial space, ``ISSUER:NUMBER`` (``5180:881146306``) in the
        printed space."""
        if self.space == SPACE_PRINTED:
            issuer, _, number = card_id.partition(":")
            return self.contains_asn(printed_key(issuer, number))
        return self.contains_asn(asn_of(card_id))

    def contains_asn(self, asn: int) -> bool:
        if self.auto_refresh_s is not None:
            now = time.monotonic()
            if now - self._checked_at >= self.auto_refresh_s:
                self._checked_at = now
                try:
                    self.refresh()
                except BlacklistFileError as exc:  # keep answering from the list in memory
                    log.error("blacklist reload failed; keeping the loaded list", error=str(exc))
        if not self._entries_loaded:
            self.lookups = True
            self._load(check=True)
        return self._packed.contains(asn)

    def __contains__(self, card_id: object) -> bool:
        return isinstance(card_id, str) and self.contains(card_id)

    def __len__(self) -> int:
        return self._packed.count

    @property
    def count(self) -> int:
        return self._packed.count

    def age_s(self, now: float | None = None) -> float | None:
        """Seconds since the host issued the loaded list (``None`` without a list)."""
        if not self.version:
            return None
        return (time.time() if now is None else now) - self.issued_at

    def is_expired(self, now: float | None = None) -> bool:
        return bool(self.version) and (time.time() if now is None else now) >= self.expires_at

    def health(self) -> dict[str, Any]:
        """Figures for the heartbeat."""
        age = self.age_s()
        name = "blacklist" if self.space == SPACE_SERIAL else f"{self.space}_blacklist"
        return {
            f"{name}_version": self.version,
            f"{name}_count": self.count,
            f"{name}_age_s": None if age is None else round(age, 1),
            f"{name}_expired": self.is_expired(),
            f"{name}_expires_at": self.expires_at or None,
            f"{name}_checked_at": self.checked_at,
        }

    def memory_bytes(self) -> int:
        """Bytes of the packed structure: the file image (header, offsets, entries) and the
        in-memory fence keys (:class:`_Packed`)."""
        return len(self._packed.buf) + self._packed.fences.itemsize * len(self._packed.fences)

    # --- loading ---------------------------------------------------------------------------

    def refresh(self, *, force: bool = False) -> bool:
        """Reload the file if it was replaced since the last load; True if reloaded."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise BlacklistFileError(f"blacklist: cannot stat {self.path}: {exc}") from exc
        stamp = file_stamp(st)
        if not force and stamp == self._stamp:
            return False
        self._load(check=True)
        log.info("blacklist loaded", path=str(self.path), version=self.version, count=self.count)
        return True

    def _load(self, *, check: bool) -> None:
        """Read the file (checked whole when ``check``): all of it for lookups, else its header
        and offset table only (the rest is hashed one step at a time)."""
        try:
            with open(self.path, "rb") as file:
                st = os.fstat(file.fileno())
                if self.lookups:
                    image = file.read()
                    header = _check_image(image, self.path, checksum=check)
                else:
                    header = _check_file(file, st.st_size, self.path, checksum=check)
                    image = os.pread(file.fileno(), _DATA_START, 0)
        except OSError as exc:
            raise BlacklistFileError(f"blacklist: cannot read {self.path}: {exc}") from exc
        version, issued_at, expires_at, count, applied_at, digest = header
        packed = _Packed(image, count)
        if packed.offsets[_BUCKETS] != count or packed.offsets[0] != 0:
            raise BlacklistFileError(f"blacklist: {self.path} has an inconsistent offset table")
        if self.lookups:
            packed.build_fences()
        self._entries_loaded = self.lookups
        self._packed = packed
        self.version, self.issued_at, self.expires_at = version, issued_at, expires_at
        self.applied_at = applied_at
        self.content_digest = digest
        self._stamp = file_stamp(st)

    # --- applying a signed list (the sync daemon) --------------------------------------------

    def incoming(self) -> IncomingList:
        """A list about to stream in from the host: feed it the answer's bytes as they come
        (:meth:`IncomingList.feed`), then :meth:`apply_incoming` it (or ``discard`` it)."""
        return IncomingList(self.path, self.space)

    def apply(self, document: bytes, keys: Keys, *, now: float | None = None) -> ApplyResult:
        """Verify a signed snapshot or delta held in memory and apply it (see
        :meth:`apply_incoming`)."""
        incoming = self.incoming()
        try:
            view = memoryview(document)
            for start in range(0, len(view), _STEP):
                incoming.feed(view[start : start + _STEP])
        except BaseException:
            incoming.discard()
            raise
        return self.apply_incoming(incoming, keys, now=now)

    def apply_incoming(
        self, incoming: IncomingList, keys: Keys, *, now: float | None = None
    ) -> ApplyResult:
        """Verify a list that streamed in against the signing keys in force and replace the
        local file atomically. The incoming file is removed either way.

        Raises :class:`BlacklistRejected` (the list is refused; nothing changes) or
        :class:`BlacklistFileError` (the disk failed; nothing changes).
        """
        try:
            return self._apply_incoming(incoming, keys, now)
        finally:
            incoming.discard()

    def _apply_incoming(self, incoming: IncomingList, keys: Keys, now: float | None) -> ApplyResult:
        signed = incoming.finish(keys)
        moment = time.time() if now is None else now
        if not self._check_acceptable(signed, moment):
            log.debug("blacklist unchanged", version=self.version)
            self.checked_at = moment
            return ApplyResult("unchanged", self.version, self.version, self.count, 0, 0)
        previous = self.version
        new = self.path.with_name(f"{self.path.name}.tmp-new")
        try:
            if signed.version == self.version:  # a re-issue of the same content: a new expiry
                target = new
                with self._old_entries() as old, _open_new(new) as out:
                    _copy(old, out, _ENTRY * self.count)
                    out.flush()
                counts, added, removed = self._packed.counts(), 0, 0
            elif signed.is_snapshot:
                target = incoming.path
                counts, added, removed = incoming.counts, signed.n_add, self.count
            else:
                target = new
                with self._old_entries() as old, _open_new(new) as out:
                    counts, added, removed = _merge_delta(
                        old, self._packed, incoming.path, signed.n_add, signed.n_remove, out
                    )
                    out.flush()
            offsets = _offsets_from_counts(counts)
            table = _table_bytes(offsets)
            digest = _file_entries_digest(target, table)
            if digest != signed.content_digest:
                if signed.is_snapshot:
                    raise BlacklistRejected(
                        f"blacklist: snapshot version {signed.version} does not hold the content "
                        "its digest names (corrupt or forged by a signing key)"
                    )
                # Our list at the base version is not the host's: start again from a snapshot.
                raise BlacklistBaseMismatch(
                    f"blacklist: delta {signed.base_version} -> {signed.version} applied to the "
                    "loaded list does not give the signed content; a snapshot is needed"
                )
            head = _file_header(
                signed.version,
                signed.issued_at,
                signed.expires_at,
                offsets[_BUCKETS],
                digest,
                int(time.time()),
            )
            _finish_file(target, head + table, self.path)
        except OSError as exc:
            raise BlacklistFileError(f"blacklist: could not write {self.path}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                new.unlink()
        self._load(check=False)  # written and digested just now
        self.checked_at = moment
        result = ApplyResult(signed.kind_name, signed.version, previous, self.count, added, removed)
        log.info(
            "blacklist applied",
            kind=result.kind,
            version=result.version,
            previous_version=previous,
            count=result.count,
            added=added,
            removed=removed,
        )
        return result

    @contextlib.contextmanager
    def _old_entries(self) -> Iterator[_Reader]:
        """The loaded list's entries, read sequentially from its file (never all at once)."""
        if self._stamp is None:  # the empty list, in memory
            yield io.BytesIO(bytes(self._packed.buf[_DATA_START:]))
            return
        with open(self.path, "rb", buffering=_STEP) as file:
            if os.fstat(file.fileno()).st_ino != self._stamp[0]:
                raise BlacklistFileError(
                    f"blacklist: {self.path} was replaced by another writer; not merged"
                )
            file.seek(_DATA_START)
            yield file

    def _check_acceptable(self, signed: ListHeader, now: float) -> bool:
        """Raise if the list must be refused; False if it changes nothing worth writing."""
        if signed.expires_at <= now:
            raise BlacklistRejected(
                f"blacklist: {signed.kind_name} version {signed.version} expired "
                f"{now - signed.expires_at:.0f} s ago"
            )
        if signed.version < self.version:
            raise BlacklistRejected(
                f"blacklist: {signed.kind_name} version {signed.version} is older than the "
                f"loaded version {self.version} (rollback refused)"
            )
        if signed.version == self.version:
            # A version names one list (TUF: version bound to content). The same version with
            # another content is never an update: an attack, or a host that lost its history.
            if signed.content_digest != self.content_digest:
                log.error(
                    "blacklist_conflict",
                    detail="same version, other content: refused (possible attack)",
                    version=signed.version,
                    loaded_digest=self.content_digest.hex(),
                    signed_digest=signed.content_digest.hex(),
                )
                raise BlacklistRejected(
                    f"blacklist: version {signed.version} again with other content "
                    "(refused as an attack)"
                )
            if not signed.is_snapshot and (signed.n_add or signed.n_remove):
                raise BlacklistRejected(
                    f"blacklist: delta to the current version {signed.version} carries changes"
                )
            if signed.issued_at <= self.issued_at:
                return False  # a replay or the same issue: harmless, nothing to do
            # The same content re-issued: it may only extend the expiry. Rewrite only once half
            # of the loaded list's life is gone, so a frequent pull does not rewrite a large
            # file every time.
            lifetime = signed.expires_at - signed.issued_at
            if self.expires_at - now > lifetime / 2:
                return False
        if not signed.is_snapshot and signed.base_version != self.version:
            raise BlacklistBaseMismatch(
                f"blacklist: delta from version {signed.base_version} does not apply to the "
                f"loaded version {self.version}; a snapshot is needed"
            )
        return True


class CardBlacklist:
    """The agent's lookup over both key spaces: a card is listed if its raw serial is in the
    serial list or its printed number in the printed-number list (each searched only in its
    own set, see the module docstring). ``version`` / ``expires_at`` / :meth:`is_expired` are
    the serial list's, which every host publishes; an expired printed-number list (one the host
    has published, version > 0) counts as expired too."""

    def __init__(self, serial: Blacklist, printed: Blacklist) -> None:
        if serial.space != SPACE_SERIAL or printed.space != SPACE_PRINTED:
            raise ValueError("CardBlacklist takes a serial list and a printed-number list")
        self.serial = serial
        self.printed = printed

    @property
    def version(self) -> int:
        return self.serial.version

    @property
    def expires_at(self) -> int:
        return self.serial.expires_at

    def is_expired(self, now: float | None = None) -> bool:
        return self.serial.is_expired(now) or (
            self.printed.version > 0 and self.printed.is_expired(now)
        )

    def contains(self, card_id: str) -> bool:
        return self.serial.contains(card_id)

    def contains_printed(self, issuer: str, number: str) -> bool:
        """True if this printed number is listed for this issuer (a city code, as
        ``CpuCard.issuer_code``); only entries of the card's own issuer match. A number that
        cannot be listed (not 1 to 14 decimal digits, e.g. a hex serial shown as the number)
        or a card without an issuer code is never in the list."""
        try:
            key = printed_key(issuer, number)
        except ValueError:
            return False
        return self.printed.contains_asn(key)

    def health(self) -> dict[str, Any]:
        return self.serial.health() | self.printed.health()


class IncomingList:
    """A signed list streaming in from the host, kept in a file next to ``blacklist.bin``
    (``blacklist.bin.tmp-incoming``, one at a time: the daemon is the one writer). A snapshot is
    written as the new local file's entries (6 bytes each, after room for the header and the
    offset table) with its bucket counts; a delta as its u64 sections, add then remove. The
    bytes are checked by a :class:`ListReader` on the way; nothing counts until
    :meth:`Blacklist.apply_incoming` has verified the signature and the content digest."""

    def __init__(self, target: Path, space: str = SPACE_SERIAL) -> None:
        self.path = target.with_name(f"{target.name}.tmp-incoming")
        self.reader = ListReader(space)
        self.counts = array("I", bytes(4 * _BUCKETS))
        self._file: BinaryIO | None = None

    def feed(self, data: bytes | memoryview) -> None:
        """The answer's next bytes. Raises :class:`BlacklistRejected` when they cannot be
        (part of) a list, :class:`BlacklistFileError` when the disk fails."""
        chunks = self.reader.feed(bytes(data))
        if self.reader.header is None:
            return
        try:
            out = self._open()
            for _section, chunk in chunks:
                if self.reader.header.is_snapshot:
                    entries, ids = _six_byte_entries(chunk)
                    _count_buckets(ids, self.counts)
                    out.write(entries)
                else:
                    out.write(chunk)
        except OSError as exc:
            self.discard()
            raise BlacklistFileError(f"blacklist: could not write {self.path}: {exc}") from exc

    def _open(self) -> BinaryIO:
        if self._file is None:
            self._file = open(self.path, "wb", buffering=_STEP)  # noqa: SIM115 - kept open
            if self.reader.header is not None and self.reader.header.is_snapshot:
                self._file.write(bytes(_DATA_START))  # room for the header and offset table
        return self._file

    def finish(self, keys: Keys) -> ListHeader:
        """All bytes are in: verify (:meth:`ListReader.finish`) and close the file."""
        header = self.reader.finish(keys)
        try:
            out = self._open()
            out.flush()
            out.close()
        except OSError as exc:
            raise BlacklistFileError(f"blacklist: could not write {self.path}: {exc}") from exc
        return header

    def discard(self) -> None:
        """Close and remove the incoming file (after it was applied or refused)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            self.path.unlink()


class _Reader(Protocol):
    def read(self, size: int, /) -> bytes: ...


def _open_new(path: Path) -> BinaryIO:
    """A new local file, buffered, positioned after the room for its header and offsets."""
    out = open(path, "wb", buffering=_STEP)  # noqa: SIM115 - the caller's ``with``
    out.write(bytes(_DATA_START))
    return out


def _copy(old: _Reader, out: BinaryIO, size: int) -> None:
    """``size`` bytes from ``old`` to ``out``, at most one step at a time."""
    while size > 0:
        piece = old.read(min(size, _STEP))
        if not piece:
            raise BlacklistFileError("blacklist: the loaded file ended early (truncated?)")
        out.write(piece)
        size -= len(piece)


def _bucket_groups(path: Path, start: int, count: int) -> Iterator[tuple[int, list[bytes]]]:
    """The ascending u64 ASNs stored at ``start`` in ``path``, by bucket: (bucket, 6-byte keys),
    read one step at a time."""
    bucket, keys = -1, list[bytes]()
    with open(path, "rb") as file:
        file.seek(start)
        left = count
        while left:
            take = min(left, _STEP // 8)
            chunk = file.read(8 * take)
            if len(chunk) != 8 * take:
                raise BlacklistFileError(f"blacklist: {path} ended early")
            left -= take
            entries, ids = _six_byte_entries(chunk)
            for i, b in enumerate(ids):
                if b != bucket:
                    if keys:
                        yield bucket, keys
                    bucket, keys = b, []
                keys.append(entries[_ENTRY * i : _ENTRY * i + _ENTRY])
    if keys:
        yield bucket, keys


def _merge_delta(
    old: _Reader, packed: _Packed, delta: Path, n_add: int, n_remove: int, out: BinaryIO
) -> tuple[array[int], int, int]:
    """Write the loaded list with a delta applied, bucket by bucket: the entries of untouched
    buckets are copied from ``old`` in steps, a changed bucket is edited by binary search.

    Returns the new per-bucket counts and how many entries were really added and removed.
    """
    counts = packed.counts()
    adds = _bucket_groups(delta, 0, n_add)
    removes = _bucket_groups(delta, 8 * n_add, n_remove)
    add_next, remove_next = next(adds, None), next(removes, None)
    copied_to = 0  # entry index up to which the old entries are written
    added = removed = 0
    offsets = packed.offsets
    none: list[bytes] = []
    while add_next is not None or remove_next is not None:
        if remove_next is None or (add_next is not None and add_next[0] < remove_next[0]):
            bucket, add_keys, remove_keys = add_next[0], add_next[1], none  # type: ignore[index]
            add_next = next(adds, None)
        elif add_next is None or remove_next[0] < add_next[0]:
            bucket, add_keys, remove_keys = remove_next[0], none, remove_next[1]
            remove_next = next(removes, None)
        else:
            bucket, add_keys, remove_keys = add_next[0], add_next[1], remove_next[1]
            add_next, remove_next = next(adds, None), next(removes, None)
        start, end = offsets[bucket], offsets[bucket + 1]
        if start > copied_to:
            _copy(old, out, _ENTRY * (start - copied_to))
        edited, n_added, n_removed = _edit_bucket(
            old.read(_ENTRY * (end - start)), add_keys, remove_keys
        )
        added += n_added
        removed += n_removed
        out.write(edited)
        counts[bucket] = len(edited) // _ENTRY
        copied_to = end
    _copy(old, out, _ENTRY * (packed.count - copied_to))
    return counts, added, removed


def _file_entries_digest(path: Path, table: bytes) -> bytes:
    """SHA-256 of ``table`` and the entries of the file at ``path`` (read in steps)."""
    digest = hashlib.sha256(table)
    with open(path, "rb") as file:
        file.seek(_DATA_START)
        while piece := file.read(_STEP):
            digest.update(piece)
    return digest.digest()


def _finish_file(path: Path, head: bytes, target: Path) -> None:
    """Write the header and offset table at the start of ``path``, fsync it, rename it over
    ``target``, fsync the directory."""
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(head)
        at = 0
        while at < len(view):
            at += os.pwrite(fd, view[at:], at)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(path, target)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_image(
    image: bytes, path: Path, *, checksum: bool
) -> tuple[int, int, int, int, int, bytes]:
    """The header of the local file held in memory, checked like :func:`_check_file`."""
    return _check_file(io.BytesIO(image), len(image), path, checksum=checksum)


def _empty_image() -> bytes:
    return _build_image(
        array("I", bytes(4 * (_BUCKETS + 1))), b"", version=0, issued_at=0, expires_at=0
    )


def _check_file(
    file: BinaryIO, size: int, path: Path, *, checksum: bool
) -> tuple[int, int, int, int, int, bytes]:
    """The header of the local file, checked against its size and (``checksum``) its checksum,
    read one step at a time."""
    head = file.read(_FILE_HEADER.size)
    if size < _DATA_START or len(head) < _FILE_HEADER.size:
        raise BlacklistFileError(f"blacklist: {path} is truncated ({size} bytes)")
    magic, version, issued, expires, count, applied, digest = _FILE_HEADER.unpack_from(head)
    if magic != FILE_MAGIC:
        raise BlacklistFileError(f"blacklist: {path} is not a blacklist file (bad magic)")
    expected = _DATA_START + _ENTRY * count
    if size != expected:
        raise BlacklistFileError(
            f"blacklist: {path} is {size} bytes, its header says {expected} (truncated)"
        )
    if checksum:
        running = hashlib.sha256()
        while piece := file.read(_STEP):
            running.update(piece)
        if running.digest() != digest:
            raise BlacklistFileError(f"blacklist: {path} is corrupt (checksum mismatch)")
    return version, issued, expires, count, applied, digest


def write_atomically(path: Path, data: bytes) -> None:
    """:func:`agent.files.replace_file`; raises :class:`BlacklistFileError` (e.g. the disk is
    full), ``path`` then untouched."""
    try:
        replace_file(path, data)
    except OSError as exc:
        raise BlacklistFileError(f"blacklist: could not write {path}: {exc}") from exc
