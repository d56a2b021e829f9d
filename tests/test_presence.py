"""Card presence (issue 8, item 1): a card that stays in the field is processed once, one card
at a time, and a reader reconnect never passes for a removal.

* :class:`PresenceGuard` as a table of sequences (pure);
* the validator loop over an in-process field: it waits for removal as long as the card lies
  there, never looks for a card meanwhile, and tells the guard what it saw;
* each driver's ``wait_for_removal`` against its real stack: truthful (``False`` while the card
  stays, ``True`` only once the field was seen empty, a reconnect raises instead);
* end to end, the real ``run_validator`` loop and engine over each real stack (pcscd + vpcd,
  nfcpy udp, the serial module emulator over a socket): a card left 30 s is charged once, a
  card that left and came back after the double-tap window is charged again, a card that stays
  across a reader reconnect is not, and two cards in the field are refused (serial module: the
  only driver that can tell, see the drivers' docstrings).
"""

from __future__ import annotations

import dataclasses
import errno
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from agent import validator
from agent.errors import ReaderError, TapRefused
from agent.offline_store import OfflineStore
from agent.presence import PresenceGuard
from agent.readers.base import CardPresence, CardTechnology
from agent.readers.nfc import NfcReader
from agent.readers.pcsc import PcscCardReader
from agent.readers.serial_module import (
    CARD_PRESENT,
    SerialModuleLink,
    SerialModuleReader,
)
from agent.sam.psam import PsamConfig, PsamDriver
from agent.transaction import TapOutcome, TransactionEngine
from agent.validator import run_validator
from agent.wiring import DataDir
from tests.fake_reader.cpu_card import SimulatedCpuCard
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.inprocess import CardField, InProcessReader
from tests.fake_reader.module_server import Fault, ModuleEmulator
from tests.fake_reader.nfc_card import NfcCardEmulator
from tests.fake_reader.scenario import demo_keyset, demo_profile, make_card, make_psam
from tests.fake_reader.vpcd_card import ContactlessCardIcc
from tests.stacks import CARD_READER, SAM_READER, PcscStack
from tests.test_reader_e2e import DriverRig, nfc_rig, pcsc_rig, serial_rig

DRIVERS = ("serial", "pcsc", "nfcpy")
FARE = demo_profile().flat_fare
LOOP_POLL_S = 0.3
LEFT_IN_FIELD_S = 30.0

UID_A = bytes.fromhex("04A1A2A3")
UID_B = bytes.fromhex("04B1B2B3")


def presence(uid: bytes = UID_A, cards: int = 1) -> CardPresence:
    return CardPresence(uid, CardTechnology.ISO_DEP, 0x20, b"", cards_in_field=cards)


# ---------------------------------------------------------------------------------------------
# PresenceGuard: a table of sequences
# ---------------------------------------------------------------------------------------------

# Steps: ("admit", uid, cards) / ("card", card_id) -> expected refusal code or None;
# ("processed", uid, card_id) / ("left",) -> no result.
Step = tuple[Any, ...]
SEQUENCES: dict[str, list[tuple[Step, str | None]]] = {
    "first tap of a card is admitted": [
        (("admit", UID_A, 1), None),
        (("card", "C-A"), None),
    ],
    "the same card, never seen leaving, is refused by UID": [
        (("processed", UID_A, "C-A"), None),
        (("admit", UID_A, 1), "still_present"),
    ],
    "a phone with a new random UID is refused by its card id": [
        (("processed", bytes.fromhex("08112233"), "PHONE-1"), None),
        (("admit", bytes.fromhex("08445566"), 1), None),
        (("card", "PHONE-1"), "still_present"),
    ],
    "after the field was seen empty the same card is admitted": [
        (("processed", UID_A, "C-A"), None),
        (("left",), None),
        (("admit", UID_A, 1), None),
        (("card", "C-A"), None),
    ],
    "another card is admitted while the first was never seen leaving": [
        (("processed", UID_A, "C-A"), None),
        (("admit", UID_B, 1), None),
        (("card", "C-B"), None),
    ],
    "both cards processed without an empty field in between stay refused": [
        (("processed", UID_A, "C-A"), None),
        (("processed", UID_B, "C-B"), None),
        (("admit", UID_A, 1), "still_present"),
        (("card", "C-B"), "still_present"),
        (("left",), None),
        (("admit", UID_A, 1), None),
        (("card", "C-B"), None),
    ],
    "two cards in the field are refused, whichever the reader selected": [
        (("admit", UID_A, 2), "one_card_at_a_time"),
        (("admit", b"", 3), "one_card_at_a_time"),
    ],
    "a crowded field wins over still_present": [
        (("processed", UID_A, "C-A"), None),
        (("admit", UID_A, 2), "one_card_at_a_time"),
    ],
    "an unread UID is left to the card id check": [
        (("processed", b"", "C-A"), None),
        (("admit", b"", 1), None),
        (("card", "C-A"), "still_present"),
    ],
    "a tap that read no card id remembers the UID only": [
        (("processed", UID_A, ""), None),
        (("card", ""), None),
        (("admit", UID_A, 1), "still_present"),
    ],
    "left on an idle guard is harmless": [
        (("left",), None),
        (("admit", UID_A, 1), None),
    ],
}


def _run_step(guard: PresenceGuard, step: Step) -> str | None:
    try:
        match step:
            case ("admit", uid, cards):
                guard.admit(presence(uid, cards))
            case ("card", card_id):
                guard.admit_card(card_id)
            case ("processed", uid, card_id):
                guard.processed(uid, card_id)
            case ("left",):
                guard.left()
            case _:
                raise AssertionError(f"bad step {step}")
    except TapRefused as refused:
        return refused.reason
    return None


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_guard_sequences(name: str) -> None:
    guard = PresenceGuard()
    for i, (step, expected) in enumerate(SEQUENCES[name]):
        assert _run_step(guard, step) == expected, (name, i, step)


def test_guard_refusals_say_why_and_the_memory_is_bounded() -> None:
    guard = PresenceGuard(memory=2)
    assert not guard.awaiting_removal
    guard.processed(UID_A, "C-A")
    assert guard.awaiting_removal
    with pytest.raises(TapRefused, match="04A1A2A3 has not left the field"):
        guard.admit(presence(UID_A))
    with pytest.raises(TapRefused, match="3 cards in the field"):
        guard.admit(presence(UID_B, cards=3))
    guard.processed(UID_B, "C-B")
    guard.processed(bytes.fromhex("04C1C2C3"), "C-C")  # the oldest (A) is forgotten
    guard.admit(presence(UID_A))
    guard.admit_card("C-A")
    guard.left()
    assert not guard.awaiting_removal
    with pytest.raises(ValueError):
        PresenceGuard(memory=0)


# ---------------------------------------------------------------------------------------------
# The loop over an in-process field
# ---------------------------------------------------------------------------------------------


class Card:
    """The least a card in a :class:`CardField` needs."""

    def __init__(self, uid: bytes) -> None:
        self.uid = uid
        self.ats = b""

    def power_on(self) -> None:
        pass


class ScriptedReader(InProcessReader):
    """Counts removal waits; ``removal_faults`` makes that many of them fail."""

    def __init__(self, field: CardField) -> None:
        super().__init__(field, poll_interval=0.002)
        self.removal_calls = 0
        self.removal_faults = 0

    def wait_for_removal(self, timeout: float) -> bool:
        self.removal_calls += 1
        if self.removal_faults:
            self.removal_faults -= 1
            raise ReaderError("link dropped")
        return super().wait_for_removal(timeout)


class GuardedEngine:
    """The engine's presence calls around a tap that always pays."""

    def __init__(self) -> None:
        self.presence = PresenceGuard()
        self.taps: list[TapOutcome] = []

    def process_tap(self, reader: Any, seen: CardPresence) -> TapOutcome:
        try:
            self.presence.admit(seen)
        except TapRefused as refused:
            outcome = TapOutcome(status="refused", reason=str(refused))
        else:
            outcome = TapOutcome(status="paid", card_id=seen.uid.hex())
            self.presence.processed(seen.uid, outcome.card_id)
        self.taps.append(outcome)
        return outcome

    def expire_stale_intents(self) -> list[Any]:
        return []


class InProcessLoop:
    def __init__(self, field: CardField, **kwargs: Any) -> None:
        self.reader = ScriptedReader(field)
        self.engine = GuardedEngine()
        self.stop = threading.Event()
        self.stats: Any = None
        self.thread = threading.Thread(
            target=self._run, kwargs=kwargs, name="validator-inprocess", daemon=True
        )
        self.thread.start()

    def _run(self, **kwargs: Any) -> None:
        self.stats = run_validator(
            self.reader, cast(TransactionEngine, self.engine), stop=self.stop, **kwargs
        )

    def statuses(self) -> list[str]:
        return [o.status for o in self.engine.taps]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "validator loop did not stop"


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_loop_waits_for_removal_however_long_the_card_stays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop used to give up on the removal after 5 s and take the same card again; now it
    only logs the card as lying there (after CARD_LYING_S, 0.2 s here) and keeps waiting."""
    monkeypatch.setattr(validator, "CARD_LYING_S", 0.2)
    field = CardField()
    loop = InProcessLoop(field, poll_timeout_s=0.05)
    try:
        field.insert(Card(UID_A))
        assert _until(lambda: len(loop.engine.taps) == 1)
        time.sleep(1.5)
        stayed = loop.statuses()
        field.remove()
        assert _until(lambda: not loop.engine.presence.awaiting_removal)
        field.insert(Card(UID_A))
        assert _until(lambda: len(loop.engine.taps) == 2)
    finally:
        loop.close()

    assert stayed == ["paid"]  # not even a still_present refusal: no look for a card at all
    assert loop.statuses() == ["paid", "paid"]


def test_a_reader_fault_in_the_removal_wait_is_not_a_removal() -> None:
    """The link drops while the card stays: the loop recovers, the reader reports the card
    again, and the guard (never told it left) refuses it; once it leaves, it is welcome."""
    field = CardField()
    loop = InProcessLoop(field, poll_timeout_s=0.05)
    try:
        loop.reader.removal_faults = 1
        field.insert(Card(UID_A))
        assert _until(lambda: len(loop.engine.taps) == 2)
        assert loop.engine.presence.awaiting_removal
        field.remove()
        assert _until(lambda: not loop.engine.presence.awaiting_removal)
        field.insert(Card(UID_A))
        assert _until(lambda: len(loop.engine.taps) == 3)
    finally:
        loop.close()

    assert loop.statuses() == ["paid", "refused", "paid"]
    assert loop.engine.taps[1].reason.startswith("still_present")
    assert loop.stats.reader_faults == 1


def test_stop_ends_the_removal_wait_and_max_taps_does_not_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(validator, "CARD_LYING_S", 0.2)
    field = CardField()
    field.insert(Card(UID_A))
    loop = InProcessLoop(field, poll_timeout_s=0.05)
    assert _until(lambda: loop.reader.removal_calls >= 3)
    loop.close()  # the card is still there: stop alone ends the wait

    last = InProcessLoop(field, poll_timeout_s=0.05, max_taps=1)
    last.thread.join(10)
    assert not last.thread.is_alive(), "max_taps reached, but the loop waited for removal"
    assert last.statuses() == ["paid"]
    assert last.reader.removal_calls == 0


# ---------------------------------------------------------------------------------------------
# Each driver's wait_for_removal, against its real stack
# ---------------------------------------------------------------------------------------------


@pytest.mark.stack
@pytest.mark.timeout(120)
def test_pcsc_removal_between_two_looks_and_a_pcscd_restart(pcsc: PcscStack) -> None:
    """pcscd's event count shows a card taken away and put back between two looks (a removal);
    a pcscd restart with the card staying is a reader error, never a removal."""
    reader = PcscCardReader(CARD_READER, timeout=1.0)
    slot = pcsc.slot(0)
    card = make_card("tunion", 90, demo_keyset())
    try:
        slot.insert(ContactlessCardIcc(card))
        assert reader.wait_for_card(5.0) is not None
        stays = reader.wait_for_removal(0.5)
        slot.remove()
        pcsc.wait_card(CARD_READER, present=False)
        time.sleep(1.0)  # vpcd: keep a swapped card out long enough (spec §5.4 pitfall 8)
        slot.insert(ContactlessCardIcc(card))
        pcsc.wait_card(CARD_READER, present=True)
        back_between_looks = reader.wait_for_removal(0.5)

        assert reader.wait_for_card(5.0) is not None
        pcsc.restart_pcscd(signal.SIGKILL)
        pcsc.wait_card(CARD_READER, present=True)
        across_restart: list[object] = []
        for _ in range(3):  # the first look finds pcscd gone, the next ones know they lost it
            try:
                across_restart.append(reader.wait_for_removal(0.5))
            except ReaderError as exc:
                across_restart.append(exc)
        assert reader.wait_for_card(5.0) is not None
        after_a_new_look = reader.wait_for_removal(0.5)
    finally:
        reader.close()

    assert stays is False
    assert back_between_looks is True
    assert all(isinstance(r, ReaderError) for r in across_restart), across_restart
    assert after_a_new_look is False


class EchoCard:
    def __init__(self) -> None:
        self.uid = bytes.fromhex("08A1B2C3")
        self.ats = bytes.fromhex("0578807002")

    def power_on(self) -> None:
        pass

    def process(self, apdu: bytes) -> bytes:
        return b"\x90\x00"


@pytest.mark.stack
@pytest.mark.timeout(60)
def test_nfc_a_mute_card_in_the_field_is_not_a_removal() -> None:
    """The card stops answering its ping but stays in the field: a fresh sense still finds it
    (before issue 8 one unanswered ping counted as removal)."""
    emulator = NfcCardEmulator()
    reader = NfcReader(emulator.path, timeout=0.5, poll_interval=0.01)
    try:
        emulator.insert(EchoCard())
        assert reader.wait_for_card(3.0) is not None
        emulator.mute()
        mute_stays = reader.wait_for_removal(1.5)
        emulator.remove()
        gone = reader.wait_for_removal(5.0)
    finally:
        reader.close()
        emulator.close()

    assert mute_stays is False
    assert gone is True


@pytest.mark.stack
@pytest.mark.timeout(60)
def test_serial_module_reports_several_cards() -> None:
    """FIND_CARD status 0x82 (a collision) becomes ``cards_in_field``; CARD_PRESENT says the
    field is occupied while any card lies there."""
    field = CardField()
    emulator = ModuleEmulator(field, {}, torn_exc=CardTorn)
    _thread, port = emulator.serve_tcp("127.0.0.1", 0)
    reader = SerialModuleReader(SerialModuleLink(f"socket://127.0.0.1:{port}", timeout=1.0))
    a = make_card("tunion", 91, demo_keyset())
    b = make_card("cjt166", 92, demo_keyset())
    try:
        field.insert(a)
        emulator.others.append(b)
        crowd = reader.wait_for_card(1.0)
        field.remove()
        only_b_left = reader.wait_for_removal(0.2)
        emulator.others.clear()
        empty = reader.wait_for_removal(1.0)
        field.insert(a)
        single = reader.wait_for_card(1.0)
    finally:
        reader.close()
        emulator.stop()

    assert crowd is not None and single is not None
    assert crowd.cards_in_field == 2
    assert crowd.uid == a.uid  # the card the module would have selected
    assert single.cards_in_field == 1
    assert only_b_left is False
    assert empty is True


# ---------------------------------------------------------------------------------------------
# End to end: run_validator + the engine over each real stack
# ---------------------------------------------------------------------------------------------


class Validator:
    """The production loop on a thread over one driver's real stack; outcomes in a list."""

    def __init__(self, rig: DriverRig, side: Any, store: OfflineStore, engine: Any) -> None:
        self.rig = rig
        self.side = side
        self.store = store
        self.engine = engine
        self.outcomes: list[TapOutcome] = []
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.stats: Any = None
        self.thread = threading.Thread(target=self._run, name="validator", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.stats = run_validator(
            self.rig.reader,
            self.engine,
            stop=self.stop,
            on_outcome=self._got,
            poll_timeout_s=LOOP_POLL_S,
        )

    def _got(self, outcome: TapOutcome) -> None:
        with self.cond:
            self.outcomes.append(outcome)
            self.cond.notify_all()

    def outcome(self, index: int, timeout: float = 20.0) -> TapOutcome:
        with self.cond:
            got = self.cond.wait_for(lambda: len(self.outcomes) > index, timeout)
            assert got, f"{self.rig.name}: no tap #{index + 1} within {timeout} s"
            return self.outcomes[index]

    def taps(self) -> list[TapOutcome]:
        with self.cond:
            return list(self.outcomes)

    def removal_observed(self, timeout: float = 20.0) -> bool:
        """Whether the loop has seen the field empty (and told the guard) since the last tap."""
        return _until(lambda: not self.engine.presence.awaiting_removal, timeout)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), "validator loop did not stop"


@pytest.fixture
def validators(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``make(driver, double_tap_window_s=5.0)``: a running :class:`Validator`."""
    made: list[tuple[Validator, OfflineStore]] = []

    def make(driver: str, double_tap_window_s: float = 5.0) -> Validator:
        psam = make_psam(demo_keyset())
        side: Any
        if driver == "serial":
            rig, side = serial_rig(psam)
        elif driver == "pcsc":
            side = request.getfixturevalue("pcsc")
            rig = pcsc_rig(side, psam)
        else:
            rig, side = nfc_rig(psam)
        data_dir = DataDir(tmp_path / f"data-{len(made)}")
        data_dir.provision("E2E-0002")
        store = data_dir.open_store()
        profile = dataclasses.replace(demo_profile(), double_tap_window_s=double_tap_window_s)
        sam = PsamDriver(rig.slot, PsamConfig.for_application(profile.sam_application))
        sam.open()
        validator = Validator(rig, side, store, TransactionEngine(profile, store, sam))
        made.append((validator, store))
        return validator

    try:
        yield make
    finally:
        for validator, store in made:
            try:
                validator.close()
            finally:
                validator.rig.close()
                store.close()


def _charged(validator: Validator, card: SimulatedCpuCard, start: int, times: int) -> None:
    assert card.balance == start - times * FARE
    assert len(card.debits) == times
    asn = card.asn.hex().upper()
    paid = [r for r in validator.store.records() if r.kind == "purchase" and r.fields["asn"] == asn]
    assert len(paid) == times
    assert validator.store.pending_intents() == []
    assert validator.store.verify().ok


@pytest.mark.stack
@pytest.mark.timeout(240)
@pytest.mark.parametrize("driver", DRIVERS)
def test_card_left_in_the_field_for_30_s_is_charged_once(
    validators: Callable[..., Validator], driver: str
) -> None:
    """Issue 8 item 1: one card lying on the validator was charged every ~5.5 s. With the
    profile's own 5 s double-tap window, 30 s in the field give one tap and one debit."""
    v = validators(driver)
    card = make_card("tunion", 100, demo_keyset(), balance=3000)

    v.rig.present(card)
    first = v.outcome(0)
    time.sleep(LEFT_IN_FIELD_S)
    taps = v.taps()
    v.rig.withdraw()

    assert first.status == "paid", first.reason
    assert [(o.status, o.reason) for o in taps] == [("paid", "")]  # never looked at again
    _charged(v, card, 3000, times=1)
    assert v.removal_observed()


@pytest.mark.stack
@pytest.mark.timeout(180)
@pytest.mark.parametrize("driver", DRIVERS)
def test_card_that_left_is_charged_again_after_the_double_tap_window(
    validators: Callable[..., Validator], driver: str
) -> None:
    """Removal seen, then back within the window: double_tap; back after it: charged again,
    once, however long it then stays."""
    window_s = 6.0
    v = validators(driver, double_tap_window_s=window_s)
    card = make_card("tunion", 101, demo_keyset(), balance=3000)

    v.rig.present(card)
    paid_at = time.monotonic()
    first = v.outcome(0)
    v.rig.withdraw()
    left_once = v.removal_observed()
    v.rig.present(card)  # straight back: within the window
    within = v.outcome(1)
    v.rig.withdraw()
    left_twice = v.removal_observed()
    time.sleep(max(0.0, window_s + 1.0 - (time.monotonic() - paid_at)))
    v.rig.present(card)
    again = v.outcome(2)
    time.sleep(3.0)  # and it lies there a while
    taps = v.taps()
    v.rig.withdraw()

    assert first.status == "paid", first.reason
    assert left_once and left_twice
    assert within.refusal == "double_tap", within.reason
    assert again.status == "paid", again.reason
    assert len(taps) == 3
    _charged(v, card, 3000, times=2)


def _reconnect(v: Validator) -> None:
    """Break the reader's connection while the card stays in the field."""
    if v.rig.name == "pcsc":
        stack: PcscStack = v.side
        stack.stop_pcscd(signal.SIGKILL)
        time.sleep(1.0)  # the loop runs into the dead daemon
        stack.start_pcscd()
        stack.wait_card(SAM_READER, present=True)
    elif v.rig.name == "serial":
        emulator: ModuleEmulator = v.side
        emulator.inject(Fault(command=CARD_PRESENT, drop=True))  # silent: the link is re-opened
    else:
        reader = cast(NfcReader, v.rig.reader)
        clf = reader._frontend()
        original = clf.exchange

        def unplugged(*args: Any, **kwargs: Any) -> Any:
            clf.exchange = original
            raise OSError(errno.EIO, "device unplugged")  # the frontend is re-opened

        clf.exchange = unplugged


@pytest.mark.stack
@pytest.mark.timeout(180)
@pytest.mark.parametrize("driver", DRIVERS)
def test_card_that_stays_across_a_reader_reconnect_is_not_charged_again(
    validators: Callable[..., Validator], driver: str
) -> None:
    """pcscd killed and restarted / the serial link dropped / the nfc device failing, while the
    card stays: the loop recovers, the reader reports the card again, and it is refused as
    still present. No double-tap window here: presence alone must hold."""
    v = validators(driver, double_tap_window_s=0.0)
    card = make_card("tunion", 102, demo_keyset(), balance=3000)

    v.rig.present(card)
    first = v.outcome(0)
    _reconnect(v)
    again = v.outcome(1, timeout=30.0)
    time.sleep(2.0)
    taps = v.taps()
    v.rig.withdraw()

    assert first.status == "paid", first.reason
    assert again.refusal == "still_present", again.reason
    assert all(o.refusal == "still_present" for o in taps[1:]), [o.reason for o in taps]
    _charged(v, card, 3000, times=1)
    assert v.removal_observed()


@pytest.mark.stack
@pytest.mark.timeout(120)
def test_two_cards_in_the_field_are_refused_and_neither_is_debited(
    validators: Callable[..., Validator],
) -> None:
    """Serial module (the driver that can tell): two cards at once are refused one card at a
    time; a second card laid beside a paid one is not processed until the field is empty."""
    v = validators("serial", double_tap_window_s=0.0)
    emulator: ModuleEmulator = v.side
    a = make_card("tunion", 103, demo_keyset(), balance=3000)
    b = make_card("cjt166", 104, demo_keyset(), balance=3000)

    emulator.others.append(b)
    v.rig.present(a)
    crowded = v.outcome(0)
    emulator.others.clear()  # b taken away, a stays: no removal, no new tap
    time.sleep(1.0)
    after_b_left = len(v.taps())
    v.rig.withdraw()
    assert v.removal_observed()
    v.rig.present(a)
    paid_a = v.outcome(1)
    emulator.others.append(b)  # b laid beside the paid a
    time.sleep(1.0)
    v.rig.withdraw()  # a leaves, b stays
    time.sleep(1.0)
    b_lying = (len(v.taps()), v.engine.presence.awaiting_removal)
    emulator.others.clear()
    assert v.removal_observed()
    v.rig.present(b)
    paid_b = v.outcome(2)
    v.rig.withdraw()

    assert crowded.refusal == "one_card_at_a_time", crowded.reason
    assert after_b_left == 1
    assert paid_a.status == "paid", paid_a.reason
    assert b_lying == (2, True)
    assert paid_b.status == "paid", paid_b.reason
    assert len(v.taps()) == 3
    _charged(v, a, 3000, times=1)
    _charged(v, b, 3000, times=1)
