"""Issuer dialects (issue 15): profile data validated at load, and what each setting does to the
card steps: which file and bytes are read, the management data, the purse, the printed number.
Every setting is exercised with more than one value."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.apdu import Command, Response
from agent.errors import AgentError, CardError, ConfigurationError, TapRefused
from agent.products import cpu_purse
from agent.profile import (
    ApplicationProfile,
    CheckDigit,
    Dialect,
    Family,
    Flow,
    Management,
    NumberEncoding,
    PrintedNumber,
    Selection,
    load_dialects,
    load_profile,
    parse_profile,
    standard_dialects,
)

ROOT = Path(__file__).resolve().parent.parent
FRAGMENT = ROOT / "firmware_profiles" / "dialects" / "china-cities.toml"
DEMO = ROOT / "firmware_profiles" / "test-city-demo.toml"

TUNION = ApplicationProfile(
    Family.TUNION, Selection.AID, Flow.COMPOUND, bytes.fromhex("A000000632010105")
)
CJT = ApplicationProfile(
    Family.CJT166, Selection.AID, Flow.SIMPLE, bytes.fromhex("A00000000386980701")
)
LEGACY = ApplicationProfile(Family.LEGACY_1001, Selection.FID, Flow.SIMPLE, b"")

OK = 0x9000


def tlv(tag: int, value: bytes) -> bytes:
    head = tag.to_bytes(2 if tag > 0xFF else 1, "big")
    return head + bytes((len(value),)) + value


def ef15(
    issuer: str = "01011000FFFFFFFF",
    serial: str = "03105170070104791381",
    dates: str = "2019071820401231",
) -> bytes:
    return bytes.fromhex(issuer + "0201" + serial + dates + "0000")


class Card:
    """Answers by command name; records what was sent."""

    def __init__(self, answers: dict[str, Response]) -> None:
        self.answers = answers
        self.sent: list[Command] = []

    def __call__(self, command: Command) -> Response:
        self.sent.append(command)
        return self.answers.get(command.label, Response(b"", 0x6A82))


def read(app: ApplicationProfile, fci: bytes, card: Card, dialects: tuple[Dialect, ...]) -> Any:
    return cpu_purse.drive(cpu_purse.read_card(app, fci, dialects), card)


# --- profile data: loading and validation ------------------------------------------------------


def raw_demo() -> dict[str, Any]:
    return tomllib.loads(DEMO.read_text(encoding="utf-8"))


def with_dialect(**fields: Any) -> dict[str, Any]:
    raw = raw_demo()
    dialect = {"name": "x", "source": "test", "family": "legacy1001"}
    dialect.update(fields)
    raw["cpu_purse"]["dialects"] = [dialect]
    return raw


def test_shipped_fragment_loads_and_every_dialect_cites_a_source() -> None:
    dialects = load_dialects(FRAGMENT)
    assert len(dialects) >= 7
    for d in dialects:
        assert d.source and ("@" in d.source), d.name
    assert len({d.name for d in dialects}) == len(dialects)


def test_profile_dialects_come_before_the_standard_layouts(tmp_path: Path) -> None:
    profile = parse_profile(with_dialect(df_name="5041592E535A54"))
    assert [d.name for d in profile.dialects] == ["x", "t-union", "cjt166", "legacy1001"]
    raw = with_dialect()
    raw["cpu_purse"]["dialect_files"] = [str(FRAGMENT)]
    names = [d.name for d in parse_profile(raw).dialects]
    assert names[0] == "x" and names[1] == "shenzhen-tong" and names[-1] == "legacy1001"
    # relative to the profile's own directory when loaded from a file
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "one.toml").write_text(
        '[[dialect]]\nname = "one"\nsource = "here"\nfamily = "cjt166"\n', encoding="utf-8"
    )
    text = DEMO.read_text(encoding="utf-8").replace(
        "[[cpu_purse.applications]]",
        '[cpu_purse]\ndialect_files = ["d/one.toml"]\n\n[[cpu_purse.applications]]',
        1,
    )
    (tmp_path / "p.toml").write_text(text, encoding="utf-8")
    assert load_profile(tmp_path / "p.toml").dialects[0].name == "one"


def test_standard_dialects_can_be_left_out_but_every_family_needs_one() -> None:
    raw = with_dialect()
    raw["cpu_purse"]["standard_dialects"] = False
    with pytest.raises(ConfigurationError, match="no dialect for family 'tunion'"):
        parse_profile(raw, source="p.toml")
    raw["cpu_purse"]["dialects"] += [
        {"name": "t", "source": "s", "family": "tunion", "management": "ef17"},
        {"name": "c", "source": "s", "family": "cjt166"},
    ]
    assert [d.name for d in parse_profile(raw).dialects] == ["x", "t", "c"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": ""}, r"dialects\[0\]\.name' must be a non-empty"),
        ({"source": ""}, r"dialects\[0\]\.source' must cite"),
        ({"family": "bus"}, r"dialects\[0\]\.family' must be one of"),
        ({"purse": "cash"}, r"dialects\[0\]\.purse' must be one of ep, ed"),
        ({"management": "ef18"}, r"dialects\[0\]\.management' must be one of"),
        ({"management": "ef17"}, r"dialects\[0\]\.management' 'ef17' is the T-Union file"),
        ({"number_encoding": "octal"}, r"number_encoding' must be one of hex, decimal-be"),
        ({"number_check_digit": "luhn"}, r"number_check_digit' must be one of"),
        ({"number_file": "serial"}, r"number_file' 'serial' needs serial_sfi"),
        ({"serial_in_mf": True}, r"serial_in_mf' needs serial_sfi"),
        (
            {"serial_in_mf": "yes", "serial_sfi": 5, "serial_file_length": 48},
            r"serial_in_mf' must be true or false",
        ),
        ({"serial_sfi": 5}, r"serial_file_length' is required with serial_sfi"),
        ({"df_name": "XYZ"}, r"dialects\[0\]\.df_name' must be hex"),
        ({"issuer_prefix": "00" * 9}, r"issuer_prefix' must be 1\.\.8 bytes"),
        ({"start_date_at": 27}, r"start_date_at' must be in 0\.\.26"),
        ({"info_length": 40, "expiry_date_at": 37}, r"expiry_date_at' must be in 0\.\.36"),
        ({"serial_at": 25}, r"serial_at' must be in 0\.\.22"),
        ({"serial_at": 21}, r"serial_length' runs past the 30-byte file"),
        ({"number_at": 26, "number_length": 5}, r"number_length' runs past the 30-byte file"),
        ({"number_encoding": "decimal-le", "number_length": 9}, r"number_length' must be in"),
        ({"info_sfi": 31}, r"info_sfi' must be in 1\.\.30"),
        ({"info_length": 300}, r"info_length' must be in 16\.\.255"),
        ({"application_type_at": -2}, r"application_type_at' must be in -1\.\."),
        ({"colour": "red"}, r"dialects\[0\]\.colour' is unknown"),
        ({"number_at": float("nan")}, r"number_at' must be an integer"),
        ({"number_drop_digits": True}, r"number_drop_digits' must be an integer"),
        ({"card_type": 5}, r"dialects\[0\]\.card_type' must be a table"),
        ({"card_type": {"at": 1}}, r"card_type' needs exactly one of file .* or sfi"),
        ({"card_type": {"sfi": 5, "file": "info", "at": 1}}, r"card_type' needs exactly one"),
        ({"card_type": {"sfi": 5}}, r"card_type\.at' is required"),
        ({"card_type": {"file": "info", "at": 30}}, r"card_type\.at' must be in 0\.\.29"),
        ({"card_type": {"sfi": 5, "at": 255}}, r"card_type\.at' must be in 0\.\.254"),
        ({"card_type": {"sfi": 31, "at": 0}}, r"card_type\.sfi' must be in 1\.\.30"),
        ({"card_type": {"sfi": 21, "at": 0}}, r"card_type\.sfi' is the info file"),
        ({"card_type": {"file": "ef05", "at": 0}}, r"card_type\.file' must be one of info"),
        ({"card_type": {"file": "serial", "at": 0}}, r"card_type\.file' 'serial' needs serial"),
        ({"card_type": {"file": "info", "at": 1, "in_mf": True}}, r"in_mf' goes with sfi"),
        ({"card_type": {"sfi": 5, "at": 1, "in_mf": 1}}, r"card_type\.in_mf' must be true or"),
        ({"card_type": {"sfi": 5, "at": True}}, r"card_type\.at' must be an integer"),
        ({"card_type": {"sfi": 5, "at": 1, "pos": 2}}, r"card_type\.pos' is unknown"),
        (
            {"card_type": {"sfi": 5, "at": 1}, "family": "tunion", "management": "ef17"},
            r"card_type' is given by the management data \(ef17",
        ),
        (
            {"card_type": {"sfi": 5, "at": 48}, "serial_sfi": 5, "serial_file_length": 48},
            r"card_type\.at' must be in 0\.\.47",
        ),
        (
            {
                "card_type": {"sfi": 5, "at": 1},
                "serial_sfi": 5,
                "serial_file_length": 48,
                "serial_in_mf": True,
            },
            r"card_type\.in_mf' differs from serial_in_mf: EF05 is in the MF",
        ),
    ],
)
def test_bad_dialect_fields_are_named(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        parse_profile(with_dialect(**fields), source="bad.toml")
    assert str(info.value).startswith("bad.toml")


def test_duplicate_names_and_bad_fragment_files(tmp_path: Path) -> None:
    raw = with_dialect(name="t-union")
    with pytest.raises(ConfigurationError, match="names a dialect twice"):
        parse_profile(raw)
    raw = with_dialect()
    raw["cpu_purse"]["dialect_files"] = ["absent.toml"]
    with pytest.raises(ConfigurationError, match=r"dialect_files\[0\]'.*file not found"):
        parse_profile(raw, base_dir=tmp_path)
    (tmp_path / "bad.toml").write_text("[[dialect]]\nname = 1\n", encoding="utf-8")
    raw["cpu_purse"]["dialect_files"] = ["bad.toml"]
    with pytest.raises(ConfigurationError, match=r"dialect\[0\]\.name' must be a non-empty"):
        parse_profile(raw, base_dir=tmp_path)
    (tmp_path / "extra.toml").write_text("[other]\nx = 1\n", encoding="utf-8")
    raw["cpu_purse"]["dialect_files"] = ["extra.toml"]
    with pytest.raises(ConfigurationError, match="other' is unknown"):
        parse_profile(raw, base_dir=tmp_path)
    raw["cpu_purse"]["dialect_files"] = "one.toml"
    with pytest.raises(ConfigurationError, match="must be a list of file names"):
        parse_profile(raw)


# --- what the settings do ------------------------------------------------------------------------


def test_purse_ep_or_ed_picks_the_get_balance_and_initialize_p2() -> None:
    """purse = ep (P2 02) and ed (P2 01): GET BALANCE and INITIALIZE FOR PURCHASE of that purse."""
    for purse, p2 in (("ep", 0x02), ("ed", 0x01)):
        dialect = load_dialects_from(family="legacy1001", purse=purse)
        fci = tlv(0x6F, tlv(0x84, b"PBOC") + tlv(0xA5, tlv(0x9F0C, ef15())))
        card = Card({"GET BALANCE": Response(bytes.fromhex("00000064"), OK)})
        got = read(LEGACY, fci, card, (dialect,))
        assert got.purse == p2 and got.balance == 100
        assert card.sent[-1].p2 == p2
        init = cpu_purse.initialize_purchase_command(Flow.SIMPLE, 1, 200, bytes(6), got.purse)
        assert init.p2 == p2


def load_dialects_from(**fields: Any) -> Dialect:
    raw = with_dialect(**fields)
    return parse_profile(raw).dialects[0]


def test_management_in_ef17_in_fci_df11_or_none() -> None:
    """management = ef17 reads EF17; fci-df11 takes the same bytes from the FCI (a Lingnan
    Pass T-Union card: province 5800, city 5810, interop 0001 — issue 15 finding 2); none
    takes the city from the info file."""
    mgmt = bytes.fromhex("0000015658005810000101")
    fci_df11 = tlv(0x6F, tlv(0x84, TUNION.aid) + tlv(0xA5, tlv(0x9F0C, ef15()) + tlv(0xDF11, mgmt)))
    balance = {"GET BALANCE": Response(bytes.fromhex("00000064"), OK)}
    ef17 = dataclasses.replace(standard_dialects()[0], name="ef17")
    df11 = dataclasses.replace(ef17, name="df11", management=Management.FCI_DF11)
    none = dataclasses.replace(ef17, name="none", management=Management.NONE)

    card = Card(balance)  # no EF17 on this card
    with pytest.raises(CardError, match="READ BINARY EF17"):
        read(TUNION, fci_df11, card, (ef17,))
    card = Card(balance)
    got = read(TUNION, fci_df11, card, (df11,))
    assert (got.city_code, got.interop_flag, got.card_type) == ("5810", 1, 1)
    assert [c.label for c in card.sent] == ["GET BALANCE"]
    card = Card({**balance, "READ BINARY EF17": Response(mgmt, OK)})
    got = read(TUNION, fci_df11, card, (ef17,))
    assert got.city_code == "5810"
    got = read(TUNION, fci_df11, Card(balance), (none,))
    assert (got.city_code, got.interop_flag) == ("1000", None)
    no_df11 = tlv(0x6F, tlv(0x84, TUNION.aid) + tlv(0xA5, tlv(0x9F0C, ef15())))
    with pytest.raises(CardError, match="FCI tag DF11, absent"):
        read(TUNION, no_df11, Card(balance), (df11,))


@pytest.mark.parametrize(
    ("rule", "data", "printed"),
    [
        (PrintedNumber(0, 4, NumberEncoding.HEX), "0310517F", "0310517F"),
        (PrintedNumber(0, 4, NumberEncoding.HEX, drop_digits=1), "03105170", "3105170"),
        (PrintedNumber(0, 4, NumberEncoding.DECIMAL_LE), "C2398534", "881146306"),
        (PrintedNumber(0, 4, NumberEncoding.DECIMAL_BE), "0526E0B8", "86433976"),
        (PrintedNumber(0, 4, NumberEncoding.DECIMAL_LE), "A344C213", "331498659"),
        (
            PrintedNumber(0, 4, NumberEncoding.DECIMAL_LE, check_digit=CheckDigit.DIGIT_SUM_10),
            "A344C213",
            "331498659(2)",
        ),
        (PrintedNumber(2, 2, NumberEncoding.HEX), "00001234", "1234"),
        (PrintedNumber(0, 2, NumberEncoding.HEX, drop_digits=9), "1234", "0"),
    ],
)
def test_printed_number_rules(rule: PrintedNumber, data: str, printed: str) -> None:
    assert cpu_purse.printed_number(rule, bytes.fromhex(data)) == printed


def test_serial_file_in_the_adf_or_in_the_mf() -> None:
    """serial_sfi reads the serial from another file; serial_in_mf selects the MF for it and
    the application again after (Chongqing EF05)."""
    info = bytes.fromhex("0001400020141203209912310000") + bytes(16)
    ef05 = bytes(12) + bytes.fromhex("4000000212668612") + bytes(28)
    fci = tlv(0x6F, tlv(0x84, CJT.aid) + tlv(0xA5, tlv(0x9F0C, info)))
    base = dict(
        family="cjt166", issuer_prefix="00014000", start_date_at=4, expiry_date_at=8,
        application_type_at=-1, enable_flag_at=-1, serial_sfi=5, serial_file_length=48,
        serial_at=12, serial_length=8, number_file="serial", number_at=12, number_length=8,
    )  # fmt: skip
    answers = {
        "READ BINARY EF05": Response(ef05, OK),
        "GET BALANCE": Response(bytes(4), OK),
        "SELECT MF 3F00": Response(b"", OK),
        f"SELECT AID {CJT.aid.hex().upper()}": Response(fci, OK),
    }
    for in_mf, labels in (
        (False, ["READ BINARY EF05", "GET BALANCE"]),
        (True, ["SELECT MF 3F00", "READ BINARY EF05", f"SELECT AID {CJT.aid.hex().upper()}",
                "GET BALANCE"]),
    ):  # fmt: skip
        card = Card(answers)
        got = read(CJT, fci, card, (load_dialects_from(serial_in_mf=in_mf, **base),))
        assert [c.label for c in card.sent] == labels
        assert got.card_id == got.printed_number == "4000000212668612"
        assert got.start == dt.date(2014, 12, 3) and got.expiry == dt.date(2099, 12, 31)


CJT_BASE: dict[str, Any] = dict(
    family="cjt166", issuer_prefix="0001", application_type_at=-1, enable_flag_at=-1
)


@pytest.mark.parametrize(
    ("where", "extra", "labels", "card_type"),
    [
        (None, {}, ["GET BALANCE"], None),  # no card_type: none, as before (issue 13)
        ({"file": "info", "at": 28}, {}, ["GET BALANCE"], 0x06),  # S2: EF15 byte 28
        ({"sfi": 5, "at": 18}, {}, ["READ BINARY EF05", "GET BALANCE"], 0x07),
        (
            {"sfi": 5, "at": 19, "in_mf": True},
            {},
            ["SELECT MF 3F00", "READ BINARY EF05", "SELECT AID A00000000386980701", "GET BALANCE"],
            0x03,
        ),
        (  # the serial file is the card-type file: read once
            {"sfi": 5, "at": 18, "in_mf": True},
            {"serial_sfi": 5, "serial_file_length": 48, "serial_in_mf": True, "serial_at": 10},
            ["SELECT MF 3F00", "READ BINARY EF05", "SELECT AID A00000000386980701", "GET BALANCE"],
            0x07,
        ),
        (
            {"file": "serial", "at": 19},
            {"serial_sfi": 5, "serial_file_length": 48, "serial_at": 10},
            ["READ BINARY EF05", "GET BALANCE"],
            0x03,
        ),
        (  # a serial file and another card-type file: both read
            {"sfi": 6, "at": 0},
            {"serial_sfi": 5, "serial_file_length": 48, "serial_at": 10},
            ["READ BINARY EF05", "READ BINARY EF06", "GET BALANCE"],
            0x11,
        ),
    ],
)
def test_card_type_where_the_dialect_keeps_it(
    where: dict[str, Any] | None, extra: dict[str, Any], labels: list[str], card_type: int | None
) -> None:
    """card_type names a byte of the info file, the serial file or another file (in the MF or
    the application); each file is read once, and only as far as the byte (Le = at + 1)."""
    info = bytes.fromhex("00011000000100000101") + bytes.fromhex("1000517007010000123420190718")
    info += bytes.fromhex("20401231") + bytes((0x06, 0x00))  # byte 28: S2's main card type
    ef05 = bytes(10) + bytes.fromhex("1000517007010000") + bytes.fromhex("0703") + bytes(28)
    fci = tlv(0x6F, tlv(0x84, CJT.aid) + tlv(0xA5, tlv(0x9F0C, info)))
    answers = {
        "READ BINARY EF05": Response(ef05, OK),
        "READ BINARY EF06": Response(bytes((0x11, 0x22)), OK),
        "GET BALANCE": Response(bytes(4), OK),
        "SELECT MF 3F00": Response(b"", OK),
        f"SELECT AID {CJT.aid.hex().upper()}": Response(fci, OK),
    }
    fields = {**CJT_BASE, **extra, **({} if where is None else {"card_type": where})}
    dialect = load_dialects_from(**fields)
    card = Card(answers)
    got = read(CJT, fci, card, (dialect,))
    assert [c.label for c in card.sent] == labels
    assert got.card_type == card_type
    for command in card.sent:
        if command.label == "READ BINARY EF05" and where is not None:
            assert command.le == (48 if "serial_sfi" in extra else where["at"] + 1)


def test_a_card_type_file_too_short_or_missing_is_an_error_naming_it() -> None:
    """A card whose card-type file is shorter than the byte, or absent, fails the read with
    the file and the dialect named (never a silent full fare)."""
    info = bytes.fromhex("000110000001000001011000517007010000123420190718204012310600")
    fci = tlv(0x6F, tlv(0x84, CJT.aid) + tlv(0xA5, tlv(0x9F0C, info)))
    dialect = load_dialects_from(**CJT_BASE, name="typed", card_type={"sfi": 5, "at": 18})
    short = Card({"READ BINARY EF05": Response(bytes(10), OK)})
    with pytest.raises(CardError, match="READ BINARY EF05"):
        read(CJT, fci, short, (dialect,))
    absent = Card({})
    with pytest.raises(CardError, match=r"READ BINARY EF05.*6A82"):
        read(CJT, fci, absent, (dialect,))
    with pytest.raises(CardError, match=r"EF05 holds no card type at byte 18 \(dialect typed\)"):
        cpu_purse.parse_card(CJT, info, None, 0, dialect=dialect, card_type_file=bytes(18))


def test_dialect_matching_by_df_name_issuer_prefix_and_info_file() -> None:
    """df_name and issuer_prefix choose among dialects; a dialect whose info file the card
    lacks (6A82) gives way to the next one's (Beijing EF04 vs EF15 of other PBOC cards)."""
    fragment = load_dialects(FRAGMENT) + standard_dialects()
    pboc = tlv(0x6F, tlv(0x84, b"PBOC") + tlv(0xA5, b""))
    card = Card(
        {
            "READ BINARY EF15": Response(ef15("1000000000000000"), OK),
            "GET BALANCE": Response(bytes(4), OK),
        }
    )
    got = read(LEGACY, pboc, card, fragment)
    assert got.dialect == "legacy1001"
    assert [c.label for c in card.sent] == ["READ BINARY EF04", "READ BINARY EF15", "GET BALANCE"]
    szt = tlv(0x6F, tlv(0x84, b"PAY.SZT") + tlv(0xA5, tlv(0x9F0C, ef15() + bytes(2))))
    got = read(LEGACY, szt, Card({"GET BALANCE": Response(bytes(4), OK)}), fragment)
    assert got.dialect == "shenzhen-tong"
    shanghai = ef15("86982000FFFFFFFF", "20007D93847E0526E0B8")
    other = ef15("86984000FFFFFFFF", "20007D93847E0526E0B8")
    for info, name in ((shanghai, "shanghai-cjt166"), (other, "cjt166")):
        fci = tlv(0x6F, tlv(0x84, CJT.aid) + tlv(0xA5, tlv(0x9F0C, info)))
        got = read(CJT, fci, Card({"GET BALANCE": Response(bytes(4), OK)}), fragment)
        assert got.dialect == name
    only = (dataclasses.replace(standard_dialects()[2], issuer_prefix=b"\x99"),)
    with pytest.raises(TapRefused, match=r"unknown_card.*no dialect of family legacy1001"):
        read(LEGACY, szt, Card({}), only)
    only = (dataclasses.replace(standard_dialects()[2], df_name=b"ELSE"),)
    with pytest.raises(TapRefused, match="for DF name 5041592E535A54"):
        read(LEGACY, szt, Card({}), only)


# --- family detection: not a transit purse -----------------------------------------------------


def test_etc_and_bank_applications_are_not_transit_purses() -> None:
    """A GBK province name as issuer id (a highway ETC card) and a UnionPay bank AID are
    refused 'not_a_transit_purse', saying what the card said."""
    etc_info = bytes.fromhex("B9E3B6AB0000000116104401" + "00" * 8 + "2016053020260530")
    fci = tlv(0x6F, tlv(0x84, CJT.aid) + tlv(0xA5, b""))
    card = Card({"READ BINARY EF15": Response(etc_info + bytes(15), OK)})
    with pytest.raises(TapRefused) as refused:
        read(LEGACY, fci, card, standard_dialects())
    assert refused.value.reason == "not_a_transit_purse"
    assert "广东" in str(refused.value) and "card type 16" in str(refused.value)
    bank = tlv(
        0x6F, tlv(0x84, bytes.fromhex("A000000333010101")) + tlv(0xA5, tlv(0x50, b"PBOC DEBIT"))
    )
    dialect = dataclasses.replace(standard_dialects()[2], df_name=b"")
    with pytest.raises(TapRefused, match="bank application \\(PBOC DEBIT\\)"):
        read(LEGACY, bank, Card({}), (dialect,))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=30, max_size=64))
def test_gbk_check_only_refuses_text_issuers(info: bytes) -> None:
    """Random info files: refused as ETC only when the issuer id starts with two hanzi."""
    facts = cpu_purse.FciFacts(None, "", info, None)
    hanzi = all(0xB0 <= info[i] <= 0xF7 and 0xA1 <= info[i + 1] <= 0xFE for i in (0, 2))
    try:
        cpu_purse.not_a_transit_purse(facts, info)
    except TapRefused as refused:
        assert hanzi and refused.reason == "not_a_transit_purse"
    else:
        assert not hanzi or _undecodable(info[:4])


def _undecodable(raw: bytes) -> bool:
    try:
        raw.decode("gbk")
    except UnicodeDecodeError:
        return True
    return False


# --- property tests: untrusted bytes -------------------------------------------------------------

rules = st.builds(
    PrintedNumber,
    at=st.integers(0, 40),
    length=st.integers(1, 10),
    encoding=st.sampled_from(NumberEncoding),
    drop_digits=st.integers(0, 19),
    check_digit=st.sampled_from(CheckDigit),
)


@settings(max_examples=300, deadline=None)
@given(rules, st.binary(max_size=64))
def test_printed_number_never_raises(rule: PrintedNumber, data: bytes) -> None:
    printed = cpu_purse.printed_number(rule, data)
    assert printed
    if rule.encoding is not NumberEncoding.HEX:
        assert printed.split("(")[0].isdigit()


@settings(max_examples=300, deadline=None)
@given(
    dialect=st.sampled_from(load_dialects(FRAGMENT) + standard_dialects()),
    fci=st.binary(max_size=80),
    answers=st.lists(
        st.builds(Response, st.binary(max_size=80), st.sampled_from([0x9000, 0x6A82, 0x6283])),
        min_size=6,
        max_size=6,
    ),
)
def test_read_card_with_any_dialect_raises_only_project_errors(
    dialect: Dialect, fci: bytes, answers: list[Response]
) -> None:
    """Whatever the card answers, reading it by any shipped dialect returns a card or raises an
    AgentError."""
    app = {Family.TUNION: TUNION, Family.CJT166: CJT, Family.LEGACY_1001: LEGACY}[dialect.family]
    it = iter(answers)
    with contextlib.suppress(AgentError):
        cpu_purse.drive(cpu_purse.read_card(app, fci, (dialect,)), lambda _c: next(it))


def test_demo_profile_still_uses_the_standard_layouts() -> None:
    """Profiles without dialects keep the old behaviour (the §2.3 layouts)."""
    profile = parse_profile(copy.deepcopy(raw_demo()))
    assert profile.dialects == standard_dialects()


# --- the printed number in the tap outcome, the log line and the record (issue 15, item d) -----


def test_tap_outcome_log_and_record_carry_the_printed_number(tmp_path: Path) -> None:
    """A paid tap reports the printed number in its outcome and tap log line and signs it into
    the record body next to the card id (the raw serial hex the blacklist and intents key on)."""
    from structlog.testing import capture_logs

    from tests.fake_reader.scenario import make_card
    from tests.rig import Rig

    szt = Dialect(
        "szt-like",
        "test: a PAY.SZT card whose number is little-endian EF15[16..19]",
        Family.LEGACY_1001,
        df_name=b"PAY.SZT",
        printed=PrintedNumber(16, 4, NumberEncoding.DECIMAL_LE),
    )
    rig = Rig(tmp_path, dialects=(szt, *standard_dialects()))
    try:
        with capture_logs() as logs:
            tunion = rig.tap(make_card("tunion", 1, rig.keyset))
            legacy = rig.tap(make_card("legacy1001", 2, rig.keyset, df_name=b"PAY.SZT"))
        assert tunion.status == legacy.status == "paid"
        assert tunion.printed_number == tunion.card_id[1:]  # T-Union: drop the leading 0
        serial = bytes.fromhex(legacy.card_id)
        assert legacy.printed_number == str(int.from_bytes(serial[6:10], "little"))
        lines = [e for e in logs if e["event"] == "tap"]
        assert [e["printed"] for e in lines] == [tunion.printed_number, legacy.printed_number]
        records = list(rig.store.records())
        assert [(r.card_id, r.fields["printed_number"]) for r in records] == [
            (tunion.card_id, tunion.printed_number),
            (legacy.card_id, legacy.printed_number),
        ]
        assert rig.store.verify().ok
    finally:
        rig.close()
