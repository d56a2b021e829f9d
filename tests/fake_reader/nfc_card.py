"""The card side of nfcpy's ``udp:`` frontend: an ISO-DEP (Type 4A) card in a listening thread.

nfcpy's ``listen_tta`` answers REQA, anticollision and SELECT itself and hands over the first frame
after SELECT; nfcpy has no Type 4 card emulation, so RATS/ATS and the ISO/IEC 14443-4 block
protocol are coded here (m1-purse-and-readers.md §4b.2): I-blocks with chaining both ways,
R(ACK)/R(NAK) (a presence-check R(NAK) is answered with R(ACK)), S(DESELECT), and optional S(WTX)
requests before each answer. APDUs go to a :class:`tests.fake_reader.cpu_card.SimulatedCpuCard`.

The udp listener normally binds 0.0.0.0; here it binds the loopback address only.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import nfc
import nfc.clf

from tests.fake_reader.faults import CardTorn

ATQA_4_BYTE_UID = bytes.fromhex("0400")  # SENS_RES as on the wire, first byte first
SAK_ISO_DEP = 0x20
FSD_TABLE = (16, 24, 32, 40, 48, 64, 96, 128, 256)


class ApduCard(Protocol):
    uid: bytes
    ats: bytes

    def power_on(self) -> None: ...

    def process(self, apdu: bytes) -> bytes: ...


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NfcCardEmulator:
    """A card that can be put in and taken out of the field of an nfcpy ``udp:`` reader.

    ``wtx``: the number of S(WTX) requests sent before each answer (waiting-time extension).
    """

    def __init__(self, port: int | None = None, *, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_udp_port(host)
        self.path = f"udp:{host}:{self.port}"
        self.apdus: list[bytes] = []
        self.activations = 0
        self.wtx = 0
        # Goes silent (see mute) on the first APDU this returns True for.
        self.mute_on: Callable[[bytes], bool] | None = None
        self._card: ApduCard | None = None
        self._muted = False
        self._generation = 0
        self._stop = threading.Event()
        self._clf: Any = nfc.ContactlessFrontend(f"udp:{host}:{self.port}")
        # The socket stays bound for the emulator's whole life (nfcpy's clf.listen would close
        # and re-bind it each time, dropping the reader's REQA in between), bound to loopback
        # only, and the card reads it only while it is in the field.
        device = self._clf.device
        device._bind_socket = self._bind_loopback
        device._create_socket()
        self._bind_loopback(0.0)
        self._thread = threading.Thread(target=self._run, name=f"nfc-card-{self.port}", daemon=True)
        self._thread.start()

    def _bind_loopback(self, _time_to_return: float) -> bool:
        device = self._clf.device
        if device.socket.getsockname()[1] != self.port:
            device.socket.bind((self.host, self.port))
        return True

    # -- control ---------------------------------------------------------------------------

    @property
    def card(self) -> ApduCard | None:
        return self._card

    def insert(self, card: ApduCard) -> None:
        card.power_on()
        self._muted = False
        self.mute_on = None
        self._card = card
        self._generation += 1

    def remove(self) -> None:
        self._card = None
        self._generation += 1

    def mute(self) -> None:
        """The card stays in the field but never answers again (until re-inserted)."""
        self._muted = True

    def close(self) -> None:
        self._stop.set()
        self._card = None
        self._thread.join(5)
        self._clf.close()

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            card, generation = self._card, self._generation
            if card is None:
                time.sleep(0.01)
                continue
            uid = bytes(card.uid)
            target = nfc.clf.LocalTarget(
                "106A",
                sens_res=bytearray(ATQA_4_BYTE_UID),
                sdd_res=bytearray(uid),
                sel_res=bytearray((SAK_ISO_DEP,)),
            )
            try:
                activated = self._clf.device.listen_tta(target, 0.25)
            except nfc.clf.CommunicationError:
                continue
            self._clf.target = activated
            if activated is None or self._generation != generation:
                continue
            rats = getattr(activated, "tt4_cmd", None)
            if not rats or rats[0] != 0xE0:
                continue
            self.activations += 1
            card.power_on()
            with contextlib.suppress(nfc.clf.CommunicationError):
                self._session(card, generation, FSD_TABLE[min(rats[1] >> 4, 8)])

    def _alive(self, generation: int) -> bool:
        return not self._stop.is_set() and self._generation == generation

    def _next(self, send: bytes | None, generation: int) -> bytes | None:
        """Send ``send`` (None = stay silent) and wait for the reader's next frame."""
        while self._alive(generation):
            try:
                data = self._clf.exchange(None if send is None else bytearray(send), 0.1)
            except nfc.clf.TimeoutError:
                send = None
                continue
            if self._muted:
                send = None
                continue
            if data:
                return bytes(data)
            send = None
        return None

    def _session(self, card: ApduCard, generation: int, fsd: int) -> None:
        """One activation: ATS, then blocks until RFOFF, DESELECT or removal."""
        block = 1  # the card's block number; toggled on every I-block received
        command = b""
        last_sent = b""
        pending: list[bytes] = []  # response I-blocks not yet sent (chaining)
        frame = self._next(None if self._muted else card.ats, generation)
        while frame is not None:
            pcb = frame[0]
            reply: bytes | None
            if pcb & 0xE2 == 0x02:  # I-block
                block = pcb & 1
                command += frame[1:]
                if pcb & 0x10:
                    reply = bytes((0xA2 | block,))
                else:
                    apdu, command = command, b""
                    reply = self._answer(card, apdu, block, fsd, pending, generation)
                    if reply is None:
                        return
                    if not reply:
                        reply = None  # muted: silent, still in the field
            elif pcb & 0xE6 == 0xA2:  # R-block
                nak = bool(pcb & 0x10)
                if pcb & 1 == block and last_sent:
                    reply = last_sent  # the reader lost our last block: send it again
                elif not nak and pending:
                    block ^= 1
                    reply = bytes((pending[0][0] & ~1 | block,)) + pending[0][1:]
                    pending.pop(0)
                else:
                    reply = bytes((0xA2 | block,))  # presence check
            elif pcb & 0xF7 == 0xC2:  # S(DESELECT)
                self._clf.exchange(bytearray(frame[:1]), 0)
                return
            elif pcb & 0xF7 == 0xF2:  # S(WTX) response from the reader
                reply = last_sent
            else:
                reply = None
            if reply is not None and reply[0] & 0xE2 == 0x02:
                last_sent = reply
            frame = self._next(reply, generation)

    def _answer(
        self,
        card: ApduCard,
        apdu: bytes,
        block: int,
        fsd: int,
        pending: list[bytes],
        generation: int,
    ) -> bytes | None:
        self.apdus.append(apdu)
        if self.mute_on is not None and self.mute_on(apdu):
            self._muted = True
        if self._muted:
            return b""
        try:
            response = card.process(apdu)
        except CardTorn:
            if self._generation == generation:
                self._card = None
                self._generation += 1
            return None
        for _ in range(self.wtx):
            frame = self._next(bytes((0xF2, 0x01)), generation)
            if frame is None or frame[0] & 0xF7 != 0xF2:
                return None
        room = fsd - 3
        parts = [response[i : i + room] for i in range(0, len(response), room)] or [b""]
        pending.clear()
        for i, part in enumerate(parts[1:], start=1):
            more = 0x10 if i < len(parts) - 1 else 0
            pending.append(bytes((0x02 | more,)) + part)
        more = 0x10 if len(parts) > 1 else 0
        return bytes((0x02 | more | block,)) + parts[0]
