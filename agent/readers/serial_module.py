"""Serial (UART) contactless reader modules with PSAM slots, as found in bus validators.

m1-purse-and-readers.md §4c: every vendor frames its UART protocol differently, so the framing is
data (:class:`Framing`, loaded from the firmware profile) and the codec is sans-I/O
(:class:`FrameDecoder`, :func:`encode_request`, :func:`encode_response`). The I/O glue is
:class:`SerialModuleLink`, shared by the card reader (:class:`SerialModuleReader`) and the SAM
slots (:class:`SerialModuleSamSlot`) of one module.

Wire format (``‖`` = concatenation)::

    host -> module:  START ‖ LEN ‖ CMD ‖ SEQ ‖ DATA ‖ CHK ‖ END            LEN = |CMD SEQ DATA|
    module -> host:  START ‖ LEN ‖ CMD ‖ SEQ ‖ STATUS ‖ DATA ‖ CHK ‖ END   LEN = |CMD .. DATA|

``CMD`` and ``SEQ`` are echoed by the module; ``SEQ`` lets the host discard a late answer to an
earlier request that timed out. ``CHK`` is one byte (XOR or 8-bit additive sum) over either the
whole frame up to the checksum (``all``) or over the LEN-counted part only (``body``).
"""

from __future__ import annotations

import contextlib
import enum
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import serial
import structlog

from agent.errors import (
    CardRemovedError,
    ConfigurationError,
    ReaderError,
    ReaderTimeout,
    SamMuteError,
)
from agent.readers.base import CardPresence, CardTechnology
from agent.readers.storage import AuthenticationFailed, KeyType, StorageOperationRefused, ValueOp

_log = structlog.get_logger(__name__)

# ---------------------------------------------------------------------------------------------
# Commands and statuses
# ---------------------------------------------------------------------------------------------

GET_VERSION = 0x01
FIND_CARD = 0x10  # -> tech(1) ‖ SAK(1) ‖ UID len(1) ‖ UID ‖ ATS; status 0x80 = no card,
#                    0x82 = several cards: count(1) ‖ [the answer above for one of them]
CARD_APDU = 0x11  # APDU -> response APDU; status 0xAF = card silent / left
CARD_PRESENT = 0x12  # status 0x00 present (any card in the field), 0x80 field empty
CARD_HALT = 0x13
SAM_RESET = 0x20  # slot(1) -> ATR; status 0xE1 = SAM error / absent
SAM_APDU = 0x21  # slot(1) ‖ APDU -> response APDU; status 0xE1 = SAM mute
FEEDBACK = 0x30  # ok(1) ‖ UTF-8 text: beep / LED / display
# 0x40..0x4F: MIFARE Classic storage-card commands (m1-purse-and-readers.md §1.4, §4c). Block
# numbers are one byte, value operands 4 bytes LSB first as on the air.
M1_AUTH = 0x40  # block(1) ‖ key type(1: 60 = A, 61 = B) ‖ key(6); status 0x83 = refused
M1_READ = 0x41  # block(1) -> 16 bytes; status 0x84 = refused
M1_WRITE = 0x42  # block(1) ‖ data(16); status 0x85 = refused, 0x86 = interrupted
M1_INCREMENT = 0x43  # block(1) ‖ value(4) -> transfer buffer
M1_DECREMENT = 0x44  # block(1) ‖ value(4) -> transfer buffer
M1_RESTORE = 0x45  # block(1) -> transfer buffer
M1_TRANSFER = 0x46  # block(1): program the transfer buffer
M1_VALUE_TRANSFER = 0x47  # op(1: 01 inc, 02 dec, 03 restore) ‖ block(1) ‖ value(4) ‖ dest(1)
M1_FIRST, M1_LAST = 0x40, 0x4F

STATUS_OK = 0x00
STATUS_NO_CARD = 0x80
STATUS_SEVERAL_CARDS = 0x82  # this protocol's: collision at anticollision, several cards
STATUS_CARD_TIMEOUT = 0xAF
STATUS_AUTH_ERROR = 0x83
STATUS_READ_ERROR = 0x84
STATUS_WRITE_ERROR = 0x85
STATUS_WRITE_INTERRUPTED = 0x86
STATUS_SAM_ERROR = 0xE1
STATUS_COMMAND_ERROR = 0xE2
STATUS_PARAMETER_ERROR = 0xE3
STATUS_CHECKSUM_ERROR = 0xE4
STATUS_LINE_TIMEOUT = 0xE5

# The de facto reader-module status table, m1-purse-and-readers.md §3.6.
STATUS_MEANINGS: dict[int, str] = {
    0x00: "OK",
    0x80: "no card",
    0x81: "select error",
    0x82: "several cards in the field",
    0x83: "authentication error",
    0x84: "read error",
    0x85: "write error",
    0x86: "write interrupted",
    0x90: "not a card of this system",
    0x91: "expired",
    0x92: "city/application code error",
    0x93: "illegal card",
    0x94: "blacklisted",
    0x95: "insufficient balance",
    0x96: "balance over limit",
    0x97: "purse not enabled",
    0x98: "purse stopped",
    0x99: "purse primary damaged",
    0x9F: "public-info area damaged",
    0xAF: "card timeout",
    0xB0: "transaction interrupted midway",
    0xB1: "transaction interrupted/failed",
    0xB2: "previous step not executed/failed",
    0xC1: "online load refused",
    0xCF: "transaction timeout",
    0xE0: "MIFARE hardware init error",
    0xE1: "SAM hardware init error",
    0xE2: "command error",
    0xE3: "parameter error",
    0xE4: "checksum error",
    0xE5: "line timeout",
}


def describe_status(status: int) -> str:
    return f"0x{status:02X} ({STATUS_MEANINGS.get(status, 'unknown status')})"


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """What the link needs to know about a command.

    ``idempotent`` commands may be sent again after a corrupted exchange; ``secret`` commands
    never have their data bytes logged.
    """

    code: int
    name: str
    idempotent: bool = False
    secret: bool = False


COMMANDS: dict[int, CommandSpec] = {
    spec.code: spec
    for spec in (
        CommandSpec(GET_VERSION, "GET_VERSION", idempotent=True),
        CommandSpec(FIND_CARD, "FIND_CARD", idempotent=True),
        CommandSpec(CARD_APDU, "CARD_APDU"),
        CommandSpec(CARD_PRESENT, "CARD_PRESENT", idempotent=True),
        CommandSpec(CARD_HALT, "CARD_HALT"),
        CommandSpec(SAM_RESET, "SAM_RESET", secret=True),
        CommandSpec(SAM_APDU, "SAM_APDU", secret=True),
        CommandSpec(FEEDBACK, "FEEDBACK"),
        CommandSpec(M1_AUTH, "M1_AUTH", secret=True),
        CommandSpec(M1_READ, "M1_READ", idempotent=True),
        CommandSpec(M1_WRITE, "M1_WRITE"),
        CommandSpec(M1_INCREMENT, "M1_INCREMENT"),
        CommandSpec(M1_DECREMENT, "M1_DECREMENT"),
        CommandSpec(M1_RESTORE, "M1_RESTORE"),
        CommandSpec(M1_TRANSFER, "M1_TRANSFER"),
        CommandSpec(M1_VALUE_TRANSFER, "M1_VALUE_TRANSFER"),
    )
}


def command_spec(cmd: int) -> CommandSpec:
    """The table entry for ``cmd``; an unlisted command is treated as non-idempotent."""
    return COMMANDS.get(cmd) or CommandSpec(cmd, f"CMD_{cmd:02X}")


# ---------------------------------------------------------------------------------------------
# Framing and codec (sans-I/O)
# ---------------------------------------------------------------------------------------------

LengthOrder = Literal["big", "little"]
ChecksumKind = Literal["xor", "sum8"]
ChecksumCovers = Literal["all", "body"]

_REQUEST_MIN_PAYLOAD = 2  # CMD SEQ
_RESPONSE_MIN_PAYLOAD = 3  # CMD SEQ STATUS


@dataclass(frozen=True)
class Framing:
    """One firmware's frame layout. Invalid values raise :class:`ConfigurationError`.

    ``max_payload`` bounds LEN; with a 1-byte length field the effective bound is at most 255
    (see :attr:`payload_limit`).
    """

    start: bytes = b"\x02"
    end: bytes = b"\x03"
    length_bytes: int = 2
    length_order: LengthOrder = "big"
    checksum: ChecksumKind = "xor"
    checksum_covers: ChecksumCovers = "all"
    max_payload: int = 1024

    def __post_init__(self) -> None:
        if not isinstance(self.start, bytes) or not 1 <= len(self.start) <= 8:
            raise ConfigurationError(f"framing.start must be 1..8 bytes, got {self.start!r}")
        if not isinstance(self.end, bytes) or len(self.end) > 8:
            raise ConfigurationError(f"framing.end must be 0..8 bytes, got {self.end!r}")
        if self.length_bytes not in (1, 2) or isinstance(self.length_bytes, bool):
            raise ConfigurationError(
                f"framing.length_bytes must be 1 or 2, not {self.length_bytes!r}"
            )
        if self.length_order not in ("big", "little"):
            raise ConfigurationError(
                f"framing.length_order must be 'big' or 'little', not {self.length_order!r}"
            )
        if self.checksum not in ("xor", "sum8"):
            raise ConfigurationError(
                f"framing.checksum must be 'xor' or 'sum8', not {self.checksum!r}"
            )
        if self.checksum_covers not in ("all", "body"):
            raise ConfigurationError(
                f"framing.checksum_covers must be 'all' or 'body', not {self.checksum_covers!r}"
            )
        if (
            not isinstance(self.max_payload, int)
            or isinstance(self.max_payload, bool)
            or self.max_payload < _RESPONSE_MIN_PAYLOAD
        ):
            raise ConfigurationError(
                f"framing.max_payload must be an integer >= {_RESPONSE_MIN_PAYLOAD}, "
                f"not {self.max_payload!r}"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Framing:
        """Build from a profile section. ``start``/``end`` may be bytes, hex text or byte lists."""
        known = {
            "start",
            "end",
            "length_bytes",
            "length_order",
            "checksum",
            "checksum_covers",
            "max_payload",
        }
        unknown = set(values) - known
        if unknown:
            raise ConfigurationError(f"framing: unknown keys {sorted(unknown)}")
        kwargs: dict[str, Any] = dict(values)
        for key in ("start", "end"):
            if key in kwargs:
                kwargs[key] = _parse_bytes(f"framing.{key}", kwargs[key])
        return cls(**kwargs)

    @property
    def payload_limit(self) -> int:
        return min(self.max_payload, (1 << (8 * self.length_bytes)) - 1)

    @property
    def max_frame_size(self) -> int:
        return len(self.start) + self.length_bytes + self.payload_limit + 1 + len(self.end)

    def checksum_of(self, covered: bytes | bytearray | memoryview) -> int:
        if self.checksum == "sum8":
            return sum(covered) & 0xFF
        result = 0
        for byte in covered:
            result ^= byte
        return result


DEFAULT_FRAMING = Framing()


def _parse_bytes(label: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        text = value.replace(" ", "").replace(":", "")
        text = text.removeprefix("0x").removeprefix("0X")
        try:
            return bytes.fromhex(text)
        except ValueError as exc:
            raise ConfigurationError(f"{label}: {value!r} is not hex") from exc
    if isinstance(value, list | tuple) and all(
        isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in value
    ):
        return bytes(value)
    raise ConfigurationError(f"{label}: expected bytes, hex text or a list of bytes, not {value!r}")


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame. ``status`` is ``None`` for host->module frames."""

    cmd: int
    seq: int
    data: bytes
    status: int | None = None


class FrameErrorKind(enum.Enum):
    NOISE = "noise"  # bytes before a start sequence, or an abandoned incomplete frame
    BAD_LENGTH = "bad-length"  # LEN below the minimum or above the payload limit
    BAD_END = "bad-end"
    BAD_CHECKSUM = "bad-checksum"


@dataclass(frozen=True, slots=True)
class FrameError:
    """Something the decoder skipped. Returned, never raised."""

    kind: FrameErrorKind
    detail: str
    dropped: int  # bytes discarded from the stream


Decoded = Frame | FrameError


def _encode(framing: Framing, payload: bytes) -> bytes:
    if len(payload) > framing.payload_limit:
        raise ValueError(
            f"payload of {len(payload)} bytes exceeds the limit of {framing.payload_limit}"
        )
    head = framing.start + len(payload).to_bytes(framing.length_bytes, framing.length_order)
    covered = head + payload if framing.checksum_covers == "all" else payload
    return head + payload + bytes((framing.checksum_of(covered),)) + framing.end


def encode_request(
    cmd: int, seq: int, data: bytes = b"", *, framing: Framing = DEFAULT_FRAMING
) -> bytes:
    """Host->module frame. Raises ``ValueError`` if the data does not fit the framing."""
    return _encode(framing, bytes((cmd, seq)) + data)


def encode_response(
    cmd: int, seq: int, status: int, data: bytes = b"", *, framing: Framing = DEFAULT_FRAMING
) -> bytes:
    """Module->host frame. Raises ``ValueError`` if the data does not fit the framing."""
    return _encode(framing, bytes((cmd, seq, status)) + data)


class FrameDecoder:
    """Resynchronising stream parser for one direction of the link.

    ``feed`` returns complete frames and :class:`FrameError` items in stream order; it never
    raises on any input. An incomplete frame stays buffered until more bytes arrive or
    :meth:`reset`; the buffer never holds more than one maximal frame between calls.
    """

    def __init__(self, framing: Framing = DEFAULT_FRAMING, *, from_module: bool = True) -> None:
        self.framing = framing
        self.from_module = from_module
        self._min_payload = _RESPONSE_MIN_PAYLOAD if from_module else _REQUEST_MIN_PAYLOAD
        self._buf = bytearray()
        self._fresh = 0  # where the bytes not yet seen by a failed look-ahead begin

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def reset(self) -> None:
        self._buf.clear()
        self._fresh = 0

    def wanted(self) -> int:
        """How many more bytes would complete the frame at the head of the buffer (>= 1).

        A read-size hint, so that a link can read a frame in one or two calls instead of one
        byte at a time; reading fewer or more bytes than this is always safe.
        """
        f, buf = self.framing, self._buf
        head = len(f.start) + f.length_bytes
        minimum = head + self._min_payload + 1 + len(f.end)
        if len(buf) < head or not buf.startswith(f.start):
            return max(1, minimum - len(buf))
        length = int.from_bytes(buf[len(f.start) : head], f.length_order)
        if not self._min_payload <= length <= f.payload_limit:
            return 1
        return max(1, head + length + 1 + len(f.end) - len(buf))

    def feed(self, data: bytes) -> list[Decoded]:
        self._buf += data
        out: list[Decoded] = []
        while (item := self._step()) is not None:
            out.append(item)
        self._fresh = len(self._buf)
        return out

    def _step(self) -> Decoded | None:
        buf, start = self._buf, self.framing.start
        at = buf.find(start)
        if at < 0:
            # Keep a tail that may be the beginning of a split start sequence.
            keep = next(
                (n for n in range(min(len(start) - 1, len(buf)), 0, -1) if buf.endswith(start[:n])),
                0,
            )
            return self._drop(len(buf) - keep, FrameErrorKind.NOISE, "no start sequence")
        if at > 0:
            return self._drop(at, FrameErrorKind.NOISE, "bytes before a start sequence")
        item, size = self._parse_at(0)
        if isinstance(item, Frame):
            self._consume(size)
            return item
        if isinstance(item, FrameError):
            # Drop one byte only: the real start may lie inside what looked like this frame.
            self._consume(1)
            return item
        # Incomplete. If a complete frame follows, this was a false start inside noise. A new
        # complete frame needs a new end sequence, so only look when one has arrived.
        end = self.framing.end
        if end and buf.find(end, max(0, self._fresh - len(end) + 1)) < 0:
            return None
        later = buf.find(start, 1)
        while later >= 0:
            if isinstance(self._parse_at(later)[0], Frame):
                return self._drop(later, FrameErrorKind.NOISE, "false start before a frame")
            later = buf.find(start, later + 1)
        return None

    def _consume(self, count: int) -> None:
        del self._buf[:count]
        self._fresh = max(0, self._fresh - count)

    def _drop(self, count: int, kind: FrameErrorKind, detail: str) -> FrameError | None:
        if count <= 0:
            return None
        self._consume(count)
        return FrameError(kind, f"{detail}: dropped {count} bytes", count)

    def _parse_at(self, pos: int) -> tuple[Decoded | None, int]:
        """The candidate at ``pos``: (frame, size), (error, 1), or (None, 0) while incomplete."""
        f, buf = self.framing, self._buf
        head_end = pos + len(f.start) + f.length_bytes
        if len(buf) < head_end:
            return None, 0
        length = int.from_bytes(buf[pos + len(f.start) : head_end], f.length_order)
        if not self._min_payload <= length <= f.payload_limit:
            return FrameError(FrameErrorKind.BAD_LENGTH, f"LEN {length} out of range", 1), 1
        chk_at = head_end + length
        total = chk_at + 1 + len(f.end) - pos
        if len(buf) < pos + total:
            return None, 0
        if buf[chk_at + 1 : pos + total] != f.end:
            return FrameError(FrameErrorKind.BAD_END, "end sequence missing", 1), 1
        covered = buf[pos:chk_at] if f.checksum_covers == "all" else buf[head_end:chk_at]
        expected = f.checksum_of(covered)
        if buf[chk_at] != expected:
            detail = f"checksum {buf[chk_at]:02X}, expected {expected:02X}"
            return FrameError(FrameErrorKind.BAD_CHECKSUM, detail, 1), 1
        payload = bytes(buf[head_end:chk_at])
        if self.from_module:
            return Frame(payload[0], payload[1], payload[3:], payload[2]), total
        return Frame(payload[0], payload[1], payload[2:]), total


# ---------------------------------------------------------------------------------------------
# The link: one pyserial port, one request at a time
# ---------------------------------------------------------------------------------------------

# pyserial raises SerialException (an OSError), plain OSError, or termios.error on a dead tty.
_PORT_ERRORS: tuple[type[Exception], ...] = (OSError, serial.SerialException)
if sys.platform != "win32":
    import termios

    _PORT_ERRORS = (*_PORT_ERRORS, termios.error)

_CORRUPT_KINDS = frozenset({FrameErrorKind.BAD_CHECKSUM, FrameErrorKind.BAD_END})
_RETRYABLE_STATUSES = frozenset({STATUS_CHECKSUM_ERROR, STATUS_LINE_TIMEOUT})
_LINK_STATUSES = frozenset(
    {STATUS_COMMAND_ERROR, STATUS_PARAMETER_ERROR, STATUS_CHECKSUM_ERROR, STATUS_LINE_TIMEOUT}
)


class _DamagedAnswerError(Exception):
    """Internal: the answer was damaged on the line (bad checksum / end, or module said E4/E5)."""


class SerialModuleLink:
    """The UART link to one reader module, shared by its card reader and SAM slots.

    ``url`` is anything :func:`serial.serial_for_url` opens: ``/dev/ttyS5``, a pty path,
    ``socket://127.0.0.1:7777``. Requests are serialised by a lock. After a link fault the port
    is re-opened by the next request (an I/O error closes it at once; a timeout or a damaged
    answer closes it then), so a replugged or restarted module is picked up again.

    Idempotent commands are re-sent up to ``retries`` times after a damaged answer or a module
    checksum/line-timeout status; other commands never are. A module that stays silent is not
    retried: ``timeout`` is the whole budget for the request.
    """

    def __init__(
        self,
        url: str,
        *,
        framing: Framing = DEFAULT_FRAMING,
        baudrate: int = 115200,
        timeout: float = 1.0,
        command_timeouts: Mapping[int, float] | None = None,
        retries: int = 2,
        quiet_gap: float = 0.05,
    ) -> None:
        timeouts = [timeout, *(command_timeouts or {}).values()]
        if any(not t > 0 for t in timeouts) or not quiet_gap > 0:
            raise ConfigurationError(f"{url}: timeouts must be positive")
        if baudrate <= 0 or retries < 0:
            raise ConfigurationError(f"{url}: bad baudrate {baudrate} or retries {retries}")
        self.url = url
        self.framing = framing
        self.baudrate = baudrate
        self.timeout = timeout
        self.command_timeouts = dict(command_timeouts or {})
        self.retries = retries
        self.quiet_gap = quiet_gap
        self._decoder = FrameDecoder(framing, from_module=True)
        self._lock = threading.Lock()
        self._port: Any = None
        self._stale = False
        self._seq = 0
        self._users = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"<SerialModuleLink {self.url}>"

    def acquire(self) -> None:
        """Register a user (reader or SAM slot); :meth:`release` closes after the last one."""
        with self._lock:
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users = max(0, self._users - 1)
            last = self._users == 0
        if last:
            self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_port()

    def request(self, cmd: int, data: bytes = b"", *, timeout: float | None = None) -> Frame:
        """Send one command and return the module's answer (``status`` is set).

        Statuses E2..E5 raise :class:`ReaderError`; other statuses are the caller's to judge.
        """
        spec = command_spec(cmd)
        budget = timeout or self.command_timeouts.get(cmd, self.timeout)
        if len(data) + _REQUEST_MIN_PAYLOAD > self.framing.payload_limit:
            raise ReaderError(
                f"{self.url}: {spec.name} data of {len(data)} bytes exceeds the module's "
                f"payload limit of {self.framing.payload_limit}"
            )
        attempts = 1 + (self.retries if spec.idempotent else 0)
        with self._lock:
            if self._closed:
                raise ReaderError(f"{self.url}: link is closed")
            for attempt in range(1, attempts + 1):
                try:
                    return self._exchange(spec, data, budget, attempt)
                except _DamagedAnswerError as exc:
                    if attempt < attempts:
                        _log.warning(
                            "module_retry",
                            port=self.url,
                            command=spec.name,
                            attempt=attempt,
                            reason=str(exc),
                        )
                        continue
                    self._stale = True
                    tried = f" after {attempts} attempts" if attempts > 1 else ""
                    raise ReaderError(f"{self.url}: {spec.name} failed{tried}: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _exchange(self, spec: CommandSpec, data: bytes, budget: float, attempt: int) -> Frame:
        self._seq = (self._seq + 1) & 0xFF
        seq = self._seq
        started = time.monotonic()
        try:
            port = self._open()
            port.reset_input_buffer()
            self._decoder.reset()
            port.write(encode_request(spec.code, seq, data, framing=self.framing))
            port.flush()
            reply = self._await_reply(port, spec, seq, budget, started + budget)
        except ReaderTimeout as exc:
            self._stale = True
            self._log_failure(spec, started, exc)
            raise
        except ReaderError as exc:  # could not open
            self._log_failure(spec, started, exc)
            raise
        except _PORT_ERRORS as exc:
            self._drop_port()
            self._log_failure(spec, started, exc)
            raise ReaderError(f"{self.url}: {spec.name}: {exc}") from exc
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        fields: dict[str, Any] = {}
        if not spec.secret:
            fields = {"tx": data.hex(), "rx": reply.data.hex()}
        _log.debug(
            "module_exchange",
            port=self.url,
            command=spec.name,
            seq=seq,
            status=f"{reply.status:02X}",
            ms=elapsed_ms,
            attempt=attempt,
            **fields,
        )
        status = cast(int, reply.status)
        if status in _RETRYABLE_STATUSES:
            raise _DamagedAnswerError(f"module reported {describe_status(status)}")
        if status in _LINK_STATUSES:
            raise ReaderError(
                f"{self.url}: module rejected {spec.name} with {describe_status(status)}"
            )
        return reply

    def _await_reply(
        self, port: Any, spec: CommandSpec, seq: int, budget: float, deadline: float
    ) -> Frame:
        damaged: str | None = None
        clean = True  # no noise or bad frame seen yet: the header's length can be trusted
        while (remaining := deadline - time.monotonic()) > 0:
            # Once a damaged frame was seen, wait only for the line to go quiet.
            port.timeout = min(remaining, self.quiet_gap) if damaged else remaining
            # On a clean line, read the frame in one or two calls; after noise, read what is
            # there (a false start's length must not make us wait for bytes that never come).
            size = self._decoder.wanted() if clean else max(1, port.in_waiting)
            chunk = port.read(size)
            if not chunk:
                if damaged:
                    break
                continue
            for item in self._decoder.feed(chunk):
                if isinstance(item, FrameError):
                    clean = False
                    if item.kind in _CORRUPT_KINDS:
                        damaged = damaged or item.detail
                    _log.debug("module_frame_error", port=self.url, kind=item.kind.value)
                elif item.cmd == spec.code and item.seq == seq and item.status is not None:
                    return item
                else:
                    _log.debug(
                        "module_stale_frame",
                        port=self.url,
                        command=command_spec(item.cmd).name,
                        seq=item.seq,
                        expected_seq=seq,
                    )
        if damaged:
            raise _DamagedAnswerError(f"damaged answer ({damaged})")
        raise ReaderTimeout(f"{self.url}: no answer to {spec.name} within {budget:g} s")

    def _log_failure(self, spec: CommandSpec, started: float, exc: Exception) -> None:
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        _log.debug(
            "module_exchange_failed",
            port=self.url,
            command=spec.name,
            ms=elapsed_ms,
            error=str(exc),
        )

    def _open(self) -> Any:
        if self._stale:
            self._stale = False
            self._drop_port()
        if self._port is None:
            try:
                self._port = serial.serial_for_url(
                    self.url,
                    baudrate=self.baudrate,
                    timeout=self.timeout,
                    write_timeout=self.timeout,
                )
            except ValueError as exc:
                raise ConfigurationError(f"{self.url}: cannot open: {exc}") from exc
            except _PORT_ERRORS as exc:
                raise ReaderError(f"{self.url}: cannot open: {exc}") from exc
            _log.debug("module_port_open", port=self.url)
        return self._port

    def _drop_port(self) -> None:
        port, self._port = self._port, None
        if port is None:
            return
        # pyserial's socket:// close() skips socket.close() when shutdown() fails (peer gone).
        sock = getattr(port, "_socket", None)
        with contextlib.suppress(*_PORT_ERRORS):
            port.close()
        if sock is not None:
            sock.close()


# ---------------------------------------------------------------------------------------------
# The seam implementations
# ---------------------------------------------------------------------------------------------

_TECHNOLOGIES = {0x01: CardTechnology.ISO_DEP, 0x02: CardTechnology.MIFARE_CLASSIC}


_VALUE_OPS: dict[str, int] = {"increment": 0x01, "decrement": 0x02, "restore": 0x03}


class SerialModuleReader:
    """The module's contactless field, as a :class:`agent.readers.base.CardReader` and, for
    MIFARE Classic cards, a :class:`agent.readers.storage.StorageCardReader` (commands
    0x40..0x47). Loaded keys stay in host memory and travel only inside M1_AUTH.

    Presence: the module runs anticollision itself. FIND_CARD answers 0x82 when it saw several
    cards (a collision), with their count and one card's data; that becomes
    ``CardPresence.cards_in_field`` (the presence guard refuses it before any APDU). The vendor
    protocols of m1-purse-and-readers.md §4c have no such status (their modules select one card
    and say nothing); a module that never sends 0x82 is read as one card. CARD_PRESENT is the
    module's own look at the field and is answered the same across a re-opened link, so a link
    that drops never reads as a removal (it raises :class:`ReaderError`); a module that was
    power-cycled meanwhile cannot say whether the card left in between.
    """

    def __init__(self, link: SerialModuleLink, *, poll_interval: float = 0.1) -> None:
        if not poll_interval > 0:
            raise ConfigurationError(f"{link.url}: poll_interval must be positive")
        self.link = link
        self.poll_interval = poll_interval
        self.name = f"serial-module {link.url}"
        self._closed = False
        self._m1_keys: dict[int, bytes] = {}
        link.acquire()

    def wait_for_card(self, timeout: float) -> CardPresence | None:
        deadline = time.monotonic() + timeout
        while True:
            reply = self.link.request(FIND_CARD)
            if reply.status == STATUS_OK:
                return self._presence(reply.data)
            if reply.status == STATUS_SEVERAL_CARDS:
                return self._crowd(reply.data)
            if reply.status != STATUS_NO_CARD:
                raise self._unexpected(reply)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(self.poll_interval, remaining))

    def transmit(self, apdu: bytes) -> bytes:
        reply = self.link.request(CARD_APDU, apdu)
        if reply.status == STATUS_OK:
            return reply.data
        if reply.status in (STATUS_CARD_TIMEOUT, STATUS_NO_CARD):
            status = describe_status(reply.status)
            raise CardRemovedError(f"{self.name}: card left or went silent ({status})")
        raise self._unexpected(reply)

    def wait_for_removal(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            reply = self.link.request(CARD_PRESENT)
            if reply.status == STATUS_NO_CARD:
                return True
            if reply.status != STATUS_OK:
                raise self._unexpected(reply)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(self.poll_interval, remaining))

    def feedback(self, ok: bool, text: str) -> None:
        room = self.link.framing.payload_limit - _REQUEST_MIN_PAYLOAD - 1
        encoded = text.encode("utf-8")[:room].decode("utf-8", "ignore").encode("utf-8")
        reply = self.link.request(FEEDBACK, bytes((1 if ok else 0,)) + encoded)
        if reply.status != STATUS_OK:
            raise self._unexpected(reply)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._m1_keys.clear()
            self.link.release()

    # -- StorageCardReader (MIFARE Classic) --------------------------------------------------

    def load_key(self, slot: int, key: bytes) -> None:
        if len(key) != 6:
            raise ReaderError(f"{self.name}: a MIFARE key is 6 bytes")
        self._m1_keys[slot] = bytes(key)

    def authenticate(self, block: int, key_type: KeyType, slot: int) -> None:
        key = self._m1_keys.get(slot)
        if key is None:
            raise ReaderError(f"{self.name}: key slot {slot} is empty")
        self._m1(M1_AUTH, "authenticate", block, bytes((block, key_type.value)) + key)

    def read_block(self, block: int) -> bytes:
        data = self._m1(M1_READ, "read", block, bytes((block,)))
        if len(data) != 16:
            raise ReaderError(f"{self.name}: M1_READ answered {len(data)} bytes, not 16")
        return data

    def write_block(self, block: int, data: bytes) -> None:
        if len(data) != 16:
            raise ReaderError(f"{self.name}: M1_WRITE takes 16 bytes")
        self._m1(M1_WRITE, "write", block, bytes((block,)) + bytes(data))

    def increment(self, block: int, value: int) -> None:
        self._m1(M1_INCREMENT, "increment", block, bytes((block,)) + _operand(value))

    def decrement(self, block: int, value: int) -> None:
        self._m1(M1_DECREMENT, "decrement", block, bytes((block,)) + _operand(value))

    def restore(self, block: int) -> None:
        self._m1(M1_RESTORE, "restore", block, bytes((block,)))

    def transfer(self, block: int) -> None:
        self._m1(M1_TRANSFER, "transfer", block, bytes((block,)))

    def value_transfer(self, op: ValueOp, block: int, value: int, dest: int) -> None:
        data = bytes((_VALUE_OPS[op], block)) + _operand(value) + bytes((dest,))
        self._m1(M1_VALUE_TRANSFER, op, block, data)

    def _m1(self, cmd: int, operation: str, block: int, data: bytes) -> bytes:
        if not 0 <= block <= 0xFF:
            raise ReaderError(f"{self.name}: block {block} out of range")
        reply = self.link.request(cmd, data)
        status = cast(int, reply.status)
        if status == STATUS_OK:
            return reply.data
        if status in (STATUS_CARD_TIMEOUT, STATUS_NO_CARD, STATUS_WRITE_INTERRUPTED):
            raise CardRemovedError(
                f"{self.name}: card left or went silent during {operation} of block {block} "
                f"({describe_status(status)})"
            )
        if status == STATUS_AUTH_ERROR:
            raise AuthenticationFailed(operation, block, describe_status(status), status)
        if status in (STATUS_READ_ERROR, STATUS_WRITE_ERROR):
            raise StorageOperationRefused(operation, block, describe_status(status), status)
        raise self._unexpected(reply)

    def _presence(self, data: bytes) -> CardPresence:
        if len(data) < 3 or data[2] == 0 or len(data) < 3 + data[2]:
            raise ReaderError(f"{self.name}: malformed FIND_CARD answer {data.hex()}")
        tech, sak, uid_len = data[0], data[1], data[2]
        return CardPresence(
            uid=data[3 : 3 + uid_len],
            technology=_TECHNOLOGIES.get(tech, CardTechnology.UNKNOWN),
            sak=sak,
            ats=data[3 + uid_len :],
        )

    def _crowd(self, data: bytes) -> CardPresence:
        """FIND_CARD status 0x82: count(1) ‖ optionally one card's FIND_CARD data."""
        count = max(2, data[0]) if data else 2
        if len(data) > 1:
            return replace(self._presence(data[1:]), cards_in_field=count)
        return CardPresence(b"", CardTechnology.UNKNOWN, cards_in_field=count)

    def _unexpected(self, reply: Frame) -> ReaderError:
        name = command_spec(reply.cmd).name
        return ReaderError(
            f"{self.name}: unexpected {describe_status(cast(int, reply.status))} to {name}"
        )


def _operand(value: int) -> bytes:
    if not 0 <= value <= 0x7FFFFFFF:
        raise ReaderError(f"value operand {value} out of range")
    return value.to_bytes(4, "little")


class SerialModuleSamSlot:
    """One PSAM contact slot of the module, as a :class:`agent.readers.base.SamSlot`."""

    def __init__(self, link: SerialModuleLink, slot: int) -> None:
        if not 0 <= slot <= 0xFF:
            raise ConfigurationError(f"{link.url}: SAM slot {slot} out of range 0..255")
        self.link = link
        self.slot = slot
        self.name = f"serial-module {link.url} SAM{slot}"
        self._closed = False
        link.acquire()

    def reset(self) -> bytes:
        return self._checked(self.link.request(SAM_RESET, bytes((self.slot,))))

    def transmit(self, apdu: bytes) -> bytes:
        return self._checked(self.link.request(SAM_APDU, bytes((self.slot,)) + apdu))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.link.release()

    def _checked(self, reply: Frame) -> bytes:
        status = cast(int, reply.status)
        if status == STATUS_OK:
            return reply.data
        name = command_spec(reply.cmd).name
        if status == STATUS_SAM_ERROR:
            raise SamMuteError(
                f"{self.name}: SAM did not answer {name} ({describe_status(status)})"
            )
        raise ReaderError(f"{self.name}: unexpected {describe_status(status)} to {name}")
