"""An emulated serial reader module (contactless field + any number of PSAM slots) speaking the
protocol of :mod:`agent.readers.serial_module` over a real byte stream: a TCP socket (for
pyserial's ``socket://``) or the module side of a socat pty pair.

The emulator knows nothing of card internals. It takes a *field* (``field.card`` is ``None`` or
an object with ``uid``, ``ats`` and ``process(apdu) -> bytes``; ``field.remove()`` empties it)
and SAMs (``process(apdu) -> bytes`` and ``reset() -> bytes``). ``process`` raising ``torn_exc``
means the card left mid-command (answer 0xAF, card removed) or the SAM went mute (answer 0xE1).

Faults for tests are queued with :meth:`ModuleEmulator.inject` and consumed one per answer.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import serial

from agent.readers import serial_module as sm
from agent.readers.storage import KeyType
from tests.fake_reader.m1_card import M1AuthFailed, M1Card, M1Nak


class Card(Protocol):
    uid: bytes
    ats: bytes

    def process(self, apdu: bytes) -> bytes: ...


class Field(Protocol):
    @property
    def card(self) -> Any: ...

    def remove(self) -> Any: ...


class Sam(Protocol):
    def process(self, apdu: bytes) -> bytes: ...

    def reset(self) -> bytes: ...


@dataclass
class Fault:
    """One fault applied to the next answer to ``command`` (any command if ``None``).

    ``noise`` is written before the answer; ``corrupt_checksum`` flips the checksum byte;
    ``drop`` sends nothing; ``split`` writes the answer one byte at a time; ``delay`` waits
    before answering; ``status`` replaces the answer with a bare status (e.g. 0xE4).
    """

    command: int | None = None
    noise: bytes = b""
    corrupt_checksum: bool = False
    drop: bool = False
    split: bool = False
    delay: float = 0.0
    status: int | None = None


class ModuleEmulator:
    """Serves one field and some SAM slots; any number of transports may be started."""

    def __init__(
        self,
        field: Field,
        sams: dict[int, Sam] | None = None,
        *,
        torn_exc: type[BaseException],
        on_feedback: Callable[[bool, str], None] | None = None,
        framing: sm.Framing = sm.DEFAULT_FRAMING,
        version: bytes = b"fake-module 1.0",
    ) -> None:
        self.field = field
        self.sams = sams if sams is not None else {}
        self.torn_exc = torn_exc
        self.on_feedback = on_feedback
        self.framing = framing
        self.version = version
        self.requests: list[sm.Frame] = []  # every request decoded, in order
        # Cards lying in the field beside field.card (a second card, a phone): FIND_CARD then
        # answers 0x82 (several cards), CARD_PRESENT sees the field occupied while any is there.
        self.others: list[Any] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._closers: list[Callable[[], None]] = []

    # -- faults and inspection -----------------------------------------------------------------

    def inject(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def insert_sam(self, slot: int, sam: Sam) -> None:
        """A PSAM goes into SAM slot ``slot`` (several slots may hold PSAMs at once)."""
        with self._lock:
            self.sams = {**self.sams, slot: sam}

    def remove_sam(self, slot: int) -> Sam | None:
        """Pull the PSAM out of ``slot``: SAM commands to it answer 0xE1 (SAM error)."""
        with self._lock:
            sams = dict(self.sams)
            sam = sams.pop(slot, None)
            self.sams = sams
        return sam

    def count(self, command: int) -> int:
        return sum(1 for frame in self.requests if frame.cmd == command)

    # -- protocol ------------------------------------------------------------------------------

    def answer(self, request: sm.Frame) -> tuple[int, bytes]:
        """The module's (status, data) for one decoded request."""
        cmd, data = request.cmd, request.data
        card = self.field.card
        if cmd == sm.GET_VERSION:
            return sm.STATUS_OK, self.version
        if cmd == sm.FIND_CARD:
            cards = [c for c in (card, *self.others) if c is not None]
            if not cards:
                return sm.STATUS_NO_CARD, b""
            found = cards[0]
            uid = bytes(found.uid)
            tech = getattr(found, "technology_code", 0x01)
            sak = getattr(found, "sak", 0x20)
            answer = bytes((tech, sak, len(uid))) + uid + bytes(found.ats)
            if len(cards) > 1:  # a collision at anticollision
                return sm.STATUS_SEVERAL_CARDS, bytes((len(cards),)) + answer
            return sm.STATUS_OK, answer
        if cmd == sm.CARD_PRESENT:
            empty = card is None and not self.others
            return (sm.STATUS_NO_CARD if empty else sm.STATUS_OK), b""
        if cmd == sm.CARD_HALT:
            return sm.STATUS_OK, b""
        if cmd == sm.CARD_APDU:
            if card is None:
                return sm.STATUS_NO_CARD, b""
            try:
                return sm.STATUS_OK, card.process(data)
            except self.torn_exc:
                self.field.remove()
                return sm.STATUS_CARD_TIMEOUT, b""
        if cmd in (sm.SAM_RESET, sm.SAM_APDU):
            if not data:
                return sm.STATUS_PARAMETER_ERROR, b""
            sam = self.sams.get(data[0])
            if sam is None:
                return sm.STATUS_SAM_ERROR, b""
            try:
                return sm.STATUS_OK, sam.reset() if cmd == sm.SAM_RESET else sam.process(data[1:])
            except self.torn_exc:
                return sm.STATUS_SAM_ERROR, b""
        if cmd == sm.FEEDBACK:
            if not data:
                return sm.STATUS_PARAMETER_ERROR, b""
            if self.on_feedback is not None:
                self.on_feedback(bool(data[0]), data[1:].decode("utf-8", "replace"))
            return sm.STATUS_OK, b""
        if sm.M1_FIRST <= cmd <= sm.M1_LAST:
            return self._m1(cmd, data, card)
        return sm.STATUS_COMMAND_ERROR, b""

    def _m1(self, cmd: int, data: bytes, card: Any) -> tuple[int, bytes]:
        """MIFARE Classic commands 0x40..0x47 on an :class:`M1Card` in the field."""
        if card is None:
            return sm.STATUS_NO_CARD, b""
        if not isinstance(card, M1Card):
            return sm.STATUS_COMMAND_ERROR, b""
        lengths = {
            sm.M1_AUTH: 8,
            sm.M1_READ: 1,
            sm.M1_WRITE: 17,
            sm.M1_INCREMENT: 5,
            sm.M1_DECREMENT: 5,
            sm.M1_RESTORE: 1,
            sm.M1_TRANSFER: 1,
            sm.M1_VALUE_TRANSFER: 7,
        }
        if cmd not in lengths:
            return sm.STATUS_COMMAND_ERROR, b""
        if len(data) != lengths[cmd]:
            return sm.STATUS_PARAMETER_ERROR, b""
        block = data[0]
        try:
            if cmd == sm.M1_AUTH:
                if data[1] not in (0x60, 0x61):
                    return sm.STATUS_PARAMETER_ERROR, b""
                if card.state == "idle":
                    card.select()
                card.authenticate(block, KeyType(data[1]), data[2:8])
            elif cmd == sm.M1_READ:
                return sm.STATUS_OK, card.read(block)
            elif cmd == sm.M1_WRITE:
                card.write(block, data[1:17])
            elif cmd in (sm.M1_INCREMENT, sm.M1_DECREMENT):
                value = int.from_bytes(data[1:5], "little")
                (card.increment if cmd == sm.M1_INCREMENT else card.decrement)(block, value)
            elif cmd == sm.M1_RESTORE:
                card.restore(block)
            elif cmd == sm.M1_TRANSFER:
                card.transfer(block)
            else:
                op, block, dest = data[0], data[1], data[6]
                operand = int.from_bytes(data[2:6], "little")
                if op == 0x01:
                    card.increment(block, operand)
                elif op == 0x02:
                    card.decrement(block, operand)
                elif op == 0x03:
                    card.restore(block)
                else:
                    return sm.STATUS_PARAMETER_ERROR, b""
                card.transfer(dest)
        except self.torn_exc:
            self.field.remove()
            return sm.STATUS_CARD_TIMEOUT, b""
        except M1AuthFailed:
            return sm.STATUS_AUTH_ERROR, b""
        except M1Nak:
            return (sm.STATUS_READ_ERROR if cmd == sm.M1_READ else sm.STATUS_WRITE_ERROR), b""
        return sm.STATUS_OK, b""

    def handle(self, decoder: sm.FrameDecoder, data: bytes, write: Callable[[bytes], None]) -> None:
        """Feed received bytes; write the answers (with any queued fault applied)."""
        for item in decoder.feed(data):
            if isinstance(item, sm.FrameError):
                continue  # a real module stays silent on a damaged request
            with self._lock:
                self.requests.append(item)
                fault = self._take_fault(item.cmd)
                if fault is not None and fault.status is not None:
                    status, payload = fault.status, b""
                else:
                    status, payload = self.answer(item)
            frame = sm.encode_response(item.cmd, item.seq, status, payload, framing=self.framing)
            self._send(frame, fault, write)

    def _take_fault(self, cmd: int) -> Fault | None:
        for i, fault in enumerate(self._faults):
            if fault.command is None or fault.command == cmd:
                return self._faults.pop(i)
        return None

    def _send(self, frame: bytes, fault: Fault | None, write: Callable[[bytes], None]) -> None:
        if fault is None:
            write(frame)
            return
        if fault.delay:
            time.sleep(fault.delay)
        if fault.drop:
            return
        if fault.corrupt_checksum:
            at = len(frame) - len(self.framing.end) - 1
            frame = frame[:at] + bytes((frame[at] ^ 0x5A,)) + frame[at + 1 :]
        if fault.noise:
            write(fault.noise)
        if fault.split:
            for i in range(len(frame)):
                write(frame[i : i + 1])
                time.sleep(0.001)
        else:
            write(frame)

    # -- transports ----------------------------------------------------------------------------

    def serve_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[threading.Thread, int]:
        """Listen on TCP; one client at a time, a new client replaces the old one."""
        listener = socket.create_server((host, port))
        listener.setblocking(False)
        bound_port: int = listener.getsockname()[1]
        wake_r, wake_w = socket.socketpair()
        thread = threading.Thread(
            target=self._tcp_loop, args=(listener, wake_r), name="module-emulator-tcp", daemon=True
        )

        def close() -> None:
            with contextlib.suppress(OSError):
                wake_w.send(b"x")
            thread.join(5)
            wake_w.close()

        self._start(thread, close)
        return thread, bound_port

    def _tcp_loop(self, listener: socket.socket, wake: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        selector.register(wake, selectors.EVENT_READ)
        client: socket.socket | None = None
        decoder = sm.FrameDecoder(self.framing, from_module=False)

        def drop_client() -> None:
            nonlocal client
            if client is not None:
                selector.unregister(client)
                client.close()
                client = None

        try:
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.2):
                    if key.fileobj is wake:
                        return
                    if key.fileobj is listener:
                        with contextlib.suppress(BlockingIOError):
                            new, _addr = listener.accept()
                            drop_client()
                            new.setblocking(True)
                            client = new
                            decoder.reset()
                            selector.register(client, selectors.EVENT_READ)
                    elif client is not None and key.fileobj is client:
                        try:
                            data = client.recv(4096)
                        except OSError:
                            data = b""
                        if not data:
                            drop_client()
                            continue
                        try:
                            self.handle(decoder, data, client.sendall)
                        except OSError:
                            drop_client()
        finally:
            drop_client()
            selector.close()
            listener.close()
            wake.close()

    def serve_serial(self, url_or_path: str, baudrate: int = 115200) -> threading.Thread:
        """Serve on a serial port, e.g. the module side of a socat pty pair."""
        port = serial.serial_for_url(url_or_path, baudrate=baudrate, timeout=0.05)
        thread = threading.Thread(
            target=self._serial_loop, args=(port,), name="module-emulator-serial", daemon=True
        )
        self._start(thread, lambda: thread.join(5))
        return thread

    def _serial_loop(self, port: Any) -> None:
        decoder = sm.FrameDecoder(self.framing, from_module=False)

        def write(data: bytes) -> None:
            port.write(data)
            port.flush()

        try:
            while not self._stop.is_set():
                data = port.read(max(1, port.in_waiting))
                if data:
                    self.handle(decoder, data, write)
        except (OSError, serial.SerialException, termios.error):
            pass  # the other end of the pty went away
        finally:
            port.close()

    def _start(self, thread: threading.Thread, close: Callable[[], None]) -> None:
        self._stop.clear()
        self._threads.append(thread)
        self._closers.append(close)
        thread.start()

    def stop(self) -> None:
        """Stop every transport and close its sockets/ports; the emulator may be served again."""
        self._stop.set()
        for close in self._closers:
            close()
        for thread in self._threads:
            thread.join(5)
        self._closers.clear()
        self._threads.clear()
