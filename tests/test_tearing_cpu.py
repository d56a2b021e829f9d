"""Tearing matrix for CPU purses (issue #2).

For each flow (06 simple via CJ/T 166 and ADF 1001 cards, 09 compound via T-Union), each card
command of a tap, the card removed before and after that command's commit, and the card
re-presented at once / after an agent kill -9 / never:

* the card is debited at most once per intent (exactly once when it comes back);
* every committed debit has exactly one record;
* what cannot be proven ends as an ``unresolved`` record, never dropped;
* the chain verifies.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_reader.scenario import make_card
from tests.rig import Rig

FARE = 200
BALANCE = 5000
FAMILIES = ("tunion", "cjt166", "legacy1001")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    yield rig
    rig.close()


def clean_tap_commands(tmp_path: Path, family: str) -> int:
    """How many card APDUs a clean tap of this family sends."""
    rig = Rig(tmp_path / f"probe-{family}")
    try:
        card = make_card(family, 99, rig.keyset, balance=BALANCE)  # type: ignore[arg-type]
        before = len(rig.reader.transmitted)
        assert rig.tap(card).status == "paid"
        return len(rig.reader.transmitted) - before
    finally:
        rig.close()


@pytest.fixture(scope="module")
def command_counts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    root = tmp_path_factory.mktemp("probe")
    return {family: clean_tap_commands(root, family) for family in FAMILIES}


def test_clean_taps_have_the_expected_length(command_counts: dict[str, int]) -> None:
    """T-Union: PPSE, AID, EF17, balance, INIT, 80DC, DEBIT; CJ/T: MF + 80CA; 1001: EF15."""
    assert command_counts == {"tunion": 7, "cjt166": 7, "legacy1001": 8}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["tear_before", "tear_after"])
@pytest.mark.parametrize("comeback", ["at_once", "after_kill", "never"])
def test_tearing_matrix(
    tmp_path: Path, command_counts: dict[str, int], family: str, mode: str, comeback: str
) -> None:
    """Every command position of one flow, one tear mode, one way of coming back."""
    for position in range(1, command_counts[family] + 1):
        rig = Rig(tmp_path / f"{position}")
        try:
            check_one_tear(rig, family, position, mode, comeback)
        finally:
            rig.close()


def check_one_tear(rig: Rig, family: str, position: int, mode: str, comeback: str) -> None:
    card = make_card(family, position, rig.keyset, balance=BALANCE)  # type: ignore[arg-type]
    asn = card.asn.hex().upper()
    card.reset_command_count()
    card.faults.add(position, mode)  # type: ignore[arg-type]
    label = f"{family} command {position} {mode} {comeback}"

    torn = rig.tap(card)
    assert torn.status in ("torn", "failed", "refused"), (label, torn)
    assert len(card.debits) <= 1, label
    intent_written = bool(rig.store.pending_intents())
    debited_by_torn_tap = len(card.debits) == 1

    if comeback == "after_kill":
        rig.restart()
    if comeback in ("at_once", "after_kill"):
        again = rig.tap(card)
        assert again.status in ("paid", "recovered"), (label, again)
        assert again.status == ("recovered" if debited_by_torn_tap else "paid"), (label, again)
        assert len(card.debits) == 1, f"{label}: debited {len(card.debits)} times"
        assert card.balance == BALANCE - FARE, label
        purchases = [r for r in rig.records(kind="purchase") if r.fields["asn"] == asn]
        assert len(purchases) == 1, label
        assert purchases[0].fields["counter"] == card.debits[0].counter, label
        assert purchases[0].fields["tac"] == card.debits[0].tac.hex().upper(), label
        assert not rig.records(kind="unresolved"), label
        assert not rig.store.pending_intents(), label
    else:
        rig.expire()
        assert not rig.store.pending_intents(), label
        assert not rig.records(kind="purchase"), label
        unresolved = rig.records(kind="unresolved")
        assert len(unresolved) == (1 if intent_written else 0), label
        if debited_by_torn_tap:
            # the committed debit has exactly one record: the unresolved one
            assert len(unresolved) == 1, label
            assert unresolved[0].fields["counter"] == card.debits[0].counter, label
    report = rig.store.verify()
    assert report.ok, (label, report.problems)


@pytest.mark.parametrize("position", [1, 2, 3])
def test_psam_mute_before_debit_refuses_without_debiting(rig: Rig, position: int) -> None:
    """A PSAM mute at 80 70 ends the tap before any debit; the next tap works (PSAM reset)."""
    card = make_card("tunion", 1, rig.keyset, balance=BALANCE)
    rig.psam.reset_command_count()
    rig.psam.faults.add(position, "mute")
    outcome = rig.tap(card)
    if outcome.status == "paid":  # the fault was past this tap's PSAM commands
        return
    assert outcome.status in ("failed", "torn"), outcome
    assert not card.debits
    assert rig.tap(card).status == "paid"
    assert len(card.debits) == 1


def test_psam_mute_at_credit_still_records_the_debit(rig: Rig) -> None:
    """80 72 failing after the card's DEBIT: the debit is recorded, flagged MAC2 unverified."""
    card = make_card("cjt166", 1, rig.keyset, balance=BALANCE)
    rig.psam.reset_command_count()
    rig.psam.faults.add(3, "mute")  # 80CA, 80 70, then 80 72
    outcome = rig.tap(card)
    assert outcome.status == "paid", outcome
    (record,) = rig.records(kind="purchase")
    assert record.fields["mac2_verified"] is False
    assert record.fields["tac"] == card.debits[0].tac.hex().upper()


def test_wrong_mac2_from_card_is_recorded_unverified(rig: Rig) -> None:
    """A card answering DEBIT with a corrupted MAC2: debited, so recorded, MAC2 flagged."""
    card = make_card("tunion", 1, rig.keyset, balance=BALANCE)
    card.reset_command_count()
    card.faults.add(7, "corrupt_response")
    assert rig.tap(card).status == "paid"
    (record,) = rig.records(kind="purchase")
    assert record.fields["mac2_verified"] is False


def test_locked_application_is_refused_without_intent(rig: Rig) -> None:
    """A locked card is refused at SELECT: no intent, no record, no debit."""
    card = make_card("tunion", 1, rig.keyset, balance=BALANCE, lock="permanent")
    outcome = rig.tap(card)
    assert outcome.status == "refused"
    assert "card_locked" in outcome.reason
    assert not rig.store.pending_intents()
    assert not rig.records()


def test_second_pending_intent_supersedes_nothing_is_lost(rig: Rig) -> None:
    """Two torn taps in a row on one card, then a clean one: one debit, one record."""
    card = make_card("cjt166", 1, rig.keyset, balance=BALANCE)
    for _ in range(2):
        card.reset_command_count()
        card.faults.add(7, "tear_before")
        assert rig.tap(card).status == "torn"
    assert rig.tap(card).status == "paid"
    assert len(card.debits) == 1
    assert len(rig.records(kind="purchase")) == 1
    assert not rig.store.pending_intents()
