"""Virtual ICCs for vsmartcard's vpcd: the card side of pyscard → pcscd → vpcd in the tests.

vpcd (in server mode) listens on one TCP port per slot (``CHANNELID + slot``; the test stack runs
two vpcd readers of two slots each, so vpcd slots 0..3 are ports ``port + 0..3``: card, PSAM,
second PSAM, spare — see :mod:`tests.stacks`); a virtual ICC connects to it. Every message
in both directions is ``uint16 length (big-endian) ‖ payload``; a 1-byte message from vpcd is a
control byte (``00`` power off, ``01`` power on, ``02`` reset, ``04`` get ATR — only ``04`` is
answered), anything longer is a command APDU answered with a response APDU
(m1-purse-and-readers.md §5.1). A closed connection is a removed card; connecting again is an
insertion.

:class:`VpcdSlot` is one slot's connection, served by a thread, with an ICC that can be inserted,
removed or muted while the tests run. Two ICC adapters sit in a slot:

* :class:`ContactlessCardIcc` plays a PC/SC contactless reader with an ISO-DEP card in its field:
  the ATR is the PC/SC Part 3 ATR built from the card's ATS historical bytes, and the reader's own
  ``FF CA`` GET DATA pseudo-APDU (§4a.1) is answered with the UID / historical bytes; every other
  APDU goes to a :class:`tests.fake_reader.cpu_card.SimulatedCpuCard`.
* :class:`PsamIcc` is a PSAM in a contact reader (:class:`tests.fake_reader.psam.SimulatedPsam`).

A simulator raising :class:`tests.fake_reader.faults.CardTorn` leaves the field: the slot closes
the connection without answering, exactly as a snatched card looks to pcscd.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Protocol

from tests.fake_reader.faults import CardTorn

CLONE_NEWNET = 0x40000000
POWER_OFF, POWER_ON, RESET, GET_ATR = 0x00, 0x01, 0x02, 0x04
SW_OK = b"\x90\x00"


class Icc(Protocol):
    """What sits in a vpcd slot."""

    def atr(self) -> bytes: ...

    def power_on(self) -> None: ...

    def process(self, apdu: bytes) -> bytes: ...


class ContactlessApduCard(Protocol):
    uid: bytes
    ats: bytes

    def power_on(self) -> None: ...

    def process(self, apdu: bytes) -> bytes: ...


def contactless_atr(historical: bytes) -> bytes:
    """PC/SC Part 3 ATR of an ISO 14443-4 card: ``3B 8n 80 01 ‖ historical ‖ TCK``."""
    body = bytes((0x80 | len(historical), 0x80, 0x01)) + historical
    tck = 0
    for byte in body:
        tck ^= byte
    return b"\x3b" + body + bytes((tck,))


def ats_historical_bytes(ats: bytes) -> bytes:
    """The historical bytes of an ATS (TL T0 [TA] [TB] [TC] historical...)."""
    if len(ats) < 2:
        return b""
    t0 = ats[1]
    skip = 2 + sum(1 for bit in (0x10, 0x20, 0x40) if t0 & bit)
    return ats[skip : ats[0]] if ats[0] <= len(ats) else ats[skip:]


class ContactlessCardIcc:
    """A PC/SC contactless reader with one ISO-DEP card in its field."""

    def __init__(self, card: ContactlessApduCard) -> None:
        self.card = card

    def atr(self) -> bytes:
        return contactless_atr(ats_historical_bytes(self.card.ats))

    def power_on(self) -> None:
        self.card.power_on()

    def process(self, apdu: bytes) -> bytes:
        if apdu[:2] == b"\xff\xca" and len(apdu) >= 4:  # GET DATA, answered by the reader (§4a.1)
            if apdu[2:4] == b"\x00\x00":
                return self.card.uid + SW_OK
            if apdu[2:4] == b"\x01\x00":
                return ats_historical_bytes(self.card.ats) + SW_OK
            return b"\x6b\x00"
        return self.card.process(apdu)


class ResettableApduDevice(Protocol):
    def reset(self) -> bytes: ...

    def process(self, apdu: bytes) -> bytes: ...


class PsamIcc:
    """A PSAM in a contact reader: power-on / reset is the SAM's reset."""

    def __init__(self, psam: ResettableApduDevice) -> None:
        self.psam = psam
        self._atr = psam.reset()

    def atr(self) -> bytes:
        return self._atr

    def power_on(self) -> None:
        self._atr = self.psam.reset()

    def process(self, apdu: bytes) -> bytes:
        return self.psam.process(apdu)


def enter_net_namespace(pid: int) -> None:
    """Move the *calling thread* into the network namespace of process ``pid`` (setns(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns(net of pid {pid}): {os.strerror(err)}")
    finally:
        os.close(fd)


class VpcdSlot:
    """One vpcd slot: a thread connects the inserted ICC to ``host:port`` and serves it.

    ``netns_pid``: connect from inside that process's network namespace (vpcd in a private
    namespace listens on 0.0.0.0 there, invisible to the host).
    """

    def __init__(
        self, port: int, *, host: str = "127.0.0.1", netns_pid: int | None = None, name: str = ""
    ) -> None:
        self.port = port
        self.host = host
        self.netns_pid = netns_pid
        self.name = name or f"vpcd:{port}"
        self.apdus: list[bytes] = []  # every command APDU received, in order
        # Goes silent (see mute) on the first APDU this returns True for.
        self.mute_on: Callable[[bytes], bool] | None = None
        self.connections = 0
        self._icc: Icc | None = None
        self._muted = False
        self._generation = 0
        self._connected = threading.Event()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"vpcd-{port}", daemon=True)
        self._thread.start()

    # -- control ---------------------------------------------------------------------------

    @property
    def icc(self) -> Icc | None:
        return self._icc

    def insert(self, icc: Icc) -> None:
        """The ICC enters the slot/field: the slot connects to vpcd (retrying until it listens)."""
        with self._cond:
            self._icc = icc
            self._muted = False
            self.mute_on = None
            self._generation += 1
            self._connected.clear()
            self._cond.notify_all()

    def remove(self) -> None:
        """The ICC leaves: the connection is closed (pcscd sees the removal on its next poll)."""
        with self._cond:
            self._icc = None
            self._generation += 1
            self._connected.clear()
            self._cond.notify_all()

    def mute(self) -> None:
        """The ICC stays in the field but stops answering APDUs (control bytes still answered)."""
        self._muted = True

    def wait_connected(self, timeout: float = 5.0) -> bool:
        return self._connected.wait(timeout)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._icc = None
            self._generation += 1
            self._cond.notify_all()
        self._thread.join(5)

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        if self.netns_pid is not None:
            enter_net_namespace(self.netns_pid)
        while True:
            with self._cond:
                while not self._stop and self._icc is None:
                    self._cond.wait()
                if self._stop:
                    return
                icc, generation = self._icc, self._generation
            sock = self._connect(generation)
            if sock is None:
                continue
            try:
                self._serve(sock, icc, generation)
            finally:
                with contextlib.suppress(OSError):
                    sock.close()

    def _current(self, generation: int) -> bool:
        return not self._stop and self._generation == generation

    def _connect(self, generation: int) -> socket.socket | None:
        while self._current(generation):
            try:
                sock = socket.create_connection((self.host, self.port), timeout=1.0)
            except OSError:
                time.sleep(0.05)  # vpcd not listening (yet): pcscd starting or restarting
                continue
            sock.setblocking(True)
            # vpcd writes the length and the APDU separately; without these every APDU waits for
            # a delayed ACK (m1-purse-and-readers.md §5.4 pitfall 7).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections += 1
            self._connected.set()
            return sock
        return None

    def _serve(self, sock: socket.socket, icc: Icc | None, generation: int) -> None:
        buf = b""
        while self._current(generation) and icc is not None:
            ready, _, _ = select.select([sock], [], [], 0.05)
            if not ready:
                continue
            try:
                chunk = sock.recv(4096)
            except OSError:
                return
            if not chunk:
                return  # vpcd went away (pcscd stopped): reconnect while the ICC stays inserted
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            buf += chunk
            while len(buf) >= 2:
                (length,) = struct.unpack(">H", buf[:2])
                if len(buf) < 2 + length:
                    break
                message, buf = buf[2 : 2 + length], buf[2 + length :]
                answer = self._answer(icc, message)
                if answer is _GONE:
                    with self._cond:
                        if self._generation == generation:
                            self._icc = None
                            self._generation += 1
                            self._connected.clear()
                    return
                if answer is not None:
                    try:
                        sock.sendall(struct.pack(">H", len(answer)) + answer)
                    except OSError:
                        return

    def _answer(self, icc: Icc, message: bytes) -> bytes | None:
        if len(message) == 1:
            if message[0] == GET_ATR:
                return icc.atr()
            if message[0] in (POWER_ON, RESET):
                icc.power_on()
            return None
        self.apdus.append(message)
        if self.mute_on is not None and self.mute_on(message):
            self._muted = True
        if self._muted:
            return None
        try:
            return icc.process(message)
        except CardTorn:
            return _GONE


_GONE = b"<gone>"
