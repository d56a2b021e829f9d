"""Tearing an M1 debit at every EEPROM write, in the three tear modes of m1-purse-and-readers.md
§1.5, then re-presenting the card at once, after an agent kill -9, or never (§3.5, issue #3).

Invariants: zero double debits, zero lost debits, the purse consistent afterwards (P == B,
balance ∈ {old, old − fare}, a second recovery pass finds nothing to do), one purchase record
per completed debit, none for a debit that did not happen, and an ``unresolved`` record only
for a card that never came back.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from structlog.testing import capture_logs

from agent.params import ActiveParams
from agent.products import cpu_logs
from agent.products.cpu_logs import Trip
from agent.products.fares import TapPlace
from agent.products.m1_layout import M1Layout
from agent.products.m1_purse import Recovery
from agent.transaction import TransactionEngine
from tests.fake_reader.m1_card import TEAR_MODES, M1Card
from tests.fake_reader.scenario import m1_layout, m1_purse_of, make_m1_card
from tests.m1_rig import M1Rig, card_classification
from tests.test_engine_fares import BUS, HOST_KEY, write_params

OLD = 1000
FARE = 200  # the demo profile's flat fare
DEBIT_WRITES = 6  # A pubP, B TRANSFER P, C record, D pubP, E pubB, F TRANSFER B

LAYOUTS: dict[str, dict[str, Any]] = {
    "cardop": {},
    "gdmh": {
        "public_backup_encoding": "inverted",
        "check": "crc16",
        "check_seed": "CS-METRO-2013@GDMH",
        "flag_in_progress": 0x11,
        "flag_done": 0x13,
        "flag_done_aliases": [0x14],
        "record_layout": "afc",
    },
}

_numbers = itertools.count(1000)


def assert_consistent(rig: M1Rig, card: M1Card, initial: int, *, expect_records: int) -> None:
    p, b = m1_purse_of(card, rig.layout)
    purchases = rig.records("purchase", card)
    assert p == b, f"purse copies differ: {p} / {b}"
    assert len(purchases) == expect_records
    assert p == initial - FARE * len(purchases), "double or lost debit"
    assert card_classification(card, rig.layout).kind is Recovery.NORMAL


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("mode", TEAR_MODES)
@pytest.mark.parametrize("write", range(1, DEBIT_WRITES + 1))
@pytest.mark.parametrize("represent", ["at_once", "after_kill9", "never"])
def test_tear_matrix(layout_name: str, mode: str, write: int, represent: str) -> None:
    rig = M1Rig(m1_layout(**LAYOUTS[layout_name]))
    card = make_m1_card(next(_numbers), rig.layout, balance=OLD)
    card.arm_tear(write, mode)  # type: ignore[arg-type]
    torn = rig.tap(card)
    assert torn.status == "torn", torn.reason
    assert rig.pending(card) == 1
    assert not rig.records()
    # Whatever the tear left, the rule table has a recovery for it.
    assert card_classification(card, rig.layout).kind is not Recovery.BROKEN

    if represent == "never":
        expired = rig.expire_all()
        assert [r.kind for r in expired] == ["unresolved"]
        assert not rig.records("purchase")
        assert rig.pending() == 0
        return
    if represent == "after_kill9":
        rig.kill9()
    again = rig.tap(card)
    assert again.status in ("recovered", "paid"), again.reason
    assert again.balance_after == OLD - FARE
    assert rig.pending() == 0
    assert not rig.records("unresolved")
    assert_consistent(rig, card, OLD, expect_records=1)
    # The debit that landed is the one recorded: recovered iff the card had been debited.
    record = rig.records("purchase", card)[0]
    assert record.fields["balance_after"] == OLD - FARE
    assert record.fields["tac"]
    # A later tap is an ordinary, single debit.
    third = rig.tap(card)
    assert third.status == "paid", third.reason
    assert_consistent(rig, card, OLD, expect_records=2)


@pytest.mark.parametrize("reader", ["pcsc", "raw"])
@pytest.mark.parametrize("mode", TEAR_MODES)
@pytest.mark.parametrize("write", range(1, DEBIT_WRITES + 1))
def test_tear_matrix_through_reader_models(reader: str, mode: str, write: int) -> None:
    """The same debit and recovery through FF pseudo-APDUs (ACS FF D7 value commands) and
    through Crypto1 frames (nested authentication, encrypted ACK/NAK)."""
    rig = M1Rig(reader=reader)
    card = make_m1_card(next(_numbers), rig.layout, balance=OLD)
    card.arm_tear(write, mode)  # type: ignore[arg-type]
    assert rig.tap(card).status == "torn"
    again = rig.tap(card)
    assert again.status in ("recovered", "paid"), again.reason
    assert_consistent(rig, card, OLD, expect_records=1)


@pytest.mark.parametrize("mode", TEAR_MODES)
@pytest.mark.parametrize("first", range(1, DEBIT_WRITES + 1))
@pytest.mark.parametrize("second", range(1, 4))
def test_tear_during_recovery(mode: str, first: int, second: int) -> None:
    """The second tap is torn too (inside its repair, or in the fresh debit after a void):
    the third tap still ends with exactly one debit."""
    rig = M1Rig()
    card = make_m1_card(next(_numbers), rig.layout, balance=OLD)
    card.arm_tear(first, mode)  # type: ignore[arg-type]
    assert rig.tap(card).status == "torn"
    card.arm_tear(second, mode)  # type: ignore[arg-type]
    rig.tap(card)
    card.disarm()
    assert card_classification(card, rig.layout).kind is not Recovery.BROKEN
    final = rig.tap(card, advance=1.0)  # inside the double-tap window of a paid second tap
    assert final.status in ("recovered", "paid", "refused"), final.reason
    if final.status == "refused":  # paid by the second tap: the double-tap window applies
        assert final.reason.startswith("double_tap")
    assert rig.pending() == 0
    assert_consistent(rig, card, OLD, expect_records=1)


# --- stateful: random taps, tears, removals and restarts -------------------------------------

INITIAL = 50_000


class M1Taps(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rig: M1Rig
        self.cards: list[M1Card] = []

    @initialize(variant=st.sampled_from(sorted(LAYOUTS)))
    def setup(self, variant: str) -> None:
        self.rig = M1Rig(_LAYOUT_CACHE[variant])
        base = next(_numbers) * 10
        self.cards = [make_m1_card(base + i, self.rig.layout, balance=INITIAL) for i in range(2)]

    @rule(
        index=st.integers(0, 1),
        fault=st.one_of(
            st.none(),
            st.tuples(st.just("tear"), st.integers(1, 9), st.sampled_from(TEAR_MODES)),
            st.tuples(st.just("remove"), st.integers(1, 40), st.just("")),
        ),
    )
    def tap(self, index: int, fault: Any) -> None:
        card = self.cards[index]
        if fault is not None:
            kind, at, mode = fault
            if kind == "tear":
                card.arm_tear(at, mode)
            else:
                card.arm_removal(at)
        outcome = self.rig.tap(card)
        card.disarm()
        assert outcome.status in ("paid", "recovered", "torn", "failed", "refused")
        if outcome.status == "refused":
            assert outcome.reason.startswith("double_tap"), outcome.reason

    @rule()
    def restart(self) -> None:
        self.rig.kill9()

    @rule(seconds=st.sampled_from([0.5, 30.0]))
    def wait(self, seconds: float) -> None:
        self.rig.clock.advance(seconds)

    @precondition(lambda self: bool(self.cards))
    @invariant()
    def no_double_or_lost_debit(self) -> None:
        assert not self.rig.records("unresolved")
        for card in self.cards:
            classification = card_classification(card, self.rig.layout)
            assert classification.kind is not Recovery.BROKEN, classification.reason
            balance = classification.balance
            assert balance is not None
            paid = len(self.rig.records("purchase", card))
            pending = self.rig.pending(card)
            assert pending <= 1
            allowed = {INITIAL - FARE * paid}
            if pending:
                allowed.add(INITIAL - FARE * (paid + 1))
            assert balance in allowed, (balance, allowed, classification.kind)


_LAYOUT_CACHE = {name: m1_layout(**overrides) for name, overrides in LAYOUTS.items()}


TestM1Stateful = M1Taps.TestCase
TestM1Stateful.settings = settings(
    max_examples=1000,
    stateful_step_count=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --- boarding and alighting (issue 13): the trip block is one more write ---------------------

BOARDING = 400  # line 8 stop 1: the dearest ride from there (tests/test_engine_fares.py BUS)
TRIP_LAYOUTS: dict[str, dict[str, Any]] = {
    "public-6.2": {},  # the default: public-info sector block 2, seconds since 2000
    "records-5.2": {  # a record sector's spare block, BCD time, a 4-byte amount
        "record_blocks_per_sector": 2,
        "trip": {
            "sector": 5, "block": 2, "time_encoding": "bcd", "time_at": 5, "amount_at": 12,
            "amount_length": 4, "transfer_at": -1, "city_at": -1,
        },
    },
}  # fmt: skip
_TRIP_LAYOUT_CACHE = {name: m1_layout(**overrides) for name, overrides in TRIP_LAYOUTS.items()}


def bus_rig(tmp_path: Path, layout_name: str) -> tuple[M1Rig, list[TapPlace]]:
    """An M1 rig under the entry/exit bus policy; the returned list is where the validator
    is (its last item), kept across kill -9."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    params = tmp_path / "params.json"
    write_params(params, fare_policy=BUS)
    where = [TapPlace(8, 1, "both", "1000")]

    def setup(engine: TransactionEngine) -> None:
        engine.params = ActiveParams(params, HOST_KEY.public_key_bytes)
        engine.position = lambda: where[-1]

    return M1Rig(_TRIP_LAYOUT_CACHE[layout_name], engine_setup=setup), where


def trip_of(card: M1Card, layout: M1Layout) -> Trip | None:
    return cpu_logs.parse_trip(layout.trip.layout, card.get_block(layout.trip_block))


@pytest.mark.parametrize("layout_name", sorted(TRIP_LAYOUTS))
@pytest.mark.parametrize("mode", TEAR_MODES)
@pytest.mark.parametrize("write", range(1, DEBIT_WRITES + 2))
@pytest.mark.parametrize("represent", ["at_once", "after_kill9", "never"])
def test_tear_matrix_of_a_boarding(
    tmp_path: Path, layout_name: str, mode: str, write: int, represent: str
) -> None:
    """A boarding writes the trip block between the record (C) and the "done" flag (D): seven
    writes. Torn at each, in each mode: re-presented at this terminal, the card ends with one
    boarding debit and its trip block (restored from the journal when the tear lost it), and
    the alighting settles to the table's price; never re-presented, the intent becomes an
    unresolved record, and another terminal does not trust a trip block that a torn debit may
    not have written (recovery B/C): it logs ``fare_trip_untrusted``."""
    rig, where = bus_rig(tmp_path, layout_name)
    layout = rig.layout
    card = make_m1_card(next(_numbers), layout, balance=OLD * 5)
    before = card.get_block(layout.trip_block)
    card.arm_tear(write, mode)  # type: ignore[arg-type]
    torn = rig.tap(card)
    assert torn.status == "torn", torn.reason
    assert rig.pending(card) == 1
    if represent == "never":
        assert [r.kind for r in rig.expire_all()] == ["unresolved"]
        elsewhere, _ = bus_rig(tmp_path / "elsewhere", layout_name)
        with capture_logs() as logs:
            outcome = elsewhere.tap(card)
        assert outcome.status == "paid", outcome.reason
        kind = card_classification(card, layout).kind
        assert kind is Recovery.NORMAL
        untrusted = [e for e in logs if e["event"] == "fare_trip_untrusted"]
        repaired = [e["recovery"] for e in logs if e["event"] == "m1_repair"]
        assert bool(untrusted) == ("B/C" in repaired), (repaired, untrusted)
        if card.get_block(layout.trip_block) == before or untrusted:
            # the boarding is lost to this terminal: this tap is a boarding (the host holds
            # the unresolved record of the torn one)
            assert elsewhere.records("purchase")[0].fields["fare_kind"] == "entry"
        return
    if represent == "after_kill9":
        rig.kill9()
    again = rig.tap(card)
    assert again.status in ("recovered", "paid"), again.reason
    assert rig.pending() == 0 and not rig.records("unresolved")
    p, b = m1_purse_of(card, layout)
    assert p == b == OLD * 5 - BOARDING
    trip = trip_of(card, layout)
    assert trip is not None
    assert (trip.record_type, trip.line, trip.station, trip.amount) == (0x03, 8, 1, BOARDING)
    purchases = rig.records("purchase", card)
    assert [r.fields["fare_kind"] for r in purchases] == ["entry"]
    where.append(TapPlace(8, 3, "both", "1000"))
    alight = rig.tap(card)
    assert (alight.status, alight.fare) == ("paid", 0), alight.reason
    settled = rig.records("purchase", card)
    assert [r.fields["fare_kind"] for r in settled] == ["entry", "exit"]
    assert settled[-1].fields["fare_refund_due"] == 200  # 4 yuan pre-authorised, 2 the ride
    assert sum(r.amount for r in settled) == BOARDING
    assert card_classification(card, layout).kind is Recovery.NORMAL


@pytest.mark.parametrize("mode", TEAR_MODES)
@pytest.mark.parametrize("write", [3, 4])  # the record (C), the trip block (C')
def test_a_boarding_torn_after_its_debit_is_not_trusted_elsewhere(
    tmp_path: Path, mode: str, write: int
) -> None:
    """The debit landed, the trip block maybe not, and the card never came back here: another
    terminal rolls the debit forward (B/C) and does not read the trip block as this trip's
    boarding (it may be the previous trip's); the tap there is a boarding, logged."""
    rig, _ = bus_rig(tmp_path / "here", "public-6.2")
    card = make_m1_card(next(_numbers), rig.layout, balance=OLD * 5)
    card.arm_tear(write, mode)  # type: ignore[arg-type]
    assert rig.tap(card).status == "torn"
    elsewhere, _ = bus_rig(tmp_path / "elsewhere", "public-6.2")
    with capture_logs() as logs:
        outcome = elsewhere.tap(card)
    assert (outcome.status, outcome.fare) == ("paid", BOARDING), outcome.reason
    assert [e["recovery"] for e in logs if e["event"] == "m1_repair"] == ["B/C"]
    untrusted = [e for e in logs if e["event"] == "fare_trip_untrusted"]
    assert untrusted and untrusted[0]["recovery"] == "B/C"
    assert elsewhere.records("purchase")[0].fields["fare_kind"] == "entry"
    trip = trip_of(card, elsewhere.layout)
    assert trip is not None and (trip.record_type, trip.amount) == (0x03, BOARDING)
