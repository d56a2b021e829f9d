"""The host's key-store seam: load MAC1 check, MAC2 and the load TAC without handing out keys.

The load host holds the load master key (MLK) and the TAC master (MTK) (cpu-purse.md §5.5,
§6.4). Callers never see a key: they ask the store for the MAC over the data they built, under
the card's session key (diversified from the master by the card's factors, §5.4, §5.6), and the
store answers four bytes.

:class:`SoftwareKeyStore` computes in process from a :class:`KeySet` (tests, the demo);
:class:`clearinghost.keystore_pkcs11.Pkcs11KeyStore` (SoftHSM2 in CI, an HSM in production)
answers the same calls with the masters inside a PKCS#11 token.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from agent import crypto
from agent.crypto import Algorithm
from agent.sam.keys import KeySet, MasterKey

# TEST KEYS ONLY (never real): load masters of the kiosk tests and the demo.
TEST_LOAD_MASTER_3DES = bytes.fromhex("A0A1A2A3A4A5A6A7A8A9AAABACADAEAF")  # TEST KEY
TEST_LOAD_MASTER_SM4 = bytes.fromhex("B0B1B2B3B4B5B6B7B8B9BABBBCBDBEBF")  # TEST KEY


class KeyStoreError(Exception):
    """The key store cannot answer (no such master, token failure): names the key asked for."""


@dataclass(frozen=True, slots=True)
class CardKeyRef:
    """Which card key: usage, index, algorithm, and the card's factors (card level first)."""

    usage: str
    index: int
    algorithm: Algorithm
    factors: tuple[bytes, ...]


class KeyStore(Protocol):
    def load_mac1_ok(
        self, ref: CardKeyRef, random4: bytes, counter: int, mac1: bytes, data: bytes
    ) -> bool:
        """Is ``mac1`` the card's load MAC1 over ``data`` (§5.7)?"""
        ...

    def load_mac2(self, ref: CardKeyRef, random4: bytes, counter: int, data: bytes) -> bytes:
        """MAC2 over ``data`` under SESLK (§5.7)."""
        ...

    def load_tac(
        self,
        factors: Sequence[bytes],
        new_balance: int,
        counter: int,
        amount: int,
        terminal6: bytes,
        datetime7: bytes,
        algorithm: Algorithm,
    ) -> bytes:
        """The card's load TAC (§5.7, L-confidence layout)."""
        ...


class SoftwareKeyStore:
    """Masters in process memory (test keys only)."""

    def __init__(
        self,
        keyset: KeySet,
        *,
        apdu_order_card_first: bool = True,
        sm4_load_session_key: str = "pad80",
    ) -> None:
        self.keyset = keyset
        self.order = apdu_order_card_first
        self.sm4_variant = sm4_load_session_key

    def _master(self, usage: str, index: int | None, algorithm: Algorithm) -> MasterKey:
        candidates = [
            k for k in self.keyset.of_usage(usage, algorithm) if index is None or k.index == index
        ]
        if not candidates and usage == "tac":
            candidates = list(self.keyset.of_usage("tac"))
        if not candidates:
            raise KeyStoreError(f"key store: no {usage} master {index} for {algorithm.name}")
        return candidates[0]

    def _session(self, ref: CardKeyRef, random4: bytes, counter: int) -> bytes:
        master = self._master(ref.usage, ref.index, ref.algorithm)
        return software_session(master, ref.factors, random4, counter, self.order, self.sm4_variant)

    def load_mac1_ok(
        self, ref: CardKeyRef, random4: bytes, counter: int, mac1: bytes, data: bytes
    ) -> bool:
        expected = crypto.session_mac(self._session(ref, random4, counter), data, ref.algorithm)
        return hmac.compare_digest(expected, mac1)

    def load_mac2(self, ref: CardKeyRef, random4: bytes, counter: int, data: bytes) -> bytes:
        return crypto.session_mac(self._session(ref, random4, counter), data, ref.algorithm)

    def load_tac(
        self,
        factors: Sequence[bytes],
        new_balance: int,
        counter: int,
        amount: int,
        terminal6: bytes,
        datetime7: bytes,
        algorithm: Algorithm,
    ) -> bytes:
        master = self._master("tac", None, algorithm)
        dtk = card_key(master, factors, self.order)
        if master.algorithm == Algorithm.SM4:
            return crypto.load_tac(
                dtk,
                new_balance,
                counter,
                amount,
                0x02,
                terminal6,
                datetime7,
                algorithm=Algorithm.SM4,
            )
        return software_load_tac(dtk, new_balance, counter, amount, terminal6, datetime7)


def card_key(master: MasterKey, factors: Sequence[bytes], order: bool = True) -> bytes:
    """The card's key: ``master`` diversified by its first ``levels`` factors (§5.4)."""
    if master.levels > len(factors):
        raise KeyStoreError(
            f"key store: {master.usage} master needs {master.levels} factors, got {len(factors)}"
        )
    return crypto.diversify(
        master.key, list(factors[: master.levels]), master.algorithm, apdu_order_card_first=order
    )


def software_session(
    master: MasterKey,
    factors: Sequence[bytes],
    random4: bytes,
    counter: int,
    order: bool = True,
    sm4_variant: str = "pad80",
) -> bytes:
    """SESLK of the card whose load key derives from ``master`` (§5.6; the SM4 form is the
    profile's ``crypto.sm4_load_session_key``)."""
    dlk = card_key(master, factors, order)
    return crypto.load_session_key(dlk, random4, counter, master.algorithm, sm4_variant=sm4_variant)


def software_load_tac(
    dtk: bytes, new_balance: int, counter: int, amount: int, terminal6: bytes, datetime7: bytes
) -> bytes:
    """The 3DES load TAC under ``DTK_L XOR DTK_R`` (§5.7)."""
    return crypto.load_tac(dtk, new_balance, counter, amount, 0x02, terminal6, datetime7)


def load_test_keys() -> list[MasterKey]:
    """The load masters of the tests and the demo (TEST KEYS), 2 levels like the purchase keys."""
    return [
        MasterKey("load", 1, 1, Algorithm.TDES, 2, TEST_LOAD_MASTER_3DES),
        MasterKey("load", 1, 1, Algorithm.SM4, 2, TEST_LOAD_MASTER_SM4),
    ]
