"""Building blocks shared by the demo, the tests and the benchmarks: the demo profile's test
keys, a simulated PSAM, numbered cards of each family, and a tear-on-DEBIT wrapper."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent.crypto import Algorithm
from agent.products.m1_codec import (
    AccessConditions,
    Issuance,
    IssuanceDates,
    PublicInfo,
    encode_dates_block,
    encode_issuance,
    encode_value_block,
)
from agent.products.m1_layout import M1Layout, block_number
from agent.products.m1_purse import encode_public, issuance_key
from agent.profile import Profile, load_profile
from agent.sam.keys import KeySet
from agent.sam.m1_keys import M1KeyProvider, key_provider_for
from agent.sam.software import SamCore, SoftwareSam
from tests.fake_reader.cpu_card import (
    SimulatedCpuCard,
    make_cjt166_card,
    make_legacy_1001_card,
    make_tunion_card,
)
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.m1_card import CardSize, M1Card, TearMode
from tests.fake_reader.psam import SimulatedPsam

REPO = Path(__file__).resolve().parents[2]
DEMO_PROFILE = REPO / "firmware_profiles" / "test-city-demo.toml"
TERMINAL_NUMBER = bytes.fromhex("000000000024")
PSAM_SERIAL = bytes.fromhex("23010101000000212241")
TEST_M1_MASTER = bytes.fromhex("707172737475767778797A7B7C7D7E7F")  # TEST KEY: M1 80 FC master

Family = Literal["tunion", "cjt166", "legacy1001"]


def demo_profile() -> Profile:
    return load_profile(DEMO_PROFILE)


def demo_keyset(profile: Profile | None = None) -> KeySet:
    return KeySet.from_mapping((profile or demo_profile()).test_keys)


def make_psam(keyset: KeySet, *, ttc: int = 0, m1_master: bytes | None = None) -> SimulatedPsam:
    """A simulated PSAM; it also derives M1 sector keys (80 FC) from ``m1_master``
    (default: the test master :data:`TEST_M1_MASTER`)."""
    master = TEST_M1_MASTER if m1_master is None else m1_master
    return SimulatedPsam(SamCore(keyset, TERMINAL_NUMBER, PSAM_SERIAL, ttc=ttc, m1_master=master))


def make_card(
    family: Family,
    number: int,
    keyset: KeySet,
    *,
    balance: int = 5000,
    algorithm: Algorithm = Algorithm.TDES,
    **options: object,
) -> SimulatedCpuCard:
    """Card ``number`` of ``family``: distinct ASN and UID per number."""
    asn = bytes.fromhex(f"51700701{number:08d}")
    if family == "tunion":
        return make_tunion_card(
            keyset=keyset,
            asn=asn,
            balance=balance,
            algorithm=algorithm,
            **options,  # type: ignore[arg-type]
        )
    if family == "cjt166":
        return make_cjt166_card(
            keyset=keyset,
            asn=asn,
            balance=balance,
            algorithm=algorithm,
            **options,  # type: ignore[arg-type]
        )
    issuer = bytes.fromhex("1000000000000000")
    return make_legacy_1001_card(
        keyset=keyset,
        asn=asn,
        balance=balance,
        algorithm=algorithm,
        issuer_id=issuer,
        factors=(asn, issuer),
        **options,  # type: ignore[arg-type]
    )


@dataclass
class TearOnDebit:
    """Wraps a card: the next DEBIT FOR PURCHASE (INS 54) is torn before or after its commit."""

    card: SimulatedCpuCard
    mode: Literal["tear_before", "tear_after"]
    armed: bool = True

    @property
    def uid(self) -> bytes:
        return self.card.uid

    @property
    def ats(self) -> bytes:
        return self.card.ats

    def power_on(self) -> None:
        self.card.power_on()

    def process(self, apdu: bytes) -> bytes:
        if self.armed and len(apdu) > 1 and apdu[1] == 0x54:
            self.armed = False
            if self.mode == "tear_before":
                raise CardTorn("card left before DEBIT")
            self.card.process(apdu)
            raise CardTorn("card left after DEBIT, answer lost")
        return self.card.process(apdu)


# --- M1 (MIFARE Classic) purse cards -----------------------------------------------------------

M1_ISSUANCE_ACCESS = AccessConditions((0b100, 0b100, 0b100, 0b011))  # read A|B, write B
M1_PURSE_ACCESS = AccessConditions((0b110, 0b110, 0b110, 0b011))  # 08 77 8F: A debits, B loads
M1_DATA_ACCESS = AccessConditions((0b000, 0b000, 0b000, 0b011))  # 7F 07 88 (CARDOP records)
M1_KEY_B = bytes.fromhex("B0B1B2B3B4B5")  # TEST KEY: key B of every personalised sector
M1_CITY = bytes.fromhex("1000")
M1_ISSUED = dt.date(2020, 1, 1)
M1_EXPIRES = dt.date(2099, 12, 31)


def m1_layout(profile: Profile | None = None, **overrides: Any) -> M1Layout:
    """The demo profile's M1 layout, with top-level fields overridden by keyword."""
    raw = dict((profile or demo_profile()).m1_purse)
    raw.update(overrides)
    return M1Layout.from_mapping(raw)


def m1_software_sam(keyset: KeySet | None = None, *, m1_master: bytes | None = None) -> SoftwareSam:
    """A software SAM holding the test keys and the M1 test master (the simulated PSAM's twin)."""
    core = SamCore(
        keyset or demo_keyset(),
        TERMINAL_NUMBER,
        PSAM_SERIAL,
        m1_master=TEST_M1_MASTER if m1_master is None else m1_master,
    )
    return SoftwareSam(core, allow_test_keys=True)


def m1_uid(number: int, length: int = 4) -> bytes:
    """A distinct UID per card number (7-byte UIDs start with the NXP manufacturer byte 04)."""
    if length == 4:
        return bytes.fromhex(f"C1{number:06X}")
    return bytes.fromhex(f"04{number:012X}")


def make_m1_card(
    number: int,
    layout: M1Layout | None = None,
    provider: M1KeyProvider | None = None,
    *,
    balance: int = 5000,
    size: CardSize = "1k",
    uid_length: int = 4,
    city: bytes = M1_CITY,
    card_type: int = 0x01,
    enable_flag: int = 0x02,
    blacklisted: bool = False,
    counter: int = 0,
    pointer: int = 0,
    clock: bool = False,
    issue_date: dt.date | None = M1_ISSUED,
    start_date: dt.date | None = None,
    expiry_date: dt.date | None = M1_EXPIRES,
    sector_keys: Mapping[int, bytes] | None = None,
) -> M1Card:
    """M1 purse card ``number`` personalised for ``layout`` with keys from ``provider``
    (default: 80 FC of a software SAM with :data:`TEST_M1_MASTER`), one key per sector of
    ``layout.sectors_in_use()`` (distinct record-sector keys when the layout's ``sector_ids`` say
    so); ``sector_keys`` overrides single sectors' key A. The dates go into the issuance
    sector's dates block when the layout has ``[m1_purse.validity]`` (``None`` = unset)."""
    layout = layout or m1_layout()
    provider = provider or key_provider_for(layout, m1_software_sam(), production=False)
    card = M1Card(m1_uid(number, uid_length), size, clock=clock)
    uid4 = card.auth_uid
    issuance = Issuance(
        city_code=city,
        trade_code=bytes.fromhex("0001"),
        serial=number.to_bytes(4, "big"),
        auth_code=bytes.fromhex("A1B2C3D4"),
        enable_flag=enable_flag,
        card_type=card_type,
    )
    keys = dict(provider.sector_keys(uid4, issuance, layout.sectors_in_use()))
    keys.update(sector_keys or {})
    # Directory (sector 0, block 1): area codes per sector (M1 spec §3.1).
    directory = bytearray(b"\xff" * 16)
    directory[0] = 0x00
    directory[layout.issuance_sector] = 0x01
    directory[layout.purse_sector] = 0x10
    directory[layout.public_sector] = 0x06
    for sector in layout.record_sectors:
        if sector < 16:
            directory[sector] = 0x03
    card.set_block(block_number(layout.directory_sector, layout.directory_block), bytes(directory))
    card.set_trailer(layout.directory_sector, layout.directory_key, M1_ISSUANCE_ACCESS, M1_KEY_B)
    # Issuance (sector 1): key A = UID || UID[0:2].
    card.set_block(
        block_number(layout.issuance_sector, layout.issuance_block),
        encode_issuance(issuance, layout.issuance_check),
    )
    card.set_trailer(
        layout.issuance_sector, issuance_key(layout, uid4), M1_ISSUANCE_ACCESS, M1_KEY_B
    )
    if layout.validity is not None and layout.validity_block is not None:
        dates = IssuanceDates(issue_date, start_date, expiry_date)
        card.set_block(layout.validity_block, encode_dates_block(dates, layout.validity.dates))
    # Purse: two value blocks, adr = block number.
    p_blk, b_blk = layout.purse_blocks
    card.set_block(p_blk, encode_value_block(balance, p_blk))
    card.set_block(b_blk, encode_value_block(balance, p_blk))
    card.set_trailer(layout.purse_sector, keys[layout.purse_sector], M1_PURSE_ACCESS, M1_KEY_B)
    # Public info: primary + backup, flag "done".
    info = PublicInfo(
        pointer=pointer,
        counter=counter,
        flag=layout.flag_done,
        blacklist=layout.blacklist_value if blacklisted else 0,
    )
    pp_blk, pb_blk = layout.public_blocks
    card.set_block(pp_blk, encode_public(layout, info, backup=False))
    card.set_block(pb_blk, encode_public(layout, info, backup=True))
    card.set_trailer(layout.public_sector, keys[layout.public_sector], M1_DATA_ACCESS, M1_KEY_B)
    for sector in layout.record_sectors:
        card.set_trailer(sector, keys[sector], M1_DATA_ACCESS, M1_KEY_B)
    return card


def m1_purse_of(card: M1Card, layout: M1Layout) -> tuple[int | None, int | None]:
    """(primary, backup) purse values straight from the card's memory (``None`` = invalid)."""
    p_blk, b_blk = layout.purse_blocks
    return card.value_of(p_blk), card.value_of(b_blk)


@dataclass
class M1Presentation:
    """An M1 card for the demo stream; ``tear_at_write``/``tear_mode`` arm a tear on insertion."""

    card: M1Card
    tear_at_write: int | None = None
    tear_mode: TearMode = "lost"

    def arm(self) -> M1Card:
        if self.tear_at_write is not None:
            self.card.arm_tear(self.tear_at_write, self.tear_mode)
        return self.card


def m1_demo_cards(keyset: KeySet | None = None, start: int = 100) -> list[M1Presentation]:
    """A few M1 taps for the demo stream: paid, low balance, blacklisted, torn + re-presented."""
    del keyset  # the M1 keys come from the PSAM's M1 master, not the CPU key set
    torn = make_m1_card(start + 3, balance=3000)
    return [
        M1Presentation(make_m1_card(start, balance=4000)),
        M1Presentation(make_m1_card(start + 1, balance=100)),
        M1Presentation(make_m1_card(start + 2, blacklisted=True)),
        M1Presentation(torn, tear_at_write=2, tear_mode="lost"),  # torn at the debit's TRANSFER
        M1Presentation(torn),
        M1Presentation(make_m1_card(start + 4, size="4k", uid_length=7, balance=2500)),
    ]
