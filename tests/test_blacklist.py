"""The agent's blacklist: signed lists (forged, tampered, rolled back, expired, replayed), the
packed set against a Python set, atomic file replacement, corrupt files, a full disk."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import struct
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from structlog.testing import capture_logs

from agent import blacklist as bl
from agent.blacklist import (
    KIND_DELTA,
    KIND_SNAPSHOT,
    Blacklist,
    BlacklistBaseMismatch,
    BlacklistFileError,
    BlacklistRejected,
    asn_of,
    decode_list,
    encode_list,
    list_digest,
)

NOW = 1_800_000_000


class Signer:
    """A host signing key generated for the test (TEST KEY)."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.lists: dict[int, set[int]] = {0: set()}  # the host's list at each version

    def snapshot(self, version: int, entries: list[int], *, issued: int = NOW, ttl: int = 3600):
        self.lists[version] = set(entries)
        return encode_list(
            kind=KIND_SNAPSHOT,
            version=version,
            base_version=0,
            issued_at=issued,
            expires_at=issued + ttl,
            add=entries,
            sign=self.key.sign,
            public_key_raw=self.public,
        )

    def delta(self, base: int, version: int, add=(), remove=(), *, issued: int = NOW, ttl=3600):
        if version not in self.lists:
            self.lists[version] = (self.lists.get(base, set()) - set(remove)) | set(add)
        return encode_list(
            kind=KIND_DELTA,
            version=version,
            base_version=base,
            issued_at=issued,
            expires_at=issued + ttl,
            add=add,
            remove=remove,
            content_digest=list_digest(self.lists[version]),
            sign=self.key.sign,
            public_key_raw=self.public,
        )


@pytest.fixture
def signer() -> Signer:
    return Signer()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / bl.BLACKLIST_FILE


def card(asn: int) -> str:
    return f"0310{asn:016X}"


def test_asn_of_card_ids() -> None:
    assert asn_of("03105170070100000042") == 0x5170070100000042
    assert asn_of("5170070100000042") == 0x5170070100000042
    assert asn_of("42") == 0x42
    with pytest.raises(ValueError, match="hexadecimal"):
        asn_of("not a card")


def test_absent_file_is_an_empty_list(path: Path) -> None:
    empty = Blacklist.open(path)
    assert empty.version == 0 and len(empty) == 0
    assert not empty.contains(card(1))
    assert empty.health()["blacklist_age_s"] is None


def test_snapshot_then_deltas_match_a_python_set(signer: Signer, path: Path) -> None:
    rng = random.Random(5)
    # clustered (one bucket), spread (many buckets) and edge values
    entries = {rng.randrange(1 << 64) for _ in range(3000)}
    entries |= {0x5170070100000000 + rng.randrange(5000) for _ in range(2000)}
    entries |= {0, (1 << 64) - 1, 1 << 48, (1 << 48) - 1}
    listed = Blacklist.open(path)
    result = listed.apply(signer.snapshot(1, sorted(entries)), signer.public, now=NOW)
    assert (result.kind, result.count) == ("snapshot", len(entries))
    expected = set(entries)
    version = 1
    for _round in range(15):
        pool = list(expected)
        remove = set(rng.sample(pool, 50)) | {rng.randrange(1 << 64) for _ in range(5)}
        add = {rng.randrange(1 << 64) for _ in range(40)}
        add |= {0x5170070100000000 + rng.randrange(8000) for _ in range(40)}
        add |= set(rng.sample(pool, 5))  # already listed
        listed.apply(signer.delta(version, version + 1, add, remove), signer.public, now=NOW)
        version += 1
        # a delta's removals apply before its additions (an ASN in both stays listed)
        expected = (expected - remove) | add
        assert len(listed) == len(expected)
    for asn in list(expected)[:3000]:
        assert listed.contains(card(asn))
    for _ in range(3000):
        probe = rng.randrange(1 << 64)
        assert listed.contains_asn(probe) == (probe in expected)
    reopened = Blacklist.open(path)
    assert reopened.version == version and len(reopened) == len(expected)
    assert all(reopened.contains_asn(a) for a in list(expected)[:500])


def test_forged_tampered_truncated_and_unsigned_lists_are_refused(
    signer: Signer, path: Path
) -> None:
    listed = Blacklist.open(path)
    good = signer.snapshot(1, [1, 2, 3])
    forger = Signer()
    with pytest.raises(BlacklistRejected, match="not a signing key in force"):
        listed.apply(forger.snapshot(1, [1, 2, 3]), signer.public, now=NOW)
    # a forger who also copies the real key id: the signature does not verify
    forged = bytearray(forger.snapshot(1, [9]))
    forged[-72:-64] = bl.key_id_of(signer.public)
    with pytest.raises(BlacklistRejected, match="bad signature"):
        listed.apply(bytes(forged), signer.public, now=NOW)
    tampered = bytearray(good)
    tampered[bl._LIST_HEADER.size + 7] ^= 1  # one listed ASN changed
    with pytest.raises(BlacklistRejected, match="bad signature"):
        listed.apply(bytes(tampered), signer.public, now=NOW)
    with pytest.raises(BlacklistRejected, match="truncated"):
        listed.apply(good[:-1], signer.public, now=NOW)
    with pytest.raises(BlacklistRejected, match="truncated"):
        listed.apply(good[:20], signer.public, now=NOW)
    with pytest.raises(BlacklistRejected, match="bad magic"):
        listed.apply(b"X" + good[1:], signer.public, now=NOW)
    unsigned = good[:-64] + bytes(64)
    with pytest.raises(BlacklistRejected, match="bad signature"):
        listed.apply(unsigned, signer.public, now=NOW)
    assert listed.version == 0 and not path.exists()


def signed_raw(signer: Signer, header: bytes, entries: bytes) -> bytes:
    """A list signed as CBLIST03 signs: the header, then SHA-256 of the entries section."""
    message = bl.signed_message(header, hashlib.sha256(entries).digest())
    return header + entries + bl.key_id_of(signer.public) + signer.key.sign(message)


def test_unsorted_list_is_refused_even_when_signed(signer: Signer) -> None:
    header = struct.pack(
        ">8sBQQQQ32sII", b"CBLIST03", KIND_SNAPSHOT, 1, 0, NOW, NOW + 10, bytes(32), 2, 0
    )
    document = signed_raw(signer, header, (5).to_bytes(8, "big") + (3).to_bytes(8, "big"))
    with pytest.raises(BlacklistRejected, match="ascending"):
        decode_list(document, signer.public)
    # across the steps a reader takes: one entry at a time
    reader = bl.ListReader()
    with pytest.raises(BlacklistRejected, match="ascending"):
        for i in range(len(document)):
            reader.feed(document[i : i + 1])


def test_a_list_signed_the_cblist02_way_is_refused(signer: Signer) -> None:
    """The signed bytes changed with the magic: a CBLIST02 document (signature over the whole
    body) is refused at its magic, and a CBLIST03 header signed over the body is forged."""
    entries = (3).to_bytes(8, "big") + (5).to_bytes(8, "big")
    for magic, reason in ((b"CBLIST02", "bad magic"), (b"CBLIST03", "bad signature")):
        header = struct.pack(
            ">8sBQQQQ32sII", magic, KIND_SNAPSHOT, 1, 0, NOW, NOW + 10, bytes(32), 2, 0
        )
        body = header + entries
        with pytest.raises(BlacklistRejected, match=reason):
            decode_list(body + bl.key_id_of(signer.public) + signer.key.sign(body), signer.public)


def test_a_list_verifies_whatever_the_steps_it_arrives_in(signer: Signer, path: Path) -> None:
    """The reader keeps only a partial entry, the running hash and the trailer: a document fed
    in pieces of any size gives the same verified list; bytes past its declared size are
    refused as they come."""
    signer.lists[1] = {1, 2, 3, 1 << 60}
    document = signer.delta(0, 1, add=[1, 2, 3, 1 << 60])
    rng = random.Random(3)
    for _ in range(20):
        reader, pos, got = bl.ListReader(), 0, []
        while pos < len(document):
            step = rng.randint(1, 40)
            got += reader.feed(document[pos : pos + step])
            pos += step
        header = reader.finish(signer.public)
        assert header.version == 1 and b"".join(c for _, c in got) == document[81:-72]
    padded = bl.ListReader()
    with pytest.raises(BlacklistRejected, match="runs past"):
        padded.feed(document + b"\0")
    listed = Blacklist.open(path)
    incoming = listed.incoming()
    for i in range(0, len(document), 7):
        incoming.feed(document[i : i + 7])
    assert listed.apply_incoming(incoming, signer.public, now=NOW).count == 4
    assert not list(path.parent.glob("*.tmp-*"))  # the incoming file is gone


def test_a_refused_stream_leaves_the_old_list_and_no_file_behind(
    signer: Signer, path: Path
) -> None:
    """Streamed in, then refused at the signature, the digest or the base: the old list stays in
    force (file and memory) and the incoming file is removed."""
    listed = Blacklist.open(path)
    listed.apply(signer.snapshot(1, [1, 2]), signer.public, now=NOW)
    before = path.read_bytes()
    forger = Signer()
    forger.lists[1] = {1, 2}
    cases = [
        (forger.snapshot(2, [7, 8]), BlacklistRejected, "not a signing key"),
        (
            bl.encode_list(
                kind=KIND_SNAPSHOT,
                version=2,
                base_version=0,
                issued_at=NOW,
                expires_at=NOW + 3600,
                add=[7, 8],
                content_digest=list_digest([7]),
                sign=signer.key.sign,
                public_key_raw=signer.public,
            ),
            BlacklistRejected,
            "does not hold the content",
        ),
        (signer.delta(1, 2, add=[5], remove=[9]), BlacklistRejected, "."),
    ]
    signer.lists[2] = {1, 2, 5, 77}  # the last delta's result is not the signed content
    cases[2] = (signer.delta(1, 2, add=[5]), BlacklistBaseMismatch, "signed content")
    for document, error, reason in cases:
        incoming = listed.incoming()
        incoming.feed(document)
        assert incoming.path.exists()
        with pytest.raises(error, match=reason):
            listed.apply_incoming(incoming, signer.public, now=NOW)
        assert not list(path.parent.glob("*.tmp-*"))
        assert path.read_bytes() == before and listed.version == 1
        assert listed.contains_asn(1) and not listed.contains_asn(7)
    truncated = listed.incoming()
    truncated.feed(signer.snapshot(3, list(range(100)))[:-1])
    with pytest.raises(BlacklistRejected, match="truncated"):
        listed.apply_incoming(truncated, signer.public, now=NOW)
    assert not list(path.parent.glob("*.tmp-*")) and path.read_bytes() == before


def test_rollback_expired_replay_and_wrong_base(signer: Signer, path: Path) -> None:
    listed = Blacklist.open(path)
    listed.apply(signer.snapshot(5, [10, 20]), signer.public, now=NOW)
    with pytest.raises(BlacklistRejected, match="rollback"):
        listed.apply(signer.snapshot(4, [10]), signer.public, now=NOW)
    with pytest.raises(BlacklistRejected, match="expired"):
        listed.apply(signer.snapshot(6, [10], issued=NOW - 7200), signer.public, now=NOW)
    with pytest.raises(BlacklistBaseMismatch, match="snapshot is needed"):
        listed.apply(signer.delta(3, 6, add=[30]), signer.public, now=NOW)
    with pytest.raises(BlacklistRejected, match="carries changes"):
        listed.apply(signer.delta(5, 5, add=[30]), signer.public, now=NOW)
    # the same document again, or an older re-issue: nothing to do
    again = listed.apply(signer.snapshot(5, [10, 20]), signer.public, now=NOW)
    assert again.kind == "unchanged"
    # a fresh re-issue late in the list's life extends its expiry
    late = NOW + 3000
    extended = listed.apply(signer.delta(5, 5, issued=late), signer.public, now=late)
    assert extended.kind == "delta" and listed.expires_at == late + 3600
    assert listed.version == 5 and listed.contains_asn(10) and not listed.contains_asn(30)
    assert Blacklist.open(path).expires_at == late + 3600


def test_corrupt_or_truncated_file_is_detected(signer: Signer, path: Path) -> None:
    Blacklist.open(path).apply(signer.snapshot(1, list(range(100))), signer.public, now=NOW)
    image = path.read_bytes()
    path.write_bytes(image[:-3])
    with pytest.raises(BlacklistFileError, match="truncated"):
        Blacklist.open(path)
    flipped = bytearray(image)
    flipped[-5] ^= 0x40
    path.write_bytes(bytes(flipped))
    with pytest.raises(BlacklistFileError, match="checksum"):
        Blacklist.open(path)
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(BlacklistFileError):
        Blacklist.open(path)


def test_reader_keeps_its_list_when_the_file_goes_bad(signer: Signer, path: Path) -> None:
    writer = Blacklist.open(path, auto_refresh_s=None)
    writer.apply(signer.snapshot(1, [7]), signer.public, now=NOW)
    reader = Blacklist.open(path, auto_refresh_s=0.0)
    assert reader.contains_asn(7)
    writer.apply(signer.delta(1, 2, add=[8]), signer.public, now=NOW)
    assert reader.contains_asn(8) and reader.version == 2  # picked up on the next lookup
    path.write_bytes(path.read_bytes()[:-1])
    assert reader.contains_asn(8)  # the bad file is logged and ignored


def test_full_disk_leaves_the_old_list(
    signer: Signer, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed = Blacklist.open(path)
    listed.apply(signer.snapshot(1, [1, 2]), signer.public, now=NOW)
    before = path.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(BlacklistFileError, match="No space left"):
        listed.apply(signer.delta(1, 2, add=[3]), signer.public, now=NOW)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert listed.version == 1 and not listed.contains_asn(3)
    assert not list(path.parent.glob("*.tmp-*"))
    listed.apply(signer.delta(1, 2, add=[3]), signer.public, now=NOW)
    assert listed.contains_asn(3)


def test_million_entries_fit_and_answer_fast(signer: Signer, path: Path) -> None:
    rng = random.Random(1)
    entries = sorted({rng.randrange(1 << 64) for _ in range(1_000_000)})
    listed = Blacklist.open(path, auto_refresh_s=None)
    listed.apply(signer.snapshot(1, entries), signer.public, now=time.time())
    assert len(listed) == len(entries)
    assert listed.memory_bytes() < 6.4 * len(entries) + 300_000  # 6 bytes per entry
    probes = [entries[i] for i in range(0, len(entries), 997)]
    assert all(listed.contains_asn(a) for a in probes)  # lookup speed: bench/, not a test bound


# --- version bound to content, freeze (issue 9) ------------------------------------------------


def test_same_version_with_other_content_is_refused_at_any_age(signer: Signer, path: Path) -> None:
    """A version names one list: the same version with other entries is refused (logged as an
    attack) even once the loaded list is past half its life; the same content re-issued
    extends the expiry."""
    listed = Blacklist.open(path)
    listed.apply(signer.snapshot(5, [10, 20]), signer.public, now=NOW)
    late = NOW + 3000  # past half of the loaded list's life
    for forged in (
        signer.snapshot(5, [10], issued=late),
        signer.snapshot(5, [10, 20, 30], issued=late),
    ):
        with capture_logs() as logs, pytest.raises(BlacklistRejected, match="other content"):
            listed.apply(forged, signer.public, now=late)
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["blacklist_conflict"]
    assert listed.contains_asn(20) and not listed.contains_asn(30)
    signer.lists[5] = {10, 20}
    renewed = listed.apply(signer.snapshot(5, [10, 20], issued=late), signer.public, now=late)
    assert renewed.kind == "snapshot" and listed.expires_at == late + 3600
    assert listed.checked_at == late and listed.health()["blacklist_checked_at"] == late


def test_delta_that_does_not_give_the_signed_content_needs_a_snapshot(
    signer: Signer, path: Path
) -> None:
    """A delta's result must be the list its digest names; otherwise nothing changes and the
    terminal asks for a snapshot (its list at the base version is not the host's)."""
    listed = Blacklist.open(path)
    listed.apply(signer.snapshot(1, [1, 2]), signer.public, now=NOW)
    signer.lists[2] = {1, 2, 3, 99}  # the host's version 2 has a card the delta does not add
    with pytest.raises(BlacklistBaseMismatch, match="signed content"):
        listed.apply(signer.delta(1, 2, add=[3]), signer.public, now=NOW)
    assert listed.version == 1 and not listed.contains_asn(3)


def test_lookups_at_every_position_of_a_crowded_bucket(signer: Signer, path: Path) -> None:
    """A lookup narrows a bucket by binary search, then searches a short run with bytes.find
    at entry boundaries: every value around every listed one answers as a set does (issuers
    crowd one bucket: the top 16 bits of real ASNs are the issuer's)."""
    base = 0x5170_0701_0000_0000
    listed_values = {base + 3 * k for k in range(1000)} | {base + 0x0001_0000_0000 + 7}
    # entries whose bytes contain the key off an entry boundary must not match
    listed_values |= {0x5170_0000_0000_0102, 0x5170_0304_0506_0000}
    listed = Blacklist.open(path)
    listed.apply(signer.snapshot(1, sorted(listed_values)), signer.public, now=NOW)
    for probe in range(base - 5, base + 3 * 1000 + 5):
        assert listed.contains_asn(probe) == (probe in listed_values), hex(probe)
    assert not listed.contains_asn(0x5170_0001_0203_0405)
    assert not listed.contains_asn(0x5170_0002_0304_0506)
