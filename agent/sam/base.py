"""The SAM seam: the PSAM operations the transaction engine needs.

Two implementations: :mod:`agent.sam.psam` speaks the PSAM APDUs of cpu-purse.md §4 over any
:class:`agent.readers.base.SamSlot`; :mod:`agent.sam.software` computes the same answers in
software from a *test* key set and is refused by production profiles.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class PurchaseMacRequest:
    """Input of INIT SAM FOR PURCHASE (80 70), cpu-purse.md §4.2.

    ``factors`` are the diversification factors as sent in the APDU: card level (ASN) first.
    """

    card_random: bytes  # 4 bytes, from INITIALIZE FOR PURCHASE
    card_counter: int  # card offline transaction sequence (CTC), 2 bytes
    amount: int  # fen
    transaction_type: int  # 0x06 purchase, 0x09 compound (CAPP) purchase
    when: dt.datetime
    key_version: int
    algorithm: int  # 0x00 3DES, 0x04 SM4
    factors: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class PurchaseMac:
    """Answer of 80 70: the PSAM's terminal transaction sequence (TTC) and MAC1."""

    ttc: int
    mac1: bytes


@runtime_checkable
class Sam(Protocol):
    """A purchase SAM. Implementations raise :class:`agent.errors.SamError` subclasses."""

    @property
    def terminal_number(self) -> bytes:
        """The 6-byte terminal number (PSAM EF16), sent in every INITIALIZE FOR PURCHASE."""
        ...

    @property
    def serial(self) -> str:
        """An identifier of this SAM for records (PSAM EF15 serial, hex)."""
        ...

    @property
    def purchase_key_index(self) -> int:
        """The purchase-key index to send in INITIALIZE FOR PURCHASE (PSAM EF17 byte 0)."""
        ...

    def init_for_purchase(self, request: PurchaseMacRequest) -> PurchaseMac:
        """80 70: diversify the purchase key, derive SESPK, return TTC and MAC1."""
        ...

    def credit_for_purchase(self, mac2: bytes) -> None:
        """80 72: verify the card's MAC2 under the last SESPK; raise SamStatusError if wrong."""
        ...

    def verify_security_code(self, code: bytes) -> None:
        """80 CA (CJ/T 166): check the card's 9-byte security identification code (§4.5)."""
        ...

    def cipher_init(self, p1: int, p2: int, factors: Sequence[bytes]) -> None:
        """80 1A: derive a temporary key from the master (P1 key usage, P2 index) by factors."""
        ...

    def cipher_mac(self, data: bytes) -> bytes:
        """80 FA 05 00: MAC of ``data`` (first 8 bytes = IV) under the temporary key."""
        ...

    def calculate_m1_keys(self, data: bytes, *, p1: int = 0x01, p2: int = 0x01) -> bytes:
        """80 FC: MIFARE Classic sector keys, 6 bytes per sector id in ``data`` (M1 spec §3.3)."""
        ...

    def close(self) -> None: ...
