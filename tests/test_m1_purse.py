"""The M1 purse machine and tap handler: every layout variant of m1-purse-and-readers.md §3,
the §3.5 rule table, key providers (PSAM 80 FC / 80 1A+FA over real APDUs, software 3DES,
static), record TAC through the PSAM, and bad input that must end in a clear refusal or a
recovery — never a wrong balance, never an exception out of the handler."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from agent.errors import ConfigurationError, SamMuteError
from agent.products import m1_purse
from agent.products.m1_codec import (
    AccessConditions,
    PublicInfo,
    decode_backup,
    decode_issuance,
    decode_public_info,
    decode_record,
    encode_public_info,
)
from agent.products.m1_keys import (
    PsamDesKeyProvider,
    PsamFcKeyProvider,
    Software3DesKeyProvider,
    StaticKeyProvider,
    key_provider_for,
)
from agent.products.m1_layout import M1Layout
from agent.products.m1_purse import CopyPurse, PurseState, Recovery, WritePublic, classify
from agent.readers.base import CardPresence, CardTechnology
from agent.readers.storage import KeyType
from agent.sam.psam import PsamDriver
from agent.transaction_m1 import M1TapHandler
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
from tests.m1_rig import M1Rig, card_classification

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
    via_apdu = PsamFcKeyProvider(psam_driver, layout.keys).sector_keys(card.auth_uid, issuance)
    via_core = PsamFcKeyProvider(m1_software_sam(), layout.keys).sector_keys(
        card.auth_uid, issuance
    )
    assert via_apdu == via_core
    assert via_apdu["purse"] == card.keys_of(layout.purse_sector)[0]
    sent = psam_driver.slot.psam.commands
    fc = [c for c in sent if c[:2] == b"\x80\xfc"]
    assert fc and fc[-1][4] == 0x0F  # Lc = city 2 + UID 4 + serial 2 + auth 4 + 3 ids (AFC)


def test_handler_with_a_psam_driver_end_to_end(psam_driver, tmp_path):
    rig = M1Rig(directory=tmp_path)
    rig.handler = M1TapHandler(
        rig.profile, rig.store, psam_driver, layout=rig.layout, clock=rig.clock
    )
    card = make_m1_card(next(_numbers), rig.layout, balance=1000)
    outcome = rig.tap(card)
    assert outcome.status == "paid", outcome.reason
    rec = rig.records("purchase")[0]
    # The TAC the PSAM computed over APDUs equals the software SAM's.
    twin = M1TapHandler(rig.profile, rig.store, m1_software_sam(), layout=rig.layout)
    assert twin._tac(dict(rec.fields) | {"amount": rec.amount})[0] == rec.fields["tac"]


def test_psam_des_provider_uses_80_1a_and_80_fa(psam_driver):
    layout = _layout(VARIANTS["psam-des"])
    card = make_m1_card(next(_numbers), layout, PsamDesKeyProvider(m1_software_sam(), layout.keys))
    issuance = decode_issuance(card.get_block(4))
    keys = PsamDesKeyProvider(psam_driver, layout.keys).sector_keys(card.auth_uid, issuance)
    assert keys["records"] == card.keys_of(3)[0]
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
    outcome = rig.handler.process(ApduOnly(), presence)  # type: ignore[arg-type]
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
    rig.handler = M1TapHandler(
        rig.profile,
        rig.store,
        _FlakySam("cipher_mac"),
        key_provider_for(rig.layout, rig.sam, production=False),
        layout=rig.layout,
        clock=rig.clock,
    )
    card = make_m1_card(next(_numbers), rig.layout, balance=1000)
    outcome = rig.tap(card)
    assert outcome.status == "paid"
    rec = rig.records("purchase")[0]
    assert rec.fields["tac"] == "" and "silent" in str(rec.fields["tac_error"])


def test_sam_failure_in_key_derivation_fails_before_any_write():
    rig = M1Rig()
    sam = _FlakySam("calculate_m1_keys")
    rig.handler = M1TapHandler(
        rig.profile,
        rig.store,
        sam,
        layout=rig.layout,
        clock=rig.clock,
    )
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
