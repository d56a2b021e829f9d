"""Tearing an M1 debit at every EEPROM write, in the three tear modes of m1-purse-and-readers.md
§1.5, then re-presenting the card at once, after an agent kill -9, or never (§3.5, issue #3).

Invariants: zero double debits, zero lost debits, the purse consistent afterwards (P == B,
balance ∈ {old, old − fare}, a second recovery pass finds nothing to do), one purchase record
per completed debit, none for a debit that did not happen, and an ``unresolved`` record only
for a card that never came back.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.products.m1_purse import Recovery
from tests.fake_reader.m1_card import TEAR_MODES, M1Card
from tests.fake_reader.scenario import m1_layout, m1_purse_of, make_m1_card
from tests.m1_rig import M1Rig, card_classification

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
