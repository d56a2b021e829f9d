"""Issue 8, items 3 and 4, through the tap engine: an M1 card whose record sectors 3, 4, 5 have
keys of their own (the independent card stopped working at its 4th tap), and an expired M1 card
(it was accepted: the issuance sector's dates were never read)."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import pytest

from agent.products.m1_codec import decode_record, xor8
from agent.products.m1_layout import M1Layout
from tests.fake_reader.m1_card import M1Card
from tests.fake_reader.scenario import demo_profile, m1_purse_of, make_m1_card
from tests.m1_rig import START, M1Rig

FARE = 200  # the demo profile's flat fare
_numbers = itertools.count(7001)

# Record sectors 3, 4, 5 each with a key id of its own (the purse and public info by role).
PER_SECTOR = {"sector_ids": {"purse": 0x02, "public": 0x06, "3": 0x03, "4": 0x04, "5": 0x05}}
# Role ids, but the sector number is the derivation input: again one key per sector.
BY_SECTOR_NUMBER = {"sector_input": "sector"}


def _layout(keys: dict[str, Any] | None = None, **top: Any) -> M1Layout:
    raw = dict(demo_profile().m1_purse)
    raw["keys"] = {**raw.get("keys", {}), **(keys or {})}
    raw.update(top)
    return M1Layout.from_mapping(raw)


def _memory(card: M1Card) -> list[bytes]:
    return [card.get_block(i) for i in range(card.blocks)]


# --- item 3: a key per sector --------------------------------------------------------------------


@pytest.mark.parametrize("keys", [PER_SECTOR, BY_SECTOR_NUMBER], ids=["sector_ids", "sector_no"])
def test_six_taps_of_one_card_with_distinct_keys_for_record_sectors_3_4_5(keys):
    layout = _layout(keys)
    rig = M1Rig(layout)
    # Pointer 2: the six taps write record slots 3..8, i.e. sectors 3, 4, 4, 4, 5, 5.
    card = make_m1_card(next(_numbers), layout, balance=5000, pointer=2)
    assert len({card.keys_of(sector)[0] for sector in (3, 4, 5)}) == 3
    for n in range(1, 7):
        outcome = rig.tap(card)
        assert outcome.status == "paid", (n, outcome.reason)
        assert outcome.balance_after == 5000 - FARE * n
    assert m1_purse_of(card, layout) == (5000 - 6 * FARE,) * 2
    for n, slot in enumerate(range(3, 9)):
        _, block = layout.record_block(slot)
        record = decode_record(card.get_block(block), layout.record_layout, "little")
        assert (record.balance_before, record.amount) == (5000 - FARE * n, FARE)
    assert len(rig.records("purchase")) == 6 and rig.pending() == 0


def test_an_agent_with_one_records_key_fails_the_4th_tap_before_any_write():
    """The field failure, reproduced: the card has keys per record sector, the agent's layout
    one key for all record sectors. Taps 1..3 write sector 3; the 4th needs sector 4's key and
    fails at the pre-check, before the intent and before any write."""
    card_layout = _layout(PER_SECTOR)
    rig = M1Rig(_layout())
    card = make_m1_card(next(_numbers), card_layout, balance=5000)
    for _ in range(3):
        assert rig.tap(card).status == "paid"
    before = _memory(card)
    fourth = rig.tap(card)
    assert fourth.status == "failed" and "authenticat" in fourth.reason
    assert _memory(card) == before and rig.pending() == 0
    assert len(rig.records("purchase")) == 3


@pytest.mark.parametrize("mode", ["nothing", "garbage", "lost"])
def test_tear_in_a_record_sector_with_its_own_key_recovers(mode):
    layout = _layout(PER_SECTOR)
    rig = M1Rig(layout)
    card = make_m1_card(next(_numbers), layout, balance=1000, pointer=3)  # next slot 4: sector 4
    card.arm_tear(3, mode)  # the debit's 3rd EEPROM write: the record (public A, TRANSFER B, C)
    assert rig.tap(card).status == "torn"
    again = rig.tap(card)
    assert again.status == "recovered", again.reason
    assert m1_purse_of(card, layout) == (800, 800)
    assert rig.tap(card).status == "paid"  # slot 5, sector 4 again
    assert m1_purse_of(card, layout) == (600, 600)
    assert len(rig.records("purchase")) == 2 and rig.pending() == 0


# --- item 4: the issuance sector's dates ----------------------------------------------------------

TODAY = START.date()  # the rig's clock moves seconds per tap, not days


def test_expired_card_is_refused_without_touching_it():
    rig = M1Rig()
    card = make_m1_card(
        next(_numbers), rig.layout, balance=1000, expiry_date=TODAY - dt.timedelta(days=1)
    )
    before = _memory(card)
    outcome = rig.tap(card)
    assert outcome.status == "refused", outcome.reason
    assert outcome.reason.startswith("expired")
    assert _memory(card) == before
    assert not rig.records() and rig.pending() == 0
    assert rig.reader.feedback_log[-1][0] is False


def test_card_on_its_last_valid_day_pays():
    rig = M1Rig()
    card = make_m1_card(next(_numbers), rig.layout, balance=1000, expiry_date=TODAY)
    outcome = rig.tap(card)
    assert outcome.status == "paid", outcome.reason
    assert m1_purse_of(card, rig.layout) == (800, 800)


def test_card_not_yet_valid_is_refused():
    rig = M1Rig()
    card = make_m1_card(next(_numbers), rig.layout, issue_date=TODAY + dt.timedelta(days=1))
    outcome = rig.tap(card)
    assert outcome.status == "refused" and outcome.reason.startswith("not_yet_valid")


def test_impossible_dates_on_the_card_are_a_clear_refusal():
    rig = M1Rig()
    card = make_m1_card(next(_numbers), rig.layout)
    block = bytes.fromhex("2020010120231340") + bytes(7)  # month 13
    assert rig.layout.validity_block is not None
    card.set_block(rig.layout.validity_block, block + bytes((xor8(block),)))
    before = _memory(card)
    outcome = rig.tap(card)
    assert outcome.status == "refused" and outcome.reason.startswith("card_damaged")
    assert _memory(card) == before and rig.pending() == 0
