"""The serial reader-module driver: codec, resynchronisation, and the driver end to end against
the emulated module over TCP (pyserial ``socket://``) and over a real socat pty pair."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from agent.errors import (
    CardRemovedError,
    ConfigurationError,
    ReaderError,
    ReaderTimeout,
    SamMuteError,
)
from agent.readers import serial_module as sm
from agent.readers.base import CardReader, CardTechnology, SamSlot
from agent.readers.serial_module import (
    Frame,
    FrameDecoder,
    FrameError,
    FrameErrorKind,
    Framing,
    SerialModuleLink,
    SerialModuleReader,
    SerialModuleSamSlot,
    encode_request,
    encode_response,
)
from tests.fake_reader.module_server import Fault, ModuleEmulator

SLZR = Framing(start=b"\x7d\x7d\x7d", end=b"\x7b\x7b\x7b", length_bytes=1, checksum="sum8")
FRAMINGS = {"stx-be16-xor": Framing(), "slzr-len8-sum8": SLZR}

UID = bytes.fromhex("A1B2C3D4")
ATS = bytes.fromhex("0D788080")
SAM_ATR = bytes.fromhex("3B6C00000A0B0C0D0E0F")


# --- a tiny card field and SAM, independent of the real simulators ----------------------------


class TornError(Exception):
    """The card left the field (or the SAM went mute) mid-command."""


class EchoCard:
    def __init__(self) -> None:
        self.uid = UID
        self.ats = ATS
        self.tear_next = False

    def process(self, apdu: bytes) -> bytes:
        if self.tear_next:
            raise TornError
        return apdu + b"\x90\x00"


class EchoField:
    def __init__(self, card: EchoCard | None = None) -> None:
        self.card = card

    def remove(self) -> None:
        self.card = None


class EchoSam:
    def __init__(self) -> None:
        self.mute = False

    def reset(self) -> bytes:
        if self.mute:
            raise TornError
        return SAM_ATR

    def process(self, apdu: bytes) -> bytes:
        if self.mute:
            raise TornError
        return b"\x5a" + apdu + b"\x90\x00"


# --- codec -------------------------------------------------------------------------------------


def test_request_wire_format_stx_xor():
    """Default framing: 02 ‖ LEN(2, BE) ‖ CMD ‖ SEQ ‖ DATA ‖ XOR(02..DATA) ‖ 03."""
    expected = bytes.fromhex("02 0003 11 07 AA") + bytes((0x02 ^ 0x03 ^ 0x11 ^ 0x07 ^ 0xAA,))

    assert encode_request(sm.CARD_APDU, 7, b"\xaa") == expected + b"\x03"


def test_response_wire_format_slzr_sum8():
    """SLZR-like framing: 7D7D7D ‖ LEN(1) ‖ CMD ‖ SEQ ‖ STATUS ‖ DATA ‖ SUM8 ‖ 7B7B7B."""
    head = bytes.fromhex("7D7D7D 04 10 01 80 55")
    expected = head + bytes((sum(head) & 0xFF,)) + bytes.fromhex("7B7B7B")

    assert encode_response(sm.FIND_CARD, 1, 0x80, b"\x55", framing=SLZR) == expected


def test_checksum_over_body_only():
    """``checksum_covers='body'`` excludes start and length bytes."""
    framing = Framing(checksum_covers="body", length_order="little")
    frame = encode_request(0x01, 0x02, b"\x04", framing=framing)

    assert frame == bytes.fromhex("02 0300 01 02 04 07 03")
    assert FrameDecoder(framing, from_module=False).feed(frame) == [Frame(0x01, 0x02, b"\x04")]


@pytest.mark.parametrize("name", FRAMINGS)
def test_round_trip_both_directions(name):
    """What the encoders write, the decoders read back, whole and byte by byte."""
    framing = FRAMINGS[name]
    request = encode_request(sm.SAM_APDU, 0xFF, b"\x01\x00\xa4\x04\x00", framing=framing)
    response = encode_response(sm.SAM_APDU, 0xFF, 0x00, bytes(range(200)), framing=framing)
    by_byte = FrameDecoder(framing)
    decoded = [item for b in response for item in by_byte.feed(bytes((b,)))]

    assert FrameDecoder(framing, from_module=False).feed(request) == [
        Frame(sm.SAM_APDU, 0xFF, b"\x01\x00\xa4\x04\x00")
    ]
    assert decoded == [Frame(sm.SAM_APDU, 0xFF, bytes(range(200)), 0x00)]
    assert by_byte.buffered == 0


def test_encode_refuses_oversized_payload():
    """A payload beyond the length field or ``max_payload`` is a ValueError, not a bad frame."""
    with pytest.raises(ValueError, match="exceeds"):
        encode_request(sm.CARD_APDU, 0, bytes(254), framing=SLZR)
    with pytest.raises(ValueError, match="exceeds"):
        encode_request(sm.CARD_APDU, 0, bytes(1023))


def test_framing_from_mapping():
    """Profiles give start/end as hex text or byte lists; the length field bounds max_payload."""
    framing = Framing.from_mapping(
        {
            "start": "7D 7D 7D",
            "end": [0x7B, 0x7B, 0x7B],
            "length_bytes": 1,
            "checksum": "sum8",
        }
    )

    assert framing == SLZR
    assert framing.payload_limit == 255
    assert Framing() == Framing.from_mapping({})


@pytest.mark.parametrize(
    "values",
    [
        {"start": ""},
        {"start": "zz"},
        {"end": 3},
        {"length_bytes": 3},
        {"length_bytes": True},
        {"length_order": "middle"},
        {"checksum": "crc16"},
        {"checksum_covers": "header"},
        {"max_payload": 2},
        {"max_payload": "1024"},
        {"escape": "7D"},
    ],
)
def test_framing_rejects_bad_values(values):
    """Every bad profile value is a ConfigurationError naming the field."""
    with pytest.raises(ConfigurationError, match="framing"):
        Framing.from_mapping(values)


def _kinds(items: list[sm.Decoded]) -> list[object]:
    return [item.kind if isinstance(item, FrameError) else item for item in items]


def test_decoder_resyncs_after_each_kind_of_damage():
    """Noise, oversized LEN, bad checksum and bad end are reported; the next frame still comes."""
    good = encode_response(sm.FIND_CARD, 1, 0x80)
    bad_chk = bytearray(good)
    bad_chk[-2] ^= 0xFF
    bad_end = good[:-1] + b"\x04"
    oversized = b"\x02\xff\xff"
    decoder = FrameDecoder()

    items = decoder.feed(b"\x55\xaa" + oversized + bytes(bad_chk) + bad_end + good)

    assert items[-1] == Frame(sm.FIND_CARD, 1, b"", 0x80)
    kinds = _kinds(items[:-1])
    assert kinds[0] == FrameErrorKind.NOISE
    for kind in (FrameErrorKind.BAD_LENGTH, FrameErrorKind.BAD_CHECKSUM, FrameErrorKind.BAD_END):
        assert kind in kinds
    assert decoder.buffered == 0


def test_truncated_frame_waits_and_reset_drops_it():
    """A partial frame stays buffered until the rest arrives; ``reset`` discards it."""
    frame = encode_response(sm.CARD_APDU, 9, 0x00, b"\x90\x00")
    decoder = FrameDecoder()

    assert decoder.feed(frame[:5]) == []
    assert decoder.buffered == 5
    assert decoder.feed(frame[5:]) == [Frame(sm.CARD_APDU, 9, b"\x90\x00", 0x00)]

    decoder.feed(frame[:5])
    decoder.reset()
    tail = decoder.feed(frame[5:])

    assert not any(isinstance(item, Frame) for item in tail)


def test_false_start_with_plausible_length_does_not_hide_the_frame():
    """A start byte in noise claiming 512 bytes must not swallow the complete frame behind it."""
    frame = encode_response(sm.GET_VERSION, 3, 0x00, b"v1")
    decoder = FrameDecoder()

    items = decoder.feed(b"\x02\x02\x00" + frame)

    assert _kinds(items) == [FrameErrorKind.NOISE, Frame(sm.GET_VERSION, 3, b"v1", 0x00)]
    assert decoder.buffered == 0


def test_multibyte_start_split_across_reads():
    """A 3-byte start sequence cut between two reads is kept, not dropped as noise."""
    frame = encode_response(sm.CARD_PRESENT, 4, 0x00, framing=SLZR)
    decoder = FrameDecoder(SLZR)

    first = decoder.feed(b"\x11\x22" + frame[:2])
    rest = decoder.feed(frame[2:])

    assert _kinds(first) == [FrameErrorKind.NOISE]
    assert rest == [Frame(sm.CARD_PRESENT, 4, b"", 0x00)]


def _chunks(stream: bytes, cuts: list[int]) -> Iterator[bytes]:
    edges = [0, *sorted(cuts), len(stream)]
    for a, b in itertools.pairwise(edges):
        yield stream[a:b]


@pytest.mark.parametrize("from_module", [True, False], ids=["responses", "requests"])
@pytest.mark.parametrize("name", FRAMINGS)
@settings(deadline=None, max_examples=150)
@given(data=st.data())
def test_frames_interleaved_with_noise_all_come_back(name, from_module, data):
    """Any frame stream with start-free noise between frames, cut anywhere, decodes in order."""
    framing = FRAMINGS[name]
    forbidden = set(framing.start)
    noise = st.binary(max_size=24).map(lambda b: bytes(x for x in b if x not in forbidden))
    byte = st.integers(0, 255)
    frames = data.draw(
        st.lists(
            st.builds(
                Frame,
                byte,
                byte,
                st.binary(max_size=80),
                byte if from_module else st.none(),
            ),
            max_size=6,
        )
    )
    stream = b""
    for f in frames:
        stream += data.draw(noise)
        if f.status is None:
            stream += encode_request(f.cmd, f.seq, f.data, framing=framing)
        else:
            stream += encode_response(f.cmd, f.seq, f.status, f.data, framing=framing)
    stream += data.draw(noise)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    decoder = FrameDecoder(framing, from_module=from_module)

    out = [item for chunk in _chunks(stream, cuts) for item in decoder.feed(chunk)]

    assert frames == [item for item in out if isinstance(item, Frame)]
    assert all(isinstance(item, FrameError) for item in out if not isinstance(item, Frame))
    assert decoder.buffered == 0


@pytest.mark.parametrize("name", FRAMINGS)
@settings(deadline=None, max_examples=150)
@given(garbage=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=20))
def test_random_garbage_never_raises(name, garbage, cuts):
    """Garbage yields only items (never an exception) and the buffer stays within one frame."""
    framing = FRAMINGS[name]
    decoder = FrameDecoder(framing)

    for chunk in _chunks(garbage, [c for c in cuts if c <= len(garbage)]):
        for item in decoder.feed(chunk):
            assert isinstance(item, Frame | FrameError)
        assert decoder.buffered < framing.max_frame_size


# --- driver over TCP (pyserial socket://) --------------------------------------------------


class Bench:
    """Emulator + link + reader + SAM slot 1, wired over loopback TCP."""

    def __init__(self, framing: Framing = sm.DEFAULT_FRAMING) -> None:
        self.card = EchoCard()
        self.field = EchoField(self.card)
        self.sam = EchoSam()
        self.feedback: list[tuple[bool, str]] = []
        self.emulator = ModuleEmulator(
            self.field,
            {1: self.sam},
            torn_exc=TornError,
            on_feedback=lambda ok, text: self.feedback.append((ok, text)),
            framing=framing,
        )
        _, self.port = self.emulator.serve_tcp()
        # a bound on a hang, not a measurement: on a busy 2-core machine a loopback answer
        # after a reconnect once took 0.6 s (only the two silent-module tests wait it out)
        self.timeout = 5.0
        self.link = SerialModuleLink(
            f"socket://127.0.0.1:{self.port}", framing=framing, timeout=self.timeout
        )
        self.reader = SerialModuleReader(self.link, poll_interval=0.02)
        self.slot = SerialModuleSamSlot(self.link, 1)

    def close(self) -> None:
        self.reader.close()
        self.slot.close()
        self.emulator.stop()


@pytest.fixture
def bench() -> Iterator[Bench]:
    b = Bench()
    yield b
    b.close()


def test_reader_and_slot_implement_the_seam(bench):
    """Both classes satisfy the runtime-checkable protocols; names carry the URL."""
    assert isinstance(bench.reader, CardReader)
    assert isinstance(bench.slot, SamSlot)
    assert bench.link.url in bench.reader.name
    assert bench.slot.name.endswith("SAM1")


@pytest.mark.parametrize("name", FRAMINGS)
def test_find_card_and_transmit(name):
    """FIND_CARD gives UID/ATS/technology; CARD_APDU carries the APDU both ways."""
    b = Bench(FRAMINGS[name])
    try:
        presence = b.reader.wait_for_card(1.0)

        assert presence is not None
        assert presence.uid == UID
        assert presence.ats == ATS
        assert presence.technology == CardTechnology.ISO_DEP
        assert presence.sak == 0x20
        assert b.reader.transmit(b"\x00\xb0\x95\x00\x1e") == b"\x00\xb0\x95\x00\x1e\x90\x00"
        assert b.link.request(sm.GET_VERSION).data == b"fake-module 1.0"
    finally:
        b.close()


def test_wait_for_card_polls_until_timeout(bench):
    """No card: None after about the timeout, having polled several times."""
    bench.field.remove()
    started = time.monotonic()

    assert bench.reader.wait_for_card(0.2) is None
    assert time.monotonic() - started >= 0.2
    assert bench.emulator.count(sm.FIND_CARD) >= 3


def test_card_removed_mid_command(bench):
    """The card tears mid-APDU: CardRemovedError, then the field reports it gone."""
    bench.reader.wait_for_card(1.0)
    bench.card.tear_next = True

    with pytest.raises(CardRemovedError):
        bench.reader.transmit(b"\x80\x54\x01\x00\x0f")
    with pytest.raises(CardRemovedError):
        bench.reader.transmit(b"\x00\xb2\x01\xc4\x00")  # no card: status 0x80
    assert bench.reader.wait_for_removal(0.5) is True


def test_wait_for_removal_times_out_while_card_stays(bench):
    """The card stays in the field: False after the timeout."""
    assert bench.reader.wait_for_removal(0.1) is False


def test_sam_reset_and_apdu(bench):
    """SAM_RESET returns the ATR; SAM_APDU goes to the slot named in the first data byte."""
    assert bench.slot.reset() == SAM_ATR
    assert bench.slot.transmit(b"\x00\xb0\x96\x00\x06") == b"\x5a\x00\xb0\x96\x00\x06\x90\x00"


def test_sam_mute_and_absent(bench):
    """A mute SAM or an empty slot answers 0xE1: SamMuteError."""
    bench.sam.mute = True

    with pytest.raises(SamMuteError):
        bench.slot.transmit(b"\x80\x70\x00\x00\x24")
    with pytest.raises(SamMuteError):
        SerialModuleSamSlot(bench.link, 2).reset()


def test_feedback_reaches_the_module(bench):
    """FEEDBACK carries the ok flag and UTF-8 text."""
    bench.reader.feedback(True, "余额 12.30 元")
    bench.reader.feedback(False, "x" * 5000)  # truncated to the payload limit, not an error

    assert bench.feedback[0] == (True, "余额 12.30 元")
    assert not bench.feedback[1][0]


def test_damaged_answer_is_retried_for_find_card(bench):
    """A bad checksum on FIND_CARD's answer is retried and the second answer is used."""
    bench.emulator.inject(Fault(command=sm.FIND_CARD, corrupt_checksum=True))

    assert bench.reader.wait_for_card(1.0) is not None
    assert bench.emulator.count(sm.FIND_CARD) == 2


def test_damaged_answer_is_never_retried_for_card_apdu(bench):
    """A bad checksum on CARD_APDU's answer is a ReaderError and the APDU is sent once."""
    bench.emulator.inject(Fault(command=sm.CARD_APDU, corrupt_checksum=True))

    with pytest.raises(ReaderError, match="CARD_APDU") as caught:
        bench.reader.transmit(b"\x80\x54\x01\x00\x0f")
    assert not isinstance(caught.value, ReaderTimeout)
    assert bench.emulator.count(sm.CARD_APDU) == 1
    assert bench.reader.transmit(b"\x00\x84\x00\x00\x04") == b"\x00\x84\x00\x00\x04\x90\x00"


def test_module_checksum_status(bench):
    """Status E4 (module saw a damaged request): retried for FIND_CARD, ReaderError for APDUs."""
    bench.emulator.inject(Fault(command=sm.FIND_CARD, status=sm.STATUS_CHECKSUM_ERROR))
    bench.emulator.inject(Fault(command=sm.SAM_APDU, status=sm.STATUS_CHECKSUM_ERROR))

    assert bench.reader.wait_for_card(1.0) is not None
    with pytest.raises(ReaderError, match="checksum error"):
        bench.slot.transmit(b"\x00\x84\x00\x00\x08")
    assert bench.emulator.count(sm.SAM_APDU) == 1


def test_retries_are_bounded(bench):
    """Three damaged answers in a row exhaust FIND_CARD's two retries."""
    for _ in range(3):
        bench.emulator.inject(Fault(command=sm.FIND_CARD, corrupt_checksum=True))

    with pytest.raises(ReaderError, match="after 3 attempts"):
        bench.reader.wait_for_card(1.0)
    assert bench.reader.wait_for_card(1.0) is not None


@pytest.mark.parametrize(
    "status, meaning", [(sm.STATUS_COMMAND_ERROR, "command error"), (0xE3, "parameter error")]
)
def test_command_and_parameter_errors(bench, status, meaning):
    """Statuses E2/E3 are ReaderErrors saying what the module rejected."""
    bench.emulator.inject(Fault(command=sm.CARD_APDU, status=status))

    with pytest.raises(ReaderError, match=f"rejected CARD_APDU with 0x{status:02X} \\({meaning}"):
        bench.reader.transmit(b"\x00\xa4\x04\x00\x00")


@pytest.mark.parametrize(
    "noise",
    [
        bytes.fromhex("FF00557E"),
        b"\x02\x00\x05\xaa",  # a false start whose LEN runs into the real answer
        b"\x02\x02\x00\x13",  # a false start claiming 512 bytes
    ],
)
def test_noise_before_an_answer_is_skipped(bench, noise):
    """Line noise (even with false start bytes) before the answer does not lose it."""
    bench.emulator.inject(Fault(command=sm.CARD_APDU, noise=noise))

    assert bench.reader.transmit(b"\x00\x84\x00\x00\x04") == b"\x00\x84\x00\x00\x04\x90\x00"
    assert bench.emulator.count(sm.CARD_APDU) == 1


def test_answer_split_into_single_bytes(bench):
    """An answer trickling in byte by byte is reassembled."""
    bench.emulator.inject(Fault(command=sm.FIND_CARD, split=True, noise=b"\x00"))

    presence = bench.reader.wait_for_card(1.0)

    assert presence is not None
    assert presence.uid == UID


def test_stale_answer_with_old_seq_is_discarded(bench):
    """A well-formed answer carrying another SEQ is ignored; the matching one is returned."""
    stale = encode_response(sm.CARD_APDU, 0xEE, 0x00, b"\x6a\x82")
    bench.emulator.inject(Fault(command=sm.CARD_APDU, noise=stale))

    assert bench.reader.transmit(b"\x00\xb0\x00\x00") == b"\x00\xb0\x00\x00\x90\x00"


def test_silent_module_times_out(bench):
    """No answer: ReaderTimeout within the configured timeout; the next call works again."""
    bench.emulator.inject(Fault(command=sm.CARD_APDU, drop=True))
    started = time.monotonic()

    with pytest.raises(ReaderTimeout, match="no answer to CARD_APDU"):
        bench.reader.transmit(b"\x00\xb0\x00\x00")
    elapsed = time.monotonic() - started

    assert elapsed >= bench.timeout
    assert bench.emulator.count(sm.CARD_APDU) == 1
    assert bench.reader.transmit(b"\x00\xb0\x00\x00") == b"\x00\xb0\x00\x00\x90\x00"


def test_silent_find_card_is_not_retried(bench):
    """Silence is not line damage: even FIND_CARD times out once, without retries."""
    bench.emulator.inject(Fault(command=sm.FIND_CARD, drop=True))

    with pytest.raises(ReaderTimeout):
        bench.reader.wait_for_card(1.0)

    assert bench.emulator.count(sm.FIND_CARD) == 1


def test_emulator_restart_is_picked_up_on_the_next_call(bench):
    """Module restarts: the call that meets the dead link fails, the next one reconnects."""
    assert bench.reader.wait_for_card(1.0) is not None
    bench.emulator.stop()

    with pytest.raises(ReaderError):
        bench.reader.transmit(b"\x00\xb0\x00\x00")  # peer closed the connection
    with pytest.raises(ReaderError, match="cannot open"):
        bench.reader.transmit(b"\x00\xb0\x00\x00")  # nobody listening
    bench.emulator.serve_tcp(port=bench.port)

    assert bench.reader.transmit(b"\x00\xb0\x00\x00") == b"\x00\xb0\x00\x00\x90\x00"


def test_exchanges_are_logged_without_sam_data(bench):
    """Each exchange logs command name and duration; SAM data bytes never reach the log."""
    with capture_logs() as logs:
        bench.reader.transmit(b"\x00\xb0\x00\x00")
        bench.slot.transmit(b"\x80\x1a\x24\x01\x08\x11\x22\x33\x44\x55\x66\x77\x88")

    exchanges = [e for e in logs if e["event"] == "module_exchange"]
    assert [e["command"] for e in exchanges] == ["CARD_APDU", "SAM_APDU"]
    assert all(e["log_level"] == "debug" and e["ms"] >= 0 for e in exchanges)
    assert exchanges[0]["tx"] == "00b00000"
    assert "tx" not in exchanges[1]
    assert "rx" not in exchanges[1]
    assert "1122334455667788" not in repr(logs)


def test_oversized_apdu_and_closed_link(bench):
    """Data beyond the payload limit and use after close are ReaderErrors, sent nowhere."""
    with pytest.raises(ReaderError, match="payload limit"):
        bench.reader.transmit(bytes(2000))
    bench.reader.close()
    assert bench.slot.reset() == SAM_ATR  # the slot still holds the link
    bench.slot.close()

    with pytest.raises(ReaderError, match="closed"):
        bench.link.request(sm.GET_VERSION)
    assert bench.emulator.count(sm.CARD_APDU) == 0


def test_bad_link_settings():
    """Non-positive timeouts and bad slots are configuration errors."""
    with pytest.raises(ConfigurationError):
        SerialModuleLink("loop://", timeout=0)
    with pytest.raises(ConfigurationError):
        SerialModuleLink("loop://", command_timeouts={sm.CARD_APDU: -1.0})
    with pytest.raises(ConfigurationError):
        SerialModuleSamSlot(SerialModuleLink("loop://"), 256)


# --- driver over a real pty pair (socat) ----------------------------------------------------


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    socat = shutil.which("socat")
    if socat is None:
        pytest.fail(
            "socat is required for the serial pty tests: install it (apt-get install socat)"
        )
    host, module = tmp_path / "ttyHOST", tmp_path / "ttyMOD"
    proc = subprocess.Popen(
        [socat, "-d", "-d", f"pty,raw,echo=0,link={host}", f"pty,raw,echo=0,link={module}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5
        while not (host.exists() and module.exists()):
            if proc.poll() is not None:
                pytest.fail(f"socat exited with {proc.returncode} before creating the ptys")
            if time.monotonic() > deadline:
                pytest.fail("socat did not create the pty links within 5 s")
            time.sleep(0.01)
        yield host, module, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_find_and_transmit_over_a_socat_pty(pty_pair):
    """The driver opens the host pty like /dev/ttyS5; the emulator serves the module pty."""
    host, module, proc = pty_pair
    card = EchoCard()
    emulator = ModuleEmulator(EchoField(card), {1: EchoSam()}, torn_exc=TornError)
    emulator.serve_serial(str(module))
    link = SerialModuleLink(str(host), baudrate=115200, timeout=1.0)
    reader = SerialModuleReader(link, poll_interval=0.02)
    slot = SerialModuleSamSlot(link, 1)
    try:
        presence = reader.wait_for_card(2.0)

        assert presence is not None
        assert presence.uid == UID
        assert reader.transmit(b"\x00\xb0\x95\x00\x1e") == b"\x00\xb0\x95\x00\x1e\x90\x00"
        assert slot.reset() == SAM_ATR
        card.tear_next = True
        with pytest.raises(CardRemovedError):
            reader.transmit(b"\x80\x54\x01\x00\x0f")

        proc.terminate()  # the module's line goes away
        proc.wait(5)
        with pytest.raises(ReaderError):
            reader.wait_for_card(0.1)
    finally:
        reader.close()
        slot.close()
        emulator.stop()


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(sorted(FRAMINGS)),
    data=st.binary(max_size=200),
    noise=st.binary(max_size=20).filter(lambda b: 0x02 not in b and 0x7D not in b),
)
def test_read_size_hint_never_reads_past_a_frame(name: str, data: bytes, noise: bytes) -> None:
    """Reading exactly ``wanted()`` bytes at a time yields the frame and ends on its last byte."""
    framing = FRAMINGS[name]
    stream = noise + encode_response(sm.CARD_APDU, 7, 0, data, framing=framing)
    decoder = FrameDecoder(framing)
    position = 0
    frames: list[sm.Frame] = []
    while position < len(stream) and not frames:
        take = decoder.wanted()
        chunk = stream[position : position + take]
        position += len(chunk)
        frames = [item for item in decoder.feed(chunk) if isinstance(item, sm.Frame)]
    assert frames and frames[0].data == data
    assert position == len(stream)
