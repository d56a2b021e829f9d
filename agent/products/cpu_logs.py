"""Sans-I/O reading of a CPU purse card's own logs and writing of its trip record (issue 15).

* EF18 (SFI 0x18), the transaction log: cyclic, 10 records of 23 bytes, record 1 the newest
  (cpu-purse.md §2.3 EF18, read with ``00 B2 nn C4 17``, §3.9). Its date-time is dialect
  data (:class:`agent.profile.TimeEncoding`).
* The trip records: T-Union EF1E (cyclic, 30 x 48 bytes, ``00 B2 nn F4 00``) and the CJ/T 166
  CAPP record (EF17, identifier 01, ``00 B2 01 B8 00``), laid out as the dialect's
  :class:`agent.profile.TripLayout` says (field positions, line encoding, BCD date-time or
  binary seconds since 2000).

Steps yield READ RECORD commands and receive the answers, like :mod:`agent.products.cpu_purse`;
every answer is untrusted and a malformed record raises :class:`CardProtocolError` naming the
file and record.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Generator
from dataclasses import dataclass

from agent.apdu import Command, Party, Response, require
from agent.errors import CardProtocolError, ConfigurationError
from agent.products.trip_layout import FieldEncoding, TimeEncoding, TripLayout

Step = Generator[Command, Response, list[bytes]]

EPOCH_2000 = dt.datetime(2000, 1, 1)
EF18_SFI = 0x18
EF18_LENGTH = 23  # §2.3 EF18
EF18_RECORDS = 10
# READ RECORD past the last written record: 6A83 (record not found); a card without the file
# answers 6A82; some answer 6A86 / 6981 for an empty cyclic file (§3.11).
SW_NO_MORE = frozenset({0x6A83, 0x6A82, 0x6A86, 0x6981})


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One EF18 record (§2.3): the purse transaction as the card logged it."""

    counter: int  # EP online or offline sequence number, bytes 0..1
    overdraft: int  # bytes 2..4
    amount: int  # bytes 5..8, fen
    transaction_type: int  # byte 9 (§3.10: 02 load, 06 purchase, 09 compound purchase)
    terminal: str  # bytes 10..15, hex
    when: dt.datetime | None  # bytes 16..22; None: not written


@dataclass(frozen=True, slots=True)
class Trip:
    """The fields of a trip record, whichever dialect wrote it (absent fields: 0 / "")."""

    record_type: int = 0
    terminal: str = ""  # hex, as long as the layout's field
    industry: int = 0
    line: int = 0
    station: int = 0
    vehicle: int = 0
    amount: int = 0
    balance: int = 0
    when: dt.datetime = EPOCH_2000
    city: str = ""  # BCD city code, 4 digits
    institution: str = ""  # the institution code, hex, without its FF padding
    # A one-record layout's transfer origin (TripLayout.transfer_at): the line the boarding
    # this record opened may be a transfer from (None: none, or a layout without the field).
    transfer_from: int | None = None


def read_record_command(sfi: int, number: int, le: int, *, by_identifier: bool = False) -> Command:
    """READ RECORD (§3.9): P2 = SFI<<3 | 100 (record number) or | 000 (record identifier)."""
    p2 = (sfi << 3) | (0x00 if by_identifier else 0x04)
    return Command(0x00, 0xB2, number, p2, le=le, name=f"READ RECORD EF{sfi:02X} #{number}")


def read_records(sfi: int, count: int, le: int, *, by_identifier: int = 0) -> Step:
    """Records 1..count of a record file (newest first), stopping at the first one the card
    says it has not got (:data:`SW_NO_MORE`). ``by_identifier``: read that one record by
    its identifier instead (CJ/T 166 CAPP)."""
    records: list[bytes] = []
    numbers = [by_identifier] if by_identifier else range(1, count + 1)
    for number in numbers:
        command = read_record_command(sfi, number, le, by_identifier=bool(by_identifier))
        response = yield command
        if response.sw in SW_NO_MORE:
            break
        records.append(require(response, command, Party.CARD))
    return records


def read_transactions(count: int = EF18_RECORDS) -> Step:
    """The raw EF18 records, newest first (``00 B2 nn C4 17``)."""
    return read_records(EF18_SFI, count, EF18_LENGTH)


def read_trips(layout: TripLayout) -> Step:
    """The raw trip records of a layout, newest first."""
    ident = layout.identifier if layout.by_identifier else 0
    return read_records(layout.sfi, layout.records, 0x00, by_identifier=ident)


# --- time ---------------------------------------------------------------------------------


def _bcd_datetime(raw: bytes, what: str) -> dt.datetime:
    text = raw.hex()
    if not text.isdigit():
        raise CardProtocolError(f"{what}: date-time {raw.hex().upper()} is not BCD")
    try:
        return dt.datetime(
            int(text[0:4]), int(text[4:6]), int(text[6:8]),
            int(text[8:10]), int(text[10:12]), int(text[12:14]),
        )  # fmt: skip
    except ValueError as exc:
        raise CardProtocolError(f"{what}: date-time {text} is not a date") from exc


def decode_time(raw: bytes, encoding: TimeEncoding, what: str) -> dt.datetime:
    """A record's date-time: 7 BCD bytes YYYYMMDDhhmmss, or 4 bytes of seconds since 2000."""
    if encoding is TimeEncoding.BCD:
        return _bcd_datetime(raw[:7], what)
    return EPOCH_2000 + dt.timedelta(seconds=int.from_bytes(raw[:4], "big"))


def encode_time(when: dt.datetime, encoding: TimeEncoding) -> bytes:
    if encoding is TimeEncoding.BCD:
        return bytes.fromhex(when.strftime("%Y%m%d%H%M%S"))
    seconds = int((when.replace(tzinfo=None) - EPOCH_2000).total_seconds())
    if not 0 <= seconds <= 0xFFFFFFFF:
        raise ConfigurationError(f"{when} cannot be written as seconds since 2000")
    return seconds.to_bytes(4, "big")


# --- EF18 ---------------------------------------------------------------------------------


def parse_log_entry(record: bytes, encoding: TimeEncoding, number: int = 1) -> LogEntry | None:
    """An EF18 record (§2.3); ``None`` for an unwritten one (all 00 or all FF)."""
    what = f"EF18 record {number}"
    if len(record) < EF18_LENGTH:
        raise CardProtocolError(f"{what} is {len(record)} bytes, expected {EF18_LENGTH}")
    record = record[:EF18_LENGTH]
    if record in (bytes(EF18_LENGTH), b"\xff" * EF18_LENGTH):
        return None
    when: dt.datetime | None
    stamp = record[16:23]
    if stamp in (bytes(7), b"\xff" * 7):
        when = None
    elif encoding is TimeEncoding.BCD:
        when = _bcd_datetime(stamp, what)  # date (4) + time (3)
    else:
        when = decode_time(stamp, encoding, what)
    return LogEntry(
        counter=int.from_bytes(record[0:2], "big"),
        overdraft=int.from_bytes(record[2:5], "big"),
        amount=int.from_bytes(record[5:9], "big"),
        transaction_type=record[9],
        terminal=record[10:16].hex().upper(),
        when=when,
    )


def parse_log(records: list[bytes], encoding: TimeEncoding) -> list[LogEntry]:
    entries = (parse_log_entry(r, encoding, i) for i, r in enumerate(records, 1))
    return [e for e in entries if e is not None]


# --- trip records -------------------------------------------------------------------------


def _number(raw: bytes, encoding: FieldEncoding, what: str) -> int:
    if encoding is FieldEncoding.BINARY:
        return int.from_bytes(raw, "big")
    text = raw.hex()
    if not text.isdigit():
        raise CardProtocolError(f"{what} {raw.hex().upper()} is not BCD")
    return int(text)


def _put_number(value: int, length: int, encoding: FieldEncoding, what: str) -> bytes:
    if encoding is FieldEncoding.BINARY:
        if not 0 <= value < 1 << (8 * length):
            raise ConfigurationError(f"{what} {value} does not fit {length} bytes")
        return value.to_bytes(length, "big")
    if not 0 <= value < 10 ** (2 * length):
        raise ConfigurationError(f"{what} {value} does not fit {2 * length} BCD digits")
    return bytes.fromhex(f"{value:0{2 * length}d}")


def parse_trip(layout: TripLayout, record: bytes, number: int = 1) -> Trip | None:
    """A trip record by its layout; ``None`` for an unwritten one (all 00 / FF after the
    header). Raises :class:`CardProtocolError` for a short record or an impossible field."""
    what = f"EF{layout.sfi:02X} record {number}"
    if len(record) < layout.record_length:
        raise CardProtocolError(
            f"{what} is {len(record)} bytes, the layout needs {layout.record_length}"
        )
    body = record[len(layout.header) : layout.record_length]
    if body in (bytes(len(body)), b"\xff" * len(body)):
        return None

    def get(name: str) -> bytes:
        at, length = layout.span(name)
        return record[at : at + length] if at >= 0 else b""

    institution = get("institution")[: layout.institution_code_length]
    origin = int.from_bytes(get("transfer"), "big")  # line id + 1; 0 (or absent): none
    return Trip(
        record_type=record[layout.type_at] if layout.type_at >= 0 else 0,
        terminal=get("terminal").hex().upper(),
        industry=record[layout.industry_at] if layout.industry_at >= 0 else 0,
        line=_number(get("line"), layout.line_encoding, f"{what} line") if get("line") else 0,
        station=int.from_bytes(get("station"), "big"),
        vehicle=int.from_bytes(get("vehicle"), "big"),
        amount=int.from_bytes(get("amount"), "big"),
        balance=int.from_bytes(get("balance"), "big"),
        when=decode_time(get("time"), layout.time_encoding, what),
        city=get("city").hex().upper(),
        institution=institution.hex().upper(),
        transfer_from=origin - 1 if origin else None,
    )


def parse_trips(layout: TripLayout, records: list[bytes]) -> list[Trip]:
    trips = (parse_trip(layout, r, i) for i, r in enumerate(records, 1))
    return [t for t in trips if t is not None]


def build_trip(layout: TripLayout, trip: Trip) -> bytes:
    """The record a terminal writes (UPDATE CAPP DATA CACHE, §2.4): the layout's header, each
    field where the layout puts it, the institution code padded with FF, zeros elsewhere.
    A value that does not fit its field is a configuration error (the terminal's parameters)."""
    record = bytearray(layout.record_length)
    record[: len(layout.header)] = layout.header

    def put(name: str, value: bytes) -> None:
        at, length = layout.span(name)
        if at >= 0:
            if len(value) != length:
                raise ConfigurationError(
                    f"trip record field {name} is {length} bytes, got {value.hex().upper()}"
                )
            record[at : at + length] = value

    def has(name: str) -> bool:
        return layout.span(name)[0] >= 0

    put("type", bytes((trip.record_type,)))
    terminal = bytes.fromhex(trip.terminal)
    put("terminal", terminal.rjust(layout.terminal_length, b"\x00")[-layout.terminal_length :])
    put("industry", bytes((trip.industry,)))
    numbers = (
        ("line", trip.line, layout.line_length, layout.line_encoding),
        ("station", trip.station, layout.station_length, FieldEncoding.BINARY),
        ("vehicle", trip.vehicle, layout.vehicle_length, FieldEncoding.BINARY),
        ("amount", trip.amount, layout.amount_length, FieldEncoding.BINARY),
    )
    for name, value, length, encoding in numbers:
        if has(name):
            put(name, _put_number(value, length, encoding, name))
    put("balance", trip.balance.to_bytes(4, "big"))
    put("time", encode_time(trip.when, layout.time_encoding))
    if has("city") and trip.city:  # none known: left 00 00
        put("city", bytes.fromhex(trip.city))
    if has("institution"):
        code = bytes.fromhex(trip.institution)[: layout.institution_code_length]
        code = code.ljust(layout.institution_code_length, b"\x00")
        put("institution", code.ljust(layout.institution_length, b"\xff"))
    if has("transfer") and trip.transfer_from is not None:
        origin = trip.transfer_from + 1
        put("transfer", _put_number(origin, layout.transfer_length, FieldEncoding.BINARY, "line"))
    return bytes(record)
