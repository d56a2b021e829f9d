"""Card logs, trip records and balance semantics (issue 15, second part: findings 4, 5, 6, 8).

* EF18 transaction logs of real cards (tests/golden_cards recordings) read by the READ RECORD
  steps and parsed by the dialect's time encoding;
* trip records written by the agent's compound purchase laid out as real T-Union readers write
  them (institution code + FF, binary line at bytes 10..11, station and vehicle at 12..16), read
  back by the parser of the same layout (property test, both standard layouts, both time
  encodings, both line encodings);
* balance semantics as dialect data (Macau Pass scale/offset, Shanghai T-Union negative purse,
  the ED-only campus card refused at a tap);
* ``cardagent card read`` against a simulated card behind the serial module over TCP.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.apdu import Response
from agent.cli import main
from agent.errors import CardProtocolError, ConfigurationError, TapRefused
from agent.products import cpu_inspect, cpu_logs, cpu_purse
from agent.profile import (
    CJT166_CAPP,
    TUNION_EF1E,
    Family,
    FieldEncoding,
    Management,
    TimeEncoding,
    TripLayout,
    load_dialects,
    parse_profile,
)
from agent.tap.outcome import TapStatus
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.inprocess import CardField
from tests.fake_reader.module_server import ModuleEmulator
from tests.fake_reader.scenario import DEMO_PROFILE, demo_profile, make_card
from tests.rig import Rig
from tests.test_golden_cards import (
    ALL_DIALECTS,
    ROOT,
    Replay,
    application,
    dump_files,
    load,
    read_dump,
)
from tests.test_profile import DEMO_TEXT

GOLDEN = ROOT / "tests" / "golden_cards"


# The CoreExtendedNFC logs hold no EF17: they are read, as in test_golden_cards, with the
# T-Union management data not read (its "without_management" expectation).
BARE = tuple(
    dataclasses.replace(d, management=Management.NONE) if d.family is Family.TUNION else d
    for d in ALL_DIALECTS
)


def inspect(name: str) -> cpu_inspect.CardReport:
    card = load(GOLDEN / f"{name}.json")
    replay = Replay(card["exchanges"])
    dialects = BARE if "without_management" in card["expect"] else ALL_DIALECTS
    return cpu_purse.drive(cpu_inspect.inspect_card([application(card)], dialects), replay)


# --- EF18 of real cards (finding 4) ---------------------------------------------------------


def test_beijing_tunion_log_of_ten_records() -> None:
    """CoreExtendedNFC's logged Beijing T-Union card: ten EF18 records, newest first, counters
    00B1 down to 00A8, compound purchases (09) of 0.00 / 1.60 / 3.80 ... (§2.3 EF18)."""
    report = inspect("tunion-nanjing-coreextendednfc-1")
    assert [e.counter for e in report.log] == list(range(0xB1, 0xA7, -1))
    first, second, third = report.log[:3]
    assert first == cpu_logs.LogEntry(
        0xB1, 0, 0, 0x09, "413100629380", dt.datetime(2024, 3, 10, 21, 15, 8)
    )
    assert (second.amount, second.terminal) == (0xA0, "413100629388")
    assert (third.amount, third.when) == (0x17C, dt.datetime(2024, 3, 8, 20, 0, 56))
    assert all(e.transaction_type == 0x09 for e in report.log)
    assert report.negative_purse == 0 and report.shown_balance == 740


def test_shanghai_tunion_negative_purse_is_subtracted() -> None:
    """Shanghai T-Union: EP 800 and GET BALANCE P1 01 800: shown 0.00, as CoreExtendedNFC
    shows it (finding 8); the debit still uses the EP (the card's own INITIALIZE)."""
    report = inspect("tunion-shanghai-coreextendednfc")
    assert report.card.balance == 800
    assert report.negative_purse == 800
    assert report.shown_balance == 0
    assert [(e.counter, e.transaction_type, e.terminal) for e in report.log] == [
        (2, 0x02, "200099990040"),
        (1, 0x02, "200092990040"),
    ]
    assert report.log[0].when == dt.datetime(2020, 1, 15, 15, 13, 21)


@pytest.mark.parametrize(
    ("name", "shown", "count", "first"),
    [
        # Macau Pass: shown = raw x 10 - 1000 (nfsee ReadMacauPass: raw 5710, shown 56100)
        ("macau-pass-nfsee", 56100, 3, (8, 30, 0x09, "000000011735")),
        ("shenzhen-tong-cardemulator", 100, 2, (0x1A, 160, 0x09, "000031011652")),
        ("tunion-shenzhen-nfsee", 5710, 3, (2, 1000, 0x05, "000000000024")),
        ("tunion-nanjing-coreextendednfc-2", 250, 2, (0x57, 600, 0x09, "413101925969")),
    ],
)
def test_golden_logs_and_shown_balances(
    name: str, shown: int, count: int, first: tuple[int, int, int, str]
) -> None:
    report = inspect(name)
    assert report.shown_balance == shown
    assert len(report.log) == count
    entry = report.log[0]
    assert (entry.counter, entry.amount, entry.transaction_type, entry.terminal) == first
    assert all(e.when is not None and 2015 <= e.when.year <= 2025 for e in report.log)


def test_hangzhou_logs_as_the_published_reads_show_them() -> None:
    """Two Hangzhou CJ/T 166 cards logged on web pages (tests/golden_cards/hangzhou-*.json):
    EF18 as the authors split it (counter, amount, type 09, terminal 3100..., date-time), the
    balance GET BALANCE gave (39.08 and 58.32); the missing CAPP trip record is a problem in
    the report, not a failure."""
    report = inspect("hangzhou-tong-youngbug")
    assert report.shown_balance == 3908
    assert [e.counter for e in report.log] == list(range(8, 1, -1))
    assert [e.amount for e in report.log] == [0x16C, 0, 0xB6, 0, 0xB6, 0, 0xB6]
    assert {e.transaction_type for e in report.log} == {0x09}
    assert report.log[0].terminal == "310001029313"
    assert report.log[0].when == dt.datetime(2014, 6, 14, 17, 36, 11)
    assert report.log[-1].when == dt.datetime(2014, 6, 14, 8, 55, 25)
    assert report.trips == []
    other = inspect("hangzhou-cjt166-ziyan22")
    assert other.shown_balance == 5832
    assert other.log == [
        cpu_logs.LogEntry(0x18, 0, 0x111, 0x09, "310001050306", dt.datetime(2016, 1, 9, 16, 44, 59))
    ]


def test_read_record_commands_are_the_spec_apdus() -> None:
    """§3.9: EF18 ``00 B2 nn C4 17``, EF1E ``00 B2 nn F4 00``, CAPP ``00 B2 01 B8 00``."""
    sent: list[str] = []

    def card(command: Any) -> Any:
        sent.append(command.to_bytes().hex().upper())
        return Response(b"", 0x6A83)

    cpu_purse.drive(cpu_logs.read_transactions(), card)
    cpu_purse.drive(cpu_logs.read_trips(TUNION_EF1E), card)
    cpu_purse.drive(cpu_logs.read_trips(CJT166_CAPP), card)
    assert sent == ["00B201C417", "00B201F400", "00B201B800"]


def test_read_stops_at_record_not_found_and_raises_on_other_errors() -> None:
    answers = [bytes(23), bytes(23)]

    def card(command: Any) -> Any:
        if answers:
            return Response(answers.pop(), 0x9000)
        return Response(b"", 0x6A83)

    assert len(cpu_purse.drive(cpu_logs.read_transactions(), card)) == 2
    with pytest.raises(Exception, match="READ RECORD EF18 #1"):
        cpu_purse.drive(cpu_logs.read_transactions(), lambda c: Response(b"", 0x6982))


def test_campus_card_is_read_but_refused_at_a_tap() -> None:
    """The ED-only campus card (finding 8): its dialect reads the ED (P2 01) and says payment
    = false, so a technician sees it and qualification refuses it."""
    report = inspect("tsinghua-campus-nfsee")
    assert report.card.purse == 0x01 and report.card.balance == 5710
    assert report.dialect.trips is None
    with pytest.raises(TapRefused) as refused:
        cpu_purse.qualify(report.card, demo_profile(), dt.date(2014, 1, 1))
    assert refused.value.reason == "not_a_transit_purse"


# --- parsers: property tests ----------------------------------------------------------------


@given(st.binary(min_size=23, max_size=23), st.sampled_from(list(TimeEncoding)))
def test_log_parser_raises_only_card_protocol_errors(record: bytes, encoding: TimeEncoding) -> None:
    try:
        entry = cpu_logs.parse_log_entry(record, encoding)
    except CardProtocolError as exc:
        assert "EF18 record 1" in str(exc)
        return
    if entry is not None:
        assert entry.amount == int.from_bytes(record[5:9], "big")
        assert entry.terminal == record[10:16].hex().upper()


@given(st.binary(min_size=0, max_size=60), st.sampled_from([TUNION_EF1E, CJT166_CAPP]))
def test_trip_parser_raises_only_card_protocol_errors(record: bytes, layout: TripLayout) -> None:
    try:
        cpu_logs.parse_trip(layout, record)
    except CardProtocolError as exc:
        assert f"EF{layout.sfi:02X} record 1" in str(exc)


def _layouts() -> st.SearchStrategy[TripLayout]:
    return st.builds(
        lambda base, time, line: dataclasses.replace(base, time_encoding=time, line_encoding=line),
        st.sampled_from([TUNION_EF1E, CJT166_CAPP]),
        st.sampled_from(list(TimeEncoding)),
        st.sampled_from(list(FieldEncoding)),
    )


@given(
    layout=_layouts(),
    terminal=st.binary(min_size=6, max_size=6),
    line=st.integers(0, 9999),
    station=st.integers(0, 0xFFFF),
    vehicle=st.integers(0, 0xFFFFFF),
    amount=st.integers(0, 0xFFFFFFFF),
    balance=st.integers(0, 0x7FFFFFFF),
    when=st.datetimes(dt.datetime(2000, 1, 1), dt.datetime(2099, 12, 31)),
    city=st.integers(0, 9999),
    institution=st.binary(min_size=4, max_size=4),
)
def test_written_trip_reads_back(
    layout: TripLayout,
    terminal: bytes,
    line: int,
    station: int,
    vehicle: int,
    amount: int,
    balance: int,
    when: dt.datetime,
    city: int,
    institution: bytes,
) -> None:
    """A trip record the agent writes, read back by the parser of the same layout, gives the
    same fields (those the layout has), whatever the time and line encodings."""
    trip = cpu_logs.Trip(
        record_type=0x06,
        terminal=terminal.hex().upper(),
        industry=0x02,
        line=line,
        station=station,
        vehicle=vehicle,
        amount=amount,
        balance=balance,
        when=when.replace(microsecond=0),
        city=f"{city:04d}",
        institution=institution.hex().upper(),
    )
    record = cpu_logs.build_trip(layout, trip)
    assert len(record) == layout.record_length
    assert record.startswith(layout.header)
    got = cpu_logs.parse_trip(layout, record)
    if got is None:  # an all-zero body: nothing was worth writing
        assert not any(record[len(layout.header) :])
        return
    names = ("type", "industry", "station", "vehicle", "city")
    has = {name: layout.span(name)[0] >= 0 for name in names}
    assert got.line == line and got.amount == amount and got.balance == balance
    assert got.when == trip.when
    assert got.terminal.endswith(trip.terminal)
    assert got.record_type == (0x06 if has["type"] else 0)
    assert got.industry == (0x02 if has["industry"] else 0)
    assert got.station == (station if has["station"] else 0)
    assert got.vehicle == (vehicle if has["vehicle"] else 0)
    assert got.city == (trip.city if has["city"] else "")
    if layout.institution_at >= 0:
        assert got.institution == trip.institution
        assert record[38:42] == b"\xff" * 4


def test_seconds_since_2000_and_bcd_times() -> None:
    """Both time encodings (finding 6): the same instant as 7 BCD bytes or 4 bytes of seconds
    since 2000-01-01 (the Hangzhou CJ/T 166 trip records)."""
    when = dt.datetime(2021, 8, 20, 17, 54, 44)
    assert cpu_logs.encode_time(when, TimeEncoding.BCD) == bytes.fromhex("20210820175444")
    seconds = int((when - dt.datetime(2000, 1, 1)).total_seconds())
    assert cpu_logs.encode_time(when, TimeEncoding.SECONDS_2000) == seconds.to_bytes(4, "big")
    for encoding in TimeEncoding:
        raw = cpu_logs.encode_time(when, encoding)
        assert cpu_logs.decode_time(raw, encoding, "t") == when
    with pytest.raises(CardProtocolError, match="not BCD"):
        cpu_logs.decode_time(bytes.fromhex("2021082017544A"), TimeEncoding.BCD, "t")


# --- the agent's trip record against real ones (finding 5) -----------------------------------


def test_tunion_trip_record_has_the_real_field_positions(tmp_path: Path) -> None:
    """A compound purchase through the engine writes EF1E as real T-Union readers do: the
    institution as a 4-byte code + FF x 4 (real: ``01663310FFFFFFFF``), the bus line binary
    at bytes 10..11 (route 101 -> ``0065``), station and vehicle in bytes 12..16, the city
    at 32..33, type 06, industry 02, amount and balance after at 17 / 21."""
    profile = demo_profile()
    rig = Rig(
        tmp_path,
        line="0101",
        institution=bytes.fromhex("01663310"),
        station=0x0123,
        vehicle=0x045678,
    )
    card = make_card("tunion", 501, rig.keyset, balance=3000)
    outcome = rig.tap(card)
    assert outcome.status == TapStatus.PAID, outcome
    record = card.records(0x1E)[0]
    assert record[0] == 0x06 and record[9] == 0x02
    assert record[10:12] == bytes.fromhex("0065")
    assert record[12:14] == bytes.fromhex("0123") and record[14:17] == bytes.fromhex("045678")
    assert record[34:42] == bytes.fromhex("01663310FFFFFFFF")
    assert record[32:34] == bytes.fromhex(profile.operator_city)
    fare = profile.flat_fare
    assert int.from_bytes(record[17:21], "big") == fare
    assert int.from_bytes(record[21:25], "big") == 3000 - fare
    trip = cpu_logs.parse_trip(TUNION_EF1E, record)
    assert trip is not None
    assert (trip.line, trip.station, trip.vehicle, trip.institution) == (
        101,
        0x0123,
        0x045678,
        "01663310",
    )
    rig.close()


def test_a_real_tunion_trip_record_is_read_and_written_at_its_own_positions() -> None:
    """A real EF1E record, published with its EF18 twin (T-Union_Master's format document,
    tests/golden_records): read by the READ RECORD step and the T-Union layout, every field
    is where T-Union_Master's parser takes it (type 0, terminal 1..8, sub-type 9, line and
    station 10.., amount 0x11, balance 0x15, time 0x19, city 0x20, institution 0x22 as a
    4-byte code + FF x 4); the agent's writer, given those fields, writes the same 48 bytes."""
    golden = load(
        ROOT / "tests" / "golden_records" / "tunion-beijing-metro-exit-t-union-master.json"
    )
    replay = Replay(golden["exchanges"])
    want = golden["expect"]
    records = cpu_purse.drive(cpu_logs.read_trips(TUNION_EF1E), replay)
    assert replay.sent[:2] == ["00B201F400", "00B202F400"]  # record 2 not recorded: 6A82, stop
    assert len(records) == 1 and len(records[0]) == 48
    trip = cpu_logs.parse_trip(TUNION_EF1E, records[0])
    expected = dict(want["trip"], when=dt.datetime.fromisoformat(want["trip"]["when"]))
    assert trip == cpu_logs.Trip(**expected)
    assert records[0][34:42] == bytes.fromhex("01011000FFFFFFFF")  # code + FF x 4, as ours
    assert cpu_logs.build_trip(TUNION_EF1E, trip) == records[0]
    log = cpu_purse.drive(cpu_logs.read_transactions(1), replay)
    entry = cpu_logs.parse_log_entry(log[0], TimeEncoding.BCD)
    expected_log = dict(
        want["log"], overdraft=0, when=dt.datetime.fromisoformat(want["log"]["when"])
    )
    assert entry == cpu_logs.LogEntry(**expected_log)
    # the trip and the transaction log describe one exit: same terminal, time and amount
    assert trip.terminal.endswith(entry.terminal) and (trip.when, trip.amount) == (
        entry.when,
        entry.amount,
    )


ZIBO_RECORDS = load(ROOT / "tests" / "golden_records" / "tunion-zibo-validators-ef1e.json")


@pytest.mark.parametrize(
    "real", ZIBO_RECORDS["cards"], ids=[c["card"] for c in ZIBO_RECORDS["cards"]]
)
def test_real_tunion_trip_records_of_zibo_validators(real: dict[str, Any]) -> None:
    """Three more real EF1E records (Dongying, Liaocheng and Zibo cards read by a Zibo bus
    validator, tests/golden_records): the T-Union layout reads every field where the public
    parser (haofighter/zibo File1EJTBInfoEntity) takes it; what that parser reads as one
    8-byte field at 9..16 is our sub-type, line, station and vehicle, in order; the EF18 twin
    is the same purchase; the agent's writer reproduces bytes 0..41 from the parsed fields.
    Bytes 42..47 (reserved in that parser) are non-zero in the real records and written as
    zeros by the agent: their meaning is not published."""
    card = load(ROOT / "tests" / "golden_cards" / f"{real['card']}.json")
    files = dump_files(card)
    record, log_record = bytes.fromhex(real["ef1e"]), bytes.fromhex(real["ef18"])
    assert (record, log_record) == (files["ef1e"], files["ef18"])  # verbatim slices of the dump
    _, dialect, _ = read_dump(card)
    assert dialect.trips is TUNION_EF1E
    trip = cpu_logs.parse_trip(TUNION_EF1E, record)
    assert trip is not None
    want = real["expect"]["trip"]
    assert trip == cpu_logs.Trip(**dict(want, when=dt.datetime.fromisoformat(want["when"])))
    public = real["public_parser"]
    assert f"{trip.record_type:02X}" == public["transaction_type_1e"]
    assert trip.terminal == public["terminal_number_1e"]
    middle = (
        bytes((trip.industry,))
        + trip.line.to_bytes(2, "big")
        + trip.station.to_bytes(2, "big")
        + trip.vehicle.to_bytes(3, "big")
    )
    assert middle.hex().upper() == public["trade_serial_number_1e"]
    assert f"{trip.amount:08X}" == public["transaction_amount_1e"]
    assert f"{trip.balance:08X}" == public["transaction_balance_1e"]
    assert trip.when.strftime("%Y%m%d%H%M%S") == public["transaction_time_1e"]
    assert trip.city == public["transaction_city_code_1e"]
    assert f"{trip.institution}FFFFFFFF" == public["institutional_identity_1e"]
    built = cpu_logs.build_trip(TUNION_EF1E, trip)
    assert built[:42] == record[:42]
    assert built[42:] == bytes(6) and record[42:].hex().upper() == public["reserve2_1e"] != "0" * 12
    entry = cpu_logs.parse_log_entry(log_record, dialect.log_time)
    want_log = real["expect"]["log"]
    assert entry == cpu_logs.LogEntry(
        **dict(want_log, overdraft=0, when=dt.datetime.fromisoformat(want_log["when"]))
    )
    # one purchase: the log's amount and time are the trip's, and the trip's balance is the
    # purse the module read after it
    assert (entry.amount, entry.when) == (trip.amount, trip.when)
    assert trip.balance == int.from_bytes(files["balance"], "big")


ZIBO_CAPP = load(ROOT / "tests" / "golden_records" / "zibo-cjt166-capp-zibo-validator.json")


@pytest.mark.parametrize("real", ZIBO_CAPP["cards"], ids=[c["card"] for c in ZIBO_CAPP["cards"]])
def test_real_cjt166_compound_records_of_zibo_cards(real: dict[str, Any]) -> None:
    """Two real CJ/T 166 compound records (Zibo MOHURD cards, tests/golden_records): the card
    is read with the zibo-cjt166 dialect, whose trip layout takes every modelled field where
    the public parser (haofighter/zibo File17NewCPUInfoEntity) does; it is read by its
    identifier 06 (``00 B2 06 B8 00``); the writer reproduces the header and every modelled
    field, leaving the bytes it does not model (completion flag, direction, driver, fare
    before discount, reserved) 00."""
    card = load(ROOT / "tests" / "golden_cards" / f"{real['card']}.json")
    files = dump_files(card)
    record = bytes.fromhex(real["record"])
    assert record == files["ef17"]  # a verbatim slice of the dump
    _, dialect, _ = read_dump(card)
    layout = dialect.trips
    assert dialect.name == "zibo-cjt166" and layout is not None
    assert cpu_logs.read_record_command(0x17, 6, 0, by_identifier=True).to_bytes() == bytes.fromhex(
        "00B206B800"
    )
    replay = Replay([{"command": "00B206B800", "response": real["record"] + "9000"}])
    assert cpu_purse.drive(cpu_logs.read_trips(layout), replay) == [record]
    trip = cpu_logs.parse_trip(layout, record)
    assert trip is not None
    want = real["expect"]["trip"]
    assert trip == cpu_logs.Trip(**dict(want, when=dt.datetime.fromisoformat(want["when"])))
    public = real["public_parser"]
    assert record[:3].hex().upper() == (
        public["compound_consumption_logo"] + public["record_length"] + public["record_unlock"]
    )
    assert f"{trip.line:06X}" == public["link_number"]
    assert f"{trip.station:02X}" == public["boarding_site_index"]
    assert f"{trip.amount:04X}" == public["pre_preferential_amount"]
    assert trip.when.strftime("%Y%m%d%H%M%S") == public["boarding_time"]
    assert f"{trip.vehicle:06X}" == public["vehicle_number"]
    assert trip.terminal == public["pose_id"]
    built = cpu_logs.build_trip(layout, trip)
    modelled = [*range(0, 3), *range(4, 7), 8, *range(9, 18), *range(18, 27)]
    assert [built[i] for i in modelled] == [record[i] for i in modelled]
    assert all(built[i] == 0 for i in range(48) if i not in modelled)
    # the standard CAPP layout (identifier 01, time at 21) does not fit this issuer's record
    assert CJT166_CAPP.identifier != record[0]
    # a fare the 2-byte field cannot hold is refused by name, not truncated
    with pytest.raises(ConfigurationError, match="amount 65536 does not fit 2 bytes"):
        cpu_logs.build_trip(layout, dataclasses.replace(trip, amount=0x10000))


def test_cjt166_capp_record_keeps_its_header_and_bcd_line() -> None:
    """The CJ/T 166 CAPP record (identifier 01, length 2E, lock flag 00) with the BCD line."""
    layout = CJT166_CAPP
    trip = cpu_logs.Trip(
        terminal="112233445566", line=101, amount=200, balance=4800,
        when=dt.datetime(2026, 1, 2, 3, 4, 5),
    )  # fmt: skip
    record = cpu_logs.build_trip(layout, trip)
    assert record[:3] == bytes.fromhex("012E00")
    assert record[9:13] == bytes.fromhex("00000101")
    assert record[21:28] == bytes.fromhex("20260102030405")


# --- dialect and profile data, validated at load ---------------------------------------------


def _dialect_file(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "d.toml"
    path.write_text(
        '[[dialect]]\nname = "x"\nsource = "test"\nfamily = "tunion"\n' + extra, encoding="utf-8"
    )
    return path


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ('trips = { base = "metro" }', "dialect[0].trips.base"),
        ("trips = { line_at = 9 }", "dialect[0].trips.line_at"),  # overlaps industry
        ("trips = { institution_at = 44 }", "dialect[0].trips.institution_at"),  # past 48
        ('trips = { time_encoding = "unix" }', "dialect[0].trips.time_encoding"),
        ('trips = { line_encoding = "ascii" }', "dialect[0].trips.line_encoding"),
        ("trips = { line_length = 5 }", "dialect[0].trips.line_length"),
        ("trips = { amount_length = 5 }", "dialect[0].trips.amount_length"),
        ("trips = { amount_length = 0 }", "dialect[0].trips.amount_length"),
        ("trips = { institution_code_length = 9 }", "dialect[0].trips.institution_code_length"),
        ("trips = { colour = 1 }", "dialect[0].trips.colour"),
        ('trips = { base = "none", sfi = 3 }', "dialect[0].trips.base"),
        ('log_time = "unix"', "dialect[0].log_time"),
        ("balance_scale = 0", "dialect[0].balance_scale"),
        ("balance_offset = -1", "dialect[0].balance_offset"),
        ("negative_purse_p1 = 4", "dialect[0].negative_purse_p1"),
        ('payment = "no"', "dialect[0].payment"),
    ],
)
def test_bad_log_trip_and_balance_settings_are_refused_by_name(
    tmp_path: Path, extra: str, field: str
) -> None:
    with pytest.raises(ConfigurationError) as failed:
        load_dialects(_dialect_file(tmp_path, extra))
    assert f"'{field}'" in str(failed.value)


def test_every_setting_takes_more_than_one_value(tmp_path: Path) -> None:
    """Trip layout overrides, time encodings, balance scale/offset, negative purse, payment."""
    (d,) = load_dialects(
        _dialect_file(
            tmp_path,
            'log_time = "seconds-2000"\nbalance_scale = 10\nbalance_offset = 1000\n'
            "negative_purse_p1 = 0\npayment = false\n"
            'trips = { time_encoding = "seconds-2000", line_encoding = "bcd", line_length = 3,'
            " station_at = 13, station_length = 1 }\n",
        )
    )
    assert d.log_time is TimeEncoding.SECONDS_2000
    assert d.trips is not None and d.trips.time_encoding is TimeEncoding.SECONDS_2000
    assert (d.trips.line_encoding, d.trips.line_length) == (FieldEncoding.BCD, 3)
    assert d.display_balance(5710) == 56100 and not d.payment and d.negative_purse_p1 == 0
    (std,) = load_dialects(_dialect_file(tmp_path, ""))
    assert std.trips == TUNION_EF1E and std.log_time is TimeEncoding.BCD
    assert std.display_balance(5710, 10) == 5700 and std.payment and std.negative_purse_p1 == 1
    path = tmp_path / "c.toml"
    path.write_text(
        '[[dialect]]\nname = "c"\nsource = "t"\nfamily = "cjt166"\n'
        '[[dialect]]\nname = "l"\nsource = "t"\nfamily = "legacy1001"\n',
        encoding="utf-8",
    )
    cjt, legacy = load_dialects(path)
    assert cjt.trips == CJT166_CAPP and legacy.trips is None and cjt.negative_purse_p1 == 0


def test_seconds_dialect_reads_its_log(tmp_path: Path) -> None:
    (d,) = load_dialects(_dialect_file(tmp_path, 'log_time = "seconds-2000"'))
    when = dt.datetime(2024, 3, 10, 21, 15, 8)
    stamp = cpu_logs.encode_time(when, TimeEncoding.SECONDS_2000) + bytes(3)
    record = bytes.fromhex("00B10000000000000009413100629380") + stamp
    entry = cpu_logs.parse_log_entry(record, d.log_time)
    assert entry is not None and entry.when == when


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('institution = "01X3"', "terminal.institution"),
        ('institution = "010203040506070809"', "terminal.institution"),
        ("station = -1", "terminal.station"),
        ('vehicle = "7"', "terminal.vehicle"),
    ],
)
def test_terminal_trip_parameters_are_validated(line: str, field: str) -> None:
    import tomllib

    text = DEMO_TEXT.replace("[terminal]\n", f"[terminal]\n{line}\n", 1)
    with pytest.raises(ConfigurationError) as failed:
        parse_profile(tomllib.loads(text), base_dir=DEMO_PROFILE.parent)
    assert f"'{field}'" in str(failed.value)


def test_terminal_trip_parameters_default_and_load() -> None:
    import tomllib

    assert demo_profile().institution == bytes.fromhex("10000000")
    text = DEMO_TEXT.replace(
        "[terminal]\n", '[terminal]\ninstitution = "01663310"\nstation = 7\nvehicle = 9\n', 1
    )
    profile = parse_profile(tomllib.loads(text), base_dir=DEMO_PROFILE.parent)
    assert (profile.institution, profile.station, profile.vehicle) == (
        bytes.fromhex("01663310"),
        7,
        9,
    )


# --- cardagent card read, through the serial module driver over TCP --------------------------


def test_card_read_over_the_serial_module(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A card that paid a compound fare on a line-101 bus: `cardagent card read` shows its
    number, balance, the EF18 entry and the EF1E trip, read through the real serial driver."""
    rig = Rig(tmp_path / "rig", line="0101", institution=bytes.fromhex("01663310"))
    card = make_card("tunion", 503, rig.keyset, balance=3000)
    assert rig.tap(card).status == TapStatus.PAID
    rig.close()
    field = CardField()
    emulator = ModuleEmulator(field, {}, torn_exc=CardTorn)
    _thread, port = emulator.serve_tcp("127.0.0.1", 0)
    field.insert(card)
    try:
        code = main(
            [
                "card", "read", "--profile", str(DEMO_PROFILE),
                "--reader-url", f"socket://127.0.0.1:{port}", "--wait", "5",
            ]
        )  # fmt: skip
    finally:
        emulator.stop()
    out = capsys.readouterr().out
    assert code == 0, out
    fare = demo_profile().flat_fare
    assert "dialect t-union" in out
    assert f"{(3000 - fare) / 100:.2f} shown" in out
    assert "transactions (EF18, newest first): 1" in out
    assert f"{fare / 100:.2f}  terminal" in out
    assert "trips (EF1E, newest first): 1" in out
    assert "line 101 " in out and "institution 01663310" in out


def test_card_read_without_a_card_names_the_reader(
    capsys: pytest.CaptureFixture[str],
) -> None:
    field = CardField()
    emulator = ModuleEmulator(field, {}, torn_exc=CardTorn)
    _thread, port = emulator.serve_tcp("127.0.0.1", 0)
    try:
        code = main(
            [
                "card", "read", "--profile", str(DEMO_PROFILE),
                "--reader-url", f"socket://127.0.0.1:{port}", "--wait", "0.2",
            ]
        )  # fmt: skip
    finally:
        emulator.stop()
    assert code == 2
    assert "reader error" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("industry", "line", "want"), [(0x01, "0003", "0003"), (0x02, "0512", "0200")]
)
def test_trip_industry_and_line_come_from_the_profile(
    tmp_path: Path, industry: int, line: str, want: str
) -> None:
    """EF1E byte 9 is the application's ef1e_industry (01 metro, 02 bus), bytes 10..11 the
    terminal's line, binary (512 -> 0200)."""
    apps = tuple(
        dataclasses.replace(a, ef1e_industry=industry) for a in demo_profile().applications
    )
    rig = Rig(tmp_path, line=line, applications=apps)
    card = make_card("tunion", 504, rig.keyset, balance=3000)
    assert rig.tap(card).status == TapStatus.PAID
    record = card.records(0x1E)[0]
    assert record[9] == industry
    assert record[10:12] == bytes.fromhex(want)
    rig.close()
