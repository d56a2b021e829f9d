"""M1 codecs: published value-block and access-byte vectors (m1-purse-and-readers.md §1.2,
§1.3), PC/SC pseudo-APDU builders (§4a), round-trips, and garbage that only ever raises the
project's own errors."""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import tomllib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import AgentError, CardProtocolError, ConfigurationError
from agent.products import m1_codec as c
from agent.products.m1_codec import (
    AccessConditions,
    DatesFormat,
    IssuanceDates,
    M1FormatError,
    PublicInfo,
    TripRecord,
)
from agent.products.m1_layout import M1Layout, block_number, sector_of
from agent.readers import storage as s
from agent.readers.storage import KeyType
from tests.fake_reader.m1_card import GARBAGE

# --- value blocks (§1.3) ------------------------------------------------------------------------


def test_nxp_value_block_vector():
    block = bytes.fromhex("87D61200782 9EDFF87D61200 11EE11EE".replace(" ", ""))
    assert c.encode_value_block(1234567, 0x11) == block
    assert c.decode_value_block(block) == c.ValueBlock(1234567, 0x11)


def test_acs_value_block_vectors():
    v100 = bytes.fromhex("640000009BFFFFFF6400000005FA05FA")
    assert c.encode_value_block(100, 5) == v100
    # ACS: RESTORE 05 + TRANSFER 06 copies the source's adr byte (§1.3).
    v101 = bytes.fromhex("650000009AFFFFFF6500000005FA05FA")
    assert c.decode_value_block(v101) == c.ValueBlock(101, 5)
    # §5.5 trace: 850 with adr 08.
    assert c.decode_value_block(bytes.fromhex("52030000adfcffff5203000008f708f7")).value == 850


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:8] + bytes((b[8] ^ 1,)) + b[9:],  # third copy differs
        lambda b: b[:4] + bytes((b[4] ^ 1,)) + b[5:],  # inverted copy wrong
        lambda b: b[:13] + bytes((b[13] ^ 1,)) + b[14:],  # ~adr wrong
        lambda b: b[:14] + bytes((b[14] ^ 1,)) + b[15:],  # adr copies disagree
        lambda b: b[:15],  # short
    ],
)
def test_corrupt_value_blocks_refused(mutate):
    with pytest.raises(M1FormatError):
        c.decode_value_block(mutate(c.encode_value_block(500, 9)))


def test_address_check_can_be_relaxed():
    block = bytearray(c.encode_value_block(7, 4))
    block[13] ^= 0xFF
    assert c.decode_value_block(bytes(block), check_address=False).value == 7


@given(st.integers(c.VALUE_MIN, c.VALUE_MAX), st.integers(0, 255))
def test_value_block_round_trip(value, adr):
    assert c.decode_value_block(c.encode_value_block(value, adr)) == c.ValueBlock(value, adr)


@given(st.binary(max_size=20))
def test_value_block_garbage_only_project_errors(data):
    with contextlib.suppress(M1FormatError):
        c.decode_value_block(data)


# --- access bits (§1.2) --------------------------------------------------------------------------

ACCESS_VECTORS = [
    ("FF0780", (0b000, 0b000, 0b000, 0b001)),
    ("08778F", (0b110, 0b110, 0b110, 0b011)),
    ("7F0788", (0b000, 0b000, 0b000, 0b011)),
    ("7E1788", (0b100, 0b000, 0b000, 0b011)),
]


@pytest.mark.parametrize(("hex_bytes", "groups"), ACCESS_VECTORS)
def test_access_byte_vectors(hex_bytes, groups):
    conditions = AccessConditions(groups)
    assert c.encode_access_bits(conditions) == bytes.fromhex(hex_bytes)
    assert c.decode_access_bits(bytes.fromhex(hex_bytes + "69")) == conditions


def test_purse_access_semantics():
    """08 77 8F: key A reads/debits/transfers/restores, key B also increments and writes."""
    cond = c.decode_access_bits(bytes.fromhex("08778F"))
    assert cond.data_allows(1, "decrement", KeyType.A)
    assert cond.data_allows(1, "read", KeyType.A)
    assert not cond.data_allows(1, "increment", KeyType.A)
    assert not cond.data_allows(1, "write", KeyType.A)
    assert cond.data_allows(1, "increment", KeyType.B)
    assert cond.trailer_allows("access_write", KeyType.B)
    assert not cond.trailer_allows("key_a_write", KeyType.A)
    assert not cond.key_b_readable
    assert c.decode_access_bits(bytes.fromhex("FF0780")).key_b_readable


def test_inconsistent_access_bits_refused():
    with pytest.raises(M1FormatError, match="inconsistent"):
        c.decode_access_bits(bytes.fromhex("FF0781"))


@given(st.tuples(*[st.integers(0, 7)] * 4))
def test_access_bits_round_trip(groups):
    conditions = AccessConditions(groups)
    assert c.decode_access_bits(c.encode_access_bits(conditions)) == conditions


@given(st.binary(max_size=6))
def test_access_bits_garbage_only_project_errors(data):
    with contextlib.suppress(M1FormatError):
        c.decode_access_bits(data)


def test_access_groups_of_big_sectors():
    assert [c.access_group(i, 16) for i in (0, 4, 5, 9, 10, 14, 15)] == [0, 0, 1, 1, 2, 2, 3]
    assert [c.access_group(i, 4) for i in range(4)] == [0, 1, 2, 3]
    assert block_number(32, 0) == 128 and block_number(39, 15) == 255
    assert sector_of(255) == 39 and sector_of(127) == 31


# --- checks, public info, issuance, records (§3.1, §3.2) ----------------------------------------


def test_checksums():
    assert c.xor8(bytes.fromhex("010203")) == 0x00
    assert c.crc16(b"123456789") == 0x29B1  # CRC-16/CCITT-FALSE check value
    assert c.crc8(b"123456789") != c.crc8(b"123456788")


@pytest.mark.parametrize("kind", c.CHECK_KINDS)
@pytest.mark.parametrize("seed", [b"", b"CS-METRO-2013@GDMH"])
@pytest.mark.parametrize("encoding", ["copy", "inverted"])
def test_tear_garbage_fails_every_check(kind, seed, encoding: c.BackupEncoding):
    """The card model's tear garbage must never pass for a valid block (§3.5 caveat)."""
    with pytest.raises(M1FormatError):
        c.decode_public_info(c.decode_backup(GARBAGE, encoding), kind, seed)
    assert c.value_or_none(GARBAGE) is None


@pytest.mark.parametrize("kind", c.CHECK_KINDS)
@given(
    info=st.builds(
        PublicInfo,
        pointer=st.integers(0, 255),
        counter=st.integers(0, 0xFFFF),
        flag=st.integers(0, 255),
        monthly_counter=st.integers(0, 0xFFFF),
        blacklist=st.integers(0, 255),
        file_flag=st.integers(0, 255),
    ),
    inverted=st.booleans(),
)
def test_public_info_round_trip(kind, info, inverted):
    encoding: c.BackupEncoding = "inverted" if inverted else "copy"
    block = c.encode_backup(c.encode_public_info(info, kind), encoding)
    decoded = c.decode_public_info(c.decode_backup(block, encoding), kind)
    assert decoded.key_fields() == info.key_fields()


def test_public_info_layout_afc():
    """Byte 0 pointer, 1-2 counter big-endian, 3 flag, 6 blacklist, 15 XOR (§3.1)."""
    block = c.encode_public_info(PublicInfo(3, 0x0102, 0x01, blacklist=0x04), "xor")
    assert block[:4] == bytes.fromhex("03010201") and block[6] == 0x04
    assert block[15] == c.xor8(block[:15])
    assert c.encode_backup(block, "inverted") == bytes(b ^ 0xFF for b in block)


@given(st.binary(max_size=18), st.sampled_from(c.CHECK_KINDS))
def test_public_info_garbage_only_project_errors(data, kind):
    with contextlib.suppress(M1FormatError):
        c.decode_public_info(data, kind)


def test_issuance_round_trip_and_check():
    issuance = c.Issuance(
        bytes.fromhex("1000"),
        bytes.fromhex("0001"),
        bytes.fromhex("00000001"),
        bytes.fromhex("A1B2C3D4"),
        0x02,
        0x01,
    )
    block = c.encode_issuance(issuance)
    assert c.decode_issuance(block) == issuance
    with pytest.raises(M1FormatError):
        c.decode_issuance(block[:15] + bytes((block[15] ^ 1,)))
    assert issuance.card_number == "100000000001"


@pytest.mark.parametrize("layout", ["cardop", "afc"])
@pytest.mark.parametrize("order", ["little", "big"])
def test_record_layouts(layout, order):
    record = TripRecord((26, 8, 30, 5), 1000, 200, 0x06, bytes.fromhex("00000024"))
    block = c.encode_record(record, layout, order)
    assert c.decode_record(block, layout, order) == record
    balance = (1000).to_bytes(4, order)
    if layout == "cardop":  # DD hhmmss ‖ balance ‖ amount ‖ type ‖ device
        assert block[:4] == bytes.fromhex("26083005") and block[4:8] == balance
    else:  # balance ‖ amount ‖ time ‖ type ‖ device
        assert block[:4] == balance and block[7:11] == bytes.fromhex("26083005")
    assert block[11] == 0x06


@given(st.binary(min_size=16, max_size=16), st.sampled_from(["cardop", "afc"]))
def test_record_garbage_only_project_errors(data, layout):
    with contextlib.suppress(M1FormatError):
        c.decode_record(data, layout, "little")


# --- issuance dates (§3.1 block 1; offsets and encoding are profile settings) -----------------


def test_bcd_dates_round_trip_and_unset():
    day = dt.date(2029, 2, 28)
    assert c.encode_date(day, "bcd_yyyymmdd") == bytes.fromhex("20290228")
    assert c.encode_date(day, "bcd_yymmdd") == bytes.fromhex("290228")
    for encoding in c.DATE_ENCODINGS:
        assert c.decode_date(c.encode_date(day, encoding), encoding) == day
        size = c.DATE_SIZES[encoding]
        assert c.decode_date(b"\x00" * size, encoding) is None  # unset
        assert c.decode_date(b"\xff" * size, encoding) is None
        assert c.encode_date(None, encoding) == b"\xff" * size


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        ("2029022A", "not BCD"),
        ("20290229", "not a calendar date"),  # 2029 is no leap year
        ("20291301", "not a calendar date"),
        ("00000101", "not a calendar date"),  # year 0
        ("202902", "bytes"),  # too short
    ],
)
def test_bad_dates_are_format_errors(raw, what):
    with pytest.raises(M1FormatError, match=what):
        c.decode_date(bytes.fromhex(raw), "bcd_yyyymmdd", "expiry date")


def test_dates_block_round_trip_offsets_and_check():
    fmt = DatesFormat(issue=0, start=8, expiry=4)
    dates = IssuanceDates(dt.date(2020, 1, 1), dt.date(2020, 2, 1), dt.date(2030, 12, 31))
    block = c.encode_dates_block(dates, fmt)
    assert block[0:4] == bytes.fromhex("20200101") and block[4:8] == bytes.fromhex("20301231")
    assert block[8:12] == bytes.fromhex("20200201") and block[15] == c.xor8(block[:15])
    assert c.decode_dates_block(block, fmt) == dates
    with pytest.raises(M1FormatError, match="XOR"):
        c.decode_dates_block(block[:15] + bytes((block[15] ^ 1,)), fmt)
    unchecked = DatesFormat(check="none", issue=None, expiry=12)  # 00 00 00 <xor>: no date
    with pytest.raises(M1FormatError, match="calendar"):
        c.decode_dates_block(block, unchecked)
    only_expiry = DatesFormat(check="none", issue=None, expiry=4)
    assert c.decode_dates_block(block, only_expiry) == IssuanceDates(expiry=dt.date(2030, 12, 31))


def test_issuance_carries_dates():
    issuance = c.Issuance(bytes(2), bytes(2), bytes(4), bytes(4), 2, 1)
    assert issuance.expiry_date is None
    dated = issuance.with_dates(IssuanceDates(dt.date(2020, 1, 1), None, dt.date(2030, 1, 1)))
    assert (dated.issue_date, dated.start_date, dated.expiry_date) == (
        dt.date(2020, 1, 1),
        None,
        dt.date(2030, 1, 1),
    )
    assert c.encode_issuance(dated) == c.encode_issuance(issuance)  # dates live in block 1


@given(
    st.binary(min_size=0, max_size=20),
    st.sampled_from(c.DATE_ENCODINGS),
    st.sampled_from(["xor", "none"]),
    st.sampled_from([(0, None, 4), (0, 8, 4), (None, None, 11), (3, None, 7)]),
)
def test_dates_garbage_only_project_errors(data, encoding, check, offsets):
    issue, start, expiry = offsets
    fmt = DatesFormat(encoding=encoding, check=check, issue=issue, start=start, expiry=expiry)
    size = c.DATE_SIZES[encoding]
    with contextlib.suppress(M1FormatError):
        c.decode_date(data[:size], encoding)
    with contextlib.suppress(M1FormatError):
        dates = c.decode_dates_block(data, fmt)
        for value in (dates.issue, dates.start, dates.expiry):
            assert value is None or isinstance(value, dt.date)


# --- layout validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"purse_sector": 99}, "purse_sector"),
        ({"purse_primary": 3}, "purse_primary"),
        ({"purse_backup": 1}, "purse_backup"),
        ({"check": "md5"}, "check"),
        ({"public_backup_encoding": "rot13"}, "public_backup_encoding"),
        ({"flag_in_progress": 2}, "flag_in_progress"),
        ({"record_sectors": [3, 6]}, "record_sectors"),
        ({"record_layout": "x"}, "record_layout"),
        ({"keys": {"provider": "magic"}}, "provider"),
        ({"keys": {"provider": "software_3des"}}, "software_master"),
        ({"keys": {"provider": "static", "static": {"purse": "00"}}}, "static.purse"),
        ({"keys": {"sector_ids": {"bogus": 1}}}, "sector_ids.bogus"),
        ({"tac": {"fields": ["amount3", "nonsense"]}}, "fields[1]"),
        ({"colour": "red"}, "colour"),
        ({"keys": {"issuance_key": "nothex"}}, "issuance_key"),
        ({"keys": {"sector_ids": {"9": 1}}}, "sector_ids.9"),  # not a sector of the layout
        ({"keys": {"sector_ids": {"40": 1}}}, "sector_ids.40"),
        ({"keys": {"sector_ids": {"04": 1}}}, "sector_ids.04"),
        ({"keys": {"sector_ids": {"4": 256}}}, "sector_ids.4"),
        ({"keys": {"sector_input": "uid"}}, "sector_input"),
        ({"keys": {"sector_input": "id_and_sector"}}, "sector_input"),  # 80 FC: 1 byte a key
        ({"keys": {"static": {"7": "111111111111"}}}, "static.7"),
        (
            {"keys": {"provider": "static", "static": {"purse": "111111111111"}}},
            "static.6",  # public info and records have no key
        ),
        ({"validity": {"expiry_date": 14}}, "validity"),  # 4 bytes do not fit before the check
        (
            {"validity": {"issue_date": 0, "expiry_date": 2}},
            "validity",
        ),  # overlaps the issue date at 0
        ({"validity": {"block": 0}}, "block"),  # the identity block
        ({"validity": {"block": 3}}, "block"),  # the trailer
        ({"validity": {"issue_date": -1}}, "issue_date"),
        ({"validity": {"date_encoding": "unix"}}, "date_encoding"),
        ({"validity": {"unset_dates": "maybe"}}, "unset_dates"),
        ({"validity": {"colour": 1}}, "colour"),
        ({"validity": "yes"}, "validity"),
    ],
)
def test_layout_errors_name_the_field(raw, field):
    with pytest.raises(ConfigurationError, match=field.replace("[", r"\[").replace("]", r"\]")):
        M1Layout.from_mapping(raw)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    ("path", "field"),
    [
        (("purse_sector",), "purse_sector"),
        (("flag_done",), "flag_done"),
        (("record_blocks_per_sector",), "record_blocks_per_sector"),
        (("record_sectors",), "record_sectors[0]"),
        (("accepted_card_types",), "accepted_card_types[0]"),
        (("keys", "fc_p1"), "fc_p1"),
        (("keys", "sector_ids", "records"), "sector_ids.records"),
        (("keys", "sector_ids", "4"), "sector_ids.4"),
        (("tac", "p1"), "p1"),
        (("validity", "expiry_date"), "expiry_date"),
        (("validity", "block"), "block"),
    ],
)
def test_layout_refuses_nan_and_infinity_naming_the_field(path, field, bad):
    raw: dict[str, Any] = {}
    *tables, name = path
    table = raw
    for part in tables:
        table = table.setdefault(part, {})
    table[name] = [bad] if name in ("record_sectors", "accepted_card_types") else bad
    pattern = "'" + field.replace("[", r"\[").replace("]", r"\]") + "' must be a finite"
    with pytest.raises(ConfigurationError, match=pattern):
        M1Layout.from_mapping(raw)


def test_toml_nan_in_the_layout_is_refused():
    raw = tomllib.loads("purse_sector = nan\n")
    with pytest.raises(ConfigurationError, match="purse_sector"):
        M1Layout.from_mapping(raw)


def test_role_key_ids_expand_to_every_sector():
    layout = M1Layout.from_mapping({})
    assert layout.sectors_in_use() == (2, 6, 3, 4, 5)
    assert {s: layout.key_id(s) for s in layout.sectors_in_use()} == {
        2: 0x02,
        6: 0x06,
        3: 0x03,
        4: 0x03,
        5: 0x03,
    }


def test_per_sector_key_ids_override_their_role():
    text = """
    [keys.sector_ids]
    purse = 0x10
    records = 0x03
    4 = 0x04
    "5" = 0x05
    """
    layout = M1Layout.from_mapping(tomllib.loads(text))
    assert {s: layout.key_id(s) for s in layout.sectors_in_use()} == {
        2: 0x10,
        6: 0x06,  # the default of its role
        3: 0x03,
        4: 0x04,
        5: 0x05,
    }
    four_k = M1Layout.from_mapping(
        {"record_sectors": [33, 34], "keys": {"sector_ids": {"34": 0x22}}}
    )
    assert (four_k.key_id(33), four_k.key_id(34)) == (0x03, 0x22)


def test_static_keys_per_sector_or_role():
    layout = M1Layout.from_mapping(
        {
            "keys": {
                "provider": "static",
                "static": {
                    "purse": "111111111111",
                    "public": "222222222222",
                    "records": "333333333333",
                    "4": "444444444444",
                },
            }
        }
    )
    assert layout.static_key(3) == layout.static_key(5) == bytes.fromhex("333333333333")
    assert layout.static_key(4) == bytes.fromhex("444444444444")
    assert "4444" not in repr(layout)
    per_sector = {str(s): f"{s:02d}" * 6 for s in (2, 3, 4, 5, 6)}
    only_sectors = M1Layout.from_mapping({"keys": {"provider": "static", "static": per_sector}})
    assert only_sectors.static_key(6) == bytes.fromhex("06" * 6)


def test_validity_table():
    assert M1Layout.from_mapping({}).validity is None  # absent: dates are not read
    layout = M1Layout.from_mapping(
        {"validity": {"expiry_date": 0, "issue_date": None, "date_encoding": "bcd_yymmdd"}}
    )
    assert layout.validity is not None and layout.validity_block == 5
    assert layout.validity.dates.offsets() == {"expiry": 0}
    with pytest.raises(ConfigurationError, match="at least one"):
        M1Layout.from_mapping({"validity": {"issue_date": None, "expiry_date": None}})


def test_layout_never_echoes_keys():
    with pytest.raises(ConfigurationError) as err:
        M1Layout.from_mapping({"keys": {"provider": "static", "static": {"purse": "A0A1A2A3A4ZZ"}}})
    assert "A0A1A2" not in str(err.value)


@given(
    st.dictionaries(
        st.sampled_from(["purse_sector", "check", "flag_done", "keys", "tac"]),
        st.one_of(
            st.integers(-5, 300),
            st.text(max_size=4),
            st.none(),
            st.lists(st.integers(0, 3), max_size=2),
        ),
    )
)
def test_layout_garbage_only_configuration_errors(raw):
    with contextlib.suppress(ConfigurationError):
        M1Layout.from_mapping(raw)


# --- PC/SC pseudo-APDUs (§4a.1) ------------------------------------------------------------------


def test_pseudo_apdu_builders():
    assert s.get_uid_apdu() == bytes.fromhex("FFCA000000")
    assert s.load_key_apdu(0, bytes.fromhex("A0A1A2A3A4A5")) == bytes.fromhex(
        "FF82000006A0A1A2A3A4A5"
    )
    assert s.general_authenticate_apdu(8, KeyType.A, 0) == bytes.fromhex("FF860000050100086000")
    assert s.legacy_authenticate_apdu(4, KeyType.B, 1) == bytes.fromhex("FF8800046101")
    assert s.read_binary_apdu(9) == bytes.fromhex("FFB0000910")
    assert s.update_binary_apdu(4, bytes(16)) == bytes.fromhex("FFD6000410") + bytes(16)
    assert s.read_value_apdu(8) == bytes.fromhex("FFB1000804")
    assert s.value_block_apdu(8, s.VB_DECREMENT, 150) == bytes.fromhex("FFD70008050200000096")
    assert s.value_block_apdu(5, s.VB_INCREMENT, 1) == bytes.fromhex("FFD70005050100000001")
    assert s.value_block_apdu(5, s.VB_STORE, 100) == bytes.fromhex("FFD70005050000000064")
    assert s.restore_value_apdu(8, 9) == bytes.fromhex("FFD70008020309")


def test_pseudo_apdu_parsers():
    assert s.parse_read_value(bytes.fromhex("000003e89000"), 8) == 1000
    with pytest.raises(s.StorageOperationRefused, match="6300"):
        s.check_status(bytes.fromhex("6300"), "increment", 8)
    with pytest.raises(s.AuthenticationFailed):
        s.check_status(bytes.fromhex("6300"), "authenticate", 8)
    with pytest.raises(CardProtocolError):
        s.check_status(b"\x90", "read", 8)
    with pytest.raises(CardProtocolError):
        s.check_status(bytes.fromhex("01029000"), "read", 8, length=16)


@given(st.binary(max_size=24))
def test_pseudo_apdu_answers_garbage_only_card_errors(data):
    try:
        s.check_status(data, "read", 4, length=16)
    except AgentError as exc:
        assert exc.party == "card"
