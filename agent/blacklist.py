"""The terminal's card blacklist: signed lists from the clearing host, a packed set for lookups.

Lookup key: the card's 8-byte ASN (application serial EF15[12..19], cpu-purse.md §6.1 step 4) as
an unsigned integer — the last 16 hex digits of ``CpuCard.card_id``.

In memory (and on disk) the set is a *bucketed packed array*: the top 16 bits of the ASN pick
one of 65,536 buckets, an offset table says where each bucket starts, and each entry keeps only
the remaining 6 bytes, big-endian, sorted, so ``bytes`` comparison is numeric comparison. A
lookup is one offset read plus a binary search over 6-byte slices (a few microseconds); 10
million entries take 60 MB plus a 256 KB offset table.

Local file (``blacklist.bin`` next to the store; replaced atomically, so a delta applies
entirely or not at all)::

    magic "CBLFILE1" (8) | version u64 | issued_at u64 | expires_at u64 | count u64 |
    applied_at u64 | SHA-256 of the rest (32)          -- big-endian, 80 bytes
    offsets: 65,537 x u32 little-endian (bucket b spans entries offsets[b]..offsets[b+1])
    entries: count x 6 bytes

Signed list from the host (wire format, see ``clearinghost/openapi.json``). The signed bytes are the
whole body before the trailer; the magic makes them useless as any other signed document::

    magic "CBLIST02" (8) | kind (1: 'S' snapshot, 'D' delta) | version u64 | base_version u64 |
    issued_at u64 | expires_at u64 | content digest (32) | n_add u32 | n_remove u32
                                                                     -- big-endian, 81 bytes
    add:    n_add x u64 ASN, strictly ascending
    remove: n_remove x u64 ASN, strictly ascending (always 0 in a snapshot)
    trailer: key id (8 = first 8 bytes of SHA-256 of the host public key) | Ed25519 signature (64)

The **content digest** binds the version to the whole list it names (snapshot or the result of
the delta): SHA-256 of the local file's offset table and entries, the checksum the local file
header keeps (:func:`list_digest`). A snapshot replaces the list; a delta from ``base_version``
(= the terminal's version) adds and removes, and its result must have the signed digest.

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
import os
import struct
import sys
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import AgentError, StoreError

log = structlog.get_logger(__name__)

BLACKLIST_FILE = "blacklist.bin"

KIND_SNAPSHOT = ord("S")
KIND_DELTA = ord("D")

LIST_MAGIC = b"CBLIST02"
_LIST_HEADER = struct.Struct(">8sBQQQQ32sII")
DIGEST_SIZE = 32
LIST_KEY_ID_SIZE = 8
LIST_SIGNATURE_SIZE = 64
_LIST_TRAILER = LIST_KEY_ID_SIZE + LIST_SIGNATURE_SIZE

FILE_MAGIC = b"CBLFILE1"
_FILE_HEADER = struct.Struct(">8sQQQQQ32s")
_BUCKETS = 1 << 16
_OFFSETS_SIZE = 4 * (_BUCKETS + 1)
_ENTRY = 6
_LOW_MASK = (1 << 48) - 1
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
) -> bytes:
    """Build a signed list (host side). ``add``/``remove`` are sorted and de-duplicated here.

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
        LIST_MAGIC,
        kind,
        version,
        base_version,
        issued_at,
        expires_at,
        content_digest,
        len(added) // 8,
        len(removed) // 8,
    )
    body = header + added + removed
    return body + key_id_of(public_key_raw) + sign(body)


def list_document_size(prefix: bytes) -> int | None:
    """The size a signed list's header declares (header, entries, key id, signature), read from
    the document's first bytes; ``None`` until the whole header is there. Raises
    :class:`BlacklistRejected` as soon as the bytes cannot be a list (a reader stops there)."""
    if len(prefix) < _LIST_HEADER.size:
        return None
    magic, kind, *_, n_add, n_remove = _LIST_HEADER.unpack_from(prefix)
    if magic != LIST_MAGIC:
        raise BlacklistRejected("blacklist: not a signed blacklist (bad magic)")
    if kind not in (KIND_SNAPSHOT, KIND_DELTA):
        raise BlacklistRejected(f"blacklist: unknown document kind 0x{kind:02X}")
    return int(_LIST_HEADER.size + 8 * (n_add + n_remove) + _LIST_TRAILER)


def decode_list(data: bytes, keys: Keys) -> SignedList:
    """Parse and verify a signed list against the signing keys in force. Raises
    :class:`BlacklistRejected` with the reason."""
    if len(data) < _LIST_HEADER.size + _LIST_TRAILER:
        raise BlacklistRejected(f"blacklist: document of {len(data)} bytes is truncated")
    magic, kind, version, base, issued, expires, digest, n_add, n_remove = _LIST_HEADER.unpack_from(
        data
    )
    if magic != LIST_MAGIC:
        raise BlacklistRejected("blacklist: not a signed blacklist (bad magic)")
    if kind not in (KIND_SNAPSHOT, KIND_DELTA):
        raise BlacklistRejected(f"blacklist: unknown document kind 0x{kind:02X}")
    body_len = _LIST_HEADER.size + 8 * (n_add + n_remove)
    if len(data) != body_len + _LIST_TRAILER:
        raise BlacklistRejected(
            f"blacklist: document is {len(data)} bytes, its header says "
            f"{body_len + _LIST_TRAILER} (truncated or padded)"
        )
    body = data[:body_len]
    key_id = data[body_len : body_len + LIST_KEY_ID_SIZE]
    signature = data[body_len + LIST_KEY_ID_SIZE :]
    trusted = keys_by_id(keys)
    public_key_raw = trusted.get(key_id)
    if public_key_raw is None:
        raise BlacklistRejected(
            f"blacklist: signed by key {key_id.hex()}, not a signing key in force "
            f"({', '.join(k.hex() for k in trusted)})"
        )
    try:
        Ed25519PublicKey.from_public_bytes(public_key_raw).verify(signature, body)
    except InvalidSignature:
        raise BlacklistRejected("blacklist: bad signature (forged or corrupted list)") from None
    add = body[_LIST_HEADER.size : _LIST_HEADER.size + 8 * n_add]
    remove = body[_LIST_HEADER.size + 8 * n_add :]
    if kind == KIND_SNAPSHOT and (n_remove or base):
        raise BlacklistRejected("blacklist: a snapshot must not carry removals or a base version")
    for name, packed in (("added", add), ("removed", remove)):
        if not _strictly_ascending(packed):
            raise BlacklistRejected(f"blacklist: {name} entries are not strictly ascending")
    if expires <= issued:
        raise BlacklistRejected("blacklist: expires before it was issued")
    return SignedList(kind, version, base, issued, expires, digest, bytes(add), bytes(remove))


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


def _strictly_ascending(packed: bytes) -> bool:
    # Big-endian fixed width: numeric order is byte order, compared 8 bytes at a time.
    prev = b""
    for i in range(0, len(packed), 8):
        cur = packed[i : i + 8]
        if cur <= prev:
            return False
        prev = cur
    return True


# --- the packed set -----------------------------------------------------------------------------


class _Packed:
    """The bucketed packed array inside one immutable ``bytes`` (the local file's image)."""

    __slots__ = ("buf", "count", "data_start", "offsets")

    def __init__(self, buf: bytes, count: int) -> None:
        self.buf = buf
        self.count = count
        self.data_start = _FILE_HEADER.size + _OFFSETS_SIZE
        raw = memoryview(buf)[_FILE_HEADER.size : self.data_start]
        if sys.byteorder == "little":
            self.offsets: memoryview | array[int] = raw.cast("I")
        else:  # pragma: no cover - big-endian hosts
            swapped = array("I", raw.tobytes())
            swapped.byteswap()
            self.offsets = swapped

    def contains(self, asn: int) -> bool:
        bucket = asn >> 48
        lo = self.offsets[bucket]
        hi = self.offsets[bucket + 1]
        if lo == hi:
            return False
        key = (asn & _LOW_MASK).to_bytes(_ENTRY, "big")
        buf, base = self.buf, self.data_start
        while lo < hi:
            mid = (lo + hi) >> 1
            at = base + _ENTRY * mid
            if buf[at : at + _ENTRY] < key:
                lo = mid + 1
            else:
                hi = mid
        at = base + _ENTRY * lo
        return lo < self.offsets[bucket + 1] and buf[at : at + _ENTRY] == key

    def bucket_bytes(self, bucket: int) -> bytes:
        start = self.data_start + _ENTRY * self.offsets[bucket]
        return self.buf[start : self.data_start + _ENTRY * self.offsets[bucket + 1]]

    def entries(self) -> bytes:
        return self.buf[self.data_start :]

    def offsets_array(self) -> array[int]:
        return array("I", self.offsets)


def _build_image(
    offsets: array[int], entries: bytes, *, version: int, issued_at: int, expires_at: int
) -> bytes:
    """The local file's bytes (header with checksum, offsets, entries)."""
    count = len(entries) // _ENTRY
    table = array("I", offsets)
    if sys.byteorder != "little":  # pragma: no cover
        table.byteswap()
    table_bytes = table.tobytes()
    digest = hashlib.sha256(table_bytes)
    digest.update(entries)
    header = _FILE_HEADER.pack(
        FILE_MAGIC, version, issued_at, expires_at, count, int(time.time()), digest.digest()
    )
    return header + table_bytes + entries


def _image_digest(offsets: array[int], entries: bytes) -> bytes:
    """The checksum :func:`_build_image` writes: SHA-256 of offsets (u32 LE) and entries."""
    table = array("I", offsets)
    if sys.byteorder != "little":  # pragma: no cover
        table.byteswap()
    digest = hashlib.sha256(table.tobytes())
    digest.update(entries)
    return digest.digest()


def _image_from_sorted_u64(packed: bytes) -> tuple[array[int], bytes]:
    """Offsets and 6-byte entries from strictly ascending u64 BE ASNs (a snapshot)."""
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
    offsets = array("I", bytes(4 * (_BUCKETS + 1)))
    for b in range(_BUCKETS + 1):
        offsets[b] = bisect_left(ids, b) if b < _BUCKETS else n
    return offsets, bytes(entries)


def _merge_delta(
    packed: _Packed, add: list[int], remove: list[int]
) -> tuple[array[int], bytes, int, int]:
    """Apply a delta bucket by bucket; untouched runs of buckets are copied as one slice.

    Returns offsets, entries, and how many entries were really added and removed.
    """
    changes: dict[int, tuple[list[bytes], list[bytes]]] = {}
    for asn in add:
        changes.setdefault(asn >> 48, ([], []))[0].append((asn & _LOW_MASK).to_bytes(_ENTRY))
    for asn in remove:
        changes.setdefault(asn >> 48, ([], []))[1].append((asn & _LOW_MASK).to_bytes(_ENTRY))
    counts = [packed.offsets[b + 1] - packed.offsets[b] for b in range(_BUCKETS)]
    pieces: list[bytes] = []
    all_entries = packed.entries()
    copied_to = 0  # entry index up to which the old entries are already in ``pieces``
    added = removed = 0
    for bucket in sorted(changes):
        adds, removes = changes[bucket]
        start, end = packed.offsets[bucket], packed.offsets[bucket + 1]
        pieces.append(all_entries[_ENTRY * copied_to : _ENTRY * start])
        edited, n_added, n_removed = _edit_bucket(packed.bucket_bytes(bucket), adds, removes)
        added += n_added
        removed += n_removed
        pieces.append(edited)
        counts[bucket] = len(edited) // _ENTRY
        copied_to = end
    pieces.append(all_entries[_ENTRY * copied_to :])
    offsets = array("I", bytes(4 * (_BUCKETS + 1)))
    running = 0
    for b in range(_BUCKETS):
        offsets[b] = running
        running += counts[b]
    offsets[_BUCKETS] = running
    return offsets, b"".join(pieces), added, removed


def _lower_bound(seg: bytes, key: bytes) -> int:
    lo, hi = 0, len(seg) // _ENTRY
    while lo < hi:
        mid = (lo + hi) >> 1
        if seg[_ENTRY * mid : _ENTRY * mid + _ENTRY] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _edit_bucket(seg: bytes, adds: list[bytes], removes: list[bytes]) -> tuple[bytes, int, int]:
    """Remove then add 6-byte keys in one sorted bucket by binary search (no full decode).

    Returns the new bucket and how many keys were really added and removed.
    """
    m = len(seg) // _ENTRY
    cuts: list[tuple[int, int, bytes]] = []  # (index, 0 = delete entry / 1 = insert before, key)
    deleted: set[bytes] = set()
    for key in set(removes):
        i = _lower_bound(seg, key)
        if i < m and seg[_ENTRY * i : _ENTRY * i + _ENTRY] == key:
            cuts.append((i, 0, key))
            deleted.add(key)
    inserted = 0
    for key in set(adds):
        i = _lower_bound(seg, key)
        if i < m and seg[_ENTRY * i : _ENTRY * i + _ENTRY] == key and key not in deleted:
            continue  # already listed
        cuts.append((i, 1, key))
        inserted += 1
    cuts.sort()
    out: list[bytes] = []
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
    re_added = len(deleted & set(adds))
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

    def __init__(self, path: Path, *, auto_refresh_s: float | None = 1.0) -> None:
        self.path = path
        self.auto_refresh_s = auto_refresh_s
        self._packed = _Packed(_empty_image(), 0)
        self.version = 0
        self.issued_at = 0
        self.expires_at = 0
        self.applied_at = 0
        self.content_digest = _image_digest(self._packed.offsets_array(), b"")
        self.checked_at: float | None = None  # the newest verified list from the host
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = time.monotonic()

    @classmethod
    def open(cls, path: Path, *, auto_refresh_s: float | None = 1.0) -> Blacklist:
        """Load ``path`` if it exists (an absent file is the empty list, version 0).

        Raises :class:`BlacklistFileError` if the file is corrupt or truncated.
        """
        blacklist = cls(path, auto_refresh_s=auto_refresh_s)
        blacklist.refresh(force=True)
        return blacklist

    # --- lookups ---------------------------------------------------------------------------

    def contains(self, card_id: str) -> bool:
        """True if the card (hex application serial, as ``CpuCard.card_id``) is blacklisted."""
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
        return {
            "blacklist_version": self.version,
            "blacklist_count": self.count,
            "blacklist_age_s": None if age is None else round(age, 1),
            "blacklist_expired": self.is_expired(),
            "blacklist_expires_at": self.expires_at or None,
            "blacklist_checked_at": self.checked_at,
        }

    def memory_bytes(self) -> int:
        """Bytes held by the packed structure (file image: header, offsets, entries)."""
        return len(self._packed.buf)

    # --- loading ---------------------------------------------------------------------------

    def refresh(self, *, force: bool = False) -> bool:
        """Reload the file if it was replaced since the last load; True if reloaded."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise BlacklistFileError(f"blacklist: cannot stat {self.path}: {exc}") from exc
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if not force and stamp == self._stamp:
            return False
        try:
            image = self.path.read_bytes()
        except OSError as exc:
            raise BlacklistFileError(f"blacklist: cannot read {self.path}: {exc}") from exc
        self._install(image, _check_image(image, self.path))
        self._stamp = stamp
        log.info("blacklist loaded", path=str(self.path), version=self.version, count=self.count)
        return True

    def _install(self, image: bytes, header: tuple[int, int, int, int, int, bytes]) -> None:
        version, issued_at, expires_at, count, applied_at, digest = header
        self._packed = _Packed(image, count)
        self.version, self.issued_at, self.expires_at = version, issued_at, expires_at
        self.applied_at = applied_at
        self.content_digest = digest

    # --- applying a signed list (the sync daemon) --------------------------------------------

    def apply(self, document: bytes, keys: Keys, *, now: float | None = None) -> ApplyResult:
        """Verify a signed snapshot or delta against the signing keys in force and replace the
        local file atomically.

        Raises :class:`BlacklistRejected` (the list is refused; nothing changes) or
        :class:`BlacklistFileError` (the disk failed; nothing changes).
        """
        signed = decode_list(document, keys)
        moment = time.time() if now is None else now
        if not self._check_acceptable(signed, moment):
            log.debug("blacklist unchanged", version=self.version)
            self.checked_at = moment
            return ApplyResult("unchanged", self.version, self.version, self.count, 0, 0)
        previous = self.version
        if signed.version == self.version:  # a re-issue of the same content: a new expiry
            offsets, entries = self._packed.offsets_array(), self._packed.entries()
            added = removed = 0
        elif signed.is_snapshot:
            offsets, entries = _image_from_sorted_u64(signed.add)
            added, removed = len(entries) // _ENTRY, self.count
        else:
            offsets, entries, added, removed = _merge_delta(
                self._packed, signed.added(), signed.removed()
            )
        if _image_digest(offsets, entries) != signed.content_digest:
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
        image = _build_image(
            offsets,
            entries,
            version=signed.version,
            issued_at=signed.issued_at,
            expires_at=signed.expires_at,
        )
        write_atomically(self.path, image)
        self._install(image, _check_image(image, self.path))
        with contextlib.suppress(OSError):
            st = self.path.stat()
            self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
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

    def _check_acceptable(self, signed: SignedList, now: float) -> bool:
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
            if not signed.is_snapshot and (signed.add or signed.remove):
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


def _empty_image() -> bytes:
    return _build_image(
        array("I", bytes(4 * (_BUCKETS + 1))), b"", version=0, issued_at=0, expires_at=0
    )


def _check_image(image: bytes, path: Path) -> tuple[int, int, int, int, int, bytes]:
    if len(image) < _FILE_HEADER.size + _OFFSETS_SIZE:
        raise BlacklistFileError(f"blacklist: {path} is truncated ({len(image)} bytes)")
    magic, version, issued, expires, count, applied, digest = _FILE_HEADER.unpack_from(image)
    if magic != FILE_MAGIC:
        raise BlacklistFileError(f"blacklist: {path} is not a blacklist file (bad magic)")
    expected = _FILE_HEADER.size + _OFFSETS_SIZE + _ENTRY * count
    if len(image) != expected:
        raise BlacklistFileError(
            f"blacklist: {path} is {len(image)} bytes, its header says {expected} (truncated)"
        )
    if hashlib.sha256(memoryview(image)[_FILE_HEADER.size :]).digest() != digest:
        raise BlacklistFileError(f"blacklist: {path} is corrupt (checksum mismatch)")
    packed = _Packed(image, count)
    if packed.offsets[_BUCKETS] != count or packed.offsets[0] != 0:
        raise BlacklistFileError(f"blacklist: {path} has an inconsistent offset table")
    return version, issued, expires, count, applied, digest


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file, fsync, rename over ``path``, fsync the directory.

    Raises :class:`BlacklistFileError` (e.g. the disk is full); ``path`` is then untouched.
    """
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise BlacklistFileError(f"blacklist: could not write {path}: {exc}") from exc
