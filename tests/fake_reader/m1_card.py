"""A MIFARE Classic 1K/4K card model at the semantic level (L1 of m1-purse-and-readers.md §6).

Memory map, block 0, sector trailers with access bits enforced (data-block table and trailer
table of §1.2, "key B readable ⇒ key B unusable", inconsistent access bits ⇒ sector blocked for
good), value blocks with the volatile transfer buffer (§1.3, §1.4), and the card states
IDLE → ACTIVE → AUTHENTICATED (a NAK or a failed authentication drops back to IDLE).

Faults for tests:

* :meth:`M1Card.arm_tear` tears the n-th EEPROM write (WRITE part 2 or TRANSFER) after arming,
  in one of three modes (§1.5): ``nothing`` (card leaves before programming), ``garbage``
  (deterministic bytes that satisfy no check), ``lost`` (programmed, answer lost).
* :meth:`M1Card.arm_removal` makes the card leave before its n-th operation of any kind
  (authentication included).

Either raises :class:`tests.fake_reader.faults.CardTorn`; the reader model then empties the field.

Timing model (``modelled_seconds``, typical figures of §1.4): select 2.5 ms, authentication
2 ms, read 2.5 ms, write 5.5 ms, increment/decrement/restore 2.5 ms, transfer 4.5 ms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, NoReturn

from agent.products.m1_codec import (
    AccessConditions,
    M1FormatError,
    access_group,
    decode_access_bits,
    decode_value_block,
    encode_value_block,
    trailer_block,
    xor8,
)
from agent.products.m1_layout import block_number, blocks_in_sector, sector_of
from agent.readers.storage import KeyType
from tests.fake_reader.faults import CardTorn

TearMode = Literal["nothing", "garbage", "lost"]
TEAR_MODES: tuple[TearMode, ...] = ("nothing", "garbage", "lost")
CardSize = Literal["1k", "4k"]

DEFAULT_KEY = bytes.fromhex("FFFFFFFFFFFF")
TRANSPORT_ACCESS = AccessConditions((0, 0, 0, 0b001))  # FF 07 80 (§1.2)
# Deterministic tear garbage: fails XOR (either encoding), CRC and the value-block format.
GARBAGE = bytes((0xA5, 0x5A) * 7) + b"\xa5\x00"

SELECT_S = 0.0025
AUTH_S = 0.002
READ_S = 0.0025
WRITE_S = 0.0055
VALUE_S = 0.0025
TRANSFER_S = 0.0045

# 4-bit NAK codes (NXP-DS Table 10).
NAK_INVALID_TB_VALID = 0x0
NAK_INVALID = 0x4


class M1Nak(Exception):
    """The card answered a 4-bit NAK (or stayed silent after a failed authentication)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"NAK {code:X}: {reason}")
        self.code = code
        self.reason = reason


class M1AuthFailed(M1Nak):
    """Authentication failed: a real card stays silent and falls back to IDLE."""


@dataclass
class _Tear:
    at_write: int
    mode: TearMode


class M1Card:
    """One MIFARE Classic card. ``uid`` is 4 or 7 bytes."""

    technology_code = 0x02  # serial-module FIND_CARD technology byte for MIFARE Classic
    ats = b""

    def __init__(
        self,
        uid: bytes,
        size: CardSize = "1k",
        *,
        sak: int | None = None,
        clock: bool = False,
    ) -> None:
        if len(uid) not in (4, 7):
            raise ValueError("a MIFARE Classic UID is 4 or 7 bytes")
        self.uid = bytes(uid)
        self.size = size
        self.sak = sak if sak is not None else (0x08 if size == "1k" else 0x18)
        self.atqa = b"\x04\x00" if len(uid) == 4 else b"\x44\x00"
        self.sectors = 16 if size == "1k" else 40
        self.blocks = 64 if size == "1k" else 256
        self.memory = [bytearray(16) for _ in range(self.blocks)]
        self._dead_sectors: set[int] = set()
        self._init_block0()
        for sector in range(self.sectors):
            self.set_trailer(sector, DEFAULT_KEY, TRANSPORT_ACCESS, DEFAULT_KEY)
        self.modelled_seconds = 0.0
        self.sim_seconds = 0.0  # wall time spent inside this model (for benchmarks)
        self._measure = clock
        self.ops = 0
        self.writes = 0  # EEPROM programming operations since creation
        self.op_log: list[str] = []
        self._tear: _Tear | None = None
        self._removal_at: int | None = None
        self.power_on()

    # --- personalisation (bypasses access conditions) ----------------------------------------

    def _init_block0(self) -> None:
        if len(self.uid) == 4:
            bcc = xor8(self.uid)
            block0 = self.uid + bytes((bcc, self.sak)) + self.atqa[::-1]
        else:
            block0 = self.uid + bytes((self.sak,)) + self.atqa[::-1]
        self.memory[0][:] = block0.ljust(16, b"\x00")[:16]

    @property
    def auth_uid(self) -> bytes:
        """The 4 UID bytes that enter Crypto1 and key derivation (UID3..6 for 7 bytes, §1.1)."""
        return self.uid if len(self.uid) == 4 else self.uid[3:7]

    def set_block(self, block: int, data: bytes) -> None:
        if len(data) != 16:
            raise ValueError("a block is 16 bytes")
        self.memory[block][:] = data

    def get_block(self, block: int) -> bytes:
        return bytes(self.memory[block])

    def set_trailer(
        self,
        sector: int,
        key_a: bytes,
        conditions: AccessConditions,
        key_b: bytes,
        gpb: int = 0x69,
    ) -> None:
        self.set_block(self._trailer_of(sector), trailer_block(key_a, conditions, key_b, gpb))

    def keys_of(self, sector: int) -> tuple[bytes, bytes]:
        trailer = self.memory[self._trailer_of(sector)]
        return bytes(trailer[0:6]), bytes(trailer[10:16])

    def value_of(self, block: int) -> int | None:
        try:
            return decode_value_block(self.get_block(block)).value
        except M1FormatError:
            return None

    # --- faults ------------------------------------------------------------------------------

    def arm_tear(self, at_write: int, mode: TearMode) -> None:
        """Tear the ``at_write``-th EEPROM write from now (1 = the next one)."""
        self._tear = _Tear(self.writes + at_write, mode)

    def arm_removal(self, at_op: int) -> None:
        """Leave the field before the ``at_op``-th operation from now (1 = the next one)."""
        self._removal_at = self.ops + at_op

    def disarm(self) -> None:
        self._tear = None
        self._removal_at = None

    @property
    def armed(self) -> bool:
        return self._tear is not None or self._removal_at is not None

    # --- RF state ----------------------------------------------------------------------------

    def power_on(self) -> None:
        """Enter the field: RAM state (authentication, transfer buffer) is lost."""
        self.state: Literal["idle", "active", "auth"] = "idle"
        self._auth: tuple[int, KeyType] | None = None
        self._tb: tuple[int, int] | None = None

    def select(self) -> None:
        """REQA/WUPA + anticollision + select."""
        self._begin("select", SELECT_S, count=False)
        self.state = "active"
        self._auth = None
        self._end()

    # --- commands ----------------------------------------------------------------------------

    def authenticate(self, block: int, key_type: KeyType, key: bytes) -> None:
        self._begin(f"auth {key_type.name} {block}", AUTH_S)
        try:
            if self.state == "idle":
                raise M1AuthFailed(NAK_INVALID, "card is idle (not selected)")
            self._check_block(block)
            sector = sector_of(block)
            key_a, key_b = self.keys_of(sector)
            expected = key_a if key_type is KeyType.A else key_b
            if bytes(key) != expected:
                self._to_idle()
                raise M1AuthFailed(NAK_INVALID, f"wrong key {key_type.name} for sector {sector}")
            self.state = "auth"
            self._auth = (sector, key_type)
        finally:
            self._end()

    def read(self, block: int) -> bytes:
        self._begin(f"read {block}", READ_S)
        try:
            conditions, key, index, n = self._access(block)
            if index == n - 1:
                if not conditions.trailer_allows("access_read", key):
                    self._nak(f"access bits of block {block} not readable with key {key.name}")
                raw = self.memory[block]
                key_b = raw[10:16] if conditions.trailer_allows("key_b_read", key) else bytes(6)
                return bytes(6) + bytes(raw[6:10]) + bytes(key_b)
            if not conditions.data_allows(access_group(index, n), "read", key):
                self._nak(f"read of block {block} forbidden for key {key.name}")
            return bytes(self.memory[block])
        finally:
            self._end()

    def write(self, block: int, data: bytes) -> None:
        self._begin(f"write {block}", WRITE_S)
        try:
            if len(data) != 16:
                self._nak("WRITE part 2 must carry 16 bytes")
            conditions, key, index, n = self._access(block)
            if block == 0:
                self._nak("block 0 is read-only")
            if index == n - 1:
                new = self._trailer_write(block, conditions, key, bytes(data))
            else:
                if not conditions.data_allows(access_group(index, n), "write", key):
                    self._nak(f"write of block {block} forbidden for key {key.name}")
                new = bytes(data)
            self._program(block, new)
        finally:
            self._end()

    def increment(self, block: int, value: int) -> None:
        self._value_op("increment", block, value)

    def decrement(self, block: int, value: int) -> None:
        self._value_op("decrement", block, value)

    def restore(self, block: int) -> None:
        self._value_op("restore", block, 0)

    def transfer(self, block: int) -> None:
        self._begin(f"transfer {block}", TRANSFER_S)
        try:
            conditions, key, index, n = self._access(block)
            if index == n - 1:
                self._nak("cannot transfer into a sector trailer")
            if not conditions.data_allows(access_group(index, n), "decrement", key):
                self._nak(f"transfer into block {block} forbidden for key {key.name}")
            if self._tb is None:
                self._nak("transfer buffer is not valid", NAK_INVALID)
            value, adr = self._tb
            self._program(block, encode_value_block(value, adr))
        finally:
            self._end()

    def halt(self) -> None:
        self._begin("halt", 0.0, count=False)
        self._to_idle()
        self._end()

    # --- internals ---------------------------------------------------------------------------

    def _trailer_of(self, sector: int) -> int:
        return block_number(sector, blocks_in_sector(sector) - 1)

    def _begin(self, name: str, seconds: float, *, count: bool = True) -> None:
        if self._measure:
            self._t0 = time.perf_counter()
        if count:
            self.ops += 1
            if self._removal_at is not None and self.ops >= self._removal_at:
                self._removal_at = None
                self._to_idle()
                self._end()
                raise CardTorn(f"card left the field before {name}")
        self.modelled_seconds += seconds
        self.op_log.append(name)

    def _end(self) -> None:
        if self._measure:
            self.sim_seconds += time.perf_counter() - self._t0

    def _to_idle(self) -> None:
        self.state = "idle"
        self._auth = None

    def _nak(self, reason: str, code: int = NAK_INVALID) -> NoReturn:
        self._to_idle()
        raise M1Nak(code, reason)

    def _check_block(self, block: int) -> None:
        if not 0 <= block < self.blocks:
            self._nak(f"block {block} does not exist on a {self.size} card")

    def _access(self, block: int) -> tuple[AccessConditions, KeyType, int, int]:
        """Conditions, key in use, index in sector and sector size; NAK if not authenticated."""
        self._check_block(block)
        sector = sector_of(block)
        if self.state != "auth" or self._auth is None or self._auth[0] != sector:
            self._nak(f"not authenticated for sector {sector}")
        assert self._auth is not None
        if sector in self._dead_sectors:
            self._nak(f"sector {sector} is blocked (invalid access bits)")
        try:
            conditions = decode_access_bits(bytes(self.memory[self._trailer_of(sector)][6:9]))
        except M1FormatError:
            self._dead_sectors.add(sector)
            self._nak(f"sector {sector} is blocked (invalid access bits)")
        key = self._auth[1]
        if key is KeyType.B and conditions.key_b_readable:
            self._nak("key B is readable, so it cannot be used for access")
        n = blocks_in_sector(sector)
        return conditions, key, block - block_number(sector, 0), n

    def _trailer_write(
        self, block: int, conditions: AccessConditions, key: KeyType, data: bytes
    ) -> bytes:
        old = bytes(self.memory[block])
        allowed = False
        key_a, access, key_b = old[0:6], old[6:10], old[10:16]
        if conditions.trailer_allows("key_a_write", key):
            key_a, allowed = data[0:6], True
        if conditions.trailer_allows("access_write", key):
            access, allowed = data[6:10], True
        if conditions.trailer_allows("key_b_write", key):
            key_b, allowed = data[10:16], True
        if not allowed:
            self._nak(f"trailer {block} is not writable with key {key.name}")
        return key_a + access + key_b

    def _value_op(
        self, op: Literal["increment", "decrement", "restore"], block: int, value: int
    ) -> None:
        self._begin(f"{op} {block} {value}", VALUE_S)
        try:
            conditions, key, index, n = self._access(block)
            if index == n - 1:
                self._nak(f"{op} on a sector trailer")
            perm: Literal["increment", "decrement"] = (
                "increment" if op == "increment" else "decrement"
            )
            if not conditions.data_allows(access_group(index, n), perm, key):
                self._nak(f"{op} of block {block} forbidden for key {key.name}")
            if not 0 <= value <= 0x7FFFFFFF:
                self._nak(f"{op} operand {value} out of range")
            try:
                source = decode_value_block(self.get_block(block))
            except M1FormatError:
                self._tb = None
                self._nak(f"block {block} is not a valid value block")
            result = source.value
            if op == "increment":
                result += value
            elif op == "decrement":
                result -= value
            if not -(2**31) <= result <= 2**31 - 1:
                self._tb = None
                self._nak(f"{op} overflows the value")
            self._tb = (result, source.address)
        finally:
            self._end()

    def _program(self, block: int, data: bytes) -> None:
        """One EEPROM programming operation, the only place a tear can strike (§1.5)."""
        self.writes += 1
        tear = self._tear
        if tear is not None and self.writes >= tear.at_write:
            self._tear = None
            self._to_idle()
            if tear.mode == "garbage":
                self.memory[block][:] = GARBAGE
            elif tear.mode == "lost":
                self.memory[block][:] = data
            raise CardTorn(f"power lost while programming block {block} ({tear.mode})")
        self.memory[block][:] = data
