"""Boarding-and-alighting fares on all three card families (issue 13, card side).

The same policy, the same pure engine (:func:`agent.products.fares.decide`), three trip records:
the T-Union EF1E cyclic file, the CJ/T 166 CAPP record (EF17, identifier 01, one record) and the
M1 trip block (``[m1_purse.trip]``, public-info sector block 2 by default). Each test runs on
each family through the real engine and simulated cards; what differs is only where the card
keeps its last trip.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from agent.params import ActiveParams
from agent.products import cpu_logs
from agent.products.fares import TapPlace
from agent.products.m1_layout import M1_TRIP, M1Layout
from agent.products.trip_layout import TimeEncoding, TripLayout
from agent.profile import CJT166_CAPP, TUNION_EF1E, CardTypeField, Dialect, Family, Flow
from agent.tap.outcome import TapOutcome
from tests.fake_reader.m1_card import M1Card
from tests.fake_reader.m1_readers import InProcessM1Reader, M1Field, presence_of
from tests.fake_reader.scenario import demo_profile, m1_layout, make_card, make_m1_card
from tests.rig import Rig
from tests.test_engine_fares import BUS, HOST_KEY, write_params

FAMILIES = ("tunion", "cjt166", "m1")
CITY = "1000"  # the rig's operator city (demo profile)

# Line 8: nine stops, one section each; line 9: three. 1..3 sections 2 yuan, 4..6 3 yuan,
# 7..9 4 yuan (tests/test_engine_fares.py BUS).
TABLE = {(8, 1, 3): 200, (8, 1, 9): 400, (8, 2, 9): 400, (9, 1, 3): 200, (8, 1, 5): 300}


def compound_everywhere() -> tuple[Any, ...]:
    """The demo profile's applications with CJ/T 166 on the compound flow (the CAPP record
    is written only by a compound purchase, cpu-purse.md §2.4)."""
    return tuple(
        dataclasses.replace(a, flow=Flow.COMPOUND) if a.family is Family.CJT166 else a
        for a in demo_profile().applications
    )


def typed_dialects() -> tuple[Dialect, ...]:
    """The demo profile's dialects, the CJ/T 166 one reading the card type where the simulated
    cards keep it: EF05 byte 0, in the application (tests/fake_reader/cpu_card.py
    make_cjt166_card; real issuers differ, e.g. Zibo's EF05[18] in the MF)."""
    return tuple(
        dataclasses.replace(d, card_type=CardTypeField(at=0, sfi=5))
        if d.family is Family.CJT166
        else d
        for d in demo_profile().dialects
    )


class Rider:
    """One card of a family, tapped on the rig's engine."""

    def __init__(self, rig: Rig, family: str, number: int, **options: Any) -> None:
        self.rig, self.family = rig, family
        self.card_id = ""
        card_type = options.pop("card_type", 1)
        balance = options.pop("balance", 5000)
        self.m1: M1Card | None = None
        if family == "m1":
            self.layout: M1Layout = m1_layout(rig.profile)
            self.m1 = make_m1_card(number, self.layout, balance=balance, card_type=card_type)
            self.field = M1Field()
        else:
            self.cpu = make_card(
                family,  # type: ignore[arg-type]
                number,
                rig.keyset,
                balance=balance,
                card_catalogue=card_type,
            )

    def tap(self, line: int, stop: int, role: str = "both") -> TapOutcome:
        self.rig.engine.position = lambda: TapPlace(line, stop, role, CITY)
        if self.m1 is None:
            outcome = self.rig.tap(self.cpu)
        else:
            self.field.insert(self.m1)
            reader = InProcessM1Reader(self.field)
            outcome = self.rig.engine.process_tap(reader, presence_of(self.m1))
            self.field.remove()
            self.rig.engine.presence.left()
        self.card_id = outcome.card_id or self.card_id
        return outcome

    def raw_trip(self) -> bytes:
        if self.m1 is not None:
            return self.m1.get_block(self.layout.trip_block)
        return self.cpu.records(self.trip_layout.sfi)[0]

    def set_raw_trip(self, raw: bytes) -> None:
        if self.m1 is not None:
            self.m1.set_block(self.layout.trip_block, raw)
        else:
            self.cpu.record_files[self.trip_layout.sfi].records[0] = raw

    @property
    def trip_layout(self) -> TripLayout:
        if self.m1 is not None:
            return self.layout.trip.layout
        return TUNION_EF1E if self.family == "tunion" else CJT166_CAPP

    def trip(self) -> cpu_logs.Trip | None:
        return cpu_logs.parse_trip(self.trip_layout, self.raw_trip())

    @property
    def balance(self) -> int:
        if self.m1 is not None:
            value = self.m1.value_of(self.layout.purse_blocks[0])
            assert value is not None
            return value
        return self.cpu.balance


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path / "rig", applications=compound_everywhere(), dialects=typed_dialects())
    write_params(tmp_path / "params.json", fare_policy=BUS)
    rig.engine.params = ActiveParams(tmp_path / "params.json", HOST_KEY.public_key_bytes)
    yield rig
    rig.close()


def policy(rig: Rig, tmp_path: Path, **changes: Any) -> None:
    entry_exit = {**BUS["entry_exit"], **changes.pop("entry_exit", {})}
    write_params(tmp_path / "params.json", fare_policy={**BUS, **changes, "entry_exit": entry_exit})


_numbers = iter(range(100, 100_000))


def rider(rig: Rig, family: str, **options: Any) -> Rider:
    return Rider(rig, family, next(_numbers), **options)


def charged(rig: Rig, card: Rider) -> int:
    """What the card's purchase records took, less what they say the host owes back."""
    total = 0
    for record in rig.records(kind="purchase"):
        if record.card_id == card.card_id:
            total += record.amount - int(record.fields.get("fare_refund_due") or 0)
    return total


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("boarding", ["max", "min"])
@pytest.mark.parametrize(("line", "board", "alight"), sorted(TABLE))
def test_boarding_then_alighting_adds_up_to_the_table_price(
    rig: Rig, tmp_path: Path, family: str, boarding: str, line: int, board: int, alight: int
) -> None:
    policy(rig, tmp_path, entry_exit={"boarding_debit": boarding})
    card = rider(rig, family)
    first = card.tap(line, board)
    assert first.status == "paid", first
    trip = card.trip()
    assert trip is not None
    assert (trip.record_type, trip.line, trip.station, trip.city) == (0x03, line, board, CITY)
    assert trip.amount == first.fare  # what the alighting tap settles against
    second = card.tap(line, alight)
    assert second.status == "paid", second
    after = card.trip()
    assert after is not None and (after.record_type, after.station) == (0x04, alight)
    kinds = [r.fields["fare_kind"] for r in card.rig.records(kind="purchase")]
    assert kinds == ["entry", "exit"]
    assert charged(rig, card) == TABLE[(line, board, alight)]
    assert card.balance == 5000 - first.fare - second.fare


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("rule", "closing"), [("max_fare", 200), ("penalty", 100)])
def test_unfinished_trip_meets_the_policys_rule(
    rig: Rig, tmp_path: Path, family: str, rule: str, closing: int
) -> None:
    """Boarded line 8 at stop 1 (2 yuan, boarding_debit min), never alighted; boarding line 9
    closes it by the rule: max_fare (4 yuan for that trip: 2 more) or a 3-yuan penalty (1
    more), with line 9's own 2 yuan. The record says which rule, for the host; the alighting
    on line 9 settles line 9's trip only."""
    policy(rig, tmp_path, entry_exit={"boarding_debit": "min", "unfinished": rule, "penalty": 300})
    card = rider(rig, family)
    assert card.tap(8, 1).fare == 200
    with capture_logs() as logs:
        outcome = card.tap(9, 1)  # another line: the line 8 trip was never alighted
    assert (outcome.status, outcome.fare) == ("paid", 200 + closing)
    last = rig.records(kind="purchase")[-1]
    assert (last.fields["fare_kind"], last.fields["fare_unfinished"]) == (
        "unfinished_then_entry",
        rule,
    )
    decided = [e for e in logs if e["event"] == "fare_decided"]
    assert "line 8 stop 1 not alighted" in decided[0]["notes"][0]
    trip = card.trip()
    assert trip is not None and trip.amount == 200  # the new trip's own part only
    assert card.tap(9, 3).fare == 0
    assert charged(rig, card) == 200 + 200 + closing


@pytest.mark.parametrize("family", FAMILIES)
def test_alighting_on_another_line_is_the_unfinished_rule(
    rig: Rig, tmp_path: Path, family: str
) -> None:
    """An exit validator of line 9 (role exit) reads a boarding on line 8: the trip is
    unfinished (it cannot be priced on line 9's stops), charged by the rule, recorded so."""
    policy(rig, tmp_path, entry_exit={"boarding_debit": "min"})
    card = rider(rig, family)
    assert card.tap(8, 2).fare == 200
    outcome = card.tap(9, 3, role="exit")
    assert (outcome.status, outcome.fare) == ("paid", 200)  # max 4 yuan less the 2 paid
    last = rig.records(kind="purchase")[-1]
    assert (last.fields["fare_kind"], last.fields["fare_unfinished"]) == (
        "exit_unfinished",
        "max_fare",
    )
    trip = card.trip()
    assert trip is not None and (trip.record_type, trip.line) == (0x04, 9)


@pytest.mark.parametrize("family", FAMILIES)
def test_another_citys_boarding_record_is_never_taken_for_ours(
    rig: Rig, tmp_path: Path, family: str
) -> None:
    """A boarding record written by another city's system (city code 2000, line 8 stop 1,
    1 yuan): this system neither settles against it nor charges it as unfinished. The tap is
    a fresh boarding, and the log line names the city (the documented rule: ignored)."""
    policy(rig, tmp_path)
    card = rider(rig, family)
    card.tap(8, 5, role="single")  # any tap: the card has a trip record to overwrite
    layout = card.trip_layout
    foreign = cpu_logs.Trip(
        record_type=0x03, line=8, station=1, amount=100, city="2000",
        when=dt.datetime.now().replace(microsecond=0) - dt.timedelta(minutes=5),
    )  # fmt: skip
    card.set_raw_trip(cpu_logs.build_trip(layout, foreign))
    paid_before = len(rig.records(kind="purchase"))
    with capture_logs() as logs:
        outcome = card.tap(8, 3)
    assert (outcome.status, outcome.fare) == ("paid", 400)  # a boarding: the maximum
    last = rig.records(kind="purchase")[-1]
    assert last.fields["fare_kind"] == "entry" and "fare_unfinished" not in last.fields
    assert len(rig.records(kind="purchase")) == paid_before + 1
    decided = [e for e in logs if e["event"] == "fare_decided"]
    assert decided[0]["notes"] == ["trip record of city 2000 ignored"]


@pytest.mark.parametrize("family", FAMILIES)
def test_transfer_into_a_bus_trip_is_taken_at_its_alighting(
    rig: Rig, tmp_path: Path, family: str
) -> None:
    """Line 9 boarded and alighted, line 8 boarded within the window and alighted: one yuan
    off line 8's trip on every family. A one-record layout (CJ/T 166 CAPP, M1) cannot show the
    trip before the boarding at the alighting tap, so the boarding writes its transfer origin
    (line 9) into its own record."""
    policy(
        rig,
        tmp_path,
        transfer={"window_s": 3600, "discount": 100, "between": "lines"},
        entry_exit={"boarding_debit": "min"},
    )
    card = rider(rig, family)
    fares = [card.tap(line, stop).fare for line, stop in ((9, 1), (9, 3), (8, 1), (8, 9))]
    assert fares == [200, 0, 200, 100]
    records = rig.records(kind="purchase")
    assert [r.fields.get("fare_transfer_from") for r in records] == [None, None, None, 9]
    assert charged(rig, card) == 200 + 400 - 100


@pytest.mark.parametrize("family", FAMILIES)
def test_no_transfer_from_the_same_line_or_outside_the_window(
    rig: Rig, tmp_path: Path, family: str
) -> None:
    policy(
        rig,
        tmp_path,
        transfer={"window_s": 60, "discount": 100, "between": "lines"},
        entry_exit={"boarding_debit": "min"},
    )
    card = rider(rig, family)
    fares = [card.tap(line, stop).fare for line, stop in ((8, 1), (8, 3), (8, 1), (8, 9))]
    assert fares == [200, 0, 200, 200]  # the same line twice: no transfer
    alighted = card.trip()
    assert alighted is not None
    # The line 8 trip ended two minutes ago: outside the 60-second window.
    earlier = dataclasses.replace(alighted, when=alighted.when - dt.timedelta(minutes=2))
    card.set_raw_trip(cpu_logs.build_trip(card.trip_layout, earlier))
    assert card.tap(9, 1).fare == 200
    boarding = card.trip()
    assert boarding is not None and boarding.transfer_from is None
    assert card.tap(9, 3).fare == 0  # 3 sections: the 2 yuan paid, no transfer yuan
    assert card.tap(8, 1).fare == 200  # within the window of line 9's alighting
    boarding = card.trip()
    assert boarding is not None
    assert boarding.transfer_from == (9 if family != "tunion" else None)  # EF1E: the record
    assert card.tap(8, 9).fare == 100
    assert [r.fields.get("fare_transfer_from") for r in rig.records(kind="purchase")][-1] == 9


@pytest.mark.parametrize("family", FAMILIES)
def test_card_types_price_alike(rig: Rig, tmp_path: Path, family: str) -> None:
    """Half price and free riders: the boarding pre-authorises the card type's maximum."""
    policy(rig, tmp_path, card_types={"04": {"percent": 50}, "05": {"free": True}})
    student = rider(rig, family, card_type=4)
    assert [student.tap(8, 1).fare, student.tap(8, 5).fare] == [200, 0]  # half of 4 yuan
    assert rig.records(kind="purchase")[-1].fields["fare_refund_due"] == 50  # half of 3
    senior = rider(rig, family, card_type=5)
    assert [senior.tap(8, 1).fare, senior.tap(8, 9).fare] == [0, 0]
    assert charged(rig, student) == 150 and charged(rig, senior) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_card_type_without_a_discount_pays_full_fare(
    rig: Rig, tmp_path: Path, family: str
) -> None:
    """A card type the qualification accepts but the policy gives no discount (03) pays the
    table price, as an adult card (01) does."""
    policy(rig, tmp_path, card_types={"04": {"percent": 50}, "05": {"free": True}})
    other = rider(rig, family, card_type=3)
    assert [other.tap(8, 1).fare, other.tap(8, 5).fare] == [400, 0]
    assert charged(rig, other) == 300


@pytest.mark.parametrize("family", ["tunion", "cjt166"])
def test_a_card_type_the_profile_does_not_accept_is_refused(
    rig: Rig, tmp_path: Path, family: str
) -> None:
    """The demo profile's qualification accepts card types 1..5: a type-9 card is refused
    ``card_type_refused`` before any debit, its balance untouched."""
    policy(rig, tmp_path, card_types={"04": {"percent": 50}, "09": {"free": True}})
    stranger = rider(rig, family, card_type=9)
    outcome = stranger.tap(8, 1)
    assert outcome.refusal == "card_type_refused"
    assert "card catalogue 9" in outcome.reason
    assert stranger.balance == 5000 and rig.records(kind="purchase") == []


def test_a_cjt166_dialect_without_card_type_reads_none(tmp_path: Path) -> None:
    """Without ``card_type`` (the standard CJ/T 166 dialect) a senior card pays full fare, as
    before issue 13's card types; the dialect that reads EF05 costs one READ BINARY a tap."""
    apdus = {}
    for name, dialects in (("untyped", demo_profile().dialects), ("typed", typed_dialects())):
        rig = Rig(tmp_path / name, applications=compound_everywhere(), dialects=dialects)
        try:
            write_params(
                tmp_path / "params.json", fare_policy={**BUS, "card_types": {"05": {"free": True}}}
            )
            rig.engine.params = ActiveParams(tmp_path / "params.json", HOST_KEY.public_key_bytes)
            senior = rider(rig, "cjt166", card_type=5)
            outcome = senior.tap(8, 1)
            apdus[name] = outcome.apdus
            assert outcome.fare == (400 if name == "untyped" else 0)
            assert senior.balance == (4600 if name == "untyped" else 5000)
        finally:
            rig.close()
    assert apdus["typed"] == apdus["untyped"] + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_the_daily_cap_is_settled_at_the_alighting(rig: Rig, tmp_path: Path, family: str) -> None:
    """The cap, like a transfer, is settled at the alighting: the second trip of the day is
    capped at the 1 yuan left of 5, and the host owes the rest of its boarding back."""
    policy(rig, tmp_path, daily_cap=500)
    adult = rider(rig, family)
    fares = [adult.tap(8, 1).fare, adult.tap(8, 9).fare, adult.tap(8, 1).fare, adult.tap(8, 9).fare]
    assert fares == [400, 0, 400, 0]
    last = rig.records(kind="purchase")[-1]
    assert last.fields["fare_refund_due"] == 300
    assert charged(rig, adult) == 500


def test_a_cjt166_layout_without_a_record_type_pays_single_taps(tmp_path: Path) -> None:
    """A dialect whose CAPP record keeps no type (``type_at = -1``): boarding and alighting
    cannot be told apart on the card, so each tap is a single ride, logged."""
    profile = demo_profile()
    dialects = tuple(
        dataclasses.replace(d, trips=dataclasses.replace(CJT166_CAPP, type_at=-1))
        if d.family is Family.CJT166
        else d
        for d in profile.dialects
    )
    assert any(d.family is Family.CJT166 for d in dialects)
    rig = Rig(tmp_path / "rig", applications=compound_everywhere(), dialects=dialects)
    try:
        write_params(tmp_path / "params.json", fare_policy=BUS)
        rig.engine.params = ActiveParams(tmp_path / "params.json", HOST_KEY.public_key_bytes)
        card = rider(rig, "cjt166")
        with capture_logs() as logs:
            outcome = card.tap(8, 7)
        assert outcome.fare == 400
        assert any(e["event"] == "fare_no_trip_state" for e in logs)
        assert rig.records(kind="purchase")[0].fields["fare_kind"] == "single"
    finally:
        rig.close()


def test_a_flat_fare_leaves_the_m1_trip_block_alone(rig: Rig, tmp_path: Path) -> None:
    """Only a policy that reads the last trip touches the block (a city's own data there,
    e.g. AFC's last-trip block, is left as it is under a flat fare)."""
    write_params(
        tmp_path / "params.json", fare_policy={"mode": "flat", "flat_fare": 200, "max_fare": 200}
    )
    card = rider(rig, "m1")
    assert card.m1 is not None
    theirs = bytes(range(16))
    card.set_raw_trip(theirs)
    assert card.tap(8, 1).fare == 200
    assert card.raw_trip() == theirs


# --- the M1 trip block as profile data ---------------------------------------------------


def test_m1_trip_layout_defaults_and_overrides() -> None:
    default = m1_layout()
    assert (default.trip_sector, default.trip.block) == (default.public_sector, 2)
    assert default.trip.layout == M1_TRIP
    moved = m1_layout(
        record_blocks_per_sector=2,
        trip={
            "sector": 5, "block": 2, "time_encoding": "bcd", "time_at": 5, "amount_at": 12,
            "amount_length": 4, "transfer_at": -1, "city_at": -1,
        },
    )  # fmt: skip
    assert (moved.trip_sector, moved.trip_block) == (5, 22)
    assert moved.trip.layout.time_encoding is TimeEncoding.BCD


@pytest.mark.parametrize(
    ("trip", "message"),
    [
        ({"block": 0}, "public-info copy or a record slot"),
        ({"block": 3}, "must be a data block"),
        ({"sector": 9}, "public-info sector 6 or a record sector"),
        ({"amount_at": 14}, "runs past the 16-byte record"),
        ({"line_at": 3}, "overlaps"),
        ({"time_encoding": "julian"}, "must be one of"),
        ({"colour": 1}, "unknown field 'colour'"),
        ({"amount_length": 1}, "amount_length"),
    ],
)
def test_m1_trip_layout_errors_name_the_field(trip: dict[str, Any], message: str) -> None:
    from agent.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=message):
        m1_layout(trip=trip)


@given(
    line=st.integers(0, 0xFFFF),
    stop=st.integers(0, 0xFFFF),
    amount=st.integers(0, 0xFFFFFF),
    origin=st.one_of(st.none(), st.integers(0, 0xFFFE)),
    when=st.datetimes(dt.datetime(2000, 1, 1), dt.datetime(2099, 12, 31)),
    kind=st.sampled_from([0x03, 0x04, 0x06]),
)
def test_m1_trip_block_reads_back(
    line: int, stop: int, amount: int, origin: int | None, when: dt.datetime, kind: int
) -> None:
    trip = cpu_logs.Trip(
        record_type=kind, line=line, station=stop, amount=amount, city=CITY,
        when=when.replace(microsecond=0), transfer_from=origin,
    )  # fmt: skip
    block = cpu_logs.build_trip(M1_TRIP, trip)
    assert len(block) == 16
    assert cpu_logs.parse_trip(M1_TRIP, block) == trip


# --- the CJ/T 166 boarding torn at every command -------------------------------------------


@pytest.mark.parametrize("mode", ["tear_before", "tear_after"])
def test_a_torn_cjt166_boarding_is_charged_once_and_its_capp_record_kept(
    tmp_path: Path, mode: str
) -> None:
    """Every command of a CJ/T 166 boarding (the CAPP update is staged by the card and
    committed with the DEBIT, cpu-purse.md §2.4) torn, the card back at once: one boarding
    debit, a CAPP record that says so (or, when the DEBIT never happened, neither), and the
    alighting settles to the table's price."""
    probe = Rig(tmp_path / "probe", applications=compound_everywhere())
    try:
        write_params(tmp_path / "params.json", fare_policy=BUS)
        probe.engine.params = ActiveParams(tmp_path / "params.json", HOST_KEY.public_key_bytes)
        clean = rider(probe, "cjt166")
        before = len(probe.reader.transmitted)
        assert clean.tap(8, 1).status == "paid"
        commands = len(probe.reader.transmitted) - before
    finally:
        probe.close()
    assert commands == 9  # the clean tap: 7 (tests/test_tearing_cpu.py) + CAPP read + 80DC
    for position in range(1, commands + 1):
        rig = Rig(tmp_path / f"{mode}{position}", applications=compound_everywhere())
        try:
            rig.engine.params = ActiveParams(tmp_path / "params.json", HOST_KEY.public_key_bytes)
            card = rider(rig, "cjt166")
            card.cpu.reset_command_count()
            card.cpu.faults.add(position, mode)  # type: ignore[arg-type]
            card.tap(8, 1)
            again = card.tap(8, 1)
            label = f"{mode} at command {position}"
            assert again.status in ("paid", "recovered"), (label, again)
            assert len(card.cpu.debits) == 1, label
            assert card.balance == 5000 - 400, label
            trip = card.trip()
            assert trip is not None and (trip.record_type, trip.amount) == (0x03, 400), label
            assert card.tap(8, 3).fare == 0, label
            records = rig.records(kind="purchase")
            assert [r.fields["fare_kind"] for r in records] == ["entry", "exit"], label
            assert charged(rig, card) == 200, label
        finally:
            rig.close()
