"""The pyscard driver against real pcscd + vpcd (see :mod:`tests.stacks`): presence events,
removal, bounded calls, pcscd restarts, the SAM slot, wiring and ``cardagent readers``."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.apdu import Command, Party, Response, parse_response
from agent.errors import CardRemovedError, ConfigurationError, ReaderError, SamMuteError
from agent.products import cpu_purse
from agent.profile import parse_profile
from agent.readers.base import CardReader, CardTechnology, SamSlot
from agent.readers.pcsc import PcscCardReader, PcscSamSlot, parse_atr_historical, survey
from agent.sam.psam import PsamDriver
from agent.wiring import DataDir, open_hardware
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.scenario import demo_keyset, demo_profile, make_card, make_psam
from tests.fake_reader.vpcd_card import ContactlessCardIcc, PsamIcc, VpcdSlot, contactless_atr
from tests.stacks import CARD_READER, SAM_READER, PcscStack, cardagent_readers

pytestmark = pytest.mark.stack

SELECT_PPSE = bytes.fromhex("00A404000E325041592E5359532E444446303100")


@pytest.fixture
def reader(pcsc: PcscStack) -> Iterator[PcscCardReader]:
    r = PcscCardReader(CARD_READER, timeout=1.0)
    yield r
    r.close()


def _insert_card(pcsc: PcscStack, number: int = 1):
    card = make_card("tunion", number, demo_keyset())
    pcsc.slot(0).insert(ContactlessCardIcc(card))
    return card


def test_seam_and_atr_parsing() -> None:
    """Both classes implement the seam; historical bytes come out of PC/SC Part 3 ATRs."""
    assert isinstance(PcscCardReader("x"), CardReader)
    assert isinstance(PcscSamSlot("x"), SamSlot)
    storage = bytes.fromhex("3B8F8001804F0CA000000306030001000000006A")  # §4a.1
    assert parse_atr_historical(storage) == bytes.fromhex("804F0CA00000030603000100000000")
    assert parse_atr_historical(contactless_atr(b"\x80\x73\xc8")) == b"\x80\x73\xc8"
    with pytest.raises(ConfigurationError):
        PcscCardReader("")


def test_card_presence_uid_ats_and_transmit(pcsc: PcscStack, reader: PcscCardReader) -> None:
    card = _insert_card(pcsc)

    presence = reader.wait_for_card(5.0)
    response = reader.transmit(SELECT_PPSE)

    assert presence is not None
    assert presence.uid == card.uid  # FF CA 00 00 00, answered by the (emulated) reader
    assert presence.technology is CardTechnology.ISO_DEP
    assert presence.ats == bytes.fromhex("8073C8211000")  # ATS historical bytes, via the ATR
    assert response[-2:] == b"\x90\x00"
    assert reader.reader_name == CARD_READER


@pytest.mark.timeout(60)
def test_wait_for_card_is_bounded_when_the_field_is_empty(reader: PcscCardReader) -> None:
    started = time.monotonic()
    assert reader.wait_for_card(0.4) is None
    assert time.monotonic() - started >= 0.4  # it did wait; a hang is the timeout mark's


def test_removal_is_seen_and_a_staying_card_is_not(pcsc: PcscStack, reader: PcscCardReader) -> None:
    _insert_card(pcsc)
    assert reader.wait_for_card(5.0) is not None

    stays = reader.wait_for_removal(0.3)
    pcsc.slot(0).remove()
    gone = reader.wait_for_removal(5.0)

    assert stays is False
    assert gone is True  # seen within the 5 s wait (pcscd polls vpcd about every 0.4 s)


def test_transmit_after_the_card_left_is_card_removed(
    pcsc: PcscStack, reader: PcscCardReader
) -> None:
    _insert_card(pcsc)
    assert reader.wait_for_card(5.0) is not None
    pcsc.slot(0).remove()
    pcsc.wait_card(CARD_READER, present=False)

    with pytest.raises(CardRemovedError, match="card left the field"):
        reader.transmit(SELECT_PPSE)
    with pytest.raises(CardRemovedError, match="no card connected"):
        reader.transmit(SELECT_PPSE)


@pytest.mark.timeout(60)
def test_silent_card_is_bounded_and_the_reader_recovers(
    pcsc: PcscStack, reader: PcscCardReader
) -> None:
    """A card that never answers: SCardTransmit blocks inside pcscd; the driver gives up after
    its timeout, abandons that worker, and works again once the card is gone."""
    _insert_card(pcsc)
    assert reader.wait_for_card(5.0) is not None
    pcsc.slot(0).mute()

    started = time.monotonic()
    with pytest.raises(CardRemovedError, match="silent"):
        reader.transmit(SELECT_PPSE)
    elapsed = time.monotonic() - started
    pcsc.slot(0).remove()
    pcsc.wait_card(CARD_READER, present=False)
    _insert_card(pcsc, 2)
    again = reader.wait_for_card(5.0)

    assert elapsed > 0.9  # the driver's 1 s timeout, not an early give-up; a hang: timeout mark
    assert again is not None
    assert reader.transmit(SELECT_PPSE)[-2:] == b"\x90\x00"


def test_no_reader_matches_the_pattern(pcsc: PcscStack) -> None:
    reader = PcscCardReader("ACS ACR1281*", timeout=1.0)
    try:
        with pytest.raises(ReaderError, match=r"no PC/SC reader matches.*Virtual PCD 00 00"):
            reader.wait_for_card(0.2)
    finally:
        reader.close()


def test_pcscd_stopped_is_a_reader_error_and_its_return_is_picked_up(
    pcsc: PcscStack, reader: PcscCardReader
) -> None:
    _insert_card(pcsc)
    assert reader.wait_for_card(5.0) is not None

    pcsc.stop_pcscd()
    with pytest.raises(ReaderError, match="pcscd unavailable"):
        reader.transmit(SELECT_PPSE)
    with pytest.raises(ReaderError, match="pcscd unavailable"):
        reader.wait_for_card(0.2)
    pcsc.start_pcscd()
    presence = reader.wait_for_card(5.0)

    assert presence is not None
    assert reader.transmit(SELECT_PPSE)[-2:] == b"\x90\x00"


def test_sam_slot_reset_transmit_and_absence(pcsc: PcscStack) -> None:
    psam = make_psam(demo_keyset())
    slot = PcscSamSlot(SAM_READER, timeout=1.0)
    try:
        with pytest.raises(SamMuteError, match="not connected"):
            slot.transmit(bytes.fromhex("00A40000023F00"))
        with pytest.raises(SamMuteError, match="No smart card"):
            slot.reset()  # empty contact reader
        pcsc.slot(1).insert(PsamIcc(psam))
        pcsc.wait_card(SAM_READER, present=True)
        atr = slot.reset()
        answer = slot.transmit(bytes.fromhex("00A40000023F00"))
        warm = slot.reset()  # SCardReconnect with a reset
        pcsc.slot(1).remove()
        pcsc.wait_card(SAM_READER, present=False)
        with pytest.raises(SamMuteError):
            slot.transmit(bytes.fromhex("00A40000023F00"))
    finally:
        slot.close()

    assert atr == psam.atr == warm
    assert answer[-2] in (0x90, 0x61)


def _printed_number(card: Any) -> str:
    """What the card steps read as the card's printed number (straight from the simulator)."""
    app = demo_profile().applications[0]

    def exchange(command: Command) -> Response:
        return parse_response(card.process(command.to_bytes()), command, Party.CARD)

    fci = cpu_purse.drive(cpu_purse.select_application(app), exchange)
    return cpu_purse.drive(cpu_purse.read_card(app, fci), exchange).printed_number


def test_survey_and_cardagent_readers(pcsc: PcscStack, tmp_path: Path) -> None:
    _insert_card(pcsc)
    printed = _printed_number(make_card("tunion", 1, demo_keyset()))  # a twin, not touched
    pcsc.wait_card(CARD_READER, present=True)
    text = Path(demo_profile().source).read_text(encoding="utf-8")
    head, rest = text.split("[reader]", 1)
    profile = tmp_path / "pcsc.toml"
    profile.write_text(
        head
        + '[reader]\ndriver = "pcsc"\ncard_reader = "*00 00"\nsam_reader = "*00 01"\n\n'
        + rest[rest.index("[sam]") :],
        encoding="utf-8",
    )

    infos = {i.name: i for i in survey()}
    done = cardagent_readers(profile)
    code, out = done.returncode, done.stdout

    assert infos[CARD_READER].card_present
    assert not infos[SAM_READER].card_present
    assert code == 0
    assert CARD_READER in out
    assert "contactless (card reader)" in out
    assert "card present, ATR 3B" in out
    # the card in the profile's reader, read-only: its printed number (issue 15)
    assert f"number {printed} (dialect t-union" in out
    assert SAM_READER in out
    assert "contact (PSAM reader)" in out


def _pcsc_profile_raw(**reader: object) -> dict[str, object]:
    import tomllib

    raw = tomllib.loads(Path(demo_profile().source).read_text(encoding="utf-8"))
    raw["reader"] = {"driver": "pcsc", **reader}
    return raw


def test_profile_validation_for_pcsc() -> None:
    with pytest.raises(ConfigurationError, match="card_reader"):
        parse_profile(_pcsc_profile_raw(sam_reader="*01"))
    with pytest.raises(ConfigurationError, match="sam_reader"):
        parse_profile(_pcsc_profile_raw(card_reader="*00"))
    profile = parse_profile(_pcsc_profile_raw(card_reader="*00 00", sam_reader="*00 01"))
    assert profile.reader.card_reader == "*00 00"


def test_open_hardware_from_a_pcsc_profile(pcsc: PcscStack, tmp_path: Path) -> None:
    """wiring: driver 'pcsc' opens both readers by pattern and the PSAM through the contact one."""
    pcsc.slot(1).insert(PsamIcc(make_psam(demo_keyset())))
    pcsc.wait_card(SAM_READER, present=True)
    profile = dataclasses.replace(
        parse_profile(_pcsc_profile_raw(card_reader="Virtual PCD * 00", sam_reader="* 01")),
        source="pcsc-test",
    )
    data_dir = DataDir(tmp_path)

    hardware = open_hardware(profile, data_dir)
    try:
        assert isinstance(hardware.reader, PcscCardReader)
        assert isinstance(hardware.sam, PsamDriver)
        assert hardware.sam.terminal_number == bytes.fromhex("000000000024")
    finally:
        hardware.close()


# --- an empty answer is the card leaving (issue 8, item 5) -------------------------------------


class EmptyAnswerOnce:
    """A virtual card (or SAM) whose answer to the first APDU ``when`` matches is empty, after
    which it leaves its vpcd slot. vpcd hands a 0-length answer to pcscd once the ICC's
    connection closes (until then it waits for more bytes), as SCardTransmit success with 0
    bytes: what pcscd gives for a card torn away mid-exchange. ``execute``: the card carried
    the command out before its answer was lost. ``answer=None``: no answer, just gone."""

    def __init__(
        self,
        inner: Any,
        slot: VpcdSlot,
        when: Callable[[bytes], bool],
        *,
        execute: bool = True,
        answer: bytes | None = b"",
    ) -> None:
        self.inner = inner
        self.slot = slot
        self.when = when
        self.execute = execute
        self.answer = answer
        self.armed = True

    def __getattr__(self, name: str) -> Any:  # uid, ats, atr, debits... of the wrapped one
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def power_on(self) -> None:
        self.inner.power_on()

    def process(self, apdu: bytes) -> bytes:
        if not (self.armed and self.when(apdu)):
            return bytes(self.inner.process(apdu))
        self.armed = False
        if self.execute:
            self.inner.process(apdu)
        threading.Timer(0.05, self.slot.remove).start()
        if self.answer is None:
            raise CardTorn("left without answering")
        return self.answer


@pytest.mark.timeout(60)
@pytest.mark.parametrize("answer", [b"", None], ids=["empty-answer", "no-answer"])
def test_empty_answer_is_the_card_leaving(
    pcsc: PcscStack, reader: PcscCardReader, answer: bytes | None
) -> None:
    """SCardTransmit succeeding with 0 bytes (the card answered nothing and left, or left
    mid-exchange) is CardRemovedError naming the reader, never a protocol error; the reader
    then sees the field empty and takes the next card."""
    card = make_card("tunion", 1, demo_keyset())
    icc = EmptyAnswerOnce(card, pcsc.slot(0), lambda a: a == SELECT_PPSE, answer=answer)
    pcsc.slot(0).insert(ContactlessCardIcc(icc))
    assert reader.wait_for_card(5.0) is not None

    with pytest.raises(CardRemovedError, match=r"left the field: empty answer from '.*00 00'"):
        reader.transmit(SELECT_PPSE)
    with pytest.raises(CardRemovedError, match="no card connected"):
        reader.transmit(SELECT_PPSE)
    assert reader.wait_for_removal(5.0) is True
    _insert_card(pcsc, 2)
    assert reader.wait_for_card(5.0) is not None
    assert reader.transmit(SELECT_PPSE)[-2:] == b"\x90\x00"


@pytest.mark.timeout(60)
def test_empty_answer_from_the_sam_is_a_mute_sam(pcsc: PcscStack) -> None:
    """A SAM that answers 0 bytes is lost (SamMuteError, reset needed), not a protocol error."""
    select_mf = bytes.fromhex("00A40000023F00")
    icc = EmptyAnswerOnce(PsamIcc(make_psam(demo_keyset())), pcsc.slot(1), select_mf.__eq__)
    slot = PcscSamSlot(SAM_READER, timeout=1.0)
    try:
        pcsc.slot(1).insert(icc)
        pcsc.wait_card(SAM_READER, present=True)
        slot.reset()
        with pytest.raises(SamMuteError, match=r"SAM gave an empty answer in '.*00 01'"):
            slot.transmit(select_mf)
        with pytest.raises(SamMuteError, match="not connected"):
            slot.transmit(select_mf)
    finally:
        slot.close()
