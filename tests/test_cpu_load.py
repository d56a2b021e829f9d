"""Pure parts of the online load: the judge's table, the step parsers, the load crypto."""

from __future__ import annotations

import pytest

from agent import crypto
from agent.apdu import Response
from agent.crypto import Algorithm
from agent.errors import CardProtocolError, CardStatusError, TapRefused
from agent.products import cpu_load
from agent.products.cpu_load import CpuLoadIntent, Mac2Rejected, judge_load
from agent.products.cpu_purse import drive
from agent.products.intents import IntentPayloadError, Verdict

INTENT = CpuLoadIntent(
    family="tunion",
    aid="A000000632010105",
    asn="5170070100000001",
    load_key="order-1",
    counter=7,
    amount=3000,
    balance_before=500,
    key_version=1,
    algorithm=0,
    random="11223344",
    mac1="2988AE5A",
    datetime="20261130120000",
    terminal="000000000024",
)


@pytest.mark.parametrize(
    ("counter", "balance", "verdict", "fault"),
    [
        (7, 500, Verdict.VOID, False),
        (7, 3500, Verdict.VOID, False),  # the counter decides: no credit without it moving
        (8, 3500, Verdict.FINALIZE, False),
        (8, 500, Verdict.UNRESOLVED, True),
        (9, 6500, Verdict.UNRESOLVED, False),  # another load ran since: the host decides
        (6, 500, Verdict.UNRESOLVED, True),  # counter went back
    ],
)
def test_judge_table(counter: int, balance: int, verdict: Verdict, fault: bool) -> None:
    decision = judge_load(INTENT, counter, balance)
    assert decision.verdict is verdict
    assert bool(decision.card_fault) is fault


def test_counter_wraps() -> None:
    wrapped = CpuLoadIntent.from_payload({**INTENT.to_payload(), "counter": 0xFFFF})
    assert judge_load(wrapped, 0, wrapped.balance_after).verdict is Verdict.FINALIZE


def test_intent_round_trip_and_bad_payload() -> None:
    assert CpuLoadIntent.from_payload(INTENT.to_payload()) == INTENT
    with pytest.raises(IntentPayloadError):
        CpuLoadIntent.from_payload({**INTENT.to_payload(), "counter": None})
    with pytest.raises(IntentPayloadError):
        CpuLoadIntent.from_payload({**INTENT.to_payload(), "op": "purchase"})


def _answer(data: bytes, sw: int = 0x9000) -> Response:
    return Response(data, sw)


def test_initialize_for_load_parses_the_published_answer() -> None:
    """§5.8 context: 80 50 00 01 0B 01 00001000 001122334455 → 00000000 0000 02 00 11223344
    2988AE5A (P2 01 in the post; the step sends P2 02)."""
    answer = bytes.fromhex("0000000000000200112233442988AE5A")
    step = cpu_load.initialize_for_load(1, 0x1000, bytes.fromhex("001122334455"), 10**6)
    sent: list[bytes] = []

    def exchange(command: object) -> Response:
        sent.append(command.to_bytes())  # type: ignore[attr-defined]
        return _answer(answer)

    init = drive(step, exchange)
    assert sent == [bytes.fromhex("805000020B010000100000112233445510")]
    assert (init.balance, init.counter, init.key_version, init.algorithm) == (0, 0, 2, 0)
    assert init.random == bytes.fromhex("11223344") and init.mac1 == bytes.fromhex("2988AE5A")


@pytest.mark.parametrize(
    ("data", "sw", "error"),
    [
        (b"", 0x9403, TapRefused),
        (bytes(15), 0x9000, CardProtocolError),
        (bytes(7) + b"\x09" + bytes(8), 0x9000, CardProtocolError),  # unknown algorithm
        (b"", 0x6985, CardStatusError),
    ],
)
def test_initialize_for_load_refusals(data: bytes, sw: int, error: type[Exception]) -> None:
    step = cpu_load.initialize_for_load(1, 100, bytes(6), 10**6)
    with pytest.raises(error):
        drive(step, lambda _c: _answer(data, sw))


def test_credit_for_load_9302_is_mac2_rejected() -> None:
    step = cpu_load.credit_for_load(bytes(7), bytes(4))
    with pytest.raises(Mac2Rejected) as rejected:
        drive(step, lambda _c: _answer(b"", 0x9302))
    assert rejected.value.sw == 0x9302
    tac = drive(
        cpu_load.credit_for_load(bytes(7), bytes(4)), lambda _c: _answer(b"\x01\x02\x03\x04")
    )
    assert tac == b"\x01\x02\x03\x04"


def test_published_load_vectors_a1() -> None:
    """cpu-purse.md §5.8 A1 (published, P3)."""
    seslk = crypto.load_session_key(
        bytes.fromhex("11223344556677888877665544332211"), bytes.fromhex("11223344"), 0
    )
    assert seslk == bytes.fromhex("9B1D924E05595603")
    terminal = bytes.fromhex("001122334455")
    assert crypto.load_mac1(seslk, 0, 0x1000, 0x01, terminal) == bytes.fromhex("2988AE5A")
    mac2 = crypto.load_mac2(seslk, 0x1000, 0x01, terminal, bytes.fromhex("20111221214822"))
    assert mac2 == bytes.fromhex("3A845BF0")


def test_self_computed_load_tac_b2() -> None:
    """§5.8 B2 (self-computed, L-confidence layout), TAC key 8888888888888888 = DTK
    00112233445566778899AABBCCDDEEFF halves XORed."""
    tac = crypto.load_tac(
        bytes.fromhex("00112233445566778899AABBCCDDEEFF"),
        0x1000,
        0,
        0x1000,
        0x01,
        bytes.fromhex("001122334455"),
        bytes.fromhex("20111221214822"),
    )
    assert tac == bytes.fromhex("6314E5F5")


def test_sm4_load_session_key_is_a_16_byte_sm4_block() -> None:
    """The SM4 form is UNCONFIRMED (§5.6): SM4_DLK(random4 ‖ ctr2 ‖ 80 00…00)."""
    dlk = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    key = crypto.load_session_key(dlk, bytes.fromhex("11223344"), 5, Algorithm.SM4)
    block = crypto.pad80(bytes.fromhex("11223344") + b"\x00\x05", 16)
    assert key == crypto.sm4_encrypt(dlk, block) and len(key) == 16
    mac = crypto.load_mac1(key, 0, 100, 2, bytes(6), Algorithm.SM4)
    assert mac == crypto.sm4_mac(key, bytes(4) + (100).to_bytes(4, "big") + b"\x02" + bytes(6))
