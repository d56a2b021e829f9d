"""Fare rules (issue 13): the policy validator, golden tables of real cities, the rules, and
entry/exit settlement, all pure (agent.products.fare_policy / agent.products.fares)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.products.cpu_logs import Trip
from agent.products.fare_policy import (
    ENTRY_RECORD_TYPE,
    EXIT_RECORD_TYPE,
    FarePolicy,
    FarePolicyError,
    accumulator_since,
    check_effective_window,
    month_start,
    parse_fare_policy,
    publication_problem,
)
from agent.products.fares import (
    CardFacts,
    NoFare,
    PaidTap,
    Passback,
    TapPlace,
    band_price,
    decide,
    settle_trip,
)

T0 = dt.datetime(2026, 11, 30, 8, 0)

# Beijing subway distance fares in force from 2014-12-28 (all lines but the Airport Express):
# 3 yuan up to 6 km (inclusive), 4 up to 12 km, 5 up to 22 km, 6 up to 32 km, then 1 yuan more
# per 20 km started, no ceiling. Sources (press reports of the municipal government's
# announcement of 2014-11-27):
#   https://www.thenanfang.com/blog/it-will-be-more-expensive-to-ride-the-subway-and-bus-in-beijing-next-month/
#   ("RMB 3 ... six kilometers, RMB 4 ... six and 12, RMB 5 ... 12 and 22, RMB 6 ... 22 and 32,
#   RMB 1 for each additional 20 kilometers")
#   http://www.bjreview.com.cn/se/txt/2014-11/28/content_655510.htm ("three yuan ... to six
#   yuan ... below 32 km. People who go further need to pay one yuan for every 20 km")
#   http://onestop.globaltimes.cn/beijing-public-transport-price-increases-as-of-dec-28-2014/
# and, with the inclusive upper bounds ("6公里(含)内3元；6公里至12公里(含)4元；12公里至22公里
# (含)5元；22公里至32公里(含)6元；32公里以上部分，每增加1元可乘坐20公里"), Chinese fare guides
# such as https://www.bkwk.cn/article/bjdtpjjsqszwcxcbgbpjyw.html. The official notice itself
# (Beijing Municipal Commission of Development and Reform) was not found in the sources at hand.
BEIJING_SUBWAY_2014: dict[str, Any] = {
    "mode": "distance",
    "max_fare": 1000,
    "bands": [
        {"over_m": 0, "up_to_m": 6000, "price": 300},
        {"over_m": 6000, "up_to_m": 12000, "price": 400},
        {"over_m": 12000, "up_to_m": 22000, "price": 500},
        {"over_m": 22000, "up_to_m": 32000, "price": 600},
    ],
    "beyond": {"every": 20000, "add": 100},
    "lines": {"1": {"mode": "metro", "stops": [{"id": 1, "at_m": 0}, {"id": 2, "at_m": 90000}]}},
}

# Beijing buses from the same date: 2 yuan up to 10 km, then 1 yuan more per 5 km started;
# transport-card holders pay half, students a quarter (75 % off). Sources: the Nanfang and
# Global Times pages above ("rides will start at two yuan for a ride within 10km, with one yuan
# extra for every extra 5km. Adult commuters using city transportation cards get a 50 percent
# discount, and students get 75 percent off"). Card types here: 01 adult card, 02 student.
BEIJING_BUS_2014: dict[str, Any] = {
    "mode": "distance",
    "max_fare": 2000,
    "bands": [{"over_m": 0, "up_to_m": 10000, "price": 200}],
    "beyond": {"every": 5000, "add": 100},
    "lines": {"300": {"mode": "bus", "stops": [{"id": 1, "at_m": 0}, {"id": 2, "at_m": 48000}]}},
    "card_types": {"01": {"percent": 50}, "02": {"percent": 25}},
}

# Shanghai Metro: "For passengers traveling between 0-6 kilometers, the ticket price will be
# RMB3; if their traveling mileage exceeds 6 kilometers, they shall pay RMB1 for every 10
# kilometers" (shortest path between the stations), Shanghai Metro, "Pricing of Metro
# Tickets", http://service.shmetro.com/en/cphc/12.htm. Bus to metro with the public
# transportation card: "a preferential price of RMB1 when they get out of metro stations as
# long as their time of interchange from buses is less than 2 hours",
# http://service.shmetro.com/en/cphc/13.htm. (Line 5's own cheaper table, on the same page,
# is not modelled.)
SHANGHAI_METRO: dict[str, Any] = {
    "mode": "distance",
    "max_fare": 1500,
    "bands": [{"over_m": 0, "up_to_m": 6000, "price": 300}],
    "beyond": {"every": 10000, "add": 100},
    "transfer": {"window_s": 7200, "discount": 100, "between": "modes"},
    "lines": {
        "1": {"mode": "metro", "stops": [{"id": 1, "at_m": 0}, {"id": 2, "at_m": 80000}]},
        "71": {"mode": "bus", "stops": [{"id": 1, "at_m": 0}, {"id": 2, "at_m": 17000}]},
    },
}


@pytest.mark.parametrize(
    ("km", "yuan"),
    [(1, 3), (6, 3), (6.001, 4), (12, 4), (12.5, 5), (22, 5), (23, 6), (32, 6), (32.1, 7),
     (52, 7), (52.1, 8), (72, 8), (72.5, 9)],
)  # fmt: skip
def test_golden_beijing_subway_2014(km: float, yuan: int) -> None:
    policy = parse_fare_policy(BEIJING_SUBWAY_2014)
    assert band_price(policy, round(km * 1000)) == yuan * 100


@pytest.mark.parametrize(
    ("km", "yuan"), [(3, 3), (6, 3), (7, 4), (16, 4), (16.1, 5), (26, 5), (26.5, 6), (36, 6)]
)
def test_golden_shanghai_metro(km: float, yuan: int) -> None:
    policy = parse_fare_policy(SHANGHAI_METRO)
    assert band_price(policy, round(km * 1000)) == yuan * 100


@pytest.mark.parametrize(
    ("km", "cash", "adult_card", "student_card"),
    [(3, 200, 100, 50), (10, 200, 100, 50), (10.1, 300, 150, 75), (15, 300, 150, 75),
     (15.5, 400, 200, 100), (20, 400, 200, 100), (47, 1000, 500, 250)],
)  # fmt: skip
def test_golden_beijing_bus_2014(km: float, cash: int, adult_card: int, student_card: int) -> None:
    policy = parse_fare_policy(BEIJING_BUS_2014)
    metres = round(km * 1000)
    assert band_price(policy, metres) == cash
    stops = {"stops": [{"id": 1, "at_m": 0}, {"id": 2, "at_m": metres}]}
    priced = parse_fare_policy({**BEIJING_BUS_2014, "lines": {"300": {"mode": "bus", **stops}}})
    place = TapPlace(300, 1)
    adult = decide(priced, CardFacts(card_type=1), place, T0)
    student = decide(priced, CardFacts(card_type=2), place, T0)
    assert (adult.amount, student.amount) == (adult_card, student_card)


def test_shanghai_bus_to_metro_transfer_takes_one_yuan_off() -> None:
    policy = parse_fare_policy({**SHANGHAI_METRO, "mode": "flat", "flat_fare": 200})
    bus = PaidTap(when=T0, line=71, amount=200)
    place = TapPlace(line=1, stop=1)
    within = decide(policy, CardFacts(last_paid=bus), place, T0 + dt.timedelta(minutes=119))
    after = decide(policy, CardFacts(last_paid=bus), place, T0 + dt.timedelta(minutes=121))
    metro_to_metro = decide(
        policy, CardFacts(last_paid=PaidTap(T0, 1, 200)), TapPlace(1, 2), T0
    )  # same line: no transfer
    assert (within.amount, after.amount, metro_to_metro.amount) == (100, 200, 200)
    assert (within.transfer_from, after.transfer_from) == (71, None)


# --- the validator: refused with the field named --------------------------------------------


def _with(**changes: Any) -> dict[str, Any]:
    return {**BEIJING_SUBWAY_2014, **changes}


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        (_with(bands=[{"over_m": 0, "up_to_m": 6000, "price": 300},
                      {"over_m": 7000, "up_to_m": 12000, "price": 400}]), "gap"),
        (_with(bands=[{"over_m": 0, "up_to_m": 6000, "price": 300},
                      {"over_m": 5000, "up_to_m": 12000, "price": 400}]), "overlaps"),
        (_with(bands=[{"over_m": 0, "up_to_m": 6000, "price": -300}]), "bands[0].price"),
        (_with(bands=[{"over_m": 0, "up_to_m": 6000, "price": 3.5}]), "integer"),
        (_with(bands=[]), "non-empty"),
        (_with(beyond={"every": 0, "add": 100}), "beyond.every"),
        ({k: v for k, v in BEIJING_SUBWAY_2014.items() if k != "beyond"}, "past the table"),
        (_with(max_fare=500), "above max_fare"),
        (_with(mode="zone"), "fare_policy.mode"),
        (_with(card_types={"XYZ": {"free": True}}), "card_types.XYZ"),
        (_with(card_types={"05": {"percent": 150}}), "card_types.05.percent"),
        (_with(transfer={"window_s": 0, "discount": 100}), "transfer.window_s"),
        (_with(entry_exit={"unfinished": "forget"}), "entry_exit.unfinished"),
        (_with(entry_exit={"entry_record_type": 6}), "single-tap trip record"),
        (_with(entry_exit={"entry_record_type": 4}), "must differ"),
        (_with(lines={"1": {"stops": [{"id": 1, "at_m": 500}, {"id": 2, "at_m": 0}]}}),
         "backwards"),
        (_with(lines={"x": {"stops": [{"id": 1}]}}), "lines.x"),
        (_with(surprise=1), "unknown"),
        (_with(currency="USD"), "currency"),
        ([], "must be an object"),
    ],
)  # fmt: skip
def test_bad_policies_are_refused_naming_the_field(policy: object, words: str) -> None:
    with pytest.raises(FarePolicyError, match=words.replace(".", r"\.").replace("[", r"\[")):
        parse_fare_policy(policy)


def test_effective_dates() -> None:
    day = 86_400
    check_effective_window({"issued_at": 1000, "effective_from": 1000 + 30 * day})
    with pytest.raises(FarePolicyError, match="more than 400 days"):
        check_effective_window({"issued_at": 1000, "effective_from": 1000 + 3 * 365 * day})
    now = 10 * day
    assert publication_problem({"fare_policy": {}, "effective_from": 0}, now) is None
    assert publication_problem({"fare_policy": {}, "effective_from": now + day}, now) is None
    problem = publication_problem({"fare_policy": {}, "effective_from": now - day}, now)
    assert problem is not None and "in the past" in problem


# --- discounts and caps -------------------------------------------------------------------


FLAT: dict[str, Any] = {
    "mode": "flat",
    "flat_fare": 200,
    "max_fare": 200,
    "card_types": {"05": {"percent": 50}, "06": {"free": True}},
    "daily_cap": 500,
}


def test_card_types_and_daily_cap() -> None:
    policy = parse_fare_policy(FLAT)
    place = TapPlace(line=1, stop=1)
    assert decide(policy, CardFacts(card_type=0x01), place, T0).amount == 200
    assert decide(policy, CardFacts(card_type=0x05), place, T0).amount == 100  # student
    assert decide(policy, CardFacts(card_type=0x06), place, T0).amount == 0  # senior
    assert decide(policy, CardFacts(paid_today=400), place, T0).amount == 100
    assert decide(policy, CardFacts(paid_today=600), place, T0).amount == 0


# --- entry / exit ---------------------------------------------------------------------------

BUS_LINE: dict[str, Any] = {
    "mode": "section",
    "max_fare": 400,
    "bands": [
        {"from": 1, "to": 3, "price": 200},
        {"from": 4, "to": 6, "price": 300},
        {"from": 7, "to": 9, "price": 400},
    ],
    "lines": {
        "8": {"mode": "bus", "stops": [{"id": i, "section": i} for i in range(1, 10)]},
        "9": {"mode": "bus", "stops": [{"id": i, "section": i} for i in range(1, 4)]},
    },
    "card_types": {"06": {"free": True}},
    "anti_passback_s": 300,
    "entry_exit": {"boarding_debit": "max", "unfinished": "max_fare", "max_trip_s": 7200},
}


def _entry(line: int, stop: int, amount: int, when: dt.datetime = T0, city: str = "") -> Trip:
    return Trip(
        record_type=ENTRY_RECORD_TYPE, line=line, station=stop, amount=amount, when=when, city=city
    )


def test_boarding_preauthorises_the_maximum_and_alighting_refunds_through_the_host() -> None:
    policy = parse_fare_policy(BUS_LINE)
    board = decide(policy, CardFacts(), TapPlace(8, 1, "both"), T0)
    assert (board.kind, board.amount, board.record_type) == ("entry", 400, 0x03)
    alight = decide(
        policy,
        CardFacts(last_trip=_entry(8, 1, board.amount)),
        TapPlace(8, 3, "both"),
        T0 + dt.timedelta(minutes=20),
    )
    assert (alight.kind, alight.amount, alight.refund_due, alight.record_type) == (
        "exit",
        0,
        200,
        0x04,
    )
    assert settle_trip([board, alight]) == 200


def test_min_boarding_debit_settles_the_difference_at_alighting() -> None:
    policy = parse_fare_policy({**BUS_LINE, "entry_exit": {"boarding_debit": "min"}})
    board = decide(policy, CardFacts(), TapPlace(8, 2, "entry"), T0)
    alight = decide(
        policy, CardFacts(last_trip=_entry(8, 2, board.amount)), TapPlace(8, 9, "exit"), T0
    )
    assert (board.amount, alight.amount) == (200, 200)  # 8 sections: 4 yuan


@pytest.mark.parametrize(
    ("rule", "extra_policy", "closing"),
    [("max_fare", {}, 0), ("penalty", {"penalty": 300}, 0), ("host", {}, 0)],
)
def test_unfinished_trip_then_boarding_again(
    rule: str, extra_policy: dict[str, Any], closing: int
) -> None:
    """Boarded with the minimum, never alighted: the next boarding closes the old trip by the
    policy's rule and says so."""
    entry_exit = {"boarding_debit": "min", "unfinished": rule, **extra_policy}
    policy = parse_fare_policy({**BUS_LINE, "entry_exit": entry_exit})
    later = T0 + dt.timedelta(hours=5)  # past max_trip_s: stale
    decision = decide(policy, CardFacts(last_trip=_entry(8, 1, 200)), TapPlace(8, 1, "both"), later)
    owed = {"max_fare": 200, "penalty": 100, "host": 0}[rule]
    assert decision.kind == "unfinished_then_entry"
    assert decision.unfinished == rule
    assert decision.amount == 200 + owed
    assert any("not alighted" in n for n in decision.notes)


def test_alighting_without_a_boarding_record_meets_the_rule() -> None:
    policy = parse_fare_policy(
        {**BUS_LINE, "entry_exit": {"unfinished": "penalty", "penalty": 300}}
    )
    decision = decide(policy, CardFacts(), TapPlace(8, 5, "exit"), T0)
    assert (decision.kind, decision.amount, decision.unfinished) == (
        "exit_without_entry",
        300,
        "penalty",
    )


def test_alighting_on_another_line_closes_the_trip_as_unfinished() -> None:
    policy = parse_fare_policy(BUS_LINE)
    decision = decide(policy, CardFacts(last_trip=_entry(9, 1, 400)), TapPlace(8, 5, "exit"), T0)
    assert (decision.kind, decision.unfinished, decision.amount) == (
        "exit_unfinished",
        "max_fare",
        0,
    )


def test_foreign_trip_record_is_not_taken_for_a_boarding() -> None:
    policy = parse_fare_policy(BUS_LINE)
    place = TapPlace(8, 5, "both", city="1000")
    decision = decide(policy, CardFacts(last_trip=_entry(8, 1, 400, city="5180")), place, T0)
    assert decision.kind == "entry"
    assert any("city 5180" in n for n in decision.notes)


def test_anti_passback_and_unknown_stop() -> None:
    policy = parse_fare_policy(BUS_LINE)
    trip = _entry(8, 1, 400)
    with pytest.raises(Passback, match="line 8"):
        decide(
            policy,
            CardFacts(last_trip=trip),
            TapPlace(8, 1, "entry"),
            T0 + dt.timedelta(seconds=60),
        )
    with pytest.raises(NoFare, match="stop 42"):
        decide(policy, CardFacts(), TapPlace(8, 42, "both"), T0)
    with pytest.raises(NoFare, match="line 7"):
        decide(policy, CardFacts(), TapPlace(7, 1, "both"), T0)


def test_senior_rides_free_on_entry_exit() -> None:
    policy = parse_fare_policy(BUS_LINE)
    board = decide(policy, CardFacts(card_type=6), TapPlace(8, 1, "both"), T0)
    alight = decide(
        policy, CardFacts(card_type=6, last_trip=_entry(8, 1, 0)), TapPlace(8, 9, "both"), T0
    )
    assert (board.amount, alight.amount, alight.refund_due) == (0, 0, 0)


# --- properties -----------------------------------------------------------------------------


@st.composite
def distance_policies(draw: st.DrawFn) -> FarePolicy:
    n = draw(st.integers(1, 5))
    bounds = sorted(draw(st.sets(st.integers(1, 50_000), min_size=n, max_size=n)))
    prices = sorted(draw(st.lists(st.integers(0, 2000), min_size=n, max_size=n)))
    stops = sorted(draw(st.sets(st.integers(0, 120_000), min_size=2, max_size=8)))
    bands, low = [], 0
    for high, price in zip(bounds, prices, strict=True):
        bands.append({"over_m": low, "up_to_m": high, "price": price})
        low = high
    raw: dict[str, Any] = {
        "mode": "distance",
        "max_fare": 1_000_000,
        "bands": bands,
        "beyond": {"every": draw(st.integers(1000, 30_000)), "add": draw(st.integers(0, 500))},
        "lines": {"3": {"stops": [{"id": i, "at_m": m} for i, m in enumerate(stops, 1)]}},
        "card_types": {"05": {"percent": draw(st.integers(0, 100))}},
        "daily_cap": draw(st.integers(0, 5000)),
        "entry_exit": {"boarding_debit": draw(st.sampled_from(["max", "min"]))},
    }
    policy = parse_fare_policy(raw)
    return parse_fare_policy({**raw, "max_fare": max_of(policy)})


def max_of(policy: FarePolicy) -> int:
    from agent.products.fares import table_price

    line = policy.lines[3]
    return max(table_price(policy, line, a, b) for a in line.stops for b in line.stops)


@given(policy=distance_policies(), data=st.data())
def test_fares_are_never_negative_nor_above_the_maximum(
    policy: FarePolicy, data: st.DataObject
) -> None:
    stops = [s.id for s in policy.lines[3].stops]
    card = CardFacts(
        card_type=data.draw(st.sampled_from([None, 5])),
        paid_today=data.draw(st.integers(0, 6000)),
        last_trip=data.draw(
            st.one_of(
                st.none(),
                st.builds(_entry, st.just(3), st.sampled_from(stops), st.integers(0, 5000)),
            )
        ),
    )
    place = TapPlace(
        3,
        data.draw(st.sampled_from(stops)),
        data.draw(st.sampled_from(["single", "entry", "exit", "both"])),
    )
    decision = decide(
        policy, card, place, T0 + dt.timedelta(seconds=data.draw(st.integers(0, 20_000)))
    )
    assert 0 <= decision.amount <= policy.max_fare
    assert decision.refund_due >= 0


@given(policy=distance_policies(), data=st.data())
def test_boarding_and_alighting_add_up_to_the_table_price(
    policy: FarePolicy, data: st.DataObject
) -> None:
    from agent.products.fares import table_price

    line = policy.lines[3]
    origin, destination = (
        data.draw(st.sampled_from(line.stops)),
        data.draw(st.sampled_from(line.stops)),
    )
    board = decide(policy, CardFacts(), TapPlace(3, origin.id, "entry"), T0)
    alight = decide(
        policy,
        CardFacts(last_trip=_entry(3, origin.id, board.amount)),
        TapPlace(3, destination.id, "exit"),
        T0 + dt.timedelta(minutes=30),
    )
    assert board.kind == "entry" and alight.kind == "exit"
    price = min(table_price(policy, line, origin, destination), policy.daily_cap or 0)
    if policy.daily_cap is None:
        price = table_price(policy, line, origin, destination)
    assert settle_trip([board, alight]) == price


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
KEYS = st.sampled_from(
    ["mode", "flat_fare", "max_fare", "bands", "beyond", "lines", "card_types", "transfer",
     "daily_cap", "anti_passback_s", "entry_exit", "monthly_cap", "time_zone"]
)  # fmt: skip


@given(st.dictionaries(KEYS, JSON, max_size=6) | JSON)
def test_the_validator_refuses_or_accepts_never_crashes(raw: object) -> None:
    """Whatever a host or an attacker puts in fare_policy: a policy, or FarePolicyError."""
    with contextlib.suppress(FarePolicyError):
        parse_fare_policy(raw)


@given(
    policy=st.sampled_from([BEIJING_SUBWAY_2014, BEIJING_BUS_2014, SHANGHAI_METRO]),
    m=st.integers(0, 200_000),
)
def test_golden_tables_are_monotone(policy: dict[str, Any], m: int) -> None:
    parsed = parse_fare_policy(policy)
    start = parsed.bands[0].price  # the table's lowest price (3 yuan metro, 2 yuan bus)
    assert start <= band_price(parsed, m) <= band_price(parsed, m + 1000)


@pytest.mark.parametrize(
    "changes",
    [{"lines": {"²": {"stops": [{"id": 1}]}}}, {"card_types": {" 5": {"free": True}}}],
)
def test_odd_keys_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(FarePolicyError):
        parse_fare_policy(_with(**changes))


def test_entry_and_exit_record_types_are_the_t_union_ef1e_codes() -> None:
    """EF1E byte 0, the trip record's main type, as real T-Union cards carry it: 03 进站
    (entry), 04 出站 (exit), 06 单次 (single). Source: tkerby/flipperzero-firmware-wPlugins,
    applications/external/t_union_master/src/protocol/t_union_msg.h at
    5afa037621267281d491325d7cf43bafe6ae8457 ("主类型 3:进站 4:出站 6:单次")."""
    from agent.profile import TUNION_EF1E

    policy = parse_fare_policy(BUS_LINE)
    assert policy.entry_exit is not None
    assert (policy.entry_exit.entry_record_type, policy.entry_exit.exit_record_type) == (3, 4)
    assert (ENTRY_RECORD_TYPE, EXIT_RECORD_TYPE, TUNION_EF1E.record_type) == (0x03, 0x04, 0x06)
    # a single-tap record (06) of this line is not an open boarding: the tap is a new entry
    single = Trip(record_type=0x06, line=8, station=1, amount=200, when=T0)
    board = decide(policy, CardFacts(last_trip=single), TapPlace(8, 5, "both"), T0)
    assert (board.kind, board.record_type) == ("entry", 0x03)
    # a city whose terminals write other codes says so in its policy
    custom = parse_fare_policy(
        {**BUS_LINE, "entry_exit": {"entry_record_type": 0x11, "exit_record_type": 0x12}}
    )
    alight = decide(
        custom,
        CardFacts(last_trip=Trip(record_type=0x11, line=8, station=1, amount=400, when=T0)),
        TapPlace(8, 3, "both"),
        T0 + dt.timedelta(minutes=10),
    )
    assert (alight.kind, alight.record_type) == ("exit", 0x12)


# --- a transfer into a boarding-and-alighting trip ------------------------------------------

BUS_TRANSFER: dict[str, Any] = {
    **BUS_LINE,
    "anti_passback_s": 0,
    "transfer": {"window_s": 3600, "discount": 100, "between": "lines"},
    "entry_exit": {"boarding_debit": "min", "unfinished": "max_fare", "max_trip_s": 7200},
}


def _trip(record_type: int, line: int, stop: int, amount: int, when: dt.datetime) -> Trip:
    return Trip(record_type=record_type, line=line, station=stop, amount=amount, when=when)


@pytest.mark.parametrize(
    ("earlier", "boarded_after", "expected"),
    [
        # alighted from line 9, boarded line 8 20 min later: 1 yuan off line 8's trip
        ((EXIT_RECORD_TYPE, 9), dt.timedelta(minutes=20), 100),
        # a single-tap trip on line 9 counts the same
        ((0x06, 9), dt.timedelta(minutes=20), 100),
        # boarded 61 min after alighting: outside the window, no discount
        ((EXIT_RECORD_TYPE, 9), dt.timedelta(minutes=61), 200),
        # the earlier trip was on line 8 too: not a transfer
        ((EXIT_RECORD_TYPE, 8), dt.timedelta(minutes=20), 200),
        # the earlier record is an open boarding (never alighted): no transfer from it
        ((ENTRY_RECORD_TYPE, 9), dt.timedelta(minutes=20), 200),
    ],
)
def test_transfer_into_a_boarding_and_alighting_trip(
    earlier: tuple[int, int], boarded_after: dt.timedelta, expected: int
) -> None:
    """Alight from line A (or a single tap on it), board line B within the window: B's
    alighting tap settles the trip at its price less the transfer discount. The window runs
    from A's record to B's boarding (the card's two newest trip records), not to the
    alighting."""
    policy = parse_fare_policy(BUS_TRANSFER)
    before = _trip(earlier[0], earlier[1], 1, 200, T0)
    board_at = T0 + boarded_after
    board = decide(policy, CardFacts(last_trip=before), TapPlace(8, 2, "both"), board_at)
    assert board.record_amount == 200  # the minimum: no discount yet
    boarding = _trip(ENTRY_RECORD_TYPE, 8, 2, board.record_amount, board_at)
    alight = decide(
        policy,
        CardFacts(last_trip=boarding, earlier_trip=before),
        TapPlace(8, 9, "both"),
        board_at + dt.timedelta(minutes=50),  # alighting after the window closed: still counts
    )
    assert alight.kind == "exit"
    assert alight.base == 400  # 8 sections
    assert alight.amount == expected  # 400 less the transfer, less the 200 boarding debit
    assert alight.transfer_from == (9 if expected == 100 else None)
    if earlier[0] == ENTRY_RECORD_TYPE:  # the boarding also closed line 9's open trip
        assert (board.kind, board.amount, board.unfinished) == (
            "unfinished_then_entry",
            400,
            "max_fare",
        )
    else:
        assert (board.kind, board.amount) == ("entry", 200)
    assert settle_trip([board, alight]) == board.amount + expected


def test_transfer_into_a_trip_with_a_maximum_boarding_is_refunded_through_the_host() -> None:
    policy = parse_fare_policy({**BUS_TRANSFER, "entry_exit": {"boarding_debit": "max"}})
    before = _trip(EXIT_RECORD_TYPE, 9, 3, 200, T0)
    board_at = T0 + dt.timedelta(minutes=5)
    board = decide(policy, CardFacts(last_trip=before), TapPlace(8, 1, "both"), board_at)
    alight = decide(
        policy,
        CardFacts(last_trip=_trip(ENTRY_RECORD_TYPE, 8, 1, board.amount, board_at),
                  earlier_trip=before),
        TapPlace(8, 3, "both"),
        board_at + dt.timedelta(minutes=10),
    )  # fmt: skip
    # 3 sections cost 2 yuan, 1 yuan off for the transfer: 4 yuan pre-authorised, 3 owed back
    assert (board.amount, alight.amount, alight.refund_due) == (400, 0, 300)
    assert settle_trip([board, alight]) == 100


def test_an_unfinished_trips_charge_is_not_handed_back_at_the_next_alighting() -> None:
    """Boarded line 9 and never alighted; boarding line 8 debits line 8's minimum plus the
    unfinished rule's charge, but its trip record carries only line 8's part: alighting on
    line 8 settles against that, so the unfinished charge stays charged."""
    policy = parse_fare_policy({**BUS_LINE, "entry_exit": {"boarding_debit": "min"}})
    open_trip = _entry(9, 1, 200, T0)
    board = decide(policy, CardFacts(last_trip=open_trip), TapPlace(8, 1, "both"), T0)
    assert (board.kind, board.amount, board.record_amount) == ("unfinished_then_entry", 400, 200)
    alight = decide(
        policy,
        CardFacts(last_trip=_entry(8, 1, board.record_amount, T0)),
        TapPlace(8, 9, "both"),
        T0 + dt.timedelta(minutes=30),
    )
    assert (alight.amount, alight.refund_due) == (200, 0)  # 4 yuan trip, 2 paid at boarding
    assert settle_trip([board, alight]) == 200 + 400  # line 9's unfinished 2 + line 8's 4


@pytest.mark.parametrize(
    ("role", "paid_today", "expected"), [("both", 700, (0, 200)), ("exit", 300, (0, 200))]
)
def test_daily_cap_at_alighting_counts_what_was_paid_before_the_trip(
    role: str, paid_today: int, expected: tuple[int, int]
) -> None:
    """Cap 5 yuan, 3 yuan paid earlier today, boarded with the 4-yuan maximum (the boarding
    takes no cap), alighted after a 2-yuan trip: the trip fits under the cap, 2 yuan back.
    On a bus validator (role both) the terminal's own sum already holds the boarding's 4 yuan
    (7 in all); an exit gate's does not (3)."""
    policy = parse_fare_policy({**BUS_LINE, "daily_cap": 500, "anti_passback_s": 0})
    board = decide(policy, CardFacts(paid_today=300), TapPlace(8, 1, "both"), T0)
    assert board.amount == 400
    alight = decide(
        policy,
        CardFacts(last_trip=_entry(8, 1, 400), paid_today=paid_today),
        TapPlace(8, 3, role),
        T0 + dt.timedelta(minutes=15),
    )
    assert (alight.amount, alight.refund_due) == expected


# --- the monthly cap (issue 13: "daily and monthly caps") ------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"monthly_cap": -1}, "fare_policy.monthly_cap must be in 0..1000000, got -1"),
        ({"monthly_cap": "150.00"}, "fare_policy.monthly_cap must be an integer"),
        ({"monthly_cap": 15.5}, "fare_policy.monthly_cap must be an integer"),
        ({"monthly_cap": True}, "fare_policy.monthly_cap must be an integer"),
        ({"monthly_cap": 10**7}, "fare_policy.monthly_cap must be in 0..1000000"),
        ({"time_zone": "Mars/Olympus_Mons"}, "fare_policy.time_zone: unknown time zone"),
        ({"time_zone": "../../etc/passwd"}, "fare_policy.time_zone: unknown time zone"),
        ({"time_zone": 8}, "fare_policy.time_zone must be an IANA time zone name"),
        ({"time_zone": ""}, "fare_policy.time_zone must be an IANA time zone name"),
    ],
)
def test_a_bad_monthly_cap_or_time_zone_is_refused_naming_the_field(
    changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(FarePolicyError) as refused:
        parse_fare_policy({**FLAT, **changes})
    assert field in str(refused.value)


def test_the_monthly_cap_is_policy_data_in_fen_with_the_citys_time_zone() -> None:
    policy = parse_fare_policy({**FLAT, "monthly_cap": 15_000})
    assert (policy.monthly_cap, policy.time_zone) == (15_000, "Asia/Shanghai")
    other = parse_fare_policy({**FLAT, "monthly_cap": 0, "time_zone": "Asia/Urumqi"})
    assert (other.monthly_cap, other.time_zone) == (0, "Asia/Urumqi")
    assert parse_fare_policy(FLAT).monthly_cap is None  # no cap unless the policy says so


@pytest.mark.parametrize(
    ("zone", "utc", "start"),
    [
        # 16:00 UTC on the last of the month is midnight in Beijing time: a new month there
        ("Asia/Shanghai", dt.datetime(2026, 11, 30, 15, 59, 59, tzinfo=dt.UTC), (2026, 11, 1)),
        ("Asia/Shanghai", dt.datetime(2026, 11, 30, 16, 0, 0, tzinfo=dt.UTC), (2026, 12, 1)),
        ("Asia/Shanghai", dt.datetime(2026, 12, 31, 16, 30, tzinfo=dt.UTC), (2027, 1, 1)),
        # the same instants in a city two hours behind Beijing (UTC+6): still November
        ("Asia/Urumqi", dt.datetime(2026, 11, 30, 16, 0, 0, tzinfo=dt.UTC), (2026, 11, 1)),
        ("Asia/Urumqi", dt.datetime(2026, 11, 30, 18, 0, 0, tzinfo=dt.UTC), (2026, 12, 1)),
    ],
)
def test_the_month_begins_at_midnight_on_the_first_in_the_citys_time_zone(
    zone: str, utc: dt.datetime, start: tuple[int, int, int]
) -> None:
    policy = parse_fare_policy({**FLAT, "monthly_cap": 15_000, "time_zone": zone})
    begun = month_start(policy, utc)
    assert (begun.year, begun.month, begun.day, begun.hour, begun.minute) == (*start, 0, 0)
    assert begun.utcoffset() == dt.timedelta(hours=8 if zone == "Asia/Shanghai" else 6)
    assert begun <= utc < begun + dt.timedelta(days=31)
    # what the store keeps for the caps: from the month's start (or the day's, if earlier)
    monthly_only = parse_fare_policy({**FLAT, "monthly_cap": 15_000, "time_zone": zone})
    assert accumulator_since(dataclasses.replace(monthly_only, daily_cap=None), utc) == begun
    since = accumulator_since(policy, utc)
    assert since is not None and since <= begun
    assert (
        accumulator_since(dataclasses.replace(policy, daily_cap=None, monthly_cap=None), utc)
        is None
    )


def test_the_monthly_cap_takes_what_is_left_of_the_month() -> None:
    policy = parse_fare_policy({**FLAT, "daily_cap": 100_000, "monthly_cap": 1000})
    place = TapPlace(line=1, stop=1)
    assert decide(policy, CardFacts(paid_this_month=700), place, T0).amount == 200
    assert decide(policy, CardFacts(paid_this_month=900), place, T0).amount == 100
    assert decide(policy, CardFacts(paid_this_month=1000), place, T0).amount == 0
    assert decide(policy, CardFacts(paid_this_month=5000), place, T0).amount == 0  # never < 0
    # the lower of the two caps wins
    both = parse_fare_policy({**FLAT, "daily_cap": 500, "monthly_cap": 1000})
    assert decide(both, CardFacts(paid_today=400, paid_this_month=500), place, T0).amount == 100
    assert decide(both, CardFacts(paid_today=0, paid_this_month=950), place, T0).amount == 50


@st.composite
def capped_policies(draw: st.DrawFn) -> FarePolicy:
    """Distance tables with a monthly cap (and sometimes a daily cap and a transfer)."""
    base = draw(distance_policies())
    raw: dict[str, Any] = {
        "mode": "distance",
        "max_fare": base.max_fare,
        "bands": [{"over_m": b.low, "up_to_m": b.high, "price": b.price} for b in base.bands],
        "lines": {"3": {"stops": [{"id": s.id, "at_m": s.at_m} for s in base.lines[3].stops]}},
        "card_types": {"05": {"percent": base.card_types[5].percent}},
        "monthly_cap": draw(st.integers(0, 20_000)),
        "entry_exit": {"boarding_debit": draw(st.sampled_from(["max", "min"]))},
    }
    if base.beyond is not None:
        raw["beyond"] = {"every": base.beyond.every, "add": base.beyond.add}
    if draw(st.booleans()):
        raw["daily_cap"] = draw(st.integers(0, 5000))
    return parse_fare_policy(raw)


@given(policy=capped_policies(), data=st.data())
def test_a_month_of_single_taps_never_pays_beyond_the_monthly_cap(
    policy: FarePolicy, data: st.DataObject
) -> None:
    """Tap after tap through a month (days and stops drawn): every charge is >= 0 and the
    month's total never passes the cap; a day's never passes the daily cap."""
    assert policy.monthly_cap is not None
    stops = [s.id for s in policy.lines[3].stops]
    card_type = data.draw(st.sampled_from([None, 5]))
    month, days = 0, dict[int, int]()
    for _ in range(data.draw(st.integers(1, 40))):
        day = data.draw(st.integers(1, 28))
        place = TapPlace(3, data.draw(st.sampled_from(stops)), "single")
        card = CardFacts(card_type=card_type, paid_today=days.get(day, 0), paid_this_month=month)
        decision = decide(policy, card, place, dt.datetime(2026, 11, day, 8, 0))
        assert decision.amount >= 0
        month += decision.amount
        days[day] = days.get(day, 0) + decision.amount
        assert month <= policy.monthly_cap
        assert policy.daily_cap is None or days[day] <= policy.daily_cap


@given(policy=capped_policies(), data=st.data())
def test_a_boarding_and_alighting_trip_settles_within_the_monthly_cap(
    policy: FarePolicy, data: st.DataObject
) -> None:
    """What a trip costs once settled (boarding + alighting - the host's refund) never takes
    the month past the cap, nor below what was paid before it; no charge or refund < 0."""
    assert policy.monthly_cap is not None
    line = policy.lines[3]
    origin = data.draw(st.sampled_from(line.stops))
    destination = data.draw(st.sampled_from(line.stops))
    before = data.draw(st.integers(0, 25_000))
    role = data.draw(st.sampled_from(["both", "exit"]))
    board = decide(policy, CardFacts(paid_this_month=before), TapPlace(3, origin.id, "entry"), T0)
    after_board = before + board.amount if role == "both" else before
    alight = decide(
        policy,
        CardFacts(last_trip=_entry(3, origin.id, board.amount), paid_this_month=after_board),
        TapPlace(3, destination.id, role),
        T0 + dt.timedelta(minutes=30),
    )
    assert min(board.amount, alight.amount, alight.refund_due) >= 0
    trip = settle_trip([board, alight])
    assert trip >= 0
    assert before + trip <= max(policy.monthly_cap, before)
