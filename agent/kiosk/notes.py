"""The cash seam: a note acceptor (纸币识别器) that reports the notes it takes in.

:class:`NoteAcceptor` is the one seam (enable / disable / next event); :class:`SerialNoteAcceptor`
drives a device over pyserial (a serial port, or ``socket://HOST:PORT`` for the simulated one in
``tests/fake_reader/note_acceptor.py``) with a line protocol, one ASCII line per event::

    device → kiosk   ESCROW <fen>     a note is being drawn in (not money yet)
                     STACKED <fen>    the note is in the cash box: accepted
                     REJECTED <fen>   the note was handed back
                     JAM              the note path is jammed
    kiosk → device   ENABLE | DISABLE

Anything else from the device is ``garbage`` (reported, never counted). Which note values exist
and what a note is worth is data (:data:`NOTE_VALUES`), not the device's word: a ``STACKED``
of an amount that is no note is garbage too. Timing (a note drawn in but never stacked) is the
service's: :class:`agent.kiosk.cash.CashDrawer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from agent.errors import AgentError

EventKind = Literal["escrow", "stacked", "rejected", "jam", "garbage"]
NOTE_VALUES = frozenset({100, 500, 1000, 2000, 5000, 10000})  # fen: 1, 5, 10, 20, 50, 100 yuan
MAX_LINE = 64


class NoteAcceptorError(AgentError):
    """The note acceptor itself failed (the link to it is gone)."""


@dataclass(frozen=True, slots=True)
class NoteEvent:
    kind: EventKind
    amount: int = 0
    raw: str = ""


class NoteAcceptor(Protocol):
    def enable(self) -> None: ...

    def disable(self) -> None: ...

    def next_event(self, timeout_s: float) -> NoteEvent | None:
        """The next event within ``timeout_s``, or ``None``."""
        ...

    def close(self) -> None: ...


def parse_line(raw: bytes) -> NoteEvent:
    """One line from the device as an event (untrusted: garbage is an event, never an error)."""
    text = raw.decode("ascii", "replace").strip()
    shown = text[:MAX_LINE]
    words = text.split()
    if words == ["JAM"]:
        return NoteEvent("jam", raw=shown)
    if len(words) == 2 and words[0] in ("ESCROW", "STACKED", "REJECTED") and words[1].isdigit():
        amount = int(words[1])
        if amount in NOTE_VALUES:
            kind: EventKind = words[0].lower()  # type: ignore[assignment]
            return NoteEvent(kind, amount, shown)
    return NoteEvent("garbage", raw=shown or repr(raw[:MAX_LINE]))


class SerialNoteAcceptor:
    """:class:`NoteAcceptor` over pyserial (``url``: a device path or ``socket://…``)."""

    def __init__(self, url: str) -> None:
        import serial  # noqa: PLC0415 - pyserial is imported where the device is opened

        self.url = url
        try:
            self._port: Any = serial.serial_for_url(url, timeout=0.1)
        except (OSError, ValueError, serial.SerialException) as exc:
            raise NoteAcceptorError(f"note acceptor {url}: cannot open: {exc}") from exc
        self._buffer = b""
        self._serial_error = serial.SerialException

    def _send(self, line: str) -> None:
        try:
            self._port.write(line.encode("ascii") + b"\n")
            self._port.flush()
        except (OSError, self._serial_error) as exc:
            raise NoteAcceptorError(f"note acceptor {self.url}: write failed: {exc}") from exc

    def enable(self) -> None:
        self._send("ENABLE")

    def disable(self) -> None:
        self._send("DISABLE")

    def next_event(self, timeout_s: float) -> NoteEvent | None:
        import time  # noqa: PLC0415

        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            if len(self._buffer) > 4 * MAX_LINE:  # no line end: the device talks nonsense
                raw, self._buffer = self._buffer, b""
                return NoteEvent("garbage", raw=repr(raw[:MAX_LINE]))
            if time.monotonic() >= deadline:
                return None
            try:
                chunk = self._port.read(256)
            except (OSError, self._serial_error) as exc:
                raise NoteAcceptorError(f"note acceptor {self.url}: read failed: {exc}") from exc
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return parse_line(line)

    def close(self) -> None:
        self._port.close()
