"""M1 purse debit through the real PC/SC stack (issue #3 reader seam, issue #4 stack).

pyscard → pcscd → vpcd: slot 0 holds an ACS-style contactless reader model with an M1 card in
its field (it answers the PC/SC Part 3 / ACS pseudo-APDUs FF 82, FF 86, FF B0, FF D6, FF D7),
slot 1 the PSAM that derives the sector keys (80 FC) and the record TAC (80 1A / 80 FA).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.products.m1_layout import M1Layout
from agent.readers.base import CardTechnology
from agent.readers.pcsc import PcscCardReader, PcscSamSlot
from agent.sam.psam import PsamConfig, PsamDriver
from agent.transaction import TransactionEngine
from agent.wiring import DataDir
from tests.fake_reader.m1_card import M1Card
from tests.fake_reader.m1_readers import AcsReaderModel, M1Field
from tests.fake_reader.scenario import (
    demo_keyset,
    demo_profile,
    m1_layout,
    make_m1_card,
    make_psam,
)
from tests.fake_reader.vpcd_card import PsamIcc
from tests.m1_rig import m1_engine
from tests.stacks import CARD_READER, SAM_READER, PcscStack

# PC/SC Part 3 ATR of a MIFARE Classic 1K, as pcscd shows it (m1-purse-and-readers.md §4a.1).
CLASSIC_1K_ATR = bytes.fromhex("3B8F8001804F0CA000000306030001000000006A")


class StorageCardIcc:
    """What vpcd sees: a contactless reader (ACS firmware) with an M1 card in its field."""

    def __init__(self, card: M1Card) -> None:
        self.field = M1Field()
        self.field.insert(card)
        self.reader = AcsReaderModel(self.field)

    def atr(self) -> bytes:
        return CLASSIC_1K_ATR

    def power_on(self) -> None:
        card = self.field.card
        if card is not None:
            card.power_on()

    def process(self, apdu: bytes) -> bytes:
        return self.reader.process(apdu)


def _tck_ok(atr: bytes) -> bool:
    tck = 0
    for byte in atr[1:]:
        tck ^= byte
    return tck == 0


@dataclasses.dataclass
class M1World:
    stack: PcscStack
    reader: PcscCardReader
    engine: TransactionEngine
    store: Any
    sam: PsamDriver

    def tap(self, card: M1Card) -> Any:
        self.stack.slot(0).insert(StorageCardIcc(card))
        try:
            presence = self.reader.wait_for_card(5.0)
            assert presence is not None
            assert presence.technology is CardTechnology.MIFARE_CLASSIC
            return self.engine.process_tap(self.reader, presence)
        finally:
            self.stack.slot(0).remove()
            self.stack.wait_card(CARD_READER, present=False)
            self.engine.presence.left()


@pytest.fixture
def world(pcsc: PcscStack, tmp_path: Path) -> Iterator[M1World]:
    assert _tck_ok(CLASSIC_1K_ATR)
    pcsc.slot(1).insert(PsamIcc(make_psam(demo_keyset())))
    pcsc.wait_card(SAM_READER, present=True)
    data = DataDir(tmp_path / "data")
    data.provision("M1-PCSC")
    store = data.open_store()
    profile = dataclasses.replace(demo_profile(), double_tap_window_s=0.0)
    sam = PsamDriver(PcscSamSlot(SAM_READER, timeout=2.0), PsamConfig.for_application("tunion"))
    reader = PcscCardReader(CARD_READER, timeout=2.0)
    try:
        sam.open()
        yield M1World(pcsc, reader, TransactionEngine(profile, store, sam), store, sam)
    finally:
        reader.close()
        sam.close()
        store.close()


def test_m1_debit_through_pcscd(world: M1World) -> None:
    """An M1 card is debited through pyscard + pcscd + vpcd into a signed record."""
    card = make_m1_card(301, balance=1000)
    outcome = world.tap(card)
    assert outcome.status == "paid", outcome
    assert outcome.balance_after == 800
    records = list(world.store.records())
    assert [r.kind for r in records] == ["purchase"]
    assert records[0].fields["product"] == "m1"
    assert records[0].amount == 200
    assert world.store.verify().ok
    again = world.tap(card)
    assert again.status == "paid", again
    assert again.balance_after == 600


def test_record_sectors_with_keys_of_their_own_through_pcscd(world: M1World) -> None:
    """The independent card's layout: record sectors 3, 4, 5 each under its own key id. Six
    taps of one card write records into all three sectors, every key from the PSAM's 80 FC."""
    raw = dict(demo_profile().m1_purse)
    raw["keys"] = {
        **raw["keys"],
        "sector_ids": {"purse": 0x02, "public": 0x06, "3": 0x03, "4": 0x04, "5": 0x05},
    }
    layout = M1Layout.from_mapping(raw)
    world.engine = m1_engine(world.engine.profile, world.store, world.sam, layout)
    card = make_m1_card(311, layout, balance=5000, pointer=2)  # slots 3..8: sectors 3, 4, 5
    assert len({card.keys_of(sector)[0] for sector in (3, 4, 5)}) == 3
    for n in range(1, 7):
        outcome = world.tap(card)
        assert outcome.status == "paid", (n, outcome.reason)
        assert outcome.balance_after == 5000 - 200 * n
    assert len([r for r in world.store.records() if r.kind == "purchase"]) == 6


def test_expired_card_is_refused_through_pcscd(world: M1World) -> None:
    """The issuance sector's expiry date is read and checked: an expired card is refused and
    nothing is written to it."""
    layout = m1_layout(world.engine.profile)
    card = make_m1_card(
        312, layout, balance=1000, expiry_date=dt.date.today() - dt.timedelta(days=1)
    )
    before = [card.get_block(i) for i in range(card.blocks)]
    outcome = world.tap(card)
    assert outcome.status == "refused" and outcome.reason.startswith("expired"), outcome
    assert [card.get_block(i) for i in range(card.blocks)] == before
    assert list(world.store.records()) == []
