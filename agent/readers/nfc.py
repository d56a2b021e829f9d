"""ISO-DEP (Type 4A) cards through nfcpy's ContactlessFrontend.

nfcpy's ``clf.connect(rdwr=...)`` would route a MIFARE Classic to its Type 2 Tag code and probe it
with commands a purse card must never see (m1-purse-and-readers.md §4b.2), so this driver uses
``clf.sense()`` + ``clf.exchange()`` only and speaks ISO/IEC 14443-4 itself: RATS/ATS, then
I-blocks with chaining in both directions, R(ACK)/R(NAK) and S(WTX). Frames are passed without
CRC (nfcpy's drivers add and check it). The device path is nfcpy's: ``usb:072f:2200``,
``tty:USB0:pn532``, or ``udp:127.0.0.1:54321`` (the simulated frontend the tests use).

Presence after a tap is checked by "ping": an R(NAK) that a card in the field answers with an
R(ACK) (ISO/IEC 14443-4 §7.5.4). Silence is not taken as removal by itself (a mute or torn card
may still lie there): the driver then looks at the field afresh with ``clf.sense()``, which
switches the RF field off and on, so any card in the field powers up and answers REQA. A look
that finds nothing is a removal; a card that answers (the same one, a phone with a new random
UID, another card) is not, and an ISO-DEP card is re-activated so that pinging resumes. A device
error is a :class:`ReaderError`, never a removal; the re-opened frontend looks at the field again.

nfcpy's ``sense`` reports one target: the udp frontend models a single card, and nfcpy's PN53x
drivers ask the chip for one target, so the driver cannot tell that a second card or a phone is
in the field and ``CardPresence.cards_in_field`` stays 1 (the presence guard and the card id
check keep a card from being charged twice).

nfcpy's exceptions become the agent's errors here: ``nfc.clf.CommunicationError`` (timeout,
broken link, garbled frame) during an APDU -> :class:`CardRemovedError`; ``IOError`` from the
device -> :class:`ReaderError` (the frontend is re-opened by the next call).
"""

from __future__ import annotations

import time
from typing import Any

import nfc
import nfc.clf
import structlog

from agent.errors import (
    CardProtocolError,
    CardRemovedError,
    ConfigurationError,
    ReaderError,
)
from agent.readers.base import CardPresence, CardTechnology

_log = structlog.get_logger(__name__)

# ISO/IEC 14443-4 block coding (no CID, no NAD).
I_BLOCK = 0x02
R_ACK = 0xA2
R_NAK = 0xB2
S_WTX = 0xF2
S_DESELECT = 0xC2
CHAINING = 0x10
FSDI = 8  # we accept frames of 256 bytes (the udp frontend's limit is 290)
FSC_TABLE = (16, 24, 32, 40, 48, 64, 96, 128, 256)  # FSCI -> FSC, ISO/IEC 14443-4 Table 1
SAK_ISO_DEP = 0x20
MAX_WTX_PER_APDU = 64


def fsc_from_ats(ats: bytes) -> int:
    """The card's maximum frame size from ATS T0 (FSCI, low nibble); 32 without T0."""
    if len(ats) < 2:
        return 32
    return FSC_TABLE[min(ats[1] & 0x0F, len(FSC_TABLE) - 1)]


def ats_historical(ats: bytes) -> bytes:
    if len(ats) < 2:
        return b""
    skip = 2 + sum(1 for bit in (0x10, 0x20, 0x40) if ats[1] & bit)
    return bytes(ats[skip:])


class NfcReader:
    """An nfcpy contactless frontend as a :class:`agent.readers.base.CardReader`.

    ``timeout`` bounds one APDU, waiting-time extensions included. Sensing is nfcpy's; its udp
    frontend waits up to 1 s for an answer to REQA, so ``wait_for_card`` may overrun a shorter
    timeout by that much.
    """

    def __init__(
        self,
        path: str,
        *,
        timeout: float = 1.0,
        poll_interval: float = 0.05,
        ping_timeout: float = 0.25,
    ) -> None:
        if not path:
            raise ConfigurationError("nfcpy reader: the device path is empty")
        if not (timeout > 0 and poll_interval > 0 and ping_timeout > 0):
            raise ConfigurationError(f"nfcpy {path}: timeouts must be positive")
        self.path = path
        self.name = f"nfcpy {path}"
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.ping_timeout = ping_timeout
        self._clf: Any = None
        self._target: Any = None
        self._block = 0  # our ISO-DEP block number
        self._fsc = 32
        self._iso_dep = False
        self._closed = False

    # -- the frontend ----------------------------------------------------------------------

    def _frontend(self) -> Any:
        if self._closed:
            raise ReaderError(f"{self.name}: reader is closed")
        if self._clf is None:
            try:
                self._clf = nfc.ContactlessFrontend(self.path)
            except (OSError, ValueError) as exc:  # IOError(ENODEV), bad path
                raise ReaderError(f"{self.name}: cannot open: {exc}") from exc
            _log.info("nfc_reader_open", reader=self.path, device=str(self._clf))
        return self._clf

    def _drop_frontend(self) -> None:
        clf, self._clf, self._target = self._clf, None, None
        if clf is not None:
            try:
                clf.close()
            except (OSError, nfc.clf.Error):
                _log.debug("nfc_close_failed", reader=self.path)

    # -- the seam -----------------------------------------------------------------------------

    def wait_for_card(self, timeout: float) -> CardPresence | None:
        deadline = time.monotonic() + timeout
        while True:
            presence = self._sense_once()
            if presence is not None:
                return presence
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(self.poll_interval, remaining))

    def transmit(self, apdu: bytes) -> bytes:
        if self._target is None:
            raise CardRemovedError(f"{self.name}: no card activated")
        if not self._iso_dep:
            raise CardProtocolError(f"{self.name}: the card in the field is not ISO-DEP")
        started = time.monotonic()
        deadline = started + self.timeout
        try:
            response = self._apdu(bytes(apdu), deadline)
        except nfc.clf.CommunicationError as exc:
            self._target = None
            raise CardRemovedError(f"{self.name}: card left or went silent: {exc!r}") from exc
        except CardProtocolError:
            self._target = None
            raise
        except OSError as exc:
            self._drop_frontend()
            raise ReaderError(f"{self.name}: device failed: {exc}") from exc
        _log.debug(
            "nfc_apdu", reader=self.path, ins=f"{apdu[1]:02X}" if len(apdu) > 1 else "",
            sw=response[-2:].hex().upper(), ms=round((time.monotonic() - started) * 1000, 2),
        )  # fmt: skip
        return response

    def wait_for_removal(self, timeout: float) -> bool:
        """``True`` once a sense found no card; ``False`` while the card answers its ping or a
        sense finds a card. A look may overrun ``timeout`` by the frontend's REQA wait (1 s on
        udp)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._field_empty(deadline):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(self.poll_interval, remaining))

    def feedback(self, ok: bool, text: str) -> None:
        # nfcpy frontends have no passenger display; a buzzer/LED is driver-specific.
        _log.debug("nfc_feedback", reader=self.path, ok=ok, text=text)

    def close(self) -> None:
        if not self._closed:
            self._drop_frontend()
            self._closed = True

    # -- activation -----------------------------------------------------------------------------

    def _sense_once(self) -> CardPresence | None:
        target = self._sense()
        return None if target is None else self._activate(target)

    def _field_empty(self, deadline: float) -> bool:
        """One look: the activated card answers a ping, else a fresh sense finds no card."""
        if self._target is not None and self._iso_dep:
            if self._ping(min(self.ping_timeout, max(0.01, deadline - time.monotonic()))):
                return False
            _log.debug("nfc_ping_unanswered", reader=self.path)
        target = self._sense()
        if target is None:
            return True
        self._activate(target)  # ping again from now on (a mute card stays unactivated)
        return False

    def _sense(self) -> Any:
        """nfcpy's sense (RF field off, then REQA and anticollision): a target or ``None``."""
        clf = self._frontend()
        self._target = None
        try:
            return clf.sense(nfc.clf.RemoteTarget("106A"), iterations=1)
        except nfc.clf.CommunicationError as exc:
            _log.debug("nfc_sense_error", reader=self.path, error=repr(exc))
            return None
        except OSError as exc:
            self._drop_frontend()
            raise ReaderError(f"{self.name}: sense failed: {exc}") from exc

    def _activate(self, target: Any) -> CardPresence | None:
        """RATS for an ISO-DEP target; ``None`` if it does not answer."""
        sak = target.sel_res[0] if target.sel_res else 0
        uid = bytes(target.sdd_res or b"")
        self._target = target
        self._iso_dep = bool(sak & SAK_ISO_DEP)
        if not self._iso_dep:
            return CardPresence(uid, CardTechnology.MIFARE_CLASSIC, sak)
        try:
            ats = self._rats()
        except nfc.clf.CommunicationError as exc:
            _log.debug("nfc_rats_failed", reader=self.path, error=repr(exc))
            self._target = None
            return None
        except OSError as exc:
            self._drop_frontend()
            raise ReaderError(f"{self.name}: RATS failed: {exc}") from exc
        self._block = 0
        self._fsc = fsc_from_ats(ats)
        return CardPresence(uid, CardTechnology.ISO_DEP, sak, ats_historical(ats))

    def _rats(self) -> bytes:
        ats = self._exchange(bytes((0xE0, FSDI << 4)), self.timeout)  # RATS, CID 0
        if not ats or ats[0] != len(ats):
            raise nfc.clf.ProtocolError(f"bad ATS {ats.hex()}")
        return ats

    # -- block protocol ------------------------------------------------------------------------

    def _exchange(self, frame: bytes, timeout: float) -> bytes:
        if timeout <= 0:
            raise nfc.clf.TimeoutError("APDU time budget used up")
        data = self._frontend().exchange(bytearray(frame), timeout)
        if not data:
            raise nfc.clf.TransmissionError("empty frame")
        return bytes(data)

    def _apdu(self, apdu: bytes, deadline: float) -> bytes:
        room = max(1, min(self._fsc, 256) - 3)  # PCB + CRC
        chunks = [apdu[i : i + room] for i in range(0, len(apdu), room)] or [b""]
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            pcb = I_BLOCK | self._block | (0 if last else CHAINING)
            reply = self._await(bytes((pcb,)) + chunk, deadline)
            if not last:
                if reply[0] & 0xF6 != R_ACK & 0xF6:
                    raise CardProtocolError(f"{self.name}: expected R(ACK), got {reply.hex()}")
                self._block ^= 1
        response = b""
        while True:
            if reply[0] & 0xE2 != I_BLOCK:
                raise CardProtocolError(f"{self.name}: expected an I-block, got {reply.hex()}")
            response += reply[1:]
            self._block ^= 1
            if not reply[0] & CHAINING:
                return response
            reply = self._await(bytes((R_ACK | self._block,)), deadline)

    def _await(self, frame: bytes, deadline: float) -> bytes:
        """Send a block; answer S(WTX) requests until the card sends something else."""
        reply = self._exchange(frame, deadline - time.monotonic())
        for _ in range(MAX_WTX_PER_APDU):
            if reply[0] & 0xF7 != S_WTX or len(reply) < 2:
                return reply
            reply = self._exchange(bytes((S_WTX, reply[1] & 0x3F)), deadline - time.monotonic())
        raise CardProtocolError(f"{self.name}: endless waiting-time extensions")

    def _ping(self, timeout: float) -> bool:
        try:
            reply = self._exchange(bytes((R_NAK | self._block,)), timeout)
        except nfc.clf.CommunicationError:
            return False
        except OSError as exc:
            self._drop_frontend()
            raise ReaderError(f"{self.name}: presence check failed: {exc}") from exc
        return bool(reply)  # R(ACK), or our last block again: either way the card is there
