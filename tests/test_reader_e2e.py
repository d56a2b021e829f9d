"""The same end-to-end purchase over each real reader stack, and the faults each stack can throw.

One test body, three drivers (issue #4 "done when"):

* ``serial``: :class:`SerialModuleReader` over pyserial ``socket://`` to the emulated module (the
  PSAM sits in the module's slot 1);
* ``pcsc``: pyscard → pcscd → vpcd, the card on vpcd slot 0 behind an emulated contactless reader,
  the PSAM on slot 1 as a contact reader;
* ``nfcpy``: nfcpy's ``udp:`` frontend to an emulated ISO-DEP card; nfcpy has no contact slot, so
  the PSAM is in-process.

A CPU card is debited through the transaction engine with the PSAM driver into a signed, chained
record in a real SQLite store. The fault tests run the validator loop (:func:`run_validator`) and
check that after each fault the tap is refused or left as an intent, and the loop takes the next
card without a restart.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ReaderError
from agent.offline_store import OfflineStore
from agent.readers.base import CardReader, SamSlot
from agent.readers.nfc import NfcReader
from agent.readers.pcsc import PcscCardReader, PcscSamSlot
from agent.readers.serial_module import (
    CARD_APDU,
    SerialModuleLink,
    SerialModuleReader,
    SerialModuleSamSlot,
)
from agent.sam.psam import PsamConfig, PsamDriver
from agent.transaction import TapOutcome, TransactionEngine
from agent.validator import run_validator
from agent.wiring import DataDir
from tests.fake_reader.cpu_card import SimulatedCpuCard
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.inprocess import CardField, InProcessSamSlot
from tests.fake_reader.module_server import Fault, ModuleEmulator
from tests.fake_reader.nfc_card import NfcCardEmulator
from tests.fake_reader.psam import SimulatedPsam
from tests.fake_reader.scenario import demo_keyset, demo_profile, make_card, make_psam
from tests.fake_reader.vpcd_card import ContactlessCardIcc, PsamIcc
from tests.stacks import CARD_READER, SAM_READER, PcscStack
from tests.test_pcsc_driver import EmptyAnswerOnce

DRIVERS = ("serial", "pcsc", "nfcpy")
FARE = demo_profile().flat_fare
INS_DEBIT = 0x54
TIMEOUT_S = 1.0


class DriverRig:
    """A reader driver, its SAM slot, and the card side of the same stack."""

    def __init__(
        self,
        name: str,
        reader: CardReader,
        slot: SamSlot,
        present: Callable[[Any], None],
        withdraw: Callable[[], object],
        cleanup: Callable[[], None],
    ) -> None:
        self.name = name
        self.reader = reader
        self.slot = slot
        self._present = present
        self._withdraw = withdraw
        self._cleanup = cleanup

    def present(self, card: Any) -> None:
        self._present(card)

    def withdraw(self) -> None:
        self._withdraw()

    def close(self) -> None:
        self.reader.close()
        self.slot.close()
        self._cleanup()


def serial_rig(psam: SimulatedPsam) -> tuple[DriverRig, ModuleEmulator]:
    field = CardField()
    emulator = ModuleEmulator(field, {1: psam}, torn_exc=CardTorn)
    _thread, port = emulator.serve_tcp("127.0.0.1", 0)
    link = SerialModuleLink(f"socket://127.0.0.1:{port}", timeout=TIMEOUT_S)
    rig = DriverRig(
        "serial",
        SerialModuleReader(link, poll_interval=0.01),
        SerialModuleSamSlot(link, 1),
        field.insert,
        field.remove,
        emulator.stop,
    )
    return rig, emulator


def pcsc_rig(stack: PcscStack, psam: SimulatedPsam) -> DriverRig:
    stack.slot(1).insert(PsamIcc(psam))
    stack.wait_card(SAM_READER, present=True)

    def withdraw() -> None:
        stack.slot(0).remove()
        if stack.pcscd is not None:
            stack.wait_card(CARD_READER, present=False)

    return DriverRig(
        "pcsc",
        PcscCardReader(CARD_READER, timeout=TIMEOUT_S),
        PcscSamSlot(SAM_READER, timeout=TIMEOUT_S),
        lambda card: stack.slot(0).insert(ContactlessCardIcc(card)),
        withdraw,
        stack.clear_slots,
    )


def nfc_rig(psam: SimulatedPsam) -> tuple[DriverRig, NfcCardEmulator]:
    emulator = NfcCardEmulator()
    rig = DriverRig(
        "nfcpy",
        # A torn ISO-DEP card is silence: keep the wait for it short in these tests.
        NfcReader(emulator.path, timeout=TIMEOUT_S / 2, poll_interval=0.01),
        InProcessSamSlot(psam),
        emulator.insert,
        emulator.remove,
        emulator.close,
    )
    return rig, emulator


@dataclasses.dataclass
class World:
    rig: DriverRig
    psam: SimulatedPsam
    store: OfflineStore
    engine: TransactionEngine
    sam: PsamDriver
    side: Any  # ModuleEmulator / PcscStack / NfcCardEmulator

    def tap(self, card: SimulatedCpuCard | Any, wait_s: float = 5.0) -> TapOutcome:
        """Present a card, run one tap through the real driver, take the card away."""
        self.rig.present(card)
        try:
            presence = self.rig.reader.wait_for_card(wait_s)
            assert presence is not None, f"{self.rig.name}: card not seen"
            return self.engine.process_tap(self.rig.reader, presence)
        finally:
            self.rig.withdraw()
            self.engine.presence.left()


@pytest.fixture(params=DRIVERS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    keys = demo_keyset()
    psam = make_psam(keys)
    side: Any
    if request.param == "serial":
        rig, side = serial_rig(psam)
    elif request.param == "pcsc":
        side = request.getfixturevalue("pcsc")
        rig = pcsc_rig(side, psam)
    else:
        rig, side = nfc_rig(psam)
    data_dir = DataDir(tmp_path / "data")
    data_dir.provision("E2E-0001")
    store = data_dir.open_store()
    profile = dataclasses.replace(demo_profile(), double_tap_window_s=0.0)
    sam = PsamDriver(rig.slot, PsamConfig.for_application(profile.sam_application))
    try:
        sam.open()
        yield World(rig, psam, store, TransactionEngine(profile, store, sam), sam, side)
    finally:
        rig.close()
        store.close()


# ---------------------------------------------------------------------------------------------
# The end-to-end purchase
# ---------------------------------------------------------------------------------------------


@pytest.mark.stack
@pytest.mark.parametrize("family", ["tunion", "cjt166"])
def test_purchase_into_a_signed_record(world: World, family: str) -> None:
    """CPU card debit with the PSAM → signed, chained record; the card is charged once."""
    card = make_card(family, 41, demo_keyset(), balance=5000)  # type: ignore[arg-type]

    outcome = world.tap(card)

    assert outcome.status == "paid", outcome.reason
    assert outcome.balance_after == 5000 - FARE
    assert card.balance == 5000 - FARE
    assert len(card.debits) == 1
    records = list(world.store.records())
    assert [r.kind for r in records] == ["purchase"]
    rec = records[0]
    assert rec.amount == FARE
    assert rec.fields["tac"] == card.debits[0].tac.hex().upper()
    assert rec.fields["mac2_verified"] is True
    assert rec.fields["sam"] == world.sam.serial
    assert world.store.verify().ok
    assert world.store.pending_intents() == []


# ---------------------------------------------------------------------------------------------
# Faults, with the validator loop running
# ---------------------------------------------------------------------------------------------


class CountingReader:
    """The rig's reader, counting the reader faults ``wait_for_card`` raises."""

    def __init__(self, inner: CardReader) -> None:
        self.inner = inner
        self.name = inner.name
        self.faults = 0
        self.removal_seen = threading.Event()

    def wait_for_card(self, timeout: float) -> Any:
        try:
            return self.inner.wait_for_card(timeout)
        except ReaderError:
            self.faults += 1
            raise

    def transmit(self, apdu: bytes) -> bytes:
        return self.inner.transmit(apdu)

    def wait_for_removal(self, timeout: float) -> bool:
        """``removal_seen`` is set once the loop has seen the field empty or given up on it
        (a reader fault): then a card may be presented again as a new arrival."""
        try:
            gone = self.inner.wait_for_removal(timeout)
        except ReaderError:
            self.removal_seen.set()
            raise
        if gone:
            self.removal_seen.set()
        return gone

    def feedback(self, ok: bool, text: str) -> None:
        self.inner.feedback(ok, text)

    def close(self) -> None:
        self.inner.close()


class Loop:
    """run_validator on a thread; outcomes arrive in a list."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.outcomes: list[TapOutcome] = []
        self.stop = threading.Event()
        self.new = threading.Condition()
        self.stats: Any = None
        self.reader = CountingReader(world.rig.reader)
        self.thread = threading.Thread(target=self._run, name="validator", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.stats = run_validator(
            self.reader,
            self.world.engine,
            stop=self.stop,
            on_outcome=self._got,
            poll_timeout_s=0.3,
        )

    def _got(self, outcome: TapOutcome) -> None:
        with self.new:
            self.outcomes.append(outcome)
            self.new.notify_all()

    def tap(self, card: Any, wait_s: float = 10.0) -> TapOutcome:
        """Present a card until the loop reports an outcome for it, then take it away."""
        with self.new:
            count = len(self.outcomes)
        self.reader.removal_seen.clear()
        self.world.rig.present(card)
        try:
            with self.new:
                got = self.new.wait_for(lambda: len(self.outcomes) > count, wait_s)
                assert got, f"{self.world.rig.name}: the validator loop took no tap in {wait_s} s"
                return self.outcomes[count]
        finally:
            self.world.rig.withdraw()
            # A card swapped back faster than the loop looks is the same card never removed:
            # the loop would sit out its removal wait. Let it see the field empty first.
            self.reader.removal_seen.wait(10.0)

    def stats_so_far(self) -> int:
        """Reader faults the loop has run into so far."""
        return self.reader.faults

    def close(self) -> None:
        self.stop.set()
        self.thread.join(15)
        assert not self.thread.is_alive(), "validator loop did not stop"


@pytest.fixture
def loop(world: World) -> Iterator[Loop]:
    running = Loop(world)
    try:
        yield running
    finally:
        running.close()


def _assert_charged_once(world: World, card: SimulatedCpuCard, start: int) -> None:
    assert card.balance == start - FARE
    assert len(card.debits) == 1
    asn = card.asn.hex().upper()
    purchases = [
        r for r in world.store.records() if r.kind == "purchase" and r.fields["asn"] == asn
    ]
    assert len(purchases) == 1
    assert world.store.pending_intents() == []
    assert world.store.verify().ok


@pytest.mark.stack
@pytest.mark.parametrize("mode", ["tear_before", "tear_after"])
def test_card_snatched_at_debit_leaves_an_intent_and_the_loop_recovers(
    world: World, loop: Loop, mode: str
) -> None:
    """The card leaves at DEBIT: torn + intent; re-presented: paid/recovered, charged once."""
    card = make_card("tunion", 42, demo_keyset(), balance=3000)
    debit_at = _command_number(card, INS_DEBIT)
    card.reset_command_count()
    card.faults.add(debit_at, mode)  # type: ignore[arg-type]

    first = loop.tap(card)
    pending = world.store.pending_intents()
    second = loop.tap(card)

    assert first.status == "torn", first.reason
    assert len(pending) == 1
    assert second.status == ("recovered" if mode == "tear_after" else "paid"), second.reason
    _assert_charged_once(world, card, 3000)


def _command_number(card: SimulatedCpuCard, ins: int) -> int:
    """Which command of a normal tap has INS ``ins``, by a dry run on a copy of the card."""
    import copy

    from tests.rig import Rig

    dry = copy.deepcopy(card)
    seen: list[bytes] = []
    original = dry.process

    def spy(apdu: bytes) -> bytes:
        seen.append(apdu)
        return original(apdu)

    dry.process = spy  # type: ignore[method-assign]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rig = Rig(Path(tmp))
        try:
            rig.tap(dry)
        finally:
            rig.close()
    return next(i for i, apdu in enumerate(seen, start=1) if apdu[1] == ins)


class StallAtDebit:
    """Serial module: the module waits on a silent card past the link timeout, then gives up."""

    def __init__(self, card: SimulatedCpuCard, stall_s: float) -> None:
        self.card = card
        self.stall_s = stall_s
        self.uid, self.ats = card.uid, card.ats

    def power_on(self) -> None:
        self.card.power_on()

    def process(self, apdu: bytes) -> bytes:
        if len(apdu) > 1 and apdu[1] == INS_DEBIT:
            time.sleep(self.stall_s)
            raise CardTorn("card silent at DEBIT")
        return self.card.process(apdu)


def _silent_at_debit(world: World, card: SimulatedCpuCard) -> Any:
    """The card as the stack presents it, arranged to go silent when DEBIT arrives."""

    def is_debit(apdu: bytes) -> bool:
        return len(apdu) > 1 and apdu[1] == INS_DEBIT

    if world.rig.name == "serial":
        return StallAtDebit(card, TIMEOUT_S * 1.3)
    original = world.rig._present

    def present_then_arm(c: Any) -> None:
        original(c)
        if world.rig.name == "pcsc":
            world.side.slot(0).mute_on = is_debit
        else:
            world.side.mute_on = is_debit

    world.rig._present = present_then_arm
    return card


@pytest.mark.stack
def test_card_that_stops_answering_is_bounded_by_the_timeout(world: World, loop: Loop) -> None:
    """Long waiting time: the card goes silent at DEBIT. The tap ends as torn within the
    profile's timeout (plus scheduling slack), the intent stays, and the next tap charges once."""
    card = make_card("tunion", 43, demo_keyset(), balance=3000)
    present = world.rig._present
    silent = _silent_at_debit(world, card)

    first = loop.tap(silent, wait_s=TIMEOUT_S + 8.0)  # a hang fails the tap's own wait
    pending = world.store.pending_intents()
    world.rig._present = present
    second = loop.tap(card)

    assert first.status == "torn", first.reason
    assert len(pending) == 1
    assert second.status == "paid", second.reason
    _assert_charged_once(world, card, 3000)


@pytest.mark.stack
@pytest.mark.parametrize("world", DRIVERS, indirect=True)
def test_card_removed_at_each_command(world: World) -> None:
    """Tear after each command of a tap in turn: no tap ever charges twice, every intent left
    behind is resolved by the card's next tap, and the reader keeps taking cards."""
    probe = make_card("tunion", 50, demo_keyset())
    commands = _command_number(probe, INS_DEBIT)  # DEBIT is the card's last command
    for n in range(1, commands + 1):
        card = make_card("tunion", 50 + n, demo_keyset(), balance=3000)
        card.reset_command_count()
        card.faults.add(n, "tear_after")

        first = world.tap(card)
        second = world.tap(card)

        assert first.status in ("torn", "failed"), (n, first.reason)
        assert second.status in ("paid", "recovered"), (n, second.reason)
        assert card.balance == 3000 - FARE, n
        assert len(card.debits) == 1, n
        assert world.store.pending_intents() == [], n
    assert world.store.verify().ok


@pytest.mark.stack
@pytest.mark.parametrize("world", ["pcsc"], indirect=True)
@pytest.mark.parametrize("at", ["select", "debit"])
def test_pcsc_empty_answer_is_the_card_leaving(world: World, at: str) -> None:
    """SCardTransmit succeeding with 0 bytes is the card leaving mid-exchange: before the
    intent the tap fails, at DEBIT (the card committed) it is torn, both with a card-party
    reason that says so (not a protocol error); the next tap charges the card exactly once."""
    card = make_card("tunion", 61, demo_keyset(), balance=3000)

    def when(apdu: bytes) -> bool:
        return apdu[1] == (INS_DEBIT if at == "debit" else 0xA4) and len(apdu) > 4

    first = world.tap(EmptyAnswerOnce(card, world.side.slot(0), when))
    second = world.tap(card)

    assert first.status == ("torn" if at == "debit" else "failed"), first.reason
    assert first.reason.startswith("card: "), first.reason
    assert "left the field: empty answer" in first.reason
    assert "protocol" not in first.reason.lower()
    assert second.status == ("recovered" if at == "debit" else "paid"), second.reason
    _assert_charged_once(world, card, 3000)


class AfterDebit:
    """Processes DEBIT (the card commits), runs ``action``, and loses the answer."""

    def __init__(self, card: SimulatedCpuCard, action: Callable[[], None]) -> None:
        self.card = card
        self.action = action
        self.armed = True
        self.uid, self.ats = card.uid, card.ats

    def power_on(self) -> None:
        self.card.power_on()

    def process(self, apdu: bytes) -> bytes:
        response = self.card.process(apdu)
        if self.armed and len(apdu) > 1 and apdu[1] == INS_DEBIT:
            self.armed = False
            self.action()
            raise CardTorn("answer to DEBIT lost")
        return response


@pytest.mark.stack
@pytest.mark.parametrize("world", ["pcsc"], indirect=True)
def test_pcscd_killed_mid_debit_and_restarted(world: World, loop: Loop) -> None:
    """pcscd dies (SIGKILL) right after the card committed DEBIT: the tap is torn with its
    intent kept; while pcscd is down the loop logs reader faults; once pcscd is back the same
    card's tap recovers the debit and the next card pays, without restarting anything."""
    stack: PcscStack = world.side
    card = make_card("tunion", 60, demo_keyset(), balance=3000)
    wrapped = AfterDebit(card, lambda: stack.stop_pcscd(signal.SIGKILL))

    first = loop.tap(wrapped)
    pending = world.store.pending_intents()
    time.sleep(1.0)  # the loop runs into the dead daemon
    faults_while_down = loop.stats_so_far()
    stack.start_pcscd()
    stack.wait_card(SAM_READER, present=True)
    second = _tap_until_settled(loop, card)
    fresh = make_card("cjt166", 61, demo_keyset(), balance=3000)
    third = loop.tap(fresh)

    assert first.status == "torn", first.reason
    assert len(pending) == 1
    assert faults_while_down > 0
    assert second.status == "recovered", second.reason
    _assert_charged_once(world, card, 3000)
    assert third.status == "paid", third.reason
    assert fresh.balance == 3000 - FARE


def _tap_until_settled(loop: Loop, card: SimulatedCpuCard, attempts: int = 3) -> TapOutcome:
    """A PSAM that pcscd power-cycled fails the first command sent to it, before any intent;
    the PSAM driver re-opens it for the next tap. Tap again until the outcome is not that."""
    outcome = loop.tap(card)
    for _ in range(attempts - 1):
        if outcome.status != "failed" or not outcome.reason.startswith(("sam", "reader")):
            break
        outcome = loop.tap(card)
    return outcome


@pytest.mark.stack
@pytest.mark.parametrize("world", ["pcsc"], indirect=True)
def test_sam_reader_unplugged_and_replugged(world: World, loop: Loop) -> None:
    """The PSAM's reader goes away: taps fail with a SAM/reader error and charge nothing; once
    it is back the PSAM is re-opened by the driver and taps are paid again."""
    stack: PcscStack = world.side
    card = make_card("tunion", 62, demo_keyset(), balance=3000)

    stack.slot(1).remove()
    stack.wait_card(SAM_READER, present=False)
    refused = loop.tap(card)
    stack.slot(1).insert(PsamIcc(world.psam))
    stack.wait_card(SAM_READER, present=True)
    paid = _tap_until_settled(loop, card)

    assert refused.status == "failed", refused.reason
    assert refused.reason.startswith(("sam:", "reader:")), refused.reason
    assert paid.status == "paid", paid.reason
    _assert_charged_once(world, card, 3000)


@pytest.mark.stack
@pytest.mark.parametrize("world", ["serial"], indirect=True)
def test_serial_noise_and_a_damaged_debit_answer(world: World, loop: Loop) -> None:
    """Noise before every answer is skipped; a bad checksum on the answer to DEBIT is never
    retried (DEBIT is not idempotent): torn + intent, then recovered on the next tap."""
    emulator: ModuleEmulator = world.side
    noisy = make_card("tunion", 70, demo_keyset(), balance=3000)
    damaged = make_card("cjt166", 71, demo_keyset(), balance=3000)
    for _ in range(40):
        emulator.inject(Fault(noise=bytes(range(256)) + b"\x02\x00\x05garbage"))

    clean = loop.tap(noisy)
    emulator._faults.clear()
    before_debit = _command_number(damaged, INS_DEBIT) - 1
    for _ in range(before_debit):
        emulator.inject(Fault(command=CARD_APDU))  # no-op placeholders
    emulator.inject(Fault(command=CARD_APDU, corrupt_checksum=True))
    torn = loop.tap(damaged)
    pending = world.store.pending_intents()
    recovered = loop.tap(damaged)

    assert clean.status == "paid", clean.reason
    assert torn.status == "torn", torn.reason
    assert "checksum" in torn.reason
    assert len(pending) == 1
    assert recovered.status == "recovered", recovered.reason
    assert damaged.balance == 3000 - FARE
    assert len(damaged.debits) == 1
