"""ISO 7816-4 command/response APDUs, the status-word table, and response checks.

Pure: no I/O. Card-product machines build :class:`Command` objects and check :class:`Response`
objects with :func:`require`, naming the party (card or SAM) so that errors say who failed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.errors import (
    CardProtocolError,
    CardStatusError,
    SamProtocolError,
    SamStatusError,
)

SW_OK = 0x9000

# Status words of purse cards and PSAMs (cpu-purse.md §3.11, §4; ISO 7816-4).
STATUS_WORDS: dict[int, str] = {
    0x9000: "OK",
    0x6281: "part of returned data may be corrupted",
    0x6282: "end of data before Le",
    0x6283: "selected file invalidated (application locked)",
    0x6284: "FCI not formatted (application locked)",
    0x6300: "operation failed",
    0x6581: "EEPROM write failed",
    0x6700: "wrong length",
    0x6881: "logical channel not supported",
    0x6982: "security status not satisfied",
    0x6983: "key locked",
    0x6984: "random number invalid",
    0x6985: "conditions of use not satisfied",
    0x6986: "command not allowed",
    0x6988: "MAC incorrect",
    0x6A80: "incorrect data field",
    0x6A81: "function not supported / card locked",
    0x6A82: "file not found",
    0x6A83: "record not found",
    0x6A84: "not enough memory",
    0x6A86: "wrong P1/P2",
    0x6A88: "key not found",
    0x6B00: "wrong P1/P2",
    0x6D00: "instruction not supported",
    0x6E00: "class not supported",
    0x6F00: "no precise diagnosis",
    0x9302: "MAC error",
    0x9303: "application permanently locked",
    0x9401: "insufficient balance",
    0x9402: "counter at maximum / value out of range",
    0x9403: "key index not found",
    0x9406: "required MAC not available",
}

# SELECT answers that terminals treat as "application locked / blacklisted" (cpu-purse.md §2.1).
LOCKED_SELECT_SW = frozenset({0x6283, 0x6284, 0x9303})


def describe_sw(sw: int) -> str:
    """Human meaning of a status word, including the parametrised 61xx / 6Cxx / 63Cx forms."""
    if sw in STATUS_WORDS:
        return STATUS_WORDS[sw]
    if sw >> 8 == 0x61:
        return f"{sw & 0xFF} bytes still available"
    if sw >> 8 == 0x6C:
        return f"wrong Le, exact length {sw & 0xFF}"
    if sw & 0xFFF0 == 0x63C0:
        return f"verification failed, {sw & 0x0F} tries left"
    return "unknown status word"


@dataclass(frozen=True, slots=True)
class Command:
    """A short command APDU. ``name`` is the spec's name of the command, used in errors and logs."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    le: int | None = None
    name: str = ""

    def to_bytes(self) -> bytes:
        if len(self.data) > 255:
            raise ValueError(f"{self.label}: data of {len(self.data)} bytes needs an extended APDU")
        out = bytes((self.cla, self.ins, self.p1, self.p2))
        if self.data:
            out += bytes((len(self.data),)) + self.data
        if self.le is not None:
            out += bytes((self.le & 0xFF,))  # Le 256 is encoded 00
        return out

    @property
    def label(self) -> str:
        return self.name or f"{self.cla:02X} {self.ins:02X} {self.p1:02X} {self.p2:02X}"

    @classmethod
    def from_bytes(cls, raw: bytes) -> Command:
        """Parse a short APDU (cases 1-4). Raises ``ValueError`` on a malformed one."""
        if len(raw) < 4:
            raise ValueError("APDU shorter than its header")
        cla, ins, p1, p2 = raw[0], raw[1], raw[2], raw[3]
        body = raw[4:]
        if not body:
            return cls(cla, ins, p1, p2)
        if len(body) == 1:
            return cls(cla, ins, p1, p2, le=body[0] or 256)
        lc = body[0]
        if lc == 0 or len(body) not in (1 + lc, 2 + lc):
            raise ValueError(f"Lc {lc} does not match a body of {len(body)} bytes")
        data = bytes(body[1 : 1 + lc])
        le = (body[1 + lc] or 256) if len(body) == 2 + lc else None
        return cls(cla, ins, p1, p2, data, le)


@dataclass(frozen=True, slots=True)
class Response:
    """A response APDU: data and status word."""

    data: bytes
    sw: int

    @classmethod
    def from_bytes(cls, raw: bytes) -> Response:
        """Split raw bytes; the caller translates ``ValueError`` into its party's protocol error."""
        if len(raw) < 2:
            raise ValueError(f"response of {len(raw)} bytes has no status word")
        return cls(bytes(raw[:-2]), (raw[-2] << 8) | raw[-1])

    def to_bytes(self) -> bytes:
        return self.data + self.sw.to_bytes(2, "big")

    @property
    def ok(self) -> bool:
        return self.sw == SW_OK


class Party(enum.Enum):
    """Who answered: selects the error classes so that errors say who failed."""

    CARD = "card"
    SAM = "sam"


def parse_response(raw: bytes, command: Command, party: Party) -> Response:
    """Turn raw response bytes into a :class:`Response`, or the party's protocol error."""
    try:
        return Response.from_bytes(raw)
    except ValueError as exc:
        raise _protocol_error(party, f"{command.label}: {exc}") from exc


def require(
    response: Response,
    command: Command,
    party: Party,
    *,
    length: int | None = None,
    min_length: int | None = None,
    ok_sws: frozenset[int] = frozenset({SW_OK}),
) -> bytes:
    """Check a response's status word and data length; return its data.

    A status word outside ``ok_sws`` raises the party's status error; a data length other than
    ``length`` (or under ``min_length``) raises the party's protocol error.
    """
    if response.sw not in ok_sws:
        cls = CardStatusError if party is Party.CARD else SamStatusError
        raise cls(command.label, response.sw, describe_sw(response.sw))
    if length is not None and len(response.data) != length:
        raise _protocol_error(
            party, f"{command.label}: expected {length} data bytes, got {len(response.data)}"
        )
    if min_length is not None and len(response.data) < min_length:
        raise _protocol_error(
            party,
            f"{command.label}: expected at least {min_length} data bytes, got {len(response.data)}",
        )
    return response.data


def _protocol_error(party: Party, message: str) -> CardProtocolError | SamProtocolError:
    return CardProtocolError(message) if party is Party.CARD else SamProtocolError(message)
