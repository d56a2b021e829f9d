"""The fare policy of the parameter set in force, through the engine and simulated cards
(issue 13): distance fares by the validator's position, card-type discounts, transfers and
anti-passback read from the card's trip record, refusals that say why."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.params import ActiveParams, params_signed_bytes
from agent.products.fares import TapPlace
from clearinghost.keys import HostKey, sign_params
from tests.fake_reader.scenario import make_card
from tests.rig import Rig
from tests.test_fares import BEIJING_SUBWAY_2014

HOST_KEY = HostKey.generate()  # TEST KEY ONLY

# Beijing subway 2014 distance bands (see tests/test_fares.py for the source), on two test
# lines; the bus line 2 takes transfers from line 1 with 1 yuan off within 90 minutes.
POLICY: dict[str, Any] = {
    **BEIJING_SUBWAY_2014,  # its "lines" replaced below
    "lines": {
        "1": {"mode": "metro", "stops": [{"id": 1, "at_m": 0}, {"id": 2, "at_m": 5000},
                                         {"id": 3, "at_m": 20000}]},
        "2": {"mode": "bus", "stops": [{"id": 7, "at_m": 0}, {"id": 8, "at_m": 4000}]},
    },
    "card_types": {"04": {"percent": 50}, "05": {"free": True}},
    "transfer": {"window_s": 5400, "discount": 100, "between": "lines"},
}  # fmt: skip


def write_params(path: Path, *, unchecked: bool = False, **payload: object) -> None:
    """A signed set; ``unchecked``: signed without the host's check (an older host, or a
    forged-but-signed set), to see the agent refuse it on its own."""
    now = int(time.time())
    body: dict[str, object] = {
        "version": 1,
        "issued_at": now - 10,
        "expires_at": now + 3600,
        "effective_from": now - 5,
        **payload,
    }
    if not unchecked:
        path.write_bytes(sign_params(body, HOST_KEY))
        return
    signature = HOST_KEY.sign(params_signed_bytes(body)).hex()
    envelope = {"payload": body, "key_id": HOST_KEY.key_id, "signature": signature}
    path.write_bytes(json.dumps(envelope).encode())


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path / "rig")
    path = tmp_path / "params.json"
    write_params(path, fare_policy=POLICY)
    rig.engine.params = ActiveParams(path, HOST_KEY.public_key_bytes)
    yield rig
    rig.close()


def at(rig: Rig, line: int, stop: int) -> None:
    """What a GPS feed or the driver's console does: move the validator."""
    rig.engine.position = lambda: TapPlace(line, stop, "single", "1000")


def test_single_tap_pays_the_dearest_ride_from_its_stop(rig: Rig) -> None:
    at(rig, 1, 1)
    assert rig.tap(make_card("tunion", 1, rig.keyset)).fare == 500  # 20 km: 5 yuan
    at(rig, 1, 2)
    assert rig.tap(make_card("cjt166", 2, rig.keyset)).fare == 500  # 15 km
    at(rig, 2, 7)
    assert rig.tap(make_card("tunion", 3, rig.keyset)).fare == 300


def test_student_half_and_senior_free(rig: Rig) -> None:
    at(rig, 2, 7)
    student = rig.tap(make_card("tunion", 4, rig.keyset, card_catalogue=4))
    senior = rig.tap(make_card("tunion", 5, rig.keyset, card_catalogue=5))
    assert (student.status, student.fare) == ("paid", 150)
    assert (senior.status, senior.fare) == ("paid", 0)


def test_transfer_from_the_cards_trip_record_and_the_record_carries_the_position(
    rig: Rig,
) -> None:
    card = make_card("tunion", 6, rig.keyset, balance=5000)
    at(rig, 1, 3)
    first = rig.tap(card)
    assert first.fare == 500
    newest = card.record_files[0x1E].records[0]
    assert int.from_bytes(newest[10:12], "big") == 1 and int.from_bytes(newest[12:14], "big") == 3
    at(rig, 2, 8)
    second = rig.tap(card)
    assert (second.status, second.fare) == ("paid", 200)  # 3 yuan less the transfer yuan
    at(rig, 2, 7)
    third = rig.tap(card)  # same line as the last trip: no transfer
    assert third.fare == 300


def test_anti_passback_refuses_a_second_entry_on_the_line(rig: Rig, tmp_path: Path) -> None:
    write_params(tmp_path / "params.json", fare_policy={**POLICY, "anti_passback_s": 600})
    card = make_card("tunion", 7, rig.keyset)
    at(rig, 2, 7)
    assert rig.tap(card).status == "paid"
    again = rig.tap(card)
    assert again.status == "refused"
    assert again.reason.startswith("passback")
    assert len(card.debits) == 1


def test_a_stop_not_on_the_map_refuses_never_a_silent_zero(rig: Rig) -> None:
    at(rig, 2, 99)
    with capture_logs() as logs:
        outcome = rig.tap(make_card("tunion", 8, rig.keyset))
    assert outcome.status == "refused"
    assert outcome.reason.startswith("no_fare")
    assert "stop 99" in outcome.reason
    assert any(e["event"] == "fare_no_price" for e in logs)
    rig.engine.position = lambda: None
    assert rig.tap(make_card("tunion", 9, rig.keyset)).reason.startswith("no_fare")


def test_a_bad_policy_at_the_agent_leaves_the_profile_fare(rig: Rig, tmp_path: Path) -> None:
    """A set signed with a policy the validator refuses (a gap in the table): the whole set
    is refused with a log line naming the field; the profile's flat fare stays."""
    bad = {**POLICY, "bands": [{"over_m": 0, "up_to_m": 6000, "price": 300},
                               {"over_m": 7000, "up_to_m": 40000, "price": 400}]}  # fmt: skip
    write_params(tmp_path / "params.json", unchecked=True, fare_policy=bad)
    with capture_logs() as logs:
        outcome = rig.tap(make_card("tunion", 10, rig.keyset))
    assert outcome.fare == rig.profile.flat_fare
    refused = [e for e in logs if e["event"] == "params_refused"]
    assert refused and "bands[1] leaves a gap" in refused[0]["error"]


def test_a_pos_amount_takes_precedence_over_the_policy(rig: Rig) -> None:
    rig.engine.fare_for = lambda _profile: 1234
    at(rig, 2, 7)
    assert rig.tap(make_card("tunion", 11, rig.keyset)).fare == 1234


BUS: dict[str, Any] = {
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
    "card_types": {"05": {"free": True}},
    "entry_exit": {"boarding_debit": "max", "unfinished": "max_fare"},
}


def on_bus(rig: Rig, line: int, stop: int) -> None:
    rig.engine.position = lambda: TapPlace(line, stop, "both", "1000")


def test_bus_boarding_preauthorises_and_alighting_settles(rig: Rig, tmp_path: Path) -> None:
    write_params(tmp_path / "params.json", fare_policy=BUS)
    card = make_card("tunion", 20, rig.keyset, balance=5000)
    on_bus(rig, 8, 1)
    board = rig.tap(card)
    assert (board.status, board.fare) == ("paid", 400)
    assert card.record_files[0x1E].records[0][0] == 0x03  # EF1E 进站 (entry / boarding)
    on_bus(rig, 8, 3)
    alight = rig.tap(card)
    assert (alight.status, alight.fare) == ("paid", 0)
    assert card.record_files[0x1E].records[0][0] == 0x04  # EF1E 出站 (exit / alighting)
    records = rig.records(kind="purchase")
    assert [r.fields["fare_kind"] for r in records] == ["entry", "exit"]
    assert records[1].fields["fare_refund_due"] == 200  # 3 sections cost 2 yuan: the host owes 2
    assert rig.store.verify().ok


def test_bus_min_boarding_then_the_difference(rig: Rig, tmp_path: Path) -> None:
    write_params(
        tmp_path / "params.json", fare_policy={**BUS, "entry_exit": {"boarding_debit": "min"}}
    )
    card = make_card("tunion", 21, rig.keyset, balance=5000)
    on_bus(rig, 8, 2)
    assert rig.tap(card).fare == 200
    on_bus(rig, 8, 9)
    assert rig.tap(card).fare == 200  # 8 sections: 4 yuan in all


def test_a_card_without_trip_state_pays_a_single_tap(rig: Rig, tmp_path: Path) -> None:
    """A CJ/T 166 application on the simple flow (the demo profile's) writes no CAPP record:
    boarding and alighting cannot be told apart on the card, so it pays the dearest ride from
    its stop, once per tap (on the compound flow: tests/test_fares_families.py)."""
    write_params(tmp_path / "params.json", fare_policy=BUS)
    card = make_card("cjt166", 24, rig.keyset, balance=5000)
    on_bus(rig, 8, 7)
    with capture_logs() as logs:
        outcome = rig.tap(card)
    assert outcome.fare == 400  # stop 7 to stop 1: 7 sections
    assert any(e["event"] == "fare_no_trip_state" for e in logs)
    assert rig.records(kind="purchase")[0].fields["fare_kind"] == "single"


def test_bus_unfinished_trip_on_another_line_is_charged_and_recorded(
    rig: Rig, tmp_path: Path
) -> None:
    write_params(
        tmp_path / "params.json", fare_policy={**BUS, "entry_exit": {"boarding_debit": "min"}}
    )
    card = make_card("tunion", 22, rig.keyset, balance=5000)
    on_bus(rig, 8, 1)
    assert rig.tap(card).fare == 200
    on_bus(rig, 9, 1)  # never alighted from line 8
    with capture_logs() as logs:
        outcome = rig.tap(card)
    assert outcome.fare == 400  # the rest of line 8's maximum + boarding line 9
    last = rig.records(kind="purchase")[-1]
    assert (last.fields["fare_kind"], last.fields["fare_unfinished"]) == (
        "unfinished_then_entry",
        "max_fare",
    )
    decided = [e for e in logs if e["event"] == "fare_decided"]
    assert "not alighted" in decided[0]["notes"][0]


def test_bus_senior_rides_free(rig: Rig, tmp_path: Path) -> None:
    write_params(tmp_path / "params.json", fare_policy=BUS)
    card = make_card("tunion", 23, rig.keyset, card_catalogue=5)
    on_bus(rig, 8, 1)
    assert rig.tap(card).fare == 0
    on_bus(rig, 8, 9)
    assert rig.tap(card).fare == 0


def test_daily_cap_from_the_terminals_own_records(rig: Rig, tmp_path: Path) -> None:
    write_params(
        tmp_path / "params.json",
        fare_policy={"mode": "flat", "flat_fare": 200, "max_fare": 200, "daily_cap": 500},
    )
    card = make_card("tunion", 30, rig.keyset, balance=5000)
    assert [rig.tap(card).fare for _ in range(4)] == [200, 200, 100, 0]
    other = make_card("tunion", 31, rig.keyset, balance=5000)
    assert rig.tap(other).fare == 200  # the accumulator is per card


def test_monthly_cap_from_the_terminals_own_records_in_the_citys_month(
    rig: Rig, tmp_path: Path
) -> None:
    """The monthly cap's accumulator is this terminal's purchase records for the card since
    the first of the month, 00:00 Beijing time: a tap at 23:50 on 31 October (15:50 UTC) is
    October's, one at 00:10 on 1 November (16:10 UTC the day before) is November's, and at
    00:00:30 on 1 December the card pays again."""
    utc = dt.UTC
    taps = [
        (dt.datetime(2026, 10, 31, 15, 50, tzinfo=utc), 200),  # 31 Oct 23:50 in Beijing
        (dt.datetime(2026, 10, 31, 16, 10, tzinfo=utc), 200),  # 1 Nov 00:10: a new month
        (dt.datetime(2026, 11, 10, 1, 0, tzinfo=utc), 200),
        (dt.datetime(2026, 11, 20, 1, 0, tzinfo=utc), 100),  # 500 a month: 100 left
        (dt.datetime(2026, 11, 30, 15, 59, tzinfo=utc), 0),  # 30 Nov 23:59 in Beijing
        (dt.datetime(2026, 11, 30, 16, 0, 30, tzinfo=utc), 200),  # 1 Dec 00:00:30
    ]
    first, last = int(taps[0][0].timestamp()), int(taps[-1][0].timestamp())
    write_params(
        tmp_path / "params.json",
        issued_at=first - 60,
        expires_at=max(last, int(time.time())) + 3600,
        effective_from=0,
        fare_policy={
            "mode": "flat",
            "flat_fare": 200,
            "max_fare": 200,
            "monthly_cap": 500,
            "time_zone": "Asia/Shanghai",
        },
    )
    clock = [taps[0][0]]
    rig.engine.clock = lambda: clock[0]
    rig.store.set_stamp(lambda: (clock[0], {}))
    card = make_card("tunion", 32, rig.keyset, balance=5000)
    charged = []
    for when, _expected in taps:
        clock[0] = when
        outcome = rig.tap(card)
        assert outcome.status == "paid", outcome
        charged.append(outcome.fare)
    assert charged == [expected for _when, expected in taps]
    assert card.balance == 5000 - sum(charged)
    other = make_card("tunion", 33, rig.keyset, balance=5000)
    assert rig.tap(other).fare == 200  # the accumulator is per card


@pytest.mark.parametrize("mode", ["tear_before", "tear_after"])
def test_a_torn_tap_under_the_policy_is_charged_once_at_the_policys_fare(
    tmp_path: Path, mode: str
) -> None:
    """Every command of a policy tap (with its trip-record read) torn, the card back at once:
    one debit, of the policy's fare (3 yuan, not the profile's flat 2), one record."""
    for position in range(1, 9):  # a policy tap of a T-Union card: 8 APDUs
        rig = Rig(tmp_path / f"{mode}{position}")
        try:
            path = tmp_path / f"params{position}.json"
            write_params(path, fare_policy=POLICY)
            rig.engine.params = ActiveParams(path, HOST_KEY.public_key_bytes)
            at(rig, 2, 7)
            card = make_card("tunion", 40 + position, rig.keyset, balance=5000)
            card.reset_command_count()
            card.faults.add(position, mode)  # type: ignore[arg-type]
            rig.tap(card)
            again = rig.tap(card)
            label = f"{mode} at command {position}"
            assert again.status in ("paid", "recovered"), (label, again)
            assert len(card.debits) == 1, label
            assert card.balance == 5000 - 300, label
            assert len(rig.records(kind="purchase")) == 1, label
        finally:
            rig.close()


def test_m1_cards_pay_the_policy(rig: Rig, tmp_path: Path) -> None:
    """An M1 purse pays the distance fare from its stop; under an entry/exit policy its trip
    block (``[m1_purse.trip]``) makes the tap a boarding, which pre-authorises the dearest
    ride from here (the alighting: tests/test_fares_families.py)."""
    from tests.fake_reader.m1_readers import InProcessM1Reader, M1Field, presence_of
    from tests.fake_reader.scenario import make_m1_card

    field = M1Field()
    at(rig, 2, 7)
    card = make_m1_card(501, balance=1000)
    field.insert(card)
    outcome = rig.engine.process_tap(InProcessM1Reader(field), presence_of(card))
    assert (outcome.status, outcome.fare) == ("paid", 300)
    write_params(tmp_path / "params.json", fare_policy=BUS)
    on_bus(rig, 8, 7)
    other = make_m1_card(502, balance=1000)
    field.insert(other)
    outcome = rig.engine.process_tap(InProcessM1Reader(field), presence_of(other))
    assert (outcome.status, outcome.fare) == ("paid", 400)
    assert rig.records(kind="purchase")[-1].fields["fare_kind"] == "entry"


def test_bus_transfer_from_line_9_into_a_trip_on_line_8(rig: Rig, tmp_path: Path) -> None:
    """Alight from line 9, board line 8 within the window, alight: the alighting tap reads the
    card's two newest EF1E records (its boarding, and line 9's alighting before it) and takes
    the transfer yuan off line 8's trip."""
    write_params(
        tmp_path / "params.json",
        fare_policy={
            **BUS,
            "transfer": {"window_s": 3600, "discount": 100, "between": "lines"},
            "entry_exit": {"boarding_debit": "min"},
        },
    )
    card = make_card("tunion", 50, rig.keyset, balance=5000)
    fares = []
    for line, stop in ((9, 1), (9, 3), (8, 1), (8, 9)):
        on_bus(rig, line, stop)
        outcome = rig.tap(card)
        assert outcome.status == "paid", outcome
        fares.append(outcome.fare)
    # line 9: 2 yuan at boarding, 3 sections cost 2: nothing more; line 8: 2 yuan at boarding,
    # 9 sections cost 4, less the transfer yuan: 1 more
    assert fares == [200, 0, 200, 100]
    assert card.balance == 5000 - 500
    types = [r[0] for r in card.record_files[0x1E].records[:4]]
    assert types == [0x04, 0x03, 0x04, 0x03]  # newest first: exit, entry, exit, entry
    records = rig.records(kind="purchase")
    assert [r.fields["fare_kind"] for r in records] == ["entry", "exit", "entry", "exit"]
    # the record says where the discount came from, for the host
    assert [r.fields.get("fare_transfer_from") for r in records] == [None, None, None, 9]


def test_bus_without_a_transfer_rule_charges_the_whole_second_trip(
    rig: Rig, tmp_path: Path
) -> None:
    write_params(
        tmp_path / "params.json", fare_policy={**BUS, "entry_exit": {"boarding_debit": "min"}}
    )
    card = make_card("tunion", 51, rig.keyset, balance=5000)
    fares = []
    for line, stop in ((9, 1), (9, 3), (8, 1), (8, 9)):
        on_bus(rig, line, stop)
        fares.append(rig.tap(card).fare)
    assert fares == [200, 0, 200, 200]


def test_unfinished_charge_stays_charged_after_the_next_alighting(rig: Rig, tmp_path: Path) -> None:
    """Boarded line 8, never alighted; boarded line 9 (the unfinished rule takes line 8's
    maximum) and alighted: the alighting settles line 9's trip only."""
    write_params(
        tmp_path / "params.json", fare_policy={**BUS, "entry_exit": {"boarding_debit": "min"}}
    )
    card = make_card("tunion", 52, rig.keyset, balance=5000)
    on_bus(rig, 8, 1)
    assert rig.tap(card).fare == 200
    on_bus(rig, 9, 1)
    assert rig.tap(card).fare == 400  # line 9's 2 yuan + the rest of line 8's 4-yuan maximum
    assert int.from_bytes(card.record_files[0x1E].records[0][17:21], "big") == 200
    on_bus(rig, 9, 3)
    alight = rig.tap(card)
    assert (alight.fare, rig.records(kind="purchase")[-1].fields.get("fare_refund_due")) == (
        0,
        None,
    )
    assert card.balance == 5000 - 600


def test_m1_card_types_take_the_policys_discounts(rig: Rig) -> None:
    """The M1 card type (issuance sector, per the [m1_purse] layout) prices like a CPU
    card's: type 04 pays half, type 05 rides free, others the full fare."""
    from tests.fake_reader.m1_readers import InProcessM1Reader, M1Field, presence_of
    from tests.fake_reader.scenario import make_m1_card

    field = M1Field()
    at(rig, 2, 7)
    paid: dict[int, tuple[int, int | None]] = {}
    for number, card_type in ((510, 0x01), (511, 0x04), (512, 0x05)):
        card = make_m1_card(number, balance=1000, card_type=card_type)
        field.insert(card)
        outcome = rig.engine.process_tap(InProcessM1Reader(field), presence_of(card))
        field.remove()
        rig.engine.presence.left()
        assert outcome.status == "paid", outcome
        paid[card_type] = (outcome.fare, outcome.balance_after)
    assert paid == {0x01: (300, 700), 0x04: (150, 850), 0x05: (0, 1000)}


def test_a_new_parameter_set_of_the_same_size_within_one_clock_tick_is_read(
    tmp_path: Path,
) -> None:
    """The daemon replaces params.json whole; two sets of one size written within one tick of
    the filesystem's clock share mtime and size (simulated by setting the mtime back): the
    inode tells the agent the file changed."""
    path = tmp_path / "params.json"
    staged = tmp_path / "staged.json"
    write_params(staged, fare_table={"flat_fare": 200})
    os.replace(staged, path)
    active = ActiveParams(path, HOST_KEY.public_key_bytes)
    first_set = active.current()
    assert first_set is not None and first_set.flat_fare == 200
    first = os.stat(path)
    write_params(staged, fare_table={"flat_fare": 300})
    os.replace(staged, path)
    os.utime(path, ns=(first.st_atime_ns, first.st_mtime_ns))
    assert os.stat(path).st_size == first.st_size
    in_force = active.current()
    assert in_force is not None and in_force.flat_fare == 300
