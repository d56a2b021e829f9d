"""The nfcpy driver against nfcpy's real ``udp:`` frontend, with the card emulated on the other
end (:mod:`tests.fake_reader.nfc_card`): activation, the ISO-DEP block protocol (chaining both
ways, WTX), presence by R(NAK) ping, silence and tearing, wiring and ``cardagent readers``."""

from __future__ import annotations

import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import CardRemovedError, ConfigurationError, ReaderError
from agent.profile import parse_profile
from agent.readers.base import CardReader, CardTechnology
from agent.readers.nfc import NfcReader, ats_historical, fsc_from_ats
from agent.wiring import DataDir, open_hardware
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.nfc_card import NfcCardEmulator
from tests.fake_reader.scenario import demo_keyset, demo_profile, make_card
from tests.stacks import cardagent_readers

pytestmark = pytest.mark.stack

SELECT_PPSE = bytes.fromhex("00A404000E325041592E5359532E444446303100")


class EchoCard:
    """Answers ``apdu * repeat + 9000``; ``tear`` makes the next command leave the field."""

    def __init__(self, ats: bytes = bytes.fromhex("0578807002"), repeat: int = 1) -> None:
        self.uid = bytes.fromhex("08A1B2C3")
        self.ats = ats
        self.repeat = repeat
        self.tear = False
        self.powered = 0

    def power_on(self) -> None:
        self.powered += 1

    def process(self, apdu: bytes) -> bytes:
        if self.tear:
            raise CardTorn("left")
        return apdu * self.repeat + b"\x90\x00"


@pytest.fixture
def emulator() -> Iterator[NfcCardEmulator]:
    emu = NfcCardEmulator()
    yield emu
    emu.close()


@pytest.fixture
def reader(emulator: NfcCardEmulator) -> Iterator[NfcReader]:
    r = NfcReader(emulator.path, timeout=0.5, poll_interval=0.01)
    yield r
    r.close()


def test_seam_and_ats_parsing() -> None:
    assert isinstance(NfcReader("udp:127.0.0.1:1"), CardReader)
    assert fsc_from_ats(bytes.fromhex("0578807002")) == 256
    assert fsc_from_ats(bytes.fromhex("0570807002")) == 16
    assert ats_historical(bytes.fromhex("0B78807002" + "8073C8211000")) == bytes.fromhex(
        "8073C8211000"
    )
    with pytest.raises(ConfigurationError):
        NfcReader("")


def test_activation_and_a_purse_select(emulator: NfcCardEmulator, reader: NfcReader) -> None:
    card = make_card("tunion", 1, demo_keyset())
    emulator.insert(card)

    presence = reader.wait_for_card(3.0)
    response = reader.transmit(SELECT_PPSE)

    assert presence is not None
    assert presence.uid == card.uid
    assert presence.technology is CardTechnology.ISO_DEP
    assert presence.sak == 0x20
    assert presence.ats == bytes.fromhex("8073C8211000")
    assert response[-2:] == b"\x90\x00"
    assert emulator.activations == 1


def test_chaining_both_ways_and_waiting_time_extensions(
    emulator: NfcCardEmulator, reader: NfcReader
) -> None:
    """FSC 16 (ATS T0 FSCI 0) forces command chaining; a 600-byte answer forces response
    chaining; three S(WTX) requests precede every answer."""
    card = EchoCard(ats=bytes.fromhex("0570807002"), repeat=1)
    emulator.insert(card)
    assert reader.wait_for_card(3.0) is not None
    apdu = bytes.fromhex("80CA0000") + bytes([40]) + bytes(range(40))

    short = reader.transmit(apdu)
    card.repeat = 13
    long = reader.transmit(apdu[:46])
    card.repeat = 1
    emulator.wtx = 3
    extended = reader.transmit(b"\x00\x84\x00\x00\x04")

    assert short == apdu + b"\x90\x00"
    assert long == apdu[:46] * 13 + b"\x90\x00"
    assert extended == b"\x00\x84\x00\x00\x04\x90\x00"


def test_presence_ping_and_removal(emulator: NfcCardEmulator, reader: NfcReader) -> None:
    emulator.insert(EchoCard())
    assert reader.wait_for_card(3.0) is not None

    stays = reader.wait_for_removal(0.4)
    emulator.remove()
    gone = reader.wait_for_removal(3.0)

    assert stays is False
    assert gone is True  # seen within the 3 s wait (no wall-clock bound: CI machines are loaded)
    assert reader.wait_for_card(0.1) is None


@pytest.mark.timeout(60)
def test_silent_and_torn_cards(emulator: NfcCardEmulator, reader: NfcReader) -> None:
    card = EchoCard()
    emulator.insert(card)
    assert reader.wait_for_card(3.0) is not None
    emulator.mute()

    started = time.monotonic()
    with pytest.raises(CardRemovedError, match="silent"):
        reader.transmit(SELECT_PPSE)  # a hang is bounded by the test's timeout mark
    elapsed = time.monotonic() - started
    with pytest.raises(CardRemovedError, match="no card activated"):
        reader.transmit(SELECT_PPSE)
    emulator.insert(card)
    assert reader.wait_for_card(3.0) is not None
    card.tear = True
    with pytest.raises(CardRemovedError):
        reader.transmit(SELECT_PPSE)

    assert elapsed >= 0.5  # the driver waited its whole timeout (0.5 s) before giving up


def test_unopenable_device_is_a_reader_error() -> None:
    reader = NfcReader("tty:does-not-exist:pn532")
    with pytest.raises(ReaderError, match="cannot open"):
        reader.wait_for_card(0.1)
    reader.close()


def _nfc_profile(path: str) -> str:
    text = Path(demo_profile().source).read_text(encoding="utf-8")
    head, rest = text.split("[reader]", 1)
    rest = rest[rest.index("[sam]") :].replace('kind = "psam"', 'kind = "software"', 1)
    return head + f'[reader]\ndriver = "nfcpy"\nurl = "{path}"\n\n' + rest


def test_wiring_and_cardagent_readers(emulator: NfcCardEmulator, tmp_path: Path) -> None:
    """driver 'nfcpy' opens the frontend by device path; a PSAM would need a PC/SC contact
    reader (sam_reader), so this profile uses the software SAM of its test keys."""
    card = EchoCard()
    emulator.insert(card)
    profile_path = tmp_path / "nfc.toml"
    profile_path.write_text(_nfc_profile(emulator.path), encoding="utf-8")
    raw = tomllib.loads(profile_path.read_text(encoding="utf-8"))
    raw["sam"]["kind"] = "psam"
    with pytest.raises(ConfigurationError, match="sam_reader"):
        parse_profile(raw)

    done = cardagent_readers(profile_path)
    code, out = done.returncode, done.stdout
    hardware = open_hardware(
        parse_profile(tomllib.loads(profile_path.read_text())), DataDir(tmp_path)
    )
    try:
        assert isinstance(hardware.reader, NfcReader)
        assert hardware.reader.wait_for_card(3.0) is not None
    finally:
        hardware.close()

    assert code == 0
    assert f"card present, UID {card.uid.hex().upper()}" in out
