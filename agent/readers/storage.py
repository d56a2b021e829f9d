"""The storage-card side of the reader seam: MIFARE Classic operations (m1-purse-and-readers.md).

A reader that can handle M1 cards implements :class:`StorageCardReader` next to
:class:`agent.readers.base.CardReader`. The operations are the card's own (§1.4): the reader
firmware runs Crypto1; the agent never sees it.

This module also holds the *pure* builders and parsers of the PC/SC Part 3 storage-card
pseudo-APDUs and the ACS value commands (§4a), and :class:`PseudoApduStorage`, which implements
:class:`StorageCardReader` over any ``transmit(apdu) -> response`` function. A PC/SC driver
implements the protocol by handing its ``transmit`` to it.

Errors at this seam (all :class:`agent.errors.CardError`, the card failed):

* card gone / silent mid-command        -> :class:`agent.errors.CardRemovedError` (fate unknown)
* authentication refused (wrong key)    -> :class:`AuthenticationFailed`
* an operation refused (NAK, access bits, not a value block) -> :class:`StorageOperationRefused`
* a malformed answer                    -> :class:`agent.errors.CardProtocolError`
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

from agent.errors import CardError, CardProtocolError


class KeyType(enum.Enum):
    """The two sector keys; the value is the authentication command code (§1.4)."""

    A = 0x60
    B = 0x61


ValueOp = Literal["increment", "decrement", "restore"]

BLOCK_SIZE = 16
KEY_SIZE = 6


class StorageOperationRefused(CardError):
    """The card refused a storage operation (NAK, access conditions, not a value block)."""

    def __init__(self, operation: str, block: int, reason: str, code: int | None = None) -> None:
        super().__init__(f"card refused {operation} of block {block}: {reason}")
        self.operation = operation
        self.block = block
        self.reason = reason
        self.code = code


class AuthenticationFailed(StorageOperationRefused):
    """The sector key was refused (wrong key, or a sector the card does not have)."""


@runtime_checkable
class StorageCardReader(Protocol):
    """MIFARE Classic operations on the activated card.

    After a refused operation or a failed authentication the card is idle; the next
    :meth:`authenticate` re-activates it if the reader needs to.
    """

    def load_key(self, slot: int, key: bytes) -> None:
        """Put a 6-byte key into the reader's volatile key slot ``slot``."""
        ...

    def authenticate(self, block: int, key_type: KeyType, slot: int) -> None:
        """Three-pass authentication for ``block``'s sector with the key in ``slot``."""
        ...

    def read_block(self, block: int) -> bytes:
        """16 bytes (a trailer reads with its keys blanked)."""
        ...

    def write_block(self, block: int, data: bytes) -> None: ...

    def increment(self, block: int, value: int) -> None:
        """Load the transfer buffer with ``block`` + value (nothing is written yet)."""
        ...

    def decrement(self, block: int, value: int) -> None:
        """Load the transfer buffer with ``block`` − value (nothing is written yet)."""
        ...

    def restore(self, block: int) -> None:
        """Load the transfer buffer with ``block``'s value."""
        ...

    def transfer(self, block: int) -> None:
        """Program the transfer buffer into ``block`` (the EEPROM write)."""
        ...

    def value_transfer(self, op: ValueOp, block: int, value: int, dest: int) -> None:
        """One value operation followed by TRANSFER into ``dest``.

        ACS readers can only do this combined (``FF D7``): inc/dec with ``dest == block``, or
        restore into another block of the same sector.
        """
        ...


# --- PC/SC Part 3 + ACS pseudo-APDUs (§4a.1), pure --------------------------------------------


def _block_number(block: int) -> int:
    if not 0 <= block <= 0xFF:
        raise ValueError(f"block {block} out of range 0..255")
    return block


def get_uid_apdu() -> bytes:
    """``FF CA 00 00 00`` → UID ‖ 9000."""
    return bytes.fromhex("FFCA000000")


def load_key_apdu(slot: int, key: bytes, structure: int = 0x00) -> bytes:
    """``FF 82 P1 P2 06 key``: P1 key structure (00 = volatile), P2 key number."""
    if len(key) != KEY_SIZE:
        raise ValueError("a MIFARE key is 6 bytes")
    if not 0 <= slot <= 0xFF or not 0 <= structure <= 0xFF:
        raise ValueError("key slot and structure are one byte each")
    return bytes((0xFF, 0x82, structure, slot, KEY_SIZE)) + bytes(key)


def general_authenticate_apdu(block: int, key_type: KeyType, slot: int) -> bytes:
    """``FF 86 00 00 05 01 00 blk 60|61 keynum`` (version 01, address MSB 00)."""
    if not 0 <= slot <= 0xFF:
        raise ValueError("key slot is one byte")
    return bytes(
        (0xFF, 0x86, 0x00, 0x00, 0x05, 0x01, 0x00, _block_number(block), key_type.value, slot)
    )


def legacy_authenticate_apdu(block: int, key_type: KeyType, slot: int) -> bytes:
    """``FF 88 00 blk 60|61 keynum`` (the obsolete form some readers still need)."""
    if not 0 <= slot <= 0xFF:
        raise ValueError("key slot is one byte")
    return bytes((0xFF, 0x88, 0x00, _block_number(block), key_type.value, slot))


def read_binary_apdu(block: int) -> bytes:
    """``FF B0 00 blk 10``."""
    return bytes((0xFF, 0xB0, 0x00, _block_number(block), BLOCK_SIZE))


def update_binary_apdu(block: int, data: bytes) -> bytes:
    """``FF D6 00 blk 10 data16``."""
    if len(data) != BLOCK_SIZE:
        raise ValueError("UPDATE BINARY writes one 16-byte block")
    return bytes((0xFF, 0xD6, 0x00, _block_number(block), BLOCK_SIZE)) + bytes(data)


VB_STORE, VB_INCREMENT, VB_DECREMENT = 0x00, 0x01, 0x02


def value_block_apdu(block: int, vb_op: int, value: int) -> bytes:
    """ACS ``FF D7 00 blk 05 VB_OP value(4, MSB first)``: 00 store, 01 increment, 02 decrement.

    Increment/decrement store the result back into ``block`` (§4a.1, [M]).
    """
    if vb_op not in (VB_STORE, VB_INCREMENT, VB_DECREMENT):
        raise ValueError(f"unknown VB_OP {vb_op:#x}")
    if vb_op == VB_STORE:
        encoded = value.to_bytes(4, "big", signed=True)
    else:
        if not 0 <= value <= 0x7FFFFFFF:
            raise ValueError(f"operand {value} out of range")
        encoded = value.to_bytes(4, "big")
    return bytes((0xFF, 0xD7, 0x00, _block_number(block), 0x05, vb_op)) + encoded


def read_value_apdu(block: int) -> bytes:
    """ACS ``FF B1 00 blk 04`` → value (4, MSB first) ‖ 9000."""
    return bytes((0xFF, 0xB1, 0x00, _block_number(block), 0x04))


def restore_value_apdu(source: int, dest: int) -> bytes:
    """ACS ``FF D7 00 src 02 03 dst``: RESTORE src + TRANSFER dst (same sector)."""
    return bytes((0xFF, 0xD7, 0x00, _block_number(source), 0x02, 0x03, _block_number(dest)))


def split_response(response: bytes, operation: str) -> tuple[bytes, int]:
    """(data, SW) of a pseudo-APDU answer; fewer than 2 bytes is a protocol error."""
    if len(response) < 2:
        raise CardProtocolError(f"{operation}: answer of {len(response)} bytes has no status word")
    return bytes(response[:-2]), int.from_bytes(response[-2:], "big")


def check_status(response: bytes, operation: str, block: int, *, length: int = 0) -> bytes:
    """The data of a ``90 00`` answer of ``length`` bytes; a refusal raises."""
    data, sw = split_response(response, operation)
    if sw != 0x9000:
        exc_type = AuthenticationFailed if operation == "authenticate" else StorageOperationRefused
        raise exc_type(operation, block, f"SW {sw:04X} ({_PCSC_SW.get(sw, 'unknown')})", sw)
    if len(data) != length:
        raise CardProtocolError(f"{operation} of block {block}: {len(data)} bytes, not {length}")
    return data


def parse_read_value(response: bytes, block: int) -> int:
    return int.from_bytes(check_status(response, "read value", block, length=4), "big", signed=True)


_PCSC_SW = {
    0x6300: "operation failed",
    0x6A81: "function not supported",
    0x6282: "end of data before Le",
    0x6700: "wrong length",
    0x6982: "security status not satisfied",
    0x6983: "wrong authentication version",
    0x6986: "command not allowed / wrong key type",
    0x6988: "wrong key number",
    0x6581: "memory failure",
    0x6A82: "invalid block",
    0x6B00: "wrong P1/P2",
}


class PseudoApduStorage:
    """:class:`StorageCardReader` over a PC/SC ``transmit`` (ACS-style reader firmware).

    The card's separate value operations cannot be sent one by one through ``FF D7``: a
    DECREMENT/INCREMENT/RESTORE is held until the TRANSFER that follows and the pair is sent as
    one combined command. Pairs that ``FF D7`` cannot express (inc/dec into another block)
    are refused before anything reaches the card.
    """

    def __init__(self, transmit: Callable[[bytes], bytes], *, legacy_auth: bool = False) -> None:
        self._transmit = transmit
        self.legacy_auth = legacy_auth
        self._pending: tuple[ValueOp, int, int] | None = None

    def load_key(self, slot: int, key: bytes) -> None:
        check_status(self._transmit(load_key_apdu(slot, key)), "load key", -1)

    def authenticate(self, block: int, key_type: KeyType, slot: int) -> None:
        self._pending = None
        build = legacy_authenticate_apdu if self.legacy_auth else general_authenticate_apdu
        check_status(self._transmit(build(block, key_type, slot)), "authenticate", block)

    def read_block(self, block: int) -> bytes:
        return check_status(
            self._transmit(read_binary_apdu(block)), "read", block, length=BLOCK_SIZE
        )

    def write_block(self, block: int, data: bytes) -> None:
        check_status(self._transmit(update_binary_apdu(block, data)), "write", block)

    def increment(self, block: int, value: int) -> None:
        self._pending = ("increment", block, value)

    def decrement(self, block: int, value: int) -> None:
        self._pending = ("decrement", block, value)

    def restore(self, block: int) -> None:
        self._pending = ("restore", block, 0)

    def transfer(self, block: int) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            raise StorageOperationRefused(
                "transfer", block, "FF D7 readers cannot transfer without a value operation"
            )
        op, source, value = pending
        self.value_transfer(op, source, value, block)

    def value_transfer(self, op: ValueOp, block: int, value: int, dest: int) -> None:
        if op == "restore":
            apdu = restore_value_apdu(block, dest)
        elif dest != block:
            raise StorageOperationRefused(
                op, block, f"FF D7 cannot {op} block {block} into block {dest}"
            )
        else:
            apdu = value_block_apdu(
                block, VB_INCREMENT if op == "increment" else VB_DECREMENT, value
            )
        check_status(self._transmit(apdu), op, block)

    def read_value(self, block: int) -> int:
        """ACS ``FF B1``: the value of a value block."""
        return parse_read_value(self._transmit(read_value_apdu(block)), block)
