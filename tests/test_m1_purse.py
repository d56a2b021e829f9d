"""The M1 purse machine and tap handler: every layout variant of m1-purse-and-readers.md §3,
the §3.5 rule table, key providers (PSAM 80 FC / 80 1A+FA over real APDUs, software 3DES,
static), record TAC through the PSAM, and bad input that must end in a clear refusal or a
recovery — never a wrong balance, never an exception out of the handler."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from typing import Any

import pytest

from agent.errors import CardProtocolError, ConfigurationError, SamMuteError, TapRefused
from agent.products import m1_keys as m1_keys_inputs
from agent.products import m1_purse
from agent.products.m1_codec import (
    AccessConditions,
    Issuance,
    PublicInfo,
    decode_backup,
    decode_issuance,
    decode_public_info,
    decode_record,
    encode_public_info,
    xor8,
)
from agent.products.m1_layout import M1Layout
from agent.products.m1_purse import CopyPurse, PurseState, Recovery, WritePublic, classify
from agent.products.m1_recovery import M1PurchaseIntent
from agent.readers.base import CardPresence, CardTechnology
from agent.readers.storage import KeyType
from agent.sam.m1_keys import (
    PsamDesKeyProvider,
    PsamFcKeyProvider,
    Software3DesKeyProvider,
    StaticKeyProvider,
    key_provider_for,
)
from agent.sam.psam import PsamDriver
from agent.tap.m1 import M1Handler
from agent.transaction import TransactionEngine
from tests.fake_reader.inprocess import InProcessSamSlot
from tests.fake_reader.m1_card import M1Card
from tests.fake_reader.scenario import (
    M1_KEY_B,
    demo_keyset,
    demo_profile,
    m1_layout,
    m1_purse_of,
    m1_software_sam,
    make_m1_card,
    make_psam,
)
from tests.m1_rig import M1Rig, card_classification, m1_engine

FARE = 200
_numbers = itertools.count(1)

SOFTWARE_MASTER = "000102030405060708090A0B0C0D0E0F"
STATIC = {"purse": "111111111111", "public": "222222222222", "records": "333333333333"}

VARIANTS: dict[str, dict[str, Any]] = {
    "cardop-copy-xor": {},
    "afc-inverted": {"public_backup_encoding": "inverted"},
    "crc8": {"check": "crc8"},
    "gdmh-crc16-flags": {
        "check": "crc16",
        "check_seed": "CS-METRO-2013@GDMH",
        "flag_in_progress": 0x11,
        "flag_done": 0x13,
        "flag_done_aliases": [0x14],
        "purse_sector": 2,
        "public_sector": 9,
        "public_primary": 0,
        "public_backup": 1,
    },
    "afc-records-big-endian": {"record_layout": "afc", "record_money_order": "big"},
    "records-2-sectors": {"record_sectors": [3, 4], "record_blocks_per_sector": 2},
    "directory-check": {"directory_check": True},
    "fc-one-sector-per-call": {"keys": {"fc_batch": False}},
    "fc-city-ff-suffix": {"keys": {"fc_suffix": "city_ff"}},
    "psam-des": {"keys": {"provider": "psam_des", "des_p1": 0x45, "des_p2": 0x01}},
    "software-3des": {"keys": {"provider": "software_3des", "software_master": SOFTWARE_MASTER}},
    "static-keys": {"keys": {"provider": "static", "static": STATIC}},
    "tac-cardop-fields-no-iv": {"tac": {"prefix_iv": False}},
    "tac-disabled": {"tac": {"enabled": False}},
}


def _layout(overrides: dict[str, Any]) -> M1Layout:
    """The demo layout with ``overrides`` (nested tables merged one level deep)."""
    raw = dict(demo_profile().m1_purse)
    for key, value in overrides.items():
        if isinstance(value, dict):
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    return M1Layout.from_mapping(raw)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layout_variant_debits_and_writes_its_own_format(variant):
    layout = _layout(VARIANTS[variant])
    rig = M1Rig(layout)
    provider = key_provider_for(layout, rig.sam, production=False)
    card = make_m1_card(next(_numbers), layout, provider, balance=1000, pointer=9)
    first = rig.tap(card)
    assert first.status == "paid", first.reason
    assert first.balance_after == 800
    assert m1_purse_of(card, layout) == (800, 800)
    pp_blk, pb_blk = layout.public_blocks
    pub_p = decode_public_info(card.get_block(pp_blk), layout.check, layout.check_seed)
    pub_b = decode_public_info(
        decode_backup(card.get_block(pb_blk), layout.public_backup_encoding),
        layout.check,
        layout.check_seed,
    )
    assert pub_p == pub_b
    assert (pub_p.pointer, pub_p.counter, pub_p.flag) == (1, 1, layout.flag_done)
    _, record_blk = layout.record_block(1)
    record = decode_record(
        card.get_block(record_blk), layout.record_layout, layout.record_money_order
    )
    assert (record.balance_before, record.amount, record.kind) == (1000, FARE, layout.record_type)
    rec = rig.records("purchase")[0]
    assert rec.fields["balance_after"] == 800 and rec.fields["counter"] == 1
    if layout.tac.enabled:
        assert len(str(rec.fields["tac"])) == 8
    else:
        assert rec.fields["tac"] == "" and rec.fields["tac_error"]
    # The record slots wrap around: 9 → 1 → 2.
    second = rig.tap(card)
    assert second.status == "paid"
    assert m1_purse_of(card, layout) == (600, 600)


def test_gdmh_done_alias_is_accepted():
    layout = _layout(VARIANTS["gdmh-crc16-flags"])
    rig = M1Rig(layout)
    card = make_m1_card(next(_numbers), layout, balance=1000)
    info = PublicInfo(0, 5, 0x14)
    pp_blk, pb_blk = layout.public_blocks
    for blk in (pp_blk, pb_blk):
        card.set_block(blk, encode_public_info(info, layout.check, layout.check_seed))
    assert rig.tap(card).status == "paid"


def test_4k_card_with_7_byte_uid_and_records_in_a_big_sector():
    layout = _layout({"record_sectors": [33], "record_blocks_per_sector": 12})
    rig = M1Rig(layout)
    card = make_m1_card(next(_numbers), layout, size="4k", uid_length=7, pointer=11)
    assert card.sak == 0x18 and len(card.uid) == 7
    assert rig.tap(card).status == "paid"
    assert rig.tap(card).status == "paid"
    _, blk = layout.record_block(12)
    assert blk == 128 + 16 + 11
    assert decode_record(card.get_block(blk), "cardop", "little").balance_before == 5000


def test_same_debit_through_the_pcsc_reader_model():
    rig = M1Rig(reader="pcsc")
    card = make_m1_card(next(_numbers), rig.layout, balance=900)
    assert rig.tap(card).status == "paid"
    assert m1_purse_of(card, rig.layout) == (700, 700)
    sent = rig.reader.model.apdus  # type: ignore[union-attr]
    assert any(a[:2] == b"\xff\xd7" and a[4:6] == b"\x05\x02" for a in sent)  # FF D7 decrement
    assert any(a[:2] == b"\xff\xd7" and a[4:6] == b"\x02\x03" for a in sent)  # restore+transfer


def test_same_debit_through_crypto1_frames():
    rig = M1Rig(reader="raw")
    card = make_m1_card(next(_numbers), rig.layout, balance=900)
    first = rig.tap(card)
    assert first.status == "paid", first.reason
    assert m1_purse_of(card, rig.layout) == (700, 700)
    assert rig.reader.frames > first.apdus  # type: ignore[union-attr]
    assert rig.tap(card).status == "paid"
    assert m1_purse_of(card, rig.layout) == (500, 500)


def test_crypto1_reader_with_a_wrong_key_gets_silence():
    rig = M1Rig(reader="raw")
    other = _layout(VARIANTS["static-keys"])
    card = make_m1_card(
        next(_numbers), rig.layout, key_provider_for(other, rig.sam, production=False)
    )
    outcome = rig.tap(card)
    assert outcome.status == "failed" and "silent" in outcome.reason
    assert rig.pending() == 0


# --- key providers over real PSAM APDUs ----------------------------------------------------------


@pytest.fixture
def psam_driver() -> PsamDriver:
    driver = PsamDriver(InProcessSamSlot(make_psam(demo_keyset())))
    driver.open()
    return driver


def test_80fc_over_apdus_matches_the_software_sam(psam_driver):
    layout = m1_layout()
    card = make_m1_card(next(_numbers), layout)
    issuance_block = card.get_block(4)
    issuance = decode_issuance(issuance_block)
    sectors = layout.sectors_in_use()
    via_apdu = PsamFcKeyProvider(psam_driver, layout).sector_keys(card.auth_uid, issuance, sectors)
    via_core = PsamFcKeyProvider(m1_software_sam(), layout).sector_keys(
        card.auth_uid, issuance, sectors
    )
    assert via_apdu == via_core
    assert via_apdu[layout.purse_sector] == card.keys_of(layout.purse_sector)[0]
    sent = psam_driver.slot.psam.commands
    fc = [c for c in sent if c[:2] == b"\x80\xfc"]
    assert fc and fc[-1][4] == 0x0F  # Lc = city 2 + UID 4 + serial 2 + auth 4 + 3 ids (AFC)


def test_handler_with_a_psam_driver_end_to_end(psam_driver, tmp_path):
    rig = M1Rig(directory=tmp_path)
    rig.handler = m1_engine(rig.profile, rig.store, psam_driver, rig.layout, clock=rig.clock)
    card = make_m1_card(next(_numbers), rig.layout, balance=1000)
    outcome = rig.tap(card)
    assert outcome.status == "paid", outcome.reason
    rec = rig.records("purchase")[0]
    # The TAC the PSAM computed over APDUs equals the software SAM's.
    twin = M1Handler(rig.profile, layout=rig.layout)
    intent = M1PurchaseIntent.from_payload(
        dict(rec.fields) | {"amount": rec.amount, "counter_before": 0, "family": "m1"}
    )
    assert twin._tac(m1_software_sam(), intent)[0] == rec.fields["tac"]


def test_psam_des_provider_uses_80_1a_and_80_fa(psam_driver):
    layout = _layout(VARIANTS["psam-des"])
    card = make_m1_card(next(_numbers), layout, PsamDesKeyProvider(m1_software_sam(), layout))
    issuance = decode_issuance(card.get_block(4))
    keys = PsamDesKeyProvider(psam_driver, layout).sector_keys(card.auth_uid, issuance, [3, 4])
    assert keys[3] == keys[4] == card.keys_of(3)[0]
    sent = psam_driver.slot.psam.commands
    assert any(c[:2] == b"\x80\x1a" for c in sent) and any(c[:2] == b"\x80\xfa" for c in sent)


def test_software_and_static_providers_are_refused_in_production():
    for variant in ("software-3des", "static-keys"):
        layout = _layout(VARIANTS[variant])
        with pytest.raises(ConfigurationError, match="production"):
            key_provider_for(layout, m1_software_sam(), production=True)
        provider = key_provider_for(layout, m1_software_sam(), production=False)
        assert isinstance(provider, Software3DesKeyProvider | StaticKeyProvider)
        assert "redacted" in repr(provider)


# --- the §3.5 rule table -------------------------------------------------------------------------

L = m1_layout()
OLD = PublicInfo(pointer=4, counter=7, flag=0x02)
PROG = PublicInfo(pointer=5, counter=8, flag=0x01)
DONE = PublicInfo(pointer=5, counter=8, flag=0x02)


@pytest.mark.parametrize(
    ("state", "kind", "balance"),
    [
        (PurseState(1000, 1000, OLD, OLD), Recovery.NORMAL, 1000),
        (PurseState(1000, 1000, None, OLD), Recovery.A, 1000),
        (PurseState(1000, 1000, OLD.with_(flag=0x01), OLD), Recovery.A, 1000),
        (PurseState(800, 1000, PROG, OLD), Recovery.BC, 800),
        (PurseState(None, 1000, PROG, OLD), Recovery.B1, 1000),
        (PurseState(1000, 1000, PROG, OLD), Recovery.B2, 1000),
        (PurseState(800, 1000, None, OLD), Recovery.D, 800),
        (PurseState(800, 1000, DONE, OLD), Recovery.E, 800),
        (PurseState(800, 1000, DONE, None), Recovery.E, 800),
        (PurseState(800, 1000, DONE, DONE), Recovery.F, 800),
        (PurseState(800, None, DONE, DONE), Recovery.F, 800),
        (PurseState(None, 800, DONE, DONE), Recovery.P_FROM_B, 800),
        (PurseState(800, 800, DONE, None), Recovery.PUB_B, 800),
        (PurseState(None, None, DONE, DONE), Recovery.BROKEN, None),
        (PurseState(800, 800, None, None), Recovery.BROKEN, None),
        (PurseState(1000, 800, DONE, DONE), Recovery.BROKEN, None),  # primary > backup: a load?
        (PurseState(800, 1000, PROG, PROG), Recovery.BROKEN, None),
    ],
)
def test_rule_table(state, kind, balance):
    result = classify(state, L)
    assert result.kind is kind, result.reason
    assert result.balance == balance
    if kind is not Recovery.BROKEN:
        after = _apply(state, result.actions)
        second = classify(after, L)
        assert second.kind is Recovery.NORMAL  # a second recovery pass is a no-op
        assert after.purse_p == after.purse_b == balance


def test_rule_d_rolls_forward_to_the_intended_public_info():
    result = classify(PurseState(800, 1000, None, OLD), L)
    assert result.public == DONE


def _apply(state: PurseState, actions: tuple[Any, ...]) -> PurseState:
    p, b, pp, pb = state.purse_p, state.purse_b, state.pub_p, state.pub_b
    for action in actions:
        if isinstance(action, WritePublic):
            if action.backup:
                pb = action.info
            else:
                pp = action.info
        elif isinstance(action, CopyPurse):
            if action.to_backup:
                b = p
            else:
                p = b
    return PurseState(p, b, pp, pb)


# --- bad input -----------------------------------------------------------------------------------


def _memory(card: M1Card) -> list[bytes]:
    return [card.get_block(i) for i in range(card.blocks)]


def test_primary_purse_copies_disagree_is_recovered_from_backup():
    rig = M1Rig()
    card = make_m1_card(next(_numbers), rig.layout, balance=1000)
    p_blk, _ = rig.layout.purse_blocks
    block = bytearray(card.get_block(p_blk))
    block[8] ^= 0x01  # third copy of the value differs
    card.set_block(p_blk, bytes(block))
    outcome = rig.tap(card)
    assert outcome.status == "paid" and outcome.balance_after == 800
    assert m1_purse_of(card, rig.layout) == (800, 800)


@pytest.mark.parametrize("damage", ["both_purses", "both_publics"])
def test_both_copies_invalid_is_refused_without_touching_the_card(damage):
    rig = M1Rig()
    card = make_m1_card(next(_numbers), rig.layout, balance=1000)
    blocks = rig.layout.purse_blocks if damage == "both_purses" else rig.layout.public_blocks
    for blk in blocks:
        raw = bytearray(card.get_block(blk))
        raw[13] ^= 0x01 if damage == "both_purses" else 0x00  # adr bytes wrong
        raw[14] ^= 0x10
        card.set_block(blk, bytes(raw))
    before = _memory(card)
    outcome = rig.tap(card)
    assert outcome.status == "refused" and outcome.reason.startswith("card_damaged")
    assert _memory(card) == before
    assert rig.pending() == 0 and not rig.records()


def test_wrong_sector_keys_fail_cleanly():
    rig = M1Rig()
    other = _layout(VARIANTS["static-keys"])
    card = make_m1_card(
        next(_numbers), rig.layout, key_provider_for(other, rig.sam, production=False)
    )
    before = _memory(card)
    outcome = rig.tap(card)
    assert outcome.status == "failed"
    assert outcome.reason.startswith("card:") and "authenticate" in outcome.reason
    assert _memory(card) == before and rig.pending() == 0


def test_wrong_issuance_key_fails_cleanly():
    rig = M1Rig()
    card = make_m1_card(next(_numbers), rig.layout)
    card.set_trailer(1, bytes(6), AccessConditions((4, 4, 4, 3)), M1_KEY_B)
    outcome = rig.tap(card)
    assert outcome.status == "failed" and "authenticate" in outcome.reason


@pytest.mark.parametrize(
    ("sector_of", "conditions"),
    [
        ("purse", AccessConditions((0b010, 0b010, 0b010, 0b011))),  # purse read-only
        ("public", AccessConditions((0b100, 0b100, 0b100, 0b011))),  # public writable by B only
        ("records", AccessConditions((0b010, 0b010, 0b010, 0b011))),  # records read-only
    ],
)
def test_access_bits_forbidding_the_debit_refuse_before_any_write(sector_of, conditions):
    rig = M1Rig()
    card = make_m1_card(next(_numbers), rig.layout, balance=1000)
    sector = {"purse": 2, "public": 6, "records": 3}[sector_of]
    key_a, _ = card.keys_of(sector)
    card.set_trailer(sector, key_a, conditions, M1_KEY_B)
    before = _memory(card)
    outcome = rig.tap(card)
    assert outcome.status == "refused" and outcome.reason.startswith("access_conditions")
    assert _memory(card) == before and rig.pending() == 0


def test_unchecked_access_bits_nak_mid_debit_never_a_wrong_balance():
    """Without the pre-check, the card's NAK at the TRANSFER leaves a journaled intent; the
    next tap rolls the flag back and voids it."""
    rig = M1Rig(m1_layout(check_access_bits=False))
    card = make_m1_card(next(_numbers), rig.layout, balance=1000)
    key_a, _ = card.keys_of(2)
    card.set_trailer(2, key_a, AccessConditions((0b010, 0b010, 0b010, 0b011)), M1_KEY_B)
    outcome = rig.tap(card)
    assert outcome.status == "torn" and "refused" in outcome.reason
    again = rig.tap(card)
    assert again.status == "torn"  # voided, tried again, refused again: never a wrong balance
    assert m1_purse_of(card, rig.layout) == (1000, 1000)
    assert not rig.records("purchase")
    card.set_trailer(2, key_a, AccessConditions((0b110, 0b110, 0b110, 0b011)), M1_KEY_B)
    assert rig.tap(card).status == "paid"
    assert m1_purse_of(card, rig.layout) == (800, 800)
    assert len(rig.records("purchase")) == 1 and rig.pending() == 0


def test_inconsistent_access_bits_block_the_sector():
    rig = M1Rig()
    card = make_m1_card(next(_numbers), rig.layout)
    trailer = bytearray(card.get_block(11))
    trailer[8] ^= 0x01
    card.set_block(11, bytes(trailer))
    outcome = rig.tap(card)
    assert outcome.status == "failed" and "blocked" in outcome.reason


@pytest.mark.parametrize("at_op", range(1, 32))
def test_card_removed_at_every_operation(at_op):
    """Removal at each operation of a tap (authentications included): a clear failure or a
    torn debit, then one single debit on the next tap."""
    rig = M1Rig()
    card = make_m1_card(next(_numbers), rig.layout, balance=1000)
    card.arm_removal(at_op)
    first = rig.tap(card)
    assert first.status in ("failed", "torn", "paid"), first.reason
    card.disarm()
    second = rig.tap(card)
    assert second.status in ("paid", "recovered"), second.reason
    paid = len(rig.records("purchase"))
    assert paid == (2 if first.status == "paid" else 1)
    assert m1_purse_of(card, rig.layout) == (1000 - FARE * paid,) * 2
    assert rig.pending() == 0


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"blacklisted": True}, "blacklisted"),
        ({"enable_flag": 0x04}, "blacklisted"),
        ({"enable_flag": 0x01}, "not_enabled"),
        ({"enable_flag": 0x03}, "stopped"),
        ({"balance": 150}, "insufficient_balance"),
    ],
)
def test_refusals(options, reason):
    rig = M1Rig()
    card = make_m1_card(next(_numbers), rig.layout, **options)
    before = _memory(card)
    outcome = rig.tap(card)
    assert outcome.status == "refused" and outcome.reason.startswith(reason)
    assert _memory(card) == before
    assert rig.reader.feedback_log[-1][0] is False


def test_city_and_card_type_allow_lists():
    layout = m1_layout(city_codes=["2000"], accepted_card_types=[1])
    rig = M1Rig(layout)
    assert rig.tap(make_m1_card(next(_numbers), layout)).reason.startswith("not_accepted_city")
    layout = m1_layout(accepted_card_types=[5])
    rig = M1Rig(layout)
    assert rig.tap(make_m1_card(next(_numbers), layout)).reason.startswith("card_type")


def test_double_tap_is_refused():
    rig = M1Rig()
    card = make_m1_card(next(_numbers), rig.layout)
    assert rig.tap(card).status == "paid"
    second = rig.tap(card, advance=1.0)
    assert second.status == "refused" and second.reason.startswith("double_tap")
    assert len(rig.records("purchase")) == 1


def test_corrupt_issuance_and_implausible_balance_fail():
    rig = M1Rig()
    card = make_m1_card(next(_numbers), rig.layout)
    raw = bytearray(card.get_block(4))
    raw[15] ^= 0xFF
    card.set_block(4, bytes(raw))
    assert rig.tap(card).status == "failed"
    rich = make_m1_card(next(_numbers), rig.layout, balance=rig.profile.max_balance + 1)
    outcome = rig.tap(rich)
    assert outcome.status == "failed" and "balance" in outcome.reason


def test_reader_without_storage_operations_fails_cleanly():
    rig = M1Rig()

    class ApduOnly:
        name = "apdu-only"

        def feedback(self, ok: bool, text: str) -> None:
            pass

    presence = CardPresence(bytes(4), CardTechnology.MIFARE_CLASSIC, 0x08)
    outcome = rig.handler.process_tap(ApduOnly(), presence)  # type: ignore[arg-type]
    assert outcome.status == "failed" and outcome.reason.startswith("reader")


class _FlakySam:
    """A software SAM that goes mute for one kind of call."""

    def __init__(self, mute: str) -> None:
        self._sam = m1_software_sam()
        self.mute = mute

    def __getattr__(self, name: str) -> Any:
        if name == self.mute:

            def silent(*args: Any, **kwargs: Any) -> Any:
                raise SamMuteError(f"PSAM silent on {name}")

            return silent
        return getattr(self._sam, name)


def test_sam_failure_in_tac_still_records_the_debit():
    rig = M1Rig()
    provider = key_provider_for(rig.layout, rig.sam, production=False)
    rig.handler = TransactionEngine(
        rig.profile,
        rig.store,
        _FlakySam("cipher_mac"),
        clock=rig.clock,
        handlers=[M1Handler(rig.profile, layout=rig.layout, key_provider=lambda _sam: provider)],
    )
    card = make_m1_card(next(_numbers), rig.layout, balance=1000)
    outcome = rig.tap(card)
    assert outcome.status == "paid"
    rec = rig.records("purchase")[0]
    assert rec.fields["tac"] == "" and "silent" in str(rec.fields["tac_error"])


def test_sam_failure_in_key_derivation_fails_before_any_write():
    rig = M1Rig()
    sam = _FlakySam("calculate_m1_keys")
    rig.handler = m1_engine(rig.profile, rig.store, sam, rig.layout, clock=rig.clock)
    card = make_m1_card(next(_numbers), rig.layout)
    before = _memory(card)
    outcome = rig.tap(card)
    assert outcome.status == "failed" and outcome.reason.startswith("sam")
    assert _memory(card) == before and rig.pending() == 0


def test_keys_never_appear_in_logs_or_reprs(capsys):
    rig = M1Rig()
    card = make_m1_card(next(_numbers), rig.layout)
    rig.tap(card)
    key_a = card.keys_of(rig.layout.purse_sector)[0]
    out = capsys.readouterr().out
    assert key_a.hex() not in out.lower() and key_a.hex().upper() not in out
    session = m1_purse.M1Session({2: key_a})
    assert key_a.hex() not in repr(session).lower()
    assert key_a.hex() not in repr(m1_purse.Authenticate(8, KeyType.A, key_a)).lower()


def test_torn_card_classifies_and_the_record_marks_the_recovery_class():
    rig = M1Rig()
    card = make_m1_card(next(_numbers), rig.layout, balance=1000)
    card.arm_tear(4, "garbage")  # step D: flag 02 write torn → rule D
    assert rig.tap(card).status == "torn"
    assert card_classification(card, rig.layout).kind is Recovery.D
    assert rig.tap(card).status == "recovered"
    rec = rig.records("purchase")[0]
    assert rec.fields["recovered"] is True and rec.fields["recovery"] == "D"


# --- the serial reader module (commands 0x40..0x47) -------------------------------------------


@pytest.fixture
def module_rig(tmp_path):
    from agent.readers.serial_module import SerialModuleLink, SerialModuleReader
    from tests.fake_reader.faults import CardTorn
    from tests.fake_reader.module_server import ModuleEmulator

    rig = M1Rig(directory=tmp_path)
    emulator = ModuleEmulator(rig.field, {}, torn_exc=CardTorn)
    _thread, port = emulator.serve_tcp()
    link = SerialModuleLink(f"socket://127.0.0.1:{port}", timeout=2.0)
    rig.reader = SerialModuleReader(link, poll_interval=0.01)  # type: ignore[assignment]
    yield rig, emulator
    rig.reader.close()
    emulator.stop()


def test_serial_module_m1_commands_end_to_end(module_rig):
    from agent.readers import serial_module as sm

    rig, emulator = module_rig
    card = make_m1_card(next(_numbers), rig.layout, balance=1000)
    presence = None
    rig.field.insert(card)
    presence = rig.reader.wait_for_card(1.0)
    rig.field.remove()
    assert presence.technology is CardTechnology.MIFARE_CLASSIC and presence.sak == 0x08
    assert rig.tap(card).status == "paid"
    assert m1_purse_of(card, rig.layout) == (800, 800)
    assert emulator.count(sm.M1_AUTH) >= 5 and emulator.count(sm.M1_TRANSFER) == 2
    # Torn at the debit's TRANSFER with the answer lost: the module says "card timeout".
    card.arm_tear(2, "lost")
    torn = rig.tap(card)
    assert torn.status == "torn" and "silent" in torn.reason
    again = rig.tap(card)
    assert again.status == "recovered", again.reason
    assert m1_purse_of(card, rig.layout) == (600, 600)
    assert len(rig.records("purchase")) == 2


def test_serial_module_m1_refusals(module_rig):
    from agent.readers.storage import AuthenticationFailed, KeyType, StorageOperationRefused

    rig, _emulator = module_rig
    card = make_m1_card(next(_numbers), rig.layout)
    rig.field.insert(card)
    reader = rig.reader
    reader.wait_for_card(1.0)
    reader.load_key(0, bytes(6))
    with pytest.raises(AuthenticationFailed):
        reader.authenticate(8, KeyType.A, 0)
    reader.load_key(0, card.keys_of(2)[0])
    reader.authenticate(8, KeyType.A, 0)
    with pytest.raises(StorageOperationRefused):
        reader.increment(9, 1)  # access bits 110: key A may not increment
    reader.authenticate(8, KeyType.A, 0)
    reader.value_transfer("decrement", 9, 100, 9)
    assert card.value_of(9) == 4900
    assert reader.read_block(9)[:4] == (4900).to_bytes(4, "little")


# --- per-sector keys (issue 8: record sectors with keys of their own) ---------------------------

PER_SECTOR_IDS = {"purse": 0x10, "public": 0x16, "3": 0x23, "4": 0x24, "5": 0x25}


def test_per_sector_ids_give_distinct_record_keys_with_every_provider():
    sam = m1_software_sam()
    for extra in (
        {},
        {"provider": "psam_des", "des_p1": 0x45, "des_p2": 0x01},
        {"provider": "software_3des", "software_master": SOFTWARE_MASTER},
    ):
        layout = _layout({"keys": {**extra, "sector_ids": PER_SECTOR_IDS}})
        card = make_m1_card(next(_numbers), layout)
        keys = key_provider_for(layout, sam, production=False).sector_keys(
            card.auth_uid, decode_issuance(card.get_block(4)), layout.sectors_in_use()
        )
        assert sorted(keys) == [2, 3, 4, 5, 6]
        assert len(set(keys.values())) == 5, extra
        for sector, key in keys.items():
            assert card.keys_of(sector)[0] == key  # the card holds one key per sector


def test_role_ids_share_one_derivation_for_all_record_sectors(psam_driver):
    layout = m1_layout()
    card = make_m1_card(next(_numbers), layout)
    keys = PsamFcKeyProvider(psam_driver, layout).sector_keys(
        card.auth_uid, decode_issuance(card.get_block(4)), layout.sectors_in_use()
    )
    assert keys[3] == keys[4] == keys[5] != keys[2]
    fc = [c for c in psam_driver.slot.psam.commands if c[:2] == b"\x80\xfc"]
    assert len(fc) == 1 and fc[0][-3:] == bytes((0x02, 0x06, 0x03))  # one id per key


@pytest.mark.parametrize(
    ("sector_input", "ids"),
    [
        ("id", bytes((0x10, 0x16, 0x23, 0x24, 0x25))),  # key ids (CARDOP, AFC)
        ("sector", bytes((2, 6, 3, 4, 5))),  # sector numbers instead [L]
    ],
)
def test_80fc_input_names_each_sector_by_id_or_by_number(psam_driver, sector_input, ids):
    layout = _layout({"keys": {"sector_ids": PER_SECTOR_IDS, "sector_input": sector_input}})
    card = make_m1_card(next(_numbers), layout)
    issuance = decode_issuance(card.get_block(4))
    keys = PsamFcKeyProvider(psam_driver, layout).sector_keys(
        card.auth_uid, issuance, layout.sectors_in_use()
    )
    fc = [c for c in psam_driver.slot.psam.commands if c[:2] == b"\x80\xfc"][-1]
    prefix = issuance.city_code + card.auth_uid + issuance.serial[-2:] + issuance.auth_code
    assert fc[4] == 12 + 5 and fc[5 : 5 + 17] == prefix + ids  # Lc, data
    assert (
        m1_keys_inputs.fc_data(layout.keys, card.auth_uid, issuance, [bytes((i,)) for i in ids])[
            12:
        ]
        == ids
    )
    assert len(set(keys.values())) == 5
    assert all(card.keys_of(s)[0] == k for s, k in keys.items())


def test_one_80fc_per_sector_when_not_batched(psam_driver):
    layout = _layout({"keys": {"sector_ids": PER_SECTOR_IDS, "fc_batch": False}})
    card = make_m1_card(next(_numbers), layout)
    PsamFcKeyProvider(psam_driver, layout).sector_keys(
        card.auth_uid, decode_issuance(card.get_block(4)), [3, 4, 5]
    )
    fc = [c for c in psam_driver.slot.psam.commands if c[:2] == b"\x80\xfc"]
    assert [c[4] for c in fc] == [13, 13, 13] and [c[-1] for c in fc] == [0x23, 0x24, 0x25]


def test_sector_input_bytes_per_option():
    for option, expected in (("id", b"\x24"), ("sector", b"\x04"), ("id_and_sector", b"\x24\x04")):
        raw: dict[str, Any] = {"provider": "software_3des", "software_master": SOFTWARE_MASTER}
        layout = _layout({"keys": {**raw, "sector_ids": PER_SECTOR_IDS, "sector_input": option}})
        assert m1_keys_inputs.sector_inputs(layout, [4]) == {4: expected}
    uid = bytes.fromhex("C1000001")
    master = bytes.fromhex(SOFTWARE_MASTER)
    # "id" keeps the historic factor UID ‖ id ‖ key type ‖ 00 00.
    assert m1_keys_inputs.software_3des_key(master, uid, 0x24) == m1_keys_inputs.software_3des_key(
        master, uid, b"\x24"
    )
    both = {
        m1_keys_inputs.software_3des_key(master, uid, one)
        for one in (b"\x24", b"\x04", b"\x24\x04")
    }
    assert len(both) == 3
    factors = m1_keys_inputs.des_factors(
        _layout(
            {"keys": {"provider": "psam_des", "des_p1": 0x45, "sector_input": "id_and_sector"}}
        ).keys,
        uid,
        decode_issuance(make_m1_card(next(_numbers)).get_block(4)),
        b"\x03\x04",
    )
    assert factors[0] == uid + b"\x03\x04\x00\x00"  # 0x45 >> 5 = 2 levels: then city ‖ FF×6
    assert len(factors) == 2 and factors[1][2:] == b"\xff" * 6


def test_static_provider_per_sector():
    static = dict(STATIC) | {"4": "444444444444"}
    layout = _layout({"keys": {"provider": "static", "static": static}})
    keys = StaticKeyProvider(layout).sector_keys(bytes(4), None, layout.sectors_in_use())  # type: ignore[arg-type]
    assert keys[3] == keys[5] == bytes.fromhex(STATIC["records"])
    assert keys[4] == bytes.fromhex("444444444444")


def test_sector_key_override_on_the_simulated_card():
    layout = m1_layout()
    other = bytes.fromhex("0A0B0C0D0E0F")
    card = make_m1_card(next(_numbers), layout, sector_keys={4: other})
    assert card.keys_of(4)[0] == other and card.keys_of(3)[0] != other


# --- qualification (pure) -------------------------------------------------------------------------

TODAY = dt.date(2024, 5, 1)
Q_LAYOUT = m1_layout()  # the demo profile: issue date at 0, expiry at 4 of block 1
GOOD = PurseState(1000, 1000, OLD, OLD)


def _issuance(**changes: Any) -> Issuance:
    base = Issuance(
        city_code=bytes.fromhex("1000"),
        trade_code=bytes.fromhex("0001"),
        serial=bytes.fromhex("00000001"),
        auth_code=bytes.fromhex("A1B2C3D4"),
        enable_flag=0x02,
        card_type=0x01,
        issue_date=dt.date(2020, 1, 1),
        expiry_date=dt.date(2026, 12, 31),
    )
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    ("layout_changes", "issuance_changes", "today", "reason"),
    [
        ({}, {}, TODAY, None),
        ({}, {"expiry_date": TODAY}, TODAY, None),  # the last valid day is accepted
        ({}, {"issue_date": TODAY}, TODAY, None),  # valid from the issue day
        ({}, {"expiry_date": TODAY - dt.timedelta(days=1)}, TODAY, "expired"),
        ({}, {}, dt.date(2027, 1, 1), "expired"),
        ({}, {"issue_date": TODAY + dt.timedelta(days=1)}, TODAY, "not_yet_valid"),
        (
            {"validity": {"issue_date": 0, "start_date": 8, "expiry_date": 4}},
            {"start_date": dt.date(2024, 6, 1)},
            TODAY,
            "not_yet_valid",
        ),
        ({}, {"expiry_date": None}, TODAY, "card_damaged"),  # unset, unset_dates = "refuse"
        (
            {"validity": {"issue_date": 0, "expiry_date": 4, "unset_dates": "unlimited"}},
            {"expiry_date": None},
            TODAY,
            None,
        ),
        ({}, {"issue_date": dt.date(2027, 1, 1)}, dt.date(2027, 6, 1), "card_damaged"),
        ({"validity": None}, {"expiry_date": dt.date(2000, 1, 1)}, TODAY, None),  # not read
        ({}, {"enable_flag": 0x01}, TODAY, "not_enabled"),
        ({}, {"enable_flag": 0x03}, TODAY, "stopped"),
        ({}, {"enable_flag": 0x04}, TODAY, "blacklisted"),
        ({}, {"enable_flag": 0x09}, TODAY, "card_disabled"),
        ({"accepted_card_types": [5]}, {}, TODAY, "card_type"),
        ({"accepted_card_types": [1, 5]}, {}, TODAY, None),
        ({"city_codes": ["2000"]}, {}, TODAY, "not_accepted_city"),
    ],
)
def test_qualify_table(layout_changes, issuance_changes, today, reason):
    raw = dict(demo_profile().m1_purse)
    for key, value in layout_changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    layout = M1Layout.from_mapping(raw)
    issuance = _issuance(**issuance_changes)
    if reason is None:
        m1_purse.qualify(layout, issuance, GOOD, today, 100_000)
        return
    with pytest.raises(TapRefused) as refused:
        m1_purse.qualify(layout, issuance, GOOD, today, 100_000)
    assert refused.value.reason == reason


def test_qualify_blacklist_flag_and_balance():
    flagged = PurseState(1000, 1000, OLD.with_(blacklist=0x04), OLD.with_(blacklist=0x04))
    with pytest.raises(TapRefused, match="blacklisted"):
        m1_purse.qualify(Q_LAYOUT, _issuance(), flagged, TODAY, 100_000)
    with pytest.raises(CardProtocolError, match="balance"):
        m1_purse.qualify(Q_LAYOUT, _issuance(), GOOD, TODAY, 999)
    with pytest.raises(CardProtocolError):
        m1_purse.qualify(Q_LAYOUT, _issuance(), PurseState(None, 1000, OLD, OLD), TODAY, 100_000)


def _read_issuance_from(card: M1Card, layout: M1Layout) -> Issuance:
    card.power_on()
    card.select()

    def execute(op: m1_purse.Operation) -> bytes | None:
        if isinstance(op, m1_purse.Authenticate):
            card.authenticate(op.block, op.key_type, op.key)
            return None
        assert isinstance(op, m1_purse.Read)
        return card.read(op.block)

    return m1_purse.drive(m1_purse.read_issuance(layout, card.auth_uid), execute)


def test_read_issuance_reads_the_dates_block():
    layout = m1_layout()
    card = make_m1_card(
        next(_numbers), layout, issue_date=dt.date(2021, 3, 4), expiry_date=dt.date(2023, 12, 31)
    )
    issuance = _read_issuance_from(card, layout)
    assert (issuance.issue_date, issuance.expiry_date) == (
        dt.date(2021, 3, 4),
        dt.date(2023, 12, 31),
    )
    assert issuance.serial == card.get_block(4)[4:8]
    plain = M1Layout.from_mapping(
        {k: v for k, v in demo_profile().m1_purse.items() if k != "validity"}
    )
    assert _read_issuance_from(card, plain).expiry_date is None  # no table: not read


@pytest.mark.parametrize(
    "dates",
    [
        "2021030A20231231",  # issue date not BCD
        "2021030420230229",  # 29 February 2023
        "20210304FFFF0000",  # half unset
    ],
)
def test_bad_dates_on_the_card_refuse_as_damaged(dates):
    layout = m1_layout()
    card = make_m1_card(next(_numbers), layout)
    block = bytes.fromhex(dates) + bytes(7)
    card.set_block(5, block + bytes((xor8(block),)))
    with pytest.raises(TapRefused) as refused:
        _read_issuance_from(card, layout)
    assert refused.value.reason == "card_damaged"
