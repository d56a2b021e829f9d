"""The CPU-card simulator against cpu-purse.md §5.8 (self-computed vectors C1-C4, D) and §7."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import crypto
from agent.crypto import Algorithm
from agent.errors import CardRemovedError
from agent.sam.base import PurchaseMacRequest
from agent.sam.keys import KeySet
from agent.sam.psam import PsamConfig, PsamDriver
from agent.sam.software import SamCore
from tests.fake_reader.cpu_card import (
    AIR_OVERHEAD_S,
    AIR_PER_BYTE_S,
    EEPROM_COMMIT_S,
    SimulatedCpuCard,
    fixed_random,
    make_cjt166_card,
    make_legacy_1001_card,
    make_tunion_card,
)
from tests.fake_reader.faults import CardTorn, Fault
from tests.fake_reader.inprocess import CardField, InProcessReader, InProcessSamSlot
from tests.fake_reader.psam import SimulatedPsam

TERMINAL = bytes.fromhex("000000000024")
RANDOM = bytes.fromhex("A1B2C3D4")
ASN = bytes.fromhex("5170070104791381")
ISSUER = bytes.fromhex("01011000FFFFFFFF")

C_KEYS: list[dict[str, Any]] = [
    {"usage": "purchase", "index": 1, "version": 1, "algorithm": 0, "levels": 2,
     "key": "404142434445464748494A4B4C4D4E4F"},
    {"usage": "tac", "index": 1, "version": 1, "algorithm": 0, "levels": 2,
     "key": "505152535455565758595A5B5C5D5E5F"},
    {"usage": "maintenance", "index": 1, "version": 1, "algorithm": 0, "levels": 2,
     "key": "606162636465666768696A6B6C6D6E6F"},
]  # fmt: skip
SM4_KEYS: list[dict[str, Any]] = [
    {"usage": "purchase", "index": 1, "version": 1, "algorithm": 4, "levels": 2,
     "key": "0123456789ABCDEFFEDCBA9876543210"},
    {"usage": "tac", "index": 1, "version": 1, "algorithm": 4, "levels": 2,
     "key": "00112233445566778899AABBCCDDEEFF"},
]  # fmt: skip

# The §5.8 compound-purchase transcript: (party, command, expected response).
EF1E_RECORD = (
    "06 0000 000000000024 02 00000000000000 00000064 00001324 20240101120000 1000 "
    "01011000FFFFFFFF 000000000000"
)
TRANSCRIPT = [
    ("card", "00A4040008A00000063201010500",
     "6F318408A000000632010105A5259F0801029F0C1E01011000FFFFFFFF02010310517007010479138120190718"
     "204012310000 9000"),
    ("card", "805C000204", "00001388 9000"),
    ("card", "805003020B01000000640000000000240F", "00001388 0005 000000 01 00 A1B2C3D4 9000"),
    ("psam", "8070000024 A1B2C3D4 0005 00000064 09 20240101 120000 01 00 5170070104791381 "
             "01011000FFFFFFFF 08",
     "00000010 B7ADB8CD 9000"),
    ("card", "80DC00F030 " + EF1E_RECORD, "9000"),
    ("card", "805401000F 00000010 20240101 120000 B7ADB8CD 08", "8D8715C6 D06E03F3 9000"),
    ("psam", "8072000004 D06E03F3", "9000"),
    ("card", "805A000902 0006 08", "D06E03F3 8D8715C6 9000"),
]  # fmt: skip


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


@pytest.fixture
def keyset() -> KeySet:
    return KeySet.from_mapping(C_KEYS)


def tunion(keyset: KeySet, **kwargs) -> SimulatedCpuCard:
    kwargs.setdefault("balance", 0x1388)
    kwargs.setdefault("offline_counter", 5)
    kwargs.setdefault("random_source", fixed_random(RANDOM))
    return make_tunion_card(keyset=keyset, **kwargs)


def make_psam(keyset: KeySet, ttc: int = 0x10, **kwargs) -> SimulatedPsam:
    psam = SimulatedPsam(SamCore(keyset, TERMINAL, bytes(10), ttc=ttc, **kwargs))
    psam.reset()
    assert psam.process(h("00A4040010A0000006324D4F542E435053414D3031")) == h("9000")
    return psam


def run(device: SimulatedCpuCard | SimulatedPsam, command: str) -> bytes:
    return device.process(h(command))


def start_capp(card: SimulatedCpuCard, psam: SimulatedPsam) -> None:
    """Steps 1-5 of the transcript: select, balance, INIT CAPP, PSAM 8070, UPDATE CAPP."""
    for party, command, expected in TRANSCRIPT[:5]:
        device = card if party == "card" else psam
        assert run(device, command) == h(expected), command


DEBIT = "805401000F 00000010 20240101 120000 B7ADB8CD 08"


# -- §5.8 transcript ----------------------------------------------------------------------------


def test_compound_purchase_transcript_byte_for_byte(keyset: KeySet) -> None:
    card, psam = tunion(keyset), make_psam(keyset)
    for party, command, expected in TRANSCRIPT:
        device = card if party == "card" else psam
        assert run(device, command).hex().upper() == h(expected).hex().upper(), command
    # EF18 record of §5.8 (the counter used by the transaction, L) and the EF1E record.
    assert run(card, "00B201C417") == h("0005 000000 00000064 09 000000000024 20240101 120000 9000")
    assert run(card, "00B201F400") == h(EF1E_RECORD + "9000")
    assert card.balance == 0x1388 - 0x64
    assert card.offline_counter == 6
    assert card.debits == [(5, 0x64, 0x09, 0x10, h("8D8715C6"))]
    assert psam.core.ttc == 0x11
    assert not card.internal_errors and not psam.internal_errors


def test_modelled_time_of_a_debit(keyset: KeySet) -> None:
    card, psam = tunion(keyset), make_psam(keyset)
    start_capp(card, psam)
    before = card.modelled_seconds
    run(card, DEBIT)
    expected = AIR_OVERHEAD_S + AIR_PER_BYTE_S * (21 + 10) + EEPROM_COMMIT_S
    assert card.modelled_seconds - before == pytest.approx(expected)
    assert psam.modelled_seconds > 0


# -- purchase errors ------------------------------------------------------------------------------


def test_insufficient_balance_9401(keyset: KeySet) -> None:
    card = tunion(keyset, balance=0x63)
    run(card, "00A4040008A000000632010105")
    assert run(card, "805003020B0100000064000000000024 0F") == h("9401")
    assert not card.has_pending_transaction


def test_unknown_key_index_9403(keyset: KeySet) -> None:
    card = tunion(keyset)
    run(card, "00A4040008A000000632010105")
    assert run(card, "805001020B0900000064000000000024 0F") == h("9403")


def test_wrong_mac1_9302_ends_transaction(keyset: KeySet) -> None:
    card, psam = tunion(keyset), make_psam(keyset)
    start_capp(card, psam)
    assert run(card, "805401000F 00000010 20240101 120000 B7ADB8CE 08") == h("9302")
    assert (card.balance, card.offline_counter, card.debits) == (0x1388, 5, [])
    assert run(card, "00B201F400") == h("6A83")  # staged EF1E write discarded
    assert run(card, DEBIT) == h("6985")  # the transaction is over


def test_debit_without_init_6985(keyset: KeySet) -> None:
    card = tunion(keyset)
    run(card, "00A4040008A000000632010105")
    assert run(card, DEBIT) == h("6985")


def test_update_capp_needs_capp_init(keyset: KeySet) -> None:
    card = tunion(keyset)
    run(card, "00A4040008A000000632010105")
    assert run(card, "80DC00F030 " + EF1E_RECORD) == h("6985")
    run(card, "805001020B01000000640000000000240F")  # simple purchase: no CAPP cache
    assert run(card, "80DC00F030 " + EF1E_RECORD) == h("6985")


def test_other_commands_cancel_pending_purchase_reads_do_not(keyset: KeySet) -> None:
    card, psam = tunion(keyset), make_psam(keyset)
    start_capp(card, psam)
    assert run(card, "00B0950000")[-2:] == h("9000")
    assert run(card, "805C000204") == h("00001388 9000")
    assert card.has_pending_transaction
    assert run(card, "0084000004")[-2:] == h("9000")
    assert not card.has_pending_transaction
    assert run(card, DEBIT) == h("6985")


def test_malformed_apdus(keyset: KeySet) -> None:
    card = tunion(keyset)
    assert run(card, "00A4") == h("6700")
    assert run(card, "10A4040000") == h("6E00")
    assert run(card, "80EE000000") == h("6D00")
    assert run(card, "00A4070002 3F00") == h("6A86")
    assert run(card, "00B0950000") == h("6A82")  # no application selected
    run(card, "00A4040008A000000632010105")
    assert run(card, "805003020A01000000640000000000") == h("6700")
    assert run(card, "00B0950040") == h("6C1E")


# -- tearing and recovery (§6.5) ----------------------------------------------------------------


def test_tear_before_debit_leaves_state_unchanged(keyset: KeySet) -> None:
    card, psam = tunion(keyset), make_psam(keyset)
    field = CardField()
    field.insert(card)
    reader = InProcessReader(field)
    start_capp(card, psam)
    card.faults.add(card.command_count + 1, "tear_before")
    with pytest.raises(CardRemovedError):
        reader.transmit(h(DEBIT))
    assert field.card is None
    assert (card.balance, card.offline_counter, card.debits) == (0x1388, 5, [])
    field.insert(card)
    run(card, "00A4040008A000000632010105")
    assert run(card, "805003020B01000000000000000000240F")[4:6] == h("0005")  # not debited
    assert run(card, "805A000902 0006 08") == h("9406")
    assert run(card, "00B201F400") == h("6A83")


def test_tear_after_debit_commits_and_805A_recovers(keyset: KeySet) -> None:
    card, psam = tunion(keyset), make_psam(keyset)
    field = CardField()
    field.insert(card)
    reader = InProcessReader(field)
    start_capp(card, psam)
    card.faults.add(card.command_count + 1, "tear_after")
    with pytest.raises(CardRemovedError):
        reader.transmit(h(DEBIT))
    assert (card.balance, card.offline_counter) == (0x1388 - 0x64, 6)
    # Next tap: re-INIT shows counter + 1, 805A returns MAC2 || TAC, the PSAM accepts MAC2.
    field.insert(card)
    assert not card.has_pending_transaction
    assert reader.transmit(h("00A4040008A000000632010105"))[-2:] == h("9000")
    assert reader.transmit(h("805003020B01000000000000000000240F"))[4:6] == h("0006")
    assert reader.transmit(h("805A000902 0006 08")) == h("D06E03F3 8D8715C6 9000")
    assert run(psam, "8072000004 D06E03F3") == h("9000")
    assert run(card, "00B201F400") == h(EF1E_RECORD + "9000")
    assert run(card, "805A000902 0005 08") == h("9406")  # counter before: not accepted (L)


def test_corrupted_mac2_is_refused_by_psam(keyset: KeySet) -> None:
    card, psam = tunion(keyset), make_psam(keyset)
    start_capp(card, psam)
    card.faults.add(card.command_count + 1, "corrupt_response")
    response = run(card, DEBIT)
    assert response[:4] == h("8D8715C6") and response[4:8] != h("D06E03F3")
    assert run(psam, "8072000004" + response[4:8].hex()) == h("9302")
    assert card.offline_counter == 6


def test_mute_card_stays_silent_until_it_reenters(keyset: KeySet) -> None:
    card = tunion(keyset)
    card.faults.add(1, "mute")
    for _ in range(2):
        with pytest.raises(CardTorn):
            run(card, "00A4040008A000000632010105")
    card.power_on()
    assert run(card, "00A4040008A000000632010105")[-2:] == h("9000")


def test_reset_command_count(keyset: KeySet) -> None:
    card = tunion(keyset)
    run(card, "805C000204")
    card.reset_command_count()
    card.faults.extend([Fault(1, "tear_before")])
    with pytest.raises(CardTorn):
        run(card, "805C000204")


# -- APPLICATION BLOCK (§6.6, vector D) -----------------------------------------------------------


def lock_card(card: SimulatedCpuCard, psam: SimulatedPsam, p2: int) -> bytes:
    run(card, "00A4040008A000000632010105")
    challenge = run(card, "0084000004")[:4]
    assert run(psam, "801A450110" + (ASN + ISSUER).hex()) == h("9000")
    header = bytes((0x84, 0x1E, 0x00, p2, 0x04))
    mac = run(psam, "80FA050010" + (challenge + bytes(4) + header + h("800000")).hex())[:4]
    return run(card, (header + mac).hex())


def test_application_block_vector_d(keyset: KeySet) -> None:
    card = tunion(keyset, random_source=fixed_random(h("11223344")))
    run(card, "00A4040008A000000632010105")
    assert run(card, "0084000004") == h("11223344 9000")
    assert run(card, "841E000004 D2AD05F0") == h("9000")
    assert card.lock_state == "temporary"


@pytest.mark.parametrize(("p2", "select_sw", "state"), [(0, "6283", "temporary"),
                                                        (1, "9303", "permanent")])  # fmt: skip
def test_lock_then_select(keyset: KeySet, p2: int, select_sw: str, state: str) -> None:
    card, psam = tunion(keyset), make_psam(keyset)
    assert lock_card(card, psam, p2) == h("9000")
    assert card.lock_state == state
    assert run(card, "00A4040008A00000063201010500") == h(select_sw)
    assert run(card, "805003020B01000000640000000000240F") == h("6985")


def test_application_block_refusals(keyset: KeySet) -> None:
    card = tunion(keyset, random_source=fixed_random(h("11223344")))
    run(card, "00A4040008A000000632010105")
    assert run(card, "841E000004 D2AD05F0") == h("6984")  # no challenge
    run(card, "0084000004")
    assert run(card, "841E000004 D2AD05F1") == h("6988")
    assert run(card, "841E000004 D2AD05F0") == h("6984")  # challenge is single use
    assert card.lock_state == "none"


# -- SM4, CJ/T 166, legacy ------------------------------------------------------------------------


def purchase_via_driver(
    card: SimulatedCpuCard,
    driver: PsamDriver,
    select: list[str],
    factors: tuple[bytes, ...],
    amount: int = 0x64,
    transaction_type: int = 0x06,
) -> bytes:
    for command in select:
        assert run(card, command)[-2:] in (h("9000"),), command
    p1 = 0x03 if transaction_type == 0x09 else 0x01
    init = run(
        card,
        f"8050{p1:02X}020B{driver.purchase_key_index:02X}{amount:08X}"
        f"{driver.terminal_number.hex()}0F",
    )
    assert init[-2:] == h("9000") and len(init) == 17
    when = dt.datetime(2024, 1, 1, 12, 0, 0)
    request = PurchaseMacRequest(
        card_random=init[11:15],
        card_counter=int.from_bytes(init[4:6], "big"),
        amount=amount,
        transaction_type=transaction_type,
        when=when,
        key_version=init[9],
        algorithm=init[10],
        factors=factors,
    )
    mac = driver.init_for_purchase(request)
    debit = run(
        card,
        f"805401000F{mac.ttc:08X}{crypto.datetime7(when).hex()}{mac.mac1.hex()}08",
    )
    assert debit[-2:] == h("9000"), debit.hex()
    driver.credit_for_purchase(debit[4:8])
    return debit[:4]


def open_driver(keyset: KeySet, config: PsamConfig | None = None, **core_kwargs) -> PsamDriver:
    core = SamCore(keyset, TERMINAL, bytes(10), ttc=0x10, **core_kwargs)
    driver = PsamDriver(InProcessSamSlot(SimulatedPsam(core)), config)
    driver.open()
    return driver


def test_sm4_purchase_end_to_end() -> None:
    keyset = KeySet.from_mapping(SM4_KEYS)
    card = make_tunion_card(keyset=keyset, algorithm=Algorithm.SM4, balance=1000)
    driver = open_driver(keyset)
    tac = purchase_via_driver(card, driver, ["00A4040008A000000632010105"], (ASN, ISSUER))
    assert card.balance == 1000 - 0x64
    (debit,) = card.debits
    # The card's TAC is the SM4 TAC over the §5.7 fields with its diversified DTK.
    dtk = crypto.diversify(h(SM4_KEYS[1]["key"]), [ASN, ISSUER], Algorithm.SM4)
    expected = crypto.purchase_tac(
        dtk, 0x64, 0x06, TERMINAL, debit.ttc, h("20240101120000"), Algorithm.SM4
    )
    assert tac == expected == debit.tac


def test_cjt166_purchase_with_security_code(keyset: KeySet) -> None:
    card = make_cjt166_card(keyset=keyset, balance=500, city_code="2000")
    psam = SimulatedPsam(SamCore(keyset, TERMINAL, bytes(10), ttc=1))
    driver = PsamDriver(InProcessSamSlot(psam), PsamConfig.cjt166())
    driver.open()
    assert run(card, "00A40000023F00")[-2:] == h("9000")
    fci = run(card, "00A4040009A0000000038698070100")
    assert fci[:13] == h("6F2E8409A00000000386980701")
    assert fci[13:17] == h("A5219F0C") and fci[18:20] == h("0001")
    assert fci[20:22] == h("2000")  # EF15[2..3] city code
    code = run(card, "80CA000009")
    assert len(code) == 11 and code[-2:] == h("9000")
    driver.verify_security_code(code[:9])
    assert psam.security_codes == [code[:9]]
    factors = (ASN, h("2000FF0000000000"))
    purchase_via_driver(card, driver, [], factors)
    assert card.balance == 500 - 0x64
    assert run(card, "805A000602 0001 08")[-2:] == h("9000")
    # CAPP EF17 (record identifier 01) is read by identifier (§2.3).
    assert run(card, "00B201B800")[:3] == h("012E00")


def test_cjt166_capp_record_update(keyset: KeySet) -> None:
    card = make_cjt166_card(keyset=keyset, balance=500, random_source=fixed_random(RANDOM))
    run(card, "00A4040009A00000000386980701")
    assert run(card, "805003020B01000000000000000000240F")[-2:] == h("9000")
    record = h("012E01").ljust(48, b"\x11")
    assert run(card, "80DC01B830" + record.hex()) == h("9000")
    assert run(card, "80DC02B830" + h("022E01").ljust(48, b"\x11").hex()) == h("6A83")
    assert run(card, "80DC01B830" + h("022E01").ljust(48, b"\x11").hex()) == h("6A80")
    assert run(card, "80DC01B830" + h("012F01").ljust(48, b"\x11").hex()) == h("6A80")


def test_legacy_1001_card(keyset: KeySet) -> None:
    one_level = KeySet.from_mapping([dict(C_KEYS[0], levels=1), dict(C_KEYS[1], levels=1)])
    card = make_legacy_1001_card(keyset=one_level, balance=300)
    fci = run(card, "00A40000021001")
    assert b"PBOC" in fci and fci[-2:] == h("9000")
    driver = open_driver(one_level)
    purchase_via_driver(card, driver, [], (card.asn,))
    assert card.balance == 200
    with pytest.raises(ValueError, match="factors"):
        make_legacy_1001_card(keyset=keyset)  # 2-level masters need factors=...


def test_ppse_lists_the_tunion_application(keyset: KeySet) -> None:
    card = tunion(keyset)
    fci = run(card, "00A404000E325041592E5359532E444446303100")
    assert fci[-2:] == h("9000")
    assert h("4F08A000000632010105") in fci and b"MOT_T_EP" in fci


def test_load_credit(keyset: KeySet) -> None:
    load: dict[str, Any] = {"usage": "load", "index": 1, "version": 2, "algorithm": 0, "levels": 2,
            "key": "11223344556677888877665544332211"}  # fmt: skip
    keys = KeySet.from_mapping([*C_KEYS, load])
    card = tunion(keys, random_source=fixed_random(h("11223344")))
    run(card, "00A4040008A000000632010105")
    init = run(card, "805000020B 01 00001000 001122334455 10")
    assert init[:12] == h("00001388 0000 02 00 11223344") and init[-2:] == h("9000")
    dlk = crypto.diversify(h(load["key"]), [ASN, ISSUER], Algorithm.TDES)
    seslk = crypto.load_session_key(dlk, h("11223344"), 0)
    assert init[12:16] == crypto.load_mac1(seslk, 0x1388, 0x1000, 0x02, h("001122334455"))
    mac2 = crypto.load_mac2(seslk, 0x1000, 0x02, h("001122334455"), h("20111221214822"))
    response = run(card, "805200000B 20111221214822" + mac2.hex() + "04")
    assert response[-2:] == h("9000") and len(response) == 6
    assert (card.balance, card.online_counter) == (0x1388 + 0x1000, 1)
    assert run(card, "805A000202 0001 08") == mac2 + response[:4] + h("9000")


# -- robustness ------------------------------------------------------------------------------------


def _fresh_card() -> SimulatedCpuCard:
    return make_tunion_card(keyset=KeySet.from_mapping(C_KEYS), balance=0x1388)


_SHARED_CARD = _fresh_card()
_HEADERS = [h(x) for x in ("00A40400", "00B09500", "00B201C4", "80500302", "80DC00F0",
                           "80540100", "805A0009", "805C0002", "841E0000", "00840000",
                           "80CA0000", "80520000")]  # fmt: skip


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=300))
def test_random_apdus_never_raise(apdu: bytes) -> None:
    response = _SHARED_CARD.process(apdu)
    assert len(response) >= 2
    assert not _SHARED_CARD.internal_errors


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_HEADERS), st.binary(max_size=40)), max_size=8))
def test_structured_random_sessions_never_raise(commands: list[tuple[bytes, bytes]]) -> None:
    card = _fresh_card()
    run(card, "00A4040008A000000632010105")
    for header, body in commands:
        apdu = header + bytes((len(body),)) + body if body else header
        response = card.process(apdu)
        assert len(response) >= 2
    assert not card.internal_errors
    assert 0 <= card.balance <= 0x1388
