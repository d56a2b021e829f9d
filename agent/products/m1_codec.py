"""Pure codecs for MIFARE Classic ("M1") city cards: value blocks, sector-trailer access bits,
checksums, and the public-info / issuance / trip-record blocks of the city-card convention.

References are to ``shared/spec/m1-purse-and-readers.md``. The NXP formats (value block §1.3,
access bits §1.2) are constants; everything from §3 (checksum kind, backup encoding, record
layout, byte order) is a parameter supplied by :mod:`agent.products.m1_layout`.

Every decoder takes untrusted bytes and raises :class:`M1FormatError` (a
:class:`agent.errors.CardProtocolError`) for anything malformed, never another exception.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Literal

from agent.errors import CardProtocolError
from agent.readers.storage import KeyType

BLOCK_SIZE = 16
VALUE_MIN = -(2**31)
VALUE_MAX = 2**31 - 1


class M1FormatError(CardProtocolError):
    """A block read from an M1 card does not have the format it must have."""


def _block(name: str, data: bytes) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise M1FormatError(f"{name}: expected bytes, got {type(data).__name__}")
    raw = bytes(data)
    if len(raw) != BLOCK_SIZE:
        raise M1FormatError(f"{name}: a block is {BLOCK_SIZE} bytes, got {len(raw)}")
    return raw


def _invert(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data)


# --- value blocks (§1.3) ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ValueBlock:
    value: int
    address: int


def encode_value_block(value: int, address: int) -> bytes:
    """``value | ~value | value | adr ~adr adr ~adr``, value signed 32-bit LSB first (§1.3)."""
    if not VALUE_MIN <= value <= VALUE_MAX:
        raise ValueError(f"value {value} does not fit a signed 32-bit value block")
    if not 0 <= address <= 0xFF:
        raise ValueError(f"value-block address {address} is not one byte")
    v = value.to_bytes(4, "little", signed=True)
    a = bytes((address, address ^ 0xFF))
    return v + _invert(v) + v + a + a


def decode_value_block(data: bytes, *, check_address: bool = True) -> ValueBlock:
    """Parse and validate a value block: three copies agree, the adr pattern holds (§1.3)."""
    raw = _block("value block", data)
    v, nv, v2 = raw[0:4], raw[4:8], raw[8:12]
    if v != v2 or _invert(v) != nv:
        raise M1FormatError(f"not a value block: value copies disagree ({raw.hex()})")
    adr, nadr, adr2, nadr2 = raw[12], raw[13], raw[14], raw[15]
    if check_address and not (adr == adr2 and nadr == nadr2 and adr ^ nadr == 0xFF):
        raise M1FormatError(f"not a value block: address bytes {raw[12:].hex()} broken")
    return ValueBlock(int.from_bytes(v, "little", signed=True), adr)


def value_or_none(data: bytes, *, check_address: bool = True) -> ValueBlock | None:
    """:func:`decode_value_block`, or ``None`` for an invalid block."""
    try:
        return decode_value_block(data, check_address=check_address)
    except M1FormatError:
        return None


# --- access bits (§1.2) --------------------------------------------------------------------------


DataOp = Literal["read", "write", "increment", "decrement"]
"""``decrement`` also covers transfer and restore (§1.2 table)."""

TrailerOp = Literal["key_a_write", "access_read", "access_write", "key_b_read", "key_b_write"]

_A, _B, _AB = frozenset("A"), frozenset("B"), frozenset("AB")
_NEVER: frozenset[str] = frozenset()

# C1C2C3 (C1 = most significant bit) -> read, write, increment, decrement/transfer/restore.
_DATA_TABLE: dict[int, tuple[frozenset[str], ...]] = {
    0b000: (_AB, _AB, _AB, _AB),
    0b010: (_AB, _NEVER, _NEVER, _NEVER),
    0b100: (_AB, _B, _NEVER, _NEVER),
    0b110: (_AB, _B, _B, _AB),
    0b001: (_AB, _NEVER, _NEVER, _AB),
    0b011: (_B, _B, _NEVER, _NEVER),
    0b101: (_B, _NEVER, _NEVER, _NEVER),
    0b111: (_NEVER, _NEVER, _NEVER, _NEVER),
}
_DATA_OPS: tuple[DataOp, ...] = ("read", "write", "increment", "decrement")

# Sector trailer, NXP-DS Table 7: key A write, access read, access write, key B read, key B write.
_TRAILER_TABLE: dict[int, tuple[frozenset[str], ...]] = {
    0b000: (_A, _A, _NEVER, _A, _A),
    0b010: (_NEVER, _A, _NEVER, _A, _NEVER),
    0b100: (_B, _AB, _NEVER, _NEVER, _B),
    0b110: (_NEVER, _AB, _NEVER, _NEVER, _NEVER),
    0b001: (_A, _A, _A, _A, _A),
    0b011: (_B, _AB, _B, _NEVER, _B),
    0b101: (_NEVER, _AB, _B, _NEVER, _NEVER),
    0b111: (_NEVER, _AB, _NEVER, _NEVER, _NEVER),
}
_TRAILER_OPS: tuple[TrailerOp, ...] = (
    "key_a_write",
    "access_read",
    "access_write",
    "key_b_read",
    "key_b_write",
)


@dataclass(frozen=True, slots=True)
class AccessConditions:
    """C1C2C3 of the four access groups (data groups 0..2, trailer 3) as 3-bit numbers."""

    groups: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        if len(self.groups) != 4 or any(not 0 <= g <= 7 for g in self.groups):
            raise ValueError(f"access conditions are four 3-bit numbers, got {self.groups!r}")

    @property
    def trailer(self) -> int:
        return self.groups[3]

    def data_allows(self, group: int, op: DataOp, key: KeyType) -> bool:
        return key.name in _DATA_TABLE[self.groups[group]][_DATA_OPS.index(op)]

    def trailer_allows(self, op: TrailerOp, key: KeyType) -> bool:
        return key.name in _TRAILER_TABLE[self.trailer][_TRAILER_OPS.index(op)]

    @property
    def key_b_readable(self) -> bool:
        """Key B readable means key B cannot authenticate any access (§1.2 footnote)."""
        return bool(_TRAILER_TABLE[self.trailer][3])


def encode_access_bits(conditions: AccessConditions) -> bytes:
    """Bytes 6..8 of a sector trailer (NXP-DS Fig. 10)."""
    c1 = c2 = c3 = 0
    for j, cond in enumerate(conditions.groups):
        c1 |= ((cond >> 2) & 1) << j
        c2 |= ((cond >> 1) & 1) << j
        c3 |= (cond & 1) << j
    b6 = ((~c2 & 0xF) << 4) | (~c1 & 0xF)
    b7 = (c1 << 4) | (~c3 & 0xF)
    b8 = (c3 << 4) | c2
    return bytes((b6, b7, b8))


def decode_access_bits(data: bytes) -> AccessConditions:
    """Decode trailer bytes 6..8 (a 3- or 4-byte slice); inconsistent bits raise (§1.2)."""
    raw = bytes(data)
    if len(raw) not in (3, 4):
        raise M1FormatError(f"access bits are 3 bytes (+ GPB), got {len(raw)}")
    b6, b7, b8 = raw[0], raw[1], raw[2]
    c1, c2, c3 = b7 >> 4, b8 & 0xF, b8 >> 4
    if (b6 & 0xF) != (~c1 & 0xF) or (b6 >> 4) != (~c2 & 0xF) or (b7 & 0xF) != (~c3 & 0xF):
        raise M1FormatError(f"access bits {raw[:3].hex()} are inconsistent (sector blocked)")
    groups = tuple(((c1 >> j) & 1) << 2 | ((c2 >> j) & 1) << 1 | ((c3 >> j) & 1) for j in range(4))
    return AccessConditions((groups[0], groups[1], groups[2], groups[3]))


def access_group(block_in_sector: int, blocks_in_sector: int) -> int:
    """The access group of a block: 0..2 data, 3 trailer; big 4K sectors group by 5 (§1.1)."""
    if block_in_sector == blocks_in_sector - 1:
        return 3
    return block_in_sector if blocks_in_sector == 4 else block_in_sector // 5


def trailer_block(
    key_a: bytes, conditions: AccessConditions, key_b: bytes, gpb: int = 0x69
) -> bytes:
    """A complete sector trailer: key A | access bits | GPB | key B (§1.1)."""
    if len(key_a) != 6 or len(key_b) != 6:
        raise ValueError("sector keys are 6 bytes")
    return bytes(key_a) + encode_access_bits(conditions) + bytes((gpb,)) + bytes(key_b)


# --- checksums (§3.1) ----------------------------------------------------------------------------

CheckKind = Literal["xor", "crc8", "crc16"]
CHECK_KINDS: tuple[CheckKind, ...] = ("xor", "crc8", "crc16")
CRC8_POLY = 0x31  # UNCONFIRMED which CRC-8 GDMH uses; x^8+x^5+x^4+1, init 0 (a profile may seed)
CRC16_POLY = 0x1021  # CRC-16/CCITT, init 0xFFFF, seeded with the profile's prefix [M]


def xor8(data: bytes) -> int:
    result = 0
    for byte in data:
        result ^= byte
    return result


def crc8(data: bytes, *, poly: int = CRC8_POLY, init: int = 0x00) -> int:
    crc = init
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def crc16(data: bytes, *, poly: int = CRC16_POLY, init: int = 0xFFFF) -> int:
    crc = init
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def check_length(kind: CheckKind) -> int:
    return 2 if kind == "crc16" else 1


def check_value(kind: CheckKind, payload: bytes, seed: bytes = b"") -> bytes:
    """The check bytes of ``payload`` (bytes 0..15-len of a block)."""
    if kind == "xor":
        return bytes((xor8(seed + payload),))
    if kind == "crc8":
        return bytes((crc8(seed + payload),))
    if kind == "crc16":
        return crc16(seed + payload).to_bytes(2, "big")
    raise ValueError(f"unknown check kind {kind!r}")


def seal(kind: CheckKind, payload: bytes, seed: bytes = b"") -> bytes:
    """A 16-byte block: ``payload`` (16 − check length bytes) followed by its check."""
    if len(payload) != BLOCK_SIZE - check_length(kind):
        raise ValueError(f"{kind} payload must be {BLOCK_SIZE - check_length(kind)} bytes")
    return bytes(payload) + check_value(kind, bytes(payload), seed)


def unseal(name: str, kind: CheckKind, data: bytes, seed: bytes = b"") -> bytes:
    """Verify a sealed block and return its payload; a wrong check raises."""
    raw = _block(name, data)
    n = check_length(kind)
    payload, check = raw[: BLOCK_SIZE - n], raw[BLOCK_SIZE - n :]
    if check_value(kind, payload, seed) != check:
        raise M1FormatError(f"{name}: {kind} check failed ({raw.hex()})")
    return payload


# --- public information block (§3.1 "Public-info block layout") -------------------------------

BackupEncoding = Literal["copy", "inverted"]


@dataclass(frozen=True, slots=True)
class PublicInfo:
    """Bytes 0..7 of the public-info block; ``rfu`` keeps bytes 8.. up to the check."""

    pointer: int  # next record slot, 1..N
    counter: int  # purse transaction counter, big-endian on the card
    flag: int  # process flag (01 in progress / 02 done, or a city's values)
    monthly_counter: int = 0
    blacklist: int = 0
    file_flag: int = 0
    rfu: bytes = b""

    def key_fields(self) -> tuple[int, int, int, int, int, int]:
        """Bytes 0..7 as compared by the recovery rules (§3.5: pubP[0..7] == pubB[0..7])."""
        return (
            self.pointer,
            self.counter,
            self.flag,
            self.monthly_counter,
            self.blacklist,
            self.file_flag,
        )

    def with_(self, **changes: int) -> PublicInfo:
        return replace(self, **changes)  # type: ignore[arg-type]


def encode_public_info(info: PublicInfo, kind: CheckKind, seed: bytes = b"") -> bytes:
    n = BLOCK_SIZE - check_length(kind)
    for name, value, top in (
        ("pointer", info.pointer, 0xFF),
        ("counter", info.counter, 0xFFFF),
        ("flag", info.flag, 0xFF),
        ("monthly counter", info.monthly_counter, 0xFFFF),
        ("blacklist flag", info.blacklist, 0xFF),
        ("file flag", info.file_flag, 0xFF),
    ):
        if not 0 <= value <= top:
            raise ValueError(f"public info {name} {value} out of range")
    rfu = bytes(info.rfu)[: n - 8].ljust(n - 8, b"\xff")
    payload = (
        bytes((info.pointer,))
        + info.counter.to_bytes(2, "big")
        + bytes((info.flag,))
        + info.monthly_counter.to_bytes(2, "big")
        + bytes((info.blacklist, info.file_flag))
        + rfu
    )
    return seal(kind, payload, seed)


def decode_public_info(data: bytes, kind: CheckKind, seed: bytes = b"") -> PublicInfo:
    p = unseal("public info", kind, data, seed)
    return PublicInfo(
        pointer=p[0],
        counter=int.from_bytes(p[1:3], "big"),
        flag=p[3],
        monthly_counter=int.from_bytes(p[4:6], "big"),
        blacklist=p[6],
        file_flag=p[7],
        rfu=bytes(p[8:]),
    )


def encode_backup(block: bytes, encoding: BackupEncoding) -> bytes:
    """The backup copy of a primary block: a plain copy (CARDOP) or inverted (AFC) (§3.1)."""
    return _invert(block) if encoding == "inverted" else bytes(block)


def decode_backup(block: bytes, encoding: BackupEncoding) -> bytes:
    return _invert(_block("backup block", block)) if encoding == "inverted" else bytes(block)


# --- issuance block (sector 1, block 0) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Issuance:
    """Sector 1 block 0 (§3.1): the card's identity and enable flag; with the validity dates of
    the issuance sector's dates block (§3.1 "block 1: issue date, expiry, start date, ...") when
    the layout says where they are (``None``: not read, or unset on the card)."""

    city_code: bytes  # 2 bytes, BCD
    trade_code: bytes  # 2 bytes
    serial: bytes  # issuer serial, 4 bytes
    auth_code: bytes  # card authentication code 卡认证码, 4 bytes
    enable_flag: int  # 01 not enabled, 02 normal, 03 stopped, 04 blacklisted
    card_type: int
    subtype: int = 0
    issue_date: dt.date | None = None  # 发行日期
    start_date: dt.date | None = None  # 启用日期 (valid from), where a city keeps one
    expiry_date: dt.date | None = None  # 有效期: the last day the card is valid

    @property
    def card_number(self) -> str:
        return (self.city_code + self.serial).hex().upper()

    def with_dates(self, dates: IssuanceDates) -> Issuance:
        return replace(
            self, issue_date=dates.issue, start_date=dates.start, expiry_date=dates.expiry
        )


IssuanceCheck = Literal["xor", "none"]


def encode_issuance(issuance: Issuance, check: IssuanceCheck = "xor") -> bytes:
    payload = (
        bytes(issuance.city_code)
        + bytes(issuance.trade_code)
        + bytes(issuance.serial)
        + bytes(issuance.auth_code)
        + bytes((issuance.enable_flag, issuance.card_type, issuance.subtype))
    )
    if len(payload) != 15:
        raise ValueError("issuance fields have the wrong lengths")
    return payload + bytes((xor8(payload) if check == "xor" else 0,))


def decode_issuance(data: bytes, check: IssuanceCheck = "xor") -> Issuance:
    raw = _block("issuance block", data)
    if check == "xor" and xor8(raw[:15]) != raw[15]:
        raise M1FormatError(f"issuance block: XOR check failed ({raw.hex()})")
    return Issuance(
        city_code=raw[0:2],
        trade_code=raw[2:4],
        serial=raw[4:8],
        auth_code=raw[8:12],
        enable_flag=raw[12],
        card_type=raw[13],
        subtype=raw[14],
    )


# --- issuance dates (sector 1, the dates block) --------------------------------------------------
#
# §3.1 names the fields of the issuance sector's block 1 (issue date, expiry, start date, deposit,
# ..., XOR checksum) but neither their offsets nor their encoding [L]: both are profile settings.
# BCD YYYYMMDD is what the CPU cards and the M1 TAC input (CARDOP ``date4``, §3.3) use.

DateEncoding = Literal["bcd_yyyymmdd", "bcd_yymmdd"]
DATE_ENCODINGS: tuple[DateEncoding, ...] = ("bcd_yyyymmdd", "bcd_yymmdd")
DATE_SIZES: dict[DateEncoding, int] = {"bcd_yyyymmdd": 4, "bcd_yymmdd": 3}
DATE_FIELDS = ("issue", "start", "expiry")


@dataclass(frozen=True, slots=True)
class IssuanceDates:
    """The dates of the issuance sector; ``None`` = not in this layout, or unset on the card."""

    issue: dt.date | None = None
    start: dt.date | None = None
    expiry: dt.date | None = None


@dataclass(frozen=True, slots=True)
class DatesFormat:
    """Where the dates sit in their 16-byte block (byte offsets; ``None``: not on the card)."""

    encoding: DateEncoding = "bcd_yyyymmdd"
    check: IssuanceCheck = "xor"  # byte 15 = XOR of bytes 0..14, like block 0
    issue: int | None = 0
    start: int | None = None
    expiry: int | None = 4

    def offsets(self) -> dict[str, int]:
        found = {"issue": self.issue, "start": self.start, "expiry": self.expiry}
        return {name: offset for name, offset in found.items() if offset is not None}

    def problem(self) -> str | None:
        """Why this format cannot work (overlaps, out of the block), or ``None``."""
        size = DATE_SIZES.get(self.encoding)
        if size is None:
            return f"unknown date encoding {self.encoding!r}"
        end = BLOCK_SIZE - (1 if self.check == "xor" else 0)
        taken: dict[int, str] = {}
        for name, offset in self.offsets().items():
            if not 0 <= offset <= end - size:
                return f"{name} date at byte {offset} does not fit bytes 0..{end - 1}"
            for byte in range(offset, offset + size):
                if byte in taken:
                    return f"{name} date overlaps the {taken[byte]} date"
                taken[byte] = name
        return None


def encode_date(value: dt.date | None, encoding: DateEncoding) -> bytes:
    """BCD ``YYYYMMDD`` (4 bytes) or ``YYMMDD`` (3 bytes, 2000..2099); ``None`` = unset (FF..)."""
    size = DATE_SIZES[encoding]
    if value is None:
        return b"\xff" * size
    if encoding == "bcd_yymmdd":
        if not 2000 <= value.year <= 2099:
            raise ValueError(f"{value} does not fit a YYMMDD date")
        text = f"{value.year - 2000:02d}{value.month:02d}{value.day:02d}"
    else:
        text = f"{value.year:04d}{value.month:02d}{value.day:02d}"
    return bytes.fromhex(text)


def decode_date(data: bytes, encoding: DateEncoding, what: str = "date") -> dt.date | None:
    """A BCD date; all ``00`` or all ``FF`` is unset (``None``); anything else that is not BCD or
    not a calendar date raises :class:`M1FormatError`."""
    raw = bytes(data)
    size = DATE_SIZES.get(encoding)
    if size is None or len(raw) != size:
        raise M1FormatError(f"{what}: {len(raw)} bytes is not a {encoding} date")
    if raw in (b"\x00" * size, b"\xff" * size):
        return None
    text = raw.hex()
    if not text.isdigit():
        raise M1FormatError(f"{what} {text.upper()} is not BCD")
    year = int(text[:4]) if size == 4 else 2000 + int(text[:2])
    month, day = int(text[-4:-2]), int(text[-2:])
    try:
        return dt.date(year, month, day)
    except ValueError:
        raise M1FormatError(f"{what} {text} is not a calendar date") from None


def encode_dates_block(
    dates: IssuanceDates, fmt: DatesFormat, base: bytes = bytes(BLOCK_SIZE)
) -> bytes:
    """``base`` with the dates written at their offsets (and the XOR check recomputed)."""
    problem = fmt.problem()
    if problem is not None:
        raise ValueError(problem)
    block = bytearray(_block("dates block", base))
    for name, offset in fmt.offsets().items():
        value = encode_date(getattr(dates, name), fmt.encoding)
        block[offset : offset + len(value)] = value
    if fmt.check == "xor":
        block[15] = xor8(bytes(block[:15]))
    return bytes(block)


def decode_dates_block(data: bytes, fmt: DatesFormat) -> IssuanceDates:
    """The dates of the issuance sector's dates block; malformed bytes raise M1FormatError."""
    raw = _block("dates block", data)
    problem = fmt.problem()
    if problem is not None:
        raise M1FormatError(f"dates block: {problem}")
    if fmt.check == "xor" and xor8(raw[:15]) != raw[15]:
        raise M1FormatError(f"dates block: XOR check failed ({raw.hex()})")
    size = DATE_SIZES[fmt.encoding]
    found = {
        name: decode_date(raw[offset : offset + size], fmt.encoding, f"{name} date")
        for name, offset in fmt.offsets().items()
    }
    return IssuanceDates(found.get("issue"), found.get("start"), found.get("expiry"))


# --- trip records (§3.2) -------------------------------------------------------------------------

RecordLayout = Literal["cardop", "afc"]
ByteOrder = Literal["little", "big"]


@dataclass(frozen=True, slots=True)
class TripRecord:
    """One 16-byte record slot. ``when`` is (day, hour, minute, second)."""

    when: tuple[int, int, int, int]
    balance_before: int
    amount: int
    kind: int
    device: bytes  # 4 bytes

    def __post_init__(self) -> None:
        d, h, m, s = self.when
        if not (1 <= d <= 31 and 0 <= h <= 23 and 0 <= m <= 59 and 0 <= s <= 59):
            raise ValueError(f"record time {self.when!r} is not a valid day/time")


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(byte: int) -> int:
    hi, lo = byte >> 4, byte & 0xF
    if hi > 9 or lo > 9:
        raise M1FormatError(f"record: {byte:02X} is not BCD")
    return hi * 10 + lo


def encode_record(record: TripRecord, layout: RecordLayout, order: ByteOrder) -> bytes:
    if not 0 <= record.balance_before <= 0xFFFFFFFF or not 0 <= record.amount <= 0xFFFFFF:
        raise ValueError("record money fields out of range")
    if len(record.device) != 4 or not 0 <= record.kind <= 0xFF:
        raise ValueError("record device is 4 bytes and kind one byte")
    d, h, m, s = (_bcd(x) for x in record.when)
    balance = record.balance_before.to_bytes(4, order)
    amount = record.amount.to_bytes(3, order)
    kind = bytes((record.kind,))
    if layout == "cardop":
        return bytes((d, h, m, s)) + balance + amount + kind + bytes(record.device)
    return balance + amount + bytes((d, h, m, s)) + kind + bytes(record.device)


def decode_record(data: bytes, layout: RecordLayout, order: ByteOrder) -> TripRecord:
    raw = _block("record", data)
    if layout == "cardop":
        when, balance, amount, kind, device = raw[0:4], raw[4:8], raw[8:11], raw[11], raw[12:16]
    else:
        balance, amount, when, kind, device = raw[0:4], raw[4:7], raw[7:11], raw[11], raw[12:16]
    try:
        return TripRecord(
            when=(
                _from_bcd(when[0]),
                _from_bcd(when[1]),
                _from_bcd(when[2]),
                _from_bcd(when[3]),
            ),
            balance_before=int.from_bytes(balance, order),
            amount=int.from_bytes(amount, order),
            kind=kind,
            device=bytes(device),
        )
    except ValueError as exc:
        raise M1FormatError(f"record: {exc}") from None
