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


# --- the compound purchase with boarding and alighting records (issue 13) -------------------

# A section bus line (tests/test_engine_fares.py BUS): the minimum (2 yuan) at boarding, the
# rest at alighting; stop 1 to stop 9 is 9 sections, 4 yuan.
BOARD_FARE, ALIGHT_FARE = 200, 200
ENTRY_TYPE, EXIT_TYPE = 0x03, 0x04  # EF1E byte 0 (agent.products.fare_policy)


def fare_rig(directory: Path) -> Rig:
    from agent.params import ActiveParams
    from tests.test_engine_fares import BUS, HOST_KEY, write_params

    rig = Rig(directory)
    path = directory / "params.json"
    write_params(path, fare_policy={**BUS, "entry_exit": {"boarding_debit": "min"}})

    def configure() -> None:
        rig.engine.params = ActiveParams(path, HOST_KEY.public_key_bytes)

    configure()
    rig.configure = configure  # type: ignore[attr-defined]  # again after a restart
    return rig


def on_bus(rig: Rig, stop: int) -> None:
    from agent.products.fares import TapPlace

    rig.engine.position = lambda: TapPlace(8, stop, "both", "1000")


def newest_trip(card: object) -> tuple[int, int, int]:
    """(record type, stop, amount) of the card's newest EF1E record."""
    record = card.record_files[0x1E].records[0]  # type: ignore[attr-defined]
    return record[0], int.from_bytes(record[12:14], "big"), int.from_bytes(record[17:21], "big")


@pytest.fixture(scope="module")
def entry_exit_counts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Card APDUs of a clean boarding and a clean alighting tap (the trip-record read
    included): PPSE, AID, EF17, balance, READ RECORD EF1E, INIT, 80DC, DEBIT."""
    rig = fare_rig(tmp_path_factory.mktemp("probe-entry-exit"))
    try:
        card = make_card("tunion", 98, rig.keyset, balance=BALANCE)
        counts = {}
        for leg, stop in (("board", 1), ("alight", 9)):
            on_bus(rig, stop)
            before = len(rig.reader.transmitted)
            assert rig.tap(card).status == "paid"
            counts[leg] = len(rig.reader.transmitted) - before
        return counts
    finally:
        rig.close()


def test_entry_exit_taps_have_the_expected_length(entry_exit_counts: dict[str, int]) -> None:
    assert entry_exit_counts == {"board": 8, "alight": 8}


@pytest.mark.parametrize("leg", ["board", "alight"])
@pytest.mark.parametrize("mode", ["tear_before", "tear_after"])
@pytest.mark.parametrize("comeback", ["at_once", "after_kill", "never"])
def test_tearing_matrix_with_boarding_and_alighting_records(
    tmp_path: Path, entry_exit_counts: dict[str, int], leg: str, mode: str, comeback: str
) -> None:
    """The compound purchase of a boarding tap and of an alighting tap, torn at every card
    command: the card is debited once when it comes back, its newest trip record is the
    boarding (03) or alighting (04) record of that one debit, the purchase record (recovered
    ones too) carries the fare decision, and the trip adds up to the table's price."""
    for position in range(1, entry_exit_counts[leg] + 1):
        rig = fare_rig(tmp_path / f"{position}")
        try:
            check_one_entry_exit_tear(rig, leg, position, mode, comeback)
        finally:
            rig.close()


def check_one_entry_exit_tear(rig: Rig, leg: str, position: int, mode: str, comeback: str) -> None:
    card = make_card("tunion", position, rig.keyset, balance=BALANCE)
    label = f"{leg} command {position} {mode} {comeback}"
    if leg == "alight":
        on_bus(rig, 1)
        assert rig.tap(card).fare == BOARD_FARE, label
    clean_debits = len(card.debits)
    stop, fare, kind, record_type = (
        (1, BOARD_FARE, "entry", ENTRY_TYPE)
        if leg == "board"
        else (9, ALIGHT_FARE, "exit", EXIT_TYPE)
    )
    on_bus(rig, stop)
    card.reset_command_count()
    card.faults.add(position, mode)  # type: ignore[arg-type]

    torn = rig.tap(card)
    assert torn.status in ("torn", "failed", "refused"), (label, torn)
    debited = len(card.debits) - clean_debits
    assert debited <= 1, label
    if debited == 0 and leg == "board":  # a fresh card: no boarding record half-written
        assert not card.record_files[0x1E].records, label
    elif debited == 0:  # the card still shows the boarding it had
        assert newest_trip(card) == (ENTRY_TYPE, 1, BOARD_FARE), label
    intent_written = bool(rig.store.pending_intents())

    if comeback == "after_kill":
        rig.restart()
        rig.configure()  # type: ignore[attr-defined]
        on_bus(rig, stop)
    if comeback in ("at_once", "after_kill"):
        again = rig.tap(card)
        assert again.status == ("recovered" if debited else "paid"), (label, again)
        assert len(card.debits) - clean_debits == 1, label
        assert newest_trip(card) == (record_type, stop, fare), label
        purchases = [r for r in rig.records(kind="purchase") if r.fields.get("fare_kind") == kind]
        assert len(purchases) == 1, (label, [r.fields for r in rig.records()])
        assert purchases[0].fields["fare_line"] == 8 and purchases[0].fields["fare_stop"] == stop
        assert purchases[0].amount == fare, label
        assert not rig.records(kind="unresolved"), label
        if leg == "board":  # the trip goes on as if nothing happened
            on_bus(rig, 9)
            assert rig.tap(card).fare == ALIGHT_FARE, label
        assert card.balance == BALANCE - BOARD_FARE - ALIGHT_FARE, label  # the table's 4 yuan
    else:
        rig.expire()
        assert not rig.store.pending_intents(), label
        assert not [r for r in rig.records(kind="purchase") if r.fields.get("fare_kind") == kind]
        unresolved = rig.records(kind="unresolved")
        assert len(unresolved) == (1 if intent_written else 0), label
        if debited:
            assert len(unresolved) == 1, label
    report = rig.store.verify()
    assert report.ok, (label, report.problems)
