"""Untrusted card answers: every parser and step either succeeds or raises the project's errors."""

from __future__ import annotations

import contextlib
import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import tlv
from agent.apdu import Command, Response
from agent.errors import AgentError, CardProtocolError, CardStatusError, TapRefused
from agent.products import cpu_purse
from agent.profile import ApplicationProfile, Family, Flow, Selection

TUNION = ApplicationProfile(
    Family.TUNION, Selection.PPSE, Flow.COMPOUND, bytes.fromhex("A000000632010105")
)
CJT = ApplicationProfile(
    Family.CJT166, Selection.AID, Flow.SIMPLE, bytes.fromhex("A00000000386980701")
)
LEGACY = ApplicationProfile(Family.LEGACY_1001, Selection.FID, Flow.SIMPLE, b"")

# FCI of a T-Union card from the nfsee mock (cpu-purse.md §2.2), data part only.
TUNION_FCI = bytes.fromhex(
    "6F318408A000000632010105A5259F0801029F0C1E01011000FFFFFFFF020103105170070104791381"
    "201907182040123100 00".replace(" ", "")
)
EF17 = bytes.fromhex("0000015658005840000101") + bytes(49)

responses = st.builds(
    Response,
    st.binary(max_size=300),
    st.integers(min_value=0, max_value=0xFFFF),
)


def drive_with(step, answers):
    """Feed a step a list of responses; return its result (or raise its error)."""
    it = iter(answers)
    return cpu_purse.drive(step, lambda _cmd: next(it))


def steps_for_fuzzing():
    return [
        lambda: cpu_purse.select_application(TUNION),
        lambda: cpu_purse.select_application(CJT),
        lambda: cpu_purse.select_application(LEGACY),
        lambda: cpu_purse.read_card(TUNION, b""),
        lambda: cpu_purse.read_card(CJT, TUNION_FCI),
        lambda: cpu_purse.initialize_purchase(Flow.SIMPLE, 1, 200, bytes(6), 100000),
        lambda: cpu_purse.debit_for_purchase(1, bytes(7), bytes(4)),
        lambda: cpu_purse.get_transaction_prove(9, 6),
        lambda: cpu_purse.update_capp_cache(0, 0xF0, bytes(48)),
    ]


@settings(max_examples=400, deadline=None)
@given(
    index=st.integers(min_value=0, max_value=8), answers=st.lists(responses, min_size=6, max_size=6)
)
def test_random_responses_raise_only_project_errors(index, answers):
    """Whatever the card answers, a step returns a result or raises an AgentError."""
    step = steps_for_fuzzing()[index]()
    with contextlib.suppress(AgentError):
        drive_with(step, answers)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_tlv_parser_raises_only_tlv_errors(data):
    """Garbage TLV raises TlvError (a ValueError) and nothing else."""
    with contextlib.suppress(tlv.TlvError):
        tlv.parse(data)


def test_tunion_fci_carries_ef15():
    """The nfsee mock FCI parses and carries EF15 in tag 9F0C."""
    node = tlv.find(TUNION_FCI, 0x9F0C)
    assert node is not None
    assert node.value[10:20] == bytes.fromhex("03105170070104791381")


def test_read_card_tunion_from_fci_and_ef17():
    """EF15 from the FCI, EF17 and GET BALANCE make a qualified-looking T-Union card."""
    card = drive_with(
        cpu_purse.read_card(TUNION, TUNION_FCI),
        [Response(EF17, 0x9000), Response(bytes.fromhex("00001388"), 0x9000)],
    )
    assert card.card_id == "03105170070104791381"
    assert card.asn == bytes.fromhex("5170070104791381")
    assert card.balance == 5000
    assert card.start == dt.date(2019, 7, 18)
    assert card.expiry == dt.date(2040, 12, 31)
    assert card.city_code == "5840"
    assert card.interop_flag == 1
    assert card.factors == (bytes.fromhex("5170070104791381"), bytes.fromhex("01011000FFFFFFFF"))


def test_locked_application_is_refused():
    """SELECT answering 6283 or 9303 refuses the tap as a locked card."""
    for sw in (0x6283, 0x9303):
        with pytest.raises(TapRefused, match="card_locked"):
            drive_with(
                cpu_purse.select_application(CJT), [Response(b"", 0x9000), Response(b"", sw)]
            )


def test_init_insufficient_balance_and_bad_algorithm():
    """9401 is a refusal; an unknown algorithm id is a protocol error naming the command."""
    step = lambda: cpu_purse.initialize_purchase(Flow.SIMPLE, 1, 200, bytes(6), 100000)  # noqa: E731
    with pytest.raises(TapRefused, match="insufficient_balance"):
        drive_with(step(), [Response(b"", 0x9401)])
    bad = bytes.fromhex("00001388 0005 000000 01 07 A1B2C3D4".replace(" ", ""))
    with pytest.raises(CardProtocolError, match="INITIALIZE FOR PURCHASE: unknown algorithm"):
        drive_with(step(), [Response(bad, 0x9000)])
    with pytest.raises(CardProtocolError, match="expected 15 data bytes"):
        drive_with(step(), [Response(bad[:10], 0x9000)])
    with pytest.raises(CardStatusError, match="SW 6985"):
        drive_with(step(), [Response(b"", 0x6985)])


def test_impossible_dates_are_protocol_errors():
    """Non-BCD or impossible dates in EF15 are refused as protocol errors."""
    with pytest.raises(CardProtocolError, match="not BCD"):
        cpu_purse.bcd_date(bytes.fromhex("2024AB01"), "EF15 start date")
    with pytest.raises(CardProtocolError, match="not a date"):
        cpu_purse.bcd_date(bytes.fromhex("20241301"), "EF15 start date")


def test_command_bytes_match_spec_examples():
    """Builders produce the spec's APDUs (cpu-purse.md §3.1 S2 example, §5.8 transcript)."""
    assert cpu_purse.initialize_purchase_command(
        Flow.COMPOUND, 1, 1, bytes.fromhex("000001000006")
    ).to_bytes() == bytes.fromhex("805003020B01000000010000010000060F")
    assert cpu_purse.debit_command(
        0x10, bytes.fromhex("20240101120000"), bytes.fromhex("B7ADB8CD")
    ).to_bytes() == bytes.fromhex("805401000F000000102024010112000 0B7ADB8CD08".replace(" ", ""))
    assert cpu_purse.prove_command(9, 6).to_bytes() == bytes.fromhex("805A000902000608")
    assert Command.from_bytes(bytes.fromhex("805C000204")) == Command(0x80, 0x5C, 0, 2, le=4)
