"""Where a trip record keeps each field (issue 15; issue 13 for the fare state): the layout of
the T-Union EF1E record, the CJ/T 166 CAPP record and the M1 trip block, as profile data.

Kept apart from :mod:`agent.profile` (which re-exports it) so that the M1 layout
(:mod:`agent.products.m1_layout`, imported by the profile) can describe its trip block with the
same layout, parsed and built by the same :mod:`agent.products.cpu_logs` functions.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.errors import ConfigurationError


class TimeEncoding(enum.Enum):
    """How a log or trip record writes its date-time (issue 15 finding 6)."""

    BCD = "bcd"  # YYYYMMDDhhmmss in 7 BCD bytes (EF1E, §2.3), or date (4) + time (3) in EF18
    SECONDS_2000 = "seconds-2000"  # unsigned big-endian seconds since 2000-01-01 00:00 (4 bytes)


class FieldEncoding(enum.Enum):
    """How a number (line, station, vehicle) is written in a trip record."""

    BINARY = "binary"  # unsigned big-endian (real T-Union bus records: route 101 -> 0065)
    BCD = "bcd"  # decimal digits, two a byte


TRIP_FIELDS = (
    "type",
    "terminal",
    "industry",
    "line",
    "station",
    "vehicle",
    "amount",
    "balance",
    "time",
    "city",
    "institution",
    "transfer",
)


@dataclass(frozen=True, slots=True)
class TripLayout:
    """Where a trip record (T-Union EF1E, CJ/T 166 CAPP EF17) keeps each field (issue 15).

    Offsets are into the whole record as READ RECORD answers it (header included); a field at
    -1 is absent. Written by UPDATE CAPP DATA CACHE ``80 DC write_p1 write_p2`` (§2.4); read
    with READ RECORD by number (cyclic EF1E, P2 = SFI<<3|4) or by identifier (CAPP, P2 =
    SFI<<3|0, P1 = ``identifier``). The institution is a ``institution_code_length``-byte code
    padded with FF to ``institution_length`` (real T-Union records: ``01663310FFFFFFFF``).
    """

    sfi: int
    record_length: int
    records: int
    by_identifier: bool
    identifier: int
    write_p1: int
    write_p2: int
    header: bytes
    record_type: int
    type_at: int
    terminal_at: int
    terminal_length: int
    industry_at: int
    line_at: int
    line_length: int
    line_encoding: FieldEncoding
    station_at: int
    station_length: int
    vehicle_at: int
    vehicle_length: int
    amount_at: int
    balance_at: int
    time_at: int
    time_encoding: TimeEncoding
    city_at: int
    institution_at: int
    institution_length: int
    institution_code_length: int
    # Issue 13 (boarding-and-alighting fares): the amount's width (the M1 trip block is 16
    # bytes) and where a one-record layout (CJ/T 166 CAPP, M1) keeps the transfer origin: the
    # line a boarding may be a transfer from, as line id + 1 (0: none), binary. A cyclic file
    # (EF1E) needs none: the record before the boarding says it.
    amount_length: int = 4
    transfer_at: int = -1
    transfer_length: int = 0

    def span(self, name: str) -> tuple[int, int]:
        """(offset, length) of a field; offset -1: absent."""
        fixed = {"type": 1, "industry": 1, "balance": 4, "city": 2}
        at: int = getattr(self, f"{name}_at")
        if name == "time":
            length = 7 if self.time_encoding is TimeEncoding.BCD else 4
        elif name in fixed:
            length = fixed[name]
        else:
            length = getattr(self, f"{name}_length")
        return at, length


# cpu-purse.md §2.3 EF1E, with the field positions of real T-Union records (issue 15 finding
# 5: institution = 4-byte code + FF x 4; bus line binary at bytes 10..11; bytes 12..16 carry
# station and vehicle, non-zero in real records; which is which is M). Byte 0 is the record's
# main type: 03 entry, 04 exit, 06 single (the type this layout writes for a single tap); source
# in agent.products.fare_policy (tkerby/flipperzero-firmware-wPlugins, t_union_msg.h), which
# also reads byte 9 as the record's sub-type (交易子类型): here industry_at, the profile's
# ef1e_industry.
TUNION_EF1E = TripLayout(
    sfi=0x1E, record_length=48, records=30, by_identifier=False, identifier=0,
    write_p1=0x00, write_p2=0xF0, header=b"", record_type=0x06, type_at=0,
    terminal_at=1, terminal_length=8, industry_at=9,
    line_at=10, line_length=2, line_encoding=FieldEncoding.BINARY,
    station_at=12, station_length=2, vehicle_at=14, vehicle_length=3,
    amount_at=17, balance_at=21, time_at=25, time_encoding=TimeEncoding.BCD, city_at=32,
    institution_at=34, institution_length=8, institution_code_length=4,
)  # fmt: skip
# cpu-purse.md §2.3 EF17-CAPP: identifier 01, length 2E, lock flag 00, then the data (M: the
# spec gives no field positions). Bytes 3..27 (terminal, BCD line, amount, balance, date-time)
# are this project's layout since issue 15. Boarding-and-alighting fares (issue 13) need what
# the next tap reads: the record type (byte 28, the EF1E codes: 03 boarding, 04 alighting, 06
# single), the stop (29..30, binary) and the acceptor's city code (31..32, BCD, so another
# city's record is never taken for one of ours), in the record's unused bytes 28..47. A city
# whose CAPP data differs overrides these in its dialect's ``trips`` table (-1: absent; a
# layout without ``type_at`` pays as single taps, logged ``fare_no_trip_state``). Bytes 33..36
# keep the transfer origin (a one-record file cannot show the trip before the boarding).
CJT166_CAPP = TripLayout(
    sfi=0x17, record_length=48, records=1, by_identifier=True, identifier=0x01,
    write_p1=0x01, write_p2=0xB8, header=bytes.fromhex("012E00"), record_type=0x06, type_at=28,
    terminal_at=3, terminal_length=6, industry_at=-1,
    line_at=9, line_length=4, line_encoding=FieldEncoding.BCD,
    station_at=29, station_length=2, vehicle_at=-1, vehicle_length=0,
    amount_at=13, balance_at=17, time_at=21, time_encoding=TimeEncoding.BCD, city_at=31,
    institution_at=-1, institution_length=0, institution_code_length=0,
    transfer_at=33, transfer_length=4,
)  # fmt: skip
STANDARD_TRIPS: dict[str, TripLayout] = {"tunion": TUNION_EF1E, "cjt166": CJT166_CAPP}


def check_trip_layout(
    layout: TripLayout,
    fail: Callable[[str, str, Any], ConfigurationError],
    *,
    card_file: bool = True,
) -> None:
    """Every present field inside the record, lengths the writer can fill, no overlap.
    ``card_file``: a CPU card's record file (SFI and record count checked); an M1 trip block
    has neither."""
    if card_file and not 1 <= layout.sfi <= 30:
        raise fail("sfi", "must be in 1..30", layout.sfi)
    if not 8 <= layout.record_length <= 0xFF:
        raise fail("record_length", "must be in 8..255", layout.record_length)
    if card_file and not 1 <= layout.records <= 0xFF:
        raise fail("records", "must be in 1..255", layout.records)
    limits = {
        "terminal": (1, 8), "line": (1, 4), "station": (1, 4), "vehicle": (1, 4),
        "amount": (2, 4), "transfer": (1, 4),
    }  # fmt: skip
    for name, (low, high) in limits.items():
        at, length = layout.span(name)
        if at >= 0 and not low <= length <= high:
            raise fail(f"{name}_length", f"must be in {low}..{high}", length)
    if layout.institution_at >= 0 and not (
        1 <= layout.institution_code_length <= layout.institution_length <= 8
    ):
        raise fail(
            "institution_code_length",
            "must be 1..institution_length (at most 8)",
            layout.institution_code_length,
        )
    used: dict[int, str] = {i: "header" for i in range(len(layout.header))}
    for name in TRIP_FIELDS:
        at, length = layout.span(name)
        if at < 0:
            continue
        if at + length > layout.record_length:
            raise fail(
                f"{name}_at",
                f"runs past the {layout.record_length}-byte record (ends at {at + length})",
                at,
            )
        for i in range(at, at + length):
            if i in used:
                raise fail(f"{name}_at", f"overlaps {used[i]} at byte {i}", at)
            used[i] = name
    if layout.amount_at < 0 or layout.time_at < 0:
        raise fail("amount_at" if layout.amount_at < 0 else "time_at", "is required", -1)
