"""Blacklist lock of M1 cards (issue #5): the public-info blacklist flag (m1-purse-and-readers.md
§3.1 byte 6, 0x04; 0xFB in an inverted backup) set in both copies, a ``lock`` record, the tap
refused, and every tear of the flag write (§1.5, three modes) ending either with no flag and no
record or with the flag and exactly one record — never a purse change, never a lost debit.

Real SQLite stores (:class:`tests.m1_rig.M1Rig`), the M1 card model, a real signed
:class:`agent.blacklist.Blacklist` file.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.blacklist import (
    KIND_DELTA,
    KIND_SNAPSHOT,
    Blacklist,
    asn_of,
    encode_list,
    list_digest,
    uid_key,
)
from agent.errors import CardProtocolError
from agent.products import m1_lock
from agent.products.m1_codec import PublicInfo, decode_backup, decode_public_info
from agent.products.m1_layout import M1Layout
from agent.products.m1_purse import PurseState, Recovery, WritePublic, classify, encode_public
from agent.transaction import TransactionEngine
from tests.fake_reader.m1_card import TEAR_MODES, M1Card
from tests.fake_reader.scenario import m1_layout, m1_purse_of, make_m1_card
from tests.m1_rig import M1Rig, card_classification, card_state, m1_engine

OLD = 1000
FARE = 200  # the demo profile's flat fare
LOCK_WRITES = 2  # pubP, pubB
DEBIT_WRITES = 6

LAYOUTS: dict[str, dict[str, Any]] = {
    "cardop": {},  # backup a plain copy, XOR check
    "gdmh": {  # backup inverted (byte 6 reads 0xFB), CRC16 seeded, other flag values
        "public_backup_encoding": "inverted",
        "check": "crc16",
        "check_seed": "CS-METRO-2013@GDMH",
        "flag_in_progress": 0x11,
        "flag_done": 0x13,
        "flag_done_aliases": [0x14],
        "record_layout": "afc",
    },
}
_LAYOUT_CACHE = {name: m1_layout(**overrides) for name, overrides in LAYOUTS.items()}
_numbers = itertools.count(5000)


class HostList:
    """The host's signing key (TEST KEY) and the terminal's blacklist file it feeds."""

    def __init__(self, directory: Path) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.list = Blacklist.open(directory / "blacklist.bin", auto_refresh_s=None)
        self.version = 0
        self.listed: set[int] = set()

    def _apply(self, kind: int, add: list[int], remove: list[int]) -> None:
        now = int(time.time())
        self.version += 1
        if kind == KIND_SNAPSHOT:
            self.listed = set()
        self.listed = (self.listed - set(remove)) | set(add)
        document = encode_list(
            kind=kind,
            version=self.version,
            base_version=0 if kind == KIND_SNAPSHOT else self.version - 1,
            issued_at=now,
            expires_at=now + 3600,
            add=sorted(add),
            remove=sorted(remove),
            content_digest=list_digest(self.listed),
            sign=self.key.sign,
            public_key_raw=self.public,
        )
        self.list.apply(document, self.public, now=now)

    def publish(self, *cards: M1Card) -> None:
        self._apply(KIND_SNAPSHOT, [uid_key(c.uid) for c in cards], [])

    def delist(self, *cards: M1Card) -> None:
        self._apply(KIND_DELTA, [], [uid_key(c.uid) for c in cards])


class LockRig(M1Rig):
    """:class:`M1Rig` whose handler (also after ``kill9``) looks cards up in ``host.list``."""

    def __init__(self, layout: M1Layout | None = None, **kwargs: Any) -> None:
        self.host: HostList | None = None
        super().__init__(layout, **kwargs)
        self.host = HostList(self.dir)
        self.handler = self._handler()

    def _handler(self) -> TransactionEngine:
        return m1_engine(
            self.profile,
            self.store,
            self.sam,
            self.layout,
            clock=self.clock,
            blacklist=None if self.host is None else self.host.list,
        )


def _rig(layout_name: str = "cardop") -> tuple[LockRig, HostList]:
    rig = LockRig(_LAYOUT_CACHE[layout_name])
    assert rig.host is not None
    return rig, rig.host


def _flags(card: M1Card, layout: M1Layout) -> tuple[int | None, int | None]:
    state = card_state(card, layout)
    return (
        None if state.pub_p is None else state.pub_p.blacklist,
        None if state.pub_b is None else state.pub_b.blacklist,
    )


def _locked(card: M1Card, layout: M1Layout) -> bool:
    return _flags(card, layout) == (layout.blacklist_value, layout.blacklist_value)


def _purse_blocks(card: M1Card, layout: M1Layout) -> list[bytes]:
    return [card.get_block(b) for b in layout.purse_blocks]


def _assert_chain(rig: M1Rig) -> None:
    report = rig.store.verify()
    assert report.ok, report.problems


# --- the lock --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("uid_length", [4, 7])
def test_blacklisted_card_is_flagged_recorded_and_refused(layout_name: str, uid_length: int):
    rig, host = _rig(layout_name)
    layout = rig.layout
    card = make_m1_card(next(_numbers), layout, balance=OLD, uid_length=uid_length)
    host.publish(card)
    assert host.list.contains(card.uid.hex().upper())  # the M1 card id is the UID hex
    purse_before = _purse_blocks(card, layout)
    counter_before = card_state(card, layout).pub_p.counter  # type: ignore[union-attr]
    card.op_log.clear()

    outcome = rig.tap(card)

    assert outcome.status == "refused"
    assert outcome.reason.startswith("blacklisted"), outcome.reason
    # Both copies carry the flag; the backup in the layout's own encoding (§3.1).
    assert _locked(card, layout)
    pp_blk, pb_blk = layout.public_blocks
    raw_backup_flag = card.get_block(pb_blk)[6]
    inverted = layout.public_backup_encoding == "inverted"
    assert raw_backup_flag == (0xFB if inverted else 0x04)
    assert card.get_block(pp_blk)[6] == 0x04
    # The purse is untouched: not a byte of either value block, no value operation at all.
    assert _purse_blocks(card, layout) == purse_before
    writes = [op for op in card.op_log if op.split()[0] in ("write", "transfer")]
    assert writes == [f"write {pp_blk}", f"write {pb_blk}"]
    assert not [op for op in card.op_log if op.split()[0] in ("increment", "decrement")]
    state = card_state(card, layout)
    assert state.pub_p is not None and state.pub_p.counter == counter_before
    assert card_classification(card, layout).kind is Recovery.NORMAL
    # One lock record, chained and signed.
    (record,) = rig.records()
    assert outcome.record_seq == record.seq
    assert (record.kind, record.amount, record.card_id) == ("lock", 0, card.uid.hex().upper())
    assert record.fields["product"] == "m1"
    assert record.fields["uid"] == card.uid.hex().upper()
    assert record.fields["reason"] == "blacklisted"
    assert record.fields["blacklist_flag"] == layout.blacklist_value
    assert record.fields["public_backup_encoding"] == layout.public_backup_encoding
    assert record.fields["profile"] == rig.profile.name
    assert record.fields["balance"] == OLD
    assert record.fields["recovered"] is False
    assert rig.pending() == 0
    _assert_chain(rig)

    # The next tap is refused by the card's own flag: no new record, no write.
    card.op_log.clear()
    again = rig.tap(card)
    assert again.status == "refused" and again.reason.startswith("blacklisted")
    assert len(rig.records()) == 1
    assert not [op for op in card.op_log if op.split()[0] in ("write", "transfer")]
    # Also once the host has taken it off the list, and after a restart.
    host.delist(card)
    rig.kill9()
    third = rig.tap(card)
    assert third.status == "refused" and third.reason.startswith("blacklisted")
    assert len(rig.records()) == 1
    assert m1_purse_of(card, layout) == (OLD, OLD)
    _assert_chain(rig)


def test_card_not_on_the_list_pays_as_usual():
    rig, host = _rig()
    listed = make_m1_card(next(_numbers), rig.layout, balance=OLD)
    other = make_m1_card(next(_numbers), rig.layout, balance=OLD)
    host.publish(listed)
    outcome = rig.tap(other)
    assert outcome.status == "paid", outcome.reason
    assert _flags(other, rig.layout) == (0, 0)
    assert [r.kind for r in rig.records()] == ["purchase"]
    assert m1_purse_of(other, rig.layout) == (OLD - FARE, OLD - FARE)


def test_card_already_flagged_is_refused_without_a_new_record():
    rig, host = _rig()
    card = make_m1_card(next(_numbers), rig.layout, balance=OLD, blacklisted=True)
    host.publish(card)
    card.op_log.clear()
    outcome = rig.tap(card)
    assert outcome.status == "refused" and outcome.reason.startswith("blacklisted")
    assert not rig.records()
    assert rig.pending() == 0
    assert not [op for op in card.op_log if op.split()[0] in ("write", "transfer")]


def test_without_a_blacklist_the_handler_is_unchanged():
    rig = M1Rig()  # the plain rig: no blacklist argument
    card = make_m1_card(next(_numbers), rig.layout, balance=OLD)
    assert rig.handler.blacklist is None
    assert rig.tap(card).status == "paid"


def test_uid_key_is_the_lookup_key_of_the_uid_hex():
    for uid in (bytes.fromhex("C1001388"), bytes.fromhex("04000000001388")):
        assert uid_key(uid) == asn_of(uid.hex().upper()) == int(uid.hex(), 16)
    with pytest.raises(ValueError, match="UID"):
        uid_key(b"\x01\x02")


# --- tearing the flag write ------------------------------------------------------------------


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("mode", TEAR_MODES)
@pytest.mark.parametrize("write", range(1, LOCK_WRITES + 1))
@pytest.mark.parametrize("represent", ["at_once", "after_kill9"])
def test_torn_flag_write(layout_name: str, mode: str, write: int, represent: str):
    rig, host = _rig(layout_name)
    layout = rig.layout
    card = make_m1_card(next(_numbers), layout, balance=OLD)
    host.publish(card)
    purse_before = _purse_blocks(card, layout)
    card.arm_tear(write, mode)  # type: ignore[arg-type]

    torn = rig.tap(card)

    assert torn.status == "torn", torn.reason
    assert not rig.records()  # no record before the flag is proven
    assert rig.pending(card) == 1  # the lock intent
    assert _purse_blocks(card, layout) == purse_before
    # Whatever the tear left, the rule table recovers it without touching the purse.
    found = card_classification(card, layout)
    assert found.kind is not Recovery.BROKEN, found.reason
    assert found.balance == OLD
    assert not [a for a in found.actions if not isinstance(a, WritePublic)]

    if represent == "after_kill9":
        rig.kill9()
    card.op_log.clear()
    again = rig.tap(card)

    assert again.status == "refused" and again.reason.startswith("blacklisted"), again.reason
    assert _locked(card, layout)
    assert card_classification(card, layout).kind is Recovery.NORMAL
    (record,) = rig.records()
    assert record.kind == "lock" and record.amount == 0
    assert again.record_seq == record.seq
    assert rig.pending() == 0
    assert m1_purse_of(card, layout) == (OLD, OLD)
    assert _purse_blocks(card, layout) == purse_before
    assert not [op for op in card.op_log if op.split()[0] in ("increment", "decrement")]
    _assert_chain(rig)
    # Whether the first write landed decides who completed the lock: this tap's repair (the
    # flag reached pubP) or a fresh lock (it did not).
    landed = write == 2 or mode == "lost"
    assert record.fields["recovered"] is landed
    # A third tap: refused by the flag, still one record.
    third = rig.tap(card)
    assert third.status == "refused" and third.reason.startswith("blacklisted")
    assert len(rig.records()) == 1


@pytest.mark.parametrize("mode", TEAR_MODES)
@pytest.mark.parametrize("write", range(1, LOCK_WRITES + 1))
def test_torn_flag_write_then_delisted(mode: str, write: int):
    """The host takes the card off the list before it returns: either the lock had not landed
    (no flag, no record, the card pays) or it had (the flag and exactly one record)."""
    rig, host = _rig()
    card = make_m1_card(next(_numbers), rig.layout, balance=OLD)
    host.publish(card)
    card.arm_tear(write, mode)  # type: ignore[arg-type]
    assert rig.tap(card).status == "torn"
    host.delist(card)
    again = rig.tap(card)
    assert rig.pending() == 0
    if again.status == "paid":
        assert _flags(card, rig.layout) == (0, 0)
        assert [r.kind for r in rig.records()] == ["purchase"]
        assert m1_purse_of(card, rig.layout) == (OLD - FARE, OLD - FARE)
        assert (write, mode) in ((1, "nothing"), (1, "garbage"))
    else:
        assert again.status == "refused" and again.reason.startswith("blacklisted")
        assert _locked(card, rig.layout)
        assert [r.kind for r in rig.records()] == ["lock"]
        assert m1_purse_of(card, rig.layout) == (OLD, OLD)
    _assert_chain(rig)


@pytest.mark.parametrize("mode", TEAR_MODES)
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_tear_inside_the_flag_repair(mode: str, layout_name: str):
    """The lock tears after pubP (pubB still old); the next tap tears inside its repair
    (pubB := pubP); the tap after that still ends with the flag and exactly one record."""
    rig, host = _rig(layout_name)
    card = make_m1_card(next(_numbers), rig.layout, balance=OLD)
    host.publish(card)
    card.arm_tear(2, "nothing")
    assert rig.tap(card).status == "torn"
    assert card_classification(card, rig.layout).kind is Recovery.FLAG
    card.arm_tear(1, mode)  # type: ignore[arg-type]
    second = rig.tap(card)
    card.disarm()
    assert second.status == "failed", second.reason  # torn in the repair, before any intent
    assert not rig.records() and rig.pending() == 1
    assert card_classification(card, rig.layout).kind is not Recovery.BROKEN
    final = rig.tap(card)
    assert final.status == "refused" and final.reason.startswith("blacklisted")
    assert _locked(card, rig.layout)
    assert [r.kind for r in rig.records()] == ["lock"]
    assert rig.pending() == 0
    assert m1_purse_of(card, rig.layout) == (OLD, OLD)


# --- a pending debit is settled before the lock ----------------------------------------------


@pytest.mark.parametrize("mode", TEAR_MODES)
@pytest.mark.parametrize("write", range(1, DEBIT_WRITES + 1))
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_pending_debit_is_resolved_before_the_lock(layout_name: str, mode: str, write: int):
    rig, host = _rig(layout_name)
    layout = rig.layout
    card = make_m1_card(next(_numbers), layout, balance=OLD)
    card.arm_tear(write, mode)  # type: ignore[arg-type]
    assert rig.tap(card).status == "torn"  # a debit torn before the card was listed
    assert rig.pending(card) == 1
    host.publish(card)

    second = rig.tap(card)
    assert not rig.records("unresolved")
    purchases = rig.records("purchase", card)
    if second.status == "recovered":
        # The debit had landed: it is recorded at once (as the CPU engine does, a recovered
        # debit ends the tap); the lock follows on the next tap.
        assert len(purchases) == 1 and not rig.records("lock")
        second = rig.tap(card)
    assert second.status == "refused" and second.reason.startswith("blacklisted"), second.reason
    purchases = rig.records("purchase", card)
    assert [r.kind for r in rig.records("lock")] == ["lock"]
    assert rig.pending() == 0
    balance = OLD - FARE * len(purchases)
    assert m1_purse_of(card, layout) == (balance, balance)  # no double, no lost debit
    assert _locked(card, layout)
    assert card_classification(card, layout).kind is Recovery.NORMAL
    lock = rig.records("lock")[0]
    assert lock.fields["balance"] == balance
    _assert_chain(rig)


# --- the rule table and the step -------------------------------------------------------------

L = m1_layout()
PUB = PublicInfo(pointer=4, counter=7, flag=0x02)
FLAGGED = PUB.with_(blacklist=0x04)


@pytest.mark.parametrize(
    ("state", "kind"),
    [
        (PurseState(1000, 1000, FLAGGED, PUB), Recovery.FLAG),  # pubP lost / pubB nothing
        (PurseState(1000, 1000, PUB, FLAGGED), Recovery.FLAG),  # an unlock torn the same way
        (PurseState(1000, 1000, FLAGGED, None), Recovery.PUB_B),  # pubB garbage
        (PurseState(1000, 1000, None, PUB), Recovery.A),  # pubP garbage
        (PurseState(1000, 1000, FLAGGED, FLAGGED), Recovery.NORMAL),
        # Not a flag tear: purses differ, or other bytes differ too, or a debit in progress.
        (PurseState(800, 1000, FLAGGED, PUB), Recovery.BROKEN),
        (PurseState(1000, 1000, FLAGGED.with_(counter=8), PUB), Recovery.BROKEN),
        (PurseState(1000, 1000, FLAGGED.with_(flag=0x01), PUB), Recovery.A),
    ],
)
def test_flag_rule(state: PurseState, kind: Recovery):
    result = classify(state, L)
    assert result.kind is kind, result.reason
    if kind is Recovery.FLAG:
        assert result.balance == 1000 and result.public == state.pub_p
        assert result.actions == (WritePublic(True, state.pub_p),)  # type: ignore[arg-type]
        assert not result.rolled_forward  # no debit to roll


def test_plan_lock_needs_a_consistent_card():
    plan = m1_lock.plan_lock(L, PurseState(1000, 1000, PUB, PUB))
    assert plan.public_after == FLAGGED and plan.flag == 0x04 and plan.balance == 1000
    for state in (
        PurseState(800, 1000, PUB, PUB),
        PurseState(1000, 1000, None, PUB),
        PurseState(1000, 1000, PUB, PUB.with_(counter=6)),
        PurseState(1000, 1000, PUB.with_(flag=0x01), PUB.with_(flag=0x01)),
    ):
        with pytest.raises(CardProtocolError, match="lock needs"):
            m1_lock.plan_lock(L, state)


def test_inverted_backup_holds_fb_and_decodes_to_the_flag():
    layout = _LAYOUT_CACHE["gdmh"]
    raw = encode_public(layout, FLAGGED.with_(flag=0x13), backup=True)
    assert raw[6] == 0xFB
    decoded = decode_public_info(
        decode_backup(raw, layout.public_backup_encoding), layout.check, layout.check_seed
    )
    assert m1_lock.is_flagged(layout, decoded)
