"""The console's line discipline, sans-I/O: bytes from a serial line in, lines and echo out.

A terminal program (minicom, picocom, screen) sends CR, LF or CRLF at the end of a line; all
three end one line (a LF right after a CR is the same line end). Backspace (0x08) and DEL (0x7F)
erase the last character, Ctrl-U the whole line, Ctrl-C abandons it (and any paste). Tab counts
as a space. Any other control byte, an escape sequence (arrow keys) or bytes that are not UTF-8
make the line *noise*: it is reported as such and never run. A line longer than ``max_line``
bytes is *overlong*: the rest of it is dropped up to its end and it is never run either, so
binary garbage on the line costs at most ``max_line`` bytes of memory.

Echo (for terminal programs that do not echo locally): printable input is echoed, backspace as
``BS SP BS``, a line end as CRLF. A secret line (a password) echoes only its line end.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

CR, LF, BS, DEL, TAB, CTRL_C, CTRL_U = 0x0D, 0x0A, 0x08, 0x7F, 0x09, 0x03, 0x15
DEFAULT_MAX_LINE = 1024


class LineKind(Enum):
    LINE = "line"  # a complete, clean line: ``text``
    NOISE = "noise"  # control bytes or bytes that are not UTF-8: ``text`` says what
    OVERLONG = "overlong"  # longer than the bound; its bytes were dropped
    INTERRUPT = "interrupt"  # Ctrl-C


@dataclass(frozen=True, slots=True)
class LineEvent:
    kind: LineKind
    text: str = ""


@dataclass(slots=True)
class Fed:
    """What one :meth:`LineAssembler.feed` made of the input: at most one event (the caller
    feeds the rest, ``data[consumed:]``, after acting on it: a password prompt turns echo off
    for the next line), and the echo of the bytes consumed."""

    event: LineEvent | None
    echo: bytes
    consumed: int


class LineAssembler:
    """Turns a byte stream into :class:`LineEvent` s. Pure: no I/O, no clock."""

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self.echo = True
        self.secret = False
        self._buf = bytearray()
        self._noise: str | None = None
        self._overlong = False
        self._after_cr = False

    def reset(self) -> None:
        """Forget the line in progress (a disconnect)."""
        self._buf.clear()
        self._noise = None
        self._overlong = False
        self._after_cr = False

    def feed(self, data: bytes) -> Fed:
        echo = bytearray()
        show = self.echo and not self.secret
        for index, byte in enumerate(data):
            after_cr, self._after_cr = self._after_cr, False
            if byte in (CR, LF):
                if byte == LF and after_cr:
                    continue
                self._after_cr = byte == CR
                if self.echo:
                    echo += b"\r\n"
                return Fed(self._finish(), bytes(echo), index + 1)
            if byte == CTRL_C:
                self.reset()
                if self.echo:
                    echo += b"^C\r\n"
                return Fed(LineEvent(LineKind.INTERRUPT), bytes(echo), index + 1)
            if self._overlong:
                continue
            if byte in (BS, DEL):
                if self._buf:
                    while self._buf and (self._buf[-1] & 0xC0) == 0x80:
                        self._buf.pop()  # a UTF-8 continuation byte: erase the whole character
                    if self._buf:
                        self._buf.pop()
                    if show:
                        echo += b"\b \b"
                continue
            if byte == CTRL_U:
                if show:
                    echo += b"\b \b" * len(self._buf.decode("utf-8", "replace"))
                self._buf.clear()
                continue
            if byte < 0x20 and byte != TAB:
                if self._noise is None:
                    self._noise = f"control byte 0x{byte:02X}"
                continue
            if len(self._buf) >= self.max_line:
                self._overlong = True
                self._buf.clear()
                continue
            self._buf.append(0x20 if byte == TAB else byte)
            if show:
                echo.append(0x20 if byte == TAB else byte)
        return Fed(None, bytes(echo), len(data))

    def _finish(self) -> LineEvent:
        raw = bytes(self._buf)
        noise, overlong = self._noise, self._overlong
        self._buf.clear()
        self._noise = None
        self._overlong = False
        if overlong:
            return LineEvent(LineKind.OVERLONG, f"line longer than {self.max_line} bytes")
        if noise is not None:
            return LineEvent(LineKind.NOISE, noise)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return LineEvent(LineKind.NOISE, f"bytes that are not UTF-8 at column {exc.start + 1}")
        if any(not ch.isprintable() for ch in text):
            return LineEvent(LineKind.NOISE, "unprintable characters")
        return LineEvent(LineKind.LINE, text)
